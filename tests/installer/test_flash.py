"""``palaute flash``: image checks, the chip table, and esptool driven against ports where no
bootloader answers (there is no ESP chip on the test machine; docs/installer.md describes the
check with a real board).

The images are built by esptool's own image writer (``BOOTLOADER_IMAGE().save()``) and laid
out like MicroPython's merged ``.bin`` (bootloader, partition table at 0x8000, application), so
the header layout the installer reads is the one esptool writes.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from esptool.bin_image import ELFSection
from esptool.logger import EspLog
from esptool.logger import log as esptool_log
from esptool.targets import CHIP_DEFS

from fleet.cli import main
from installer.flash import (
    BOOTLOADER_HINT,
    NoBootloader,
    flash,
    mac_text,
)
from installer.flash_image import (
    DOWNLOAD_HINT,
    ChipMismatch,
    ImageError,
    check_image_chip,
    chip_by_name,
    chips,
    read_image,
)
from installer.flash_output import ProgressBar, esptool_output
from installer.raw_repl import NoSuchPort, device_id_from_unique_id

pytest_plugins = ["tests.installer.pty_board"]

REPO = Path(__file__).resolve().parents[2]
# Where each chip runs code from internal RAM; any address esptool does not treat as flash.
IRAM = {"esp32": 0x40080000, "esp32s3": 0x40370000, "esp32c3": 0x40380000}


def merged_image(chip: str, *, partition_table: bool = True, app_size: int = 4096) -> bytes:
    """A file laid out like MicroPython's firmware .bin for ``chip`` (written at the chip's
    bootloader offset): a bootloader image made by esptool, the partition table at flash
    address 0x8000, an application at 0x10000."""
    loader = CHIP_DEFS[chip]
    bootloader = loader.BOOTLOADER_IMAGE()
    bootloader.entrypoint = IRAM[chip]
    bootloader.segments = [ELFSection(b".iram0.text", IRAM[chip], os.urandom(256), flags=0)]
    data = bytearray(bootloader.save(None))
    offset = loader.BOOTLOADER_FLASH_OFFSET
    data += b"\xff" * (0x8000 - offset - len(data))
    if partition_table:
        # One entry: magic, type app, subtype factory, offset 0x10000, size 1 MiB, "factory".
        data += (b"\xaa\x50\x00\x00" + (0x10000).to_bytes(4, "little")
                 + (0x100000).to_bytes(4, "little") + b"factory".ljust(16, b"\0")
                 + b"\0" * 4)
    data += b"\xff" * (0x10000 - offset - len(data))
    return bytes(data + os.urandom(app_size))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["flash", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the chip table ---------------------------------------------------------------------------
def test_offsets_and_chip_ids() -> None:
    # Where MicroPython's download page writes each chip's .bin, and the chip id the ROM checks.
    table = {key: (chip.name, chip.image_chip_id, chip.offset) for key, chip in chips().items()}
    assert table == {"esp32": ("ESP32", 0x0000, 0x1000), "esp32s3": ("ESP32-S3", 0x0009, 0x0)}
    assert chip_by_name("ESP32-S3") is chips()["esp32s3"]
    assert chip_by_name("ESP32-C3") is None


def test_device_id_rule_is_the_raw_repl_one() -> None:
    mac = bytes.fromhex("246f28aabbcc")
    assert mac_text(mac) == "24:6f:28:aa:bb:cc"
    assert device_id_from_unique_id(mac) == "pt-246f28aabbcc"


# -- image checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("chip", ["esp32", "esp32s3"])
def test_image_for_a_supported_chip(tmp_path: Path, chip: str) -> None:
    data = merged_image(chip)
    image = read_image(write(tmp_path, "fw.bin", data))
    assert image.chip is chips()[chip]
    assert image.chip_name == CHIP_DEFS[chip].CHIP_NAME
    assert image.data == data
    check_image_chip(image, chips()[chip], where="the board is an")  # no error


def test_image_for_the_other_chip_is_refused(tmp_path: Path) -> None:
    image = read_image(write(tmp_path, "ESP32_GENERIC_S3.bin", merged_image("esp32s3")))
    with pytest.raises(ChipMismatch) as caught:
        check_image_chip(image, chips()["esp32"], where="the board is an")
    assert str(caught.value) == ("ESP32_GENERIC_S3.bin is built for ESP32-S3, but the board is "
                                 f"an ESP32: use the MicroPython image for ESP32; {DOWNLOAD_HINT}")


def test_image_for_an_unsupported_chip_names_it(tmp_path: Path) -> None:
    image = read_image(write(tmp_path, "c3.bin", merged_image("esp32c3")))
    assert image.chip is None
    assert image.chip_name == "ESP32-C3"
    with pytest.raises(ChipMismatch, match="built for ESP32-C3, but the board is an ESP32-S3"):
        check_image_chip(image, chips()["esp32s3"], where="the board is an")


@pytest.mark.parametrize(("content", "why"), [
    (b"", "empty"),
    (b"\xe9\x03\x02", "shorter than the header"),
    (b"UF2\n" + b"\0" * 508, "a UF2 file"),
    (b"\x7fELF" + b"\0" * 60, "an ELF file"),
    (b"PK\x03\x04" + b"\0" * 60, "a zip file"),
])
def test_not_an_esp_image(tmp_path: Path, content: bytes, why: str) -> None:
    path = write(tmp_path, "firmware.bin", content)
    with pytest.raises(ImageError) as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path} is not an ESP firmware image"), why
    assert "\n" not in str(caught.value)


def test_application_image_without_partition_table(tmp_path: Path) -> None:
    path = write(tmp_path, "micropython.bin", merged_image("esp32", partition_table=False))
    with pytest.raises(ImageError, match=r"application image without bootloader and "
                                         r"partition table \(none at 0x8000\)"):
        read_image(path)


def test_missing_image_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as caught:
        read_image(tmp_path / "nope.bin")
    assert str(caught.value) == f"image {tmp_path / 'nope.bin'} not found: {DOWNLOAD_HINT}"
    with pytest.raises(ImageError, match=f"cannot read image {tmp_path}: Is a directory"):
        read_image(tmp_path)


# -- progress and esptool's output ------------------------------------------------------------
def test_progress_bar_off_a_terminal_prints_every_tenth() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, "writing")
    for done in range(0, 1_000_001, 16_384):
        bar.update(done, 1_000_000)
    bar.update(1_000_000, 1_000_000)
    lines = out.getvalue().splitlines()
    # One line when each tenth is first reached (the updates come in 16 KiB steps).
    percents = [int(line.split("]")[1].split("%")[0]) for line in lines]
    assert [p // 10 for p in percents] == list(range(11))
    assert percents[0] == 0
    assert lines[-1] == f"writing [{'#' * 30}] 100%  976/976 KiB"
    assert lines[5].startswith(f"writing [{'#' * 15}{'.' * 15}]  5")


def test_esptool_progress_and_narration_are_routed_then_restored(
        caplog: pytest.LogCaptureFixture) -> None:
    # esptool's own logger API, as write_flash uses it, drives our bar; its chatter goes to
    # the debug log; the previous logger is back afterwards.
    before = EspLog.instance
    out = io.StringIO()
    with caplog.at_level("DEBUG", logger="palaute.flash"), esptool_output(out):
        esptool_log.print("Connecting", end="")
        esptool_log.print(".", end="")
        esptool_log.print("")
        esptool_log.warn("Chip was NOT reset.")
        esptool_log.error("Error when read chip_info")
        with esptool_log.progress(total=2048, unit="B") as progress:
            progress.update(advance=1024, description="Writing at 0x00001400")
            progress.update(advance=1024, description="Writing at 0x00001800")
    assert EspLog.instance is before
    assert out.getvalue().splitlines() == [
        f"writing [{'#' * 15}{'.' * 15}]  50%  1/2 KiB", f"writing [{'#' * 30}] 100%  2/2 KiB"]
    assert [r.getMessage() for r in caplog.records] == [
        "esptool: Connecting.", "esptool: warning: Chip was NOT reset.",
        "esptool: error: Error when read chip_info"]


def test_esptool_reset_warning_on_a_pty_goes_to_the_debug_log(
        silent_port: str, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A pty has no RTS/DTR lines: esptool's reset warns once per process, through a callback
    # it bound at import time; inside esptool_output that warning is ours too.
    import serial
    from esptool.reset import ClassicReset, ResetStrategy

    port = serial.Serial(silent_port)
    ResetStrategy.print_once.already_printed = False
    try:
        with caplog.at_level("DEBUG", logger="palaute.flash"), esptool_output(io.StringIO()):
            ClassicReset(port)()
    finally:
        port.close()
    assert [r.getMessage()[:38] for r in caplog.records] == [
        "esptool: warning: Chip was NOT reset. "]
    assert capsys.readouterr() == ("", "")


# -- esptool against ports where no bootloader answers --------------------------------------------
def test_silent_port_no_bootloader_answers(silent_port: str, tmp_path: Path) -> None:
    image = write(tmp_path, "fw.bin", merged_image("esp32"))
    start = time.monotonic()
    with pytest.raises(NoBootloader) as caught:
        flash(silent_port, image, connect_attempts=1, out=io.StringIO())
    elapsed = time.monotonic() - start
    assert str(caught.value) == (f"no bootloader answers on {silent_port} (No serial data "
                                 f"received): {BOOTLOADER_HINT}")
    assert elapsed < 10, elapsed


def test_connect_attempts_reach_esptool(silent_port: str, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    # esptool prints a dot per failed sync, a fixed number per attempt: three attempts make
    # three times the dots of one, and fail the same way.
    image = write(tmp_path, "fw.bin", merged_image("esp32s3"))
    dots = {}
    for attempts in (1, 3):
        caplog.clear()
        with caplog.at_level("DEBUG", logger="palaute.flash"), pytest.raises(NoBootloader):
            flash(silent_port, image, chip="esp32s3", connect_attempts=attempts,
                  out=io.StringIO())
        lines = [r.getMessage().removeprefix("esptool: ") for r in caplog.records]
        assert "Connecting..." in lines
        dots[attempts] = sum(len(line) for line in lines if line and set(line) == {"."})
    assert dots[1] > 0
    assert dots[3] == 3 * dots[1], dots


def test_garbage_port_no_bootloader_answers(garbage_port: str, tmp_path: Path) -> None:
    image = write(tmp_path, "fw.bin", merged_image("esp32"))
    with pytest.raises(NoBootloader) as caught:
        flash(garbage_port, image, connect_attempts=1, out=io.StringIO())
    message = str(caught.value)
    assert message.startswith(f"no bootloader answers on {garbage_port} (Invalid head of "
                              "packet")
    assert message.endswith(BOOTLOADER_HINT)
    assert "\n" not in message


def test_image_is_checked_before_the_port(tmp_path: Path) -> None:
    # A bad image fails without touching the (here: missing) port.
    with pytest.raises(ImageError):
        flash(str(tmp_path / "ttyUSB9"), tmp_path / "missing.bin", out=io.StringIO())
    image = write(tmp_path, "fw.bin", merged_image("esp32s3"))
    with pytest.raises(ChipMismatch, match="built for ESP32-S3, but --chip asks for an ESP32"):
        flash(str(tmp_path / "ttyUSB9"), image, chip="esp32", out=io.StringIO())
    with pytest.raises(NoSuchPort):
        flash(str(tmp_path / "ttyUSB9"), image, chip="esp32s3", out=io.StringIO())
    with pytest.raises(ChipMismatch, match="--chip esp8266 is not supported"):
        flash(str(tmp_path / "ttyUSB9"), image, chip="esp8266", out=io.StringIO())


# -- the command ----------------------------------------------------------------------------
def test_cli_no_bootloader(silent_port: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    image = write(tmp_path, "ESP32_GENERIC.bin", merged_image("esp32"))
    code, out, err = run_cli(capsys, "--port", silent_port, "--image", str(image),
                             "--connect-attempts", "1")
    assert code == 2
    assert err == (f"palaute flash: no bootloader answers on {silent_port} (No serial data "
                   f"received): {BOOTLOADER_HINT}\n")
    assert out.splitlines()[0].startswith("image      ESP32_GENERIC.bin: ")
    assert out.splitlines()[0].endswith(" bytes for ESP32")


@pytest.mark.parametrize(("make", "args", "message"), [
    (None, (), "image {tmp}/fw.bin not found: " + DOWNLOAD_HINT),
    (b"hello", (), "{tmp}/fw.bin is not an ESP firmware image"),
    ("esp32s3", ("--chip", "esp32"),
     "fw.bin is built for ESP32-S3, but --chip asks for an ESP32: use the MicroPython image "
     "for ESP32"),
    ("esp32", ("--port", "{tmp}/ttyUSB7"),
     "no such port {tmp}/ttyUSB7: is the board plugged in? `palaute flash --list` lists the "
     "serial ports"),
])
def test_cli_errors_one_line_and_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], make: bytes | str | None,
        args: tuple[str, ...], message: str) -> None:
    image = tmp_path / "fw.bin"
    if isinstance(make, bytes):
        image.write_bytes(make)
    elif isinstance(make, str):
        image.write_bytes(merged_image(make))
    argv = [a.format(tmp=tmp_path) for a in args]
    if "--port" not in argv:
        argv += ["--port", str(tmp_path / "ttyUSB0")]
    code, _out, err = run_cli(capsys, "--image", str(image), *argv)
    assert code == 2
    assert err.startswith("palaute flash: " + message.format(tmp=tmp_path)), err
    assert err.count("\n") == 1


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_cli(capsys, "--port", "/dev/ttyUSB0")
    assert (code, err) == (2, "palaute flash: give --port and --image (or --list to see the "
                              "serial ports)\n")
    for bad in (["--chip", "esp8266"], ["--baud", "fast"], ["--connect-attempts", "0"]):
        with pytest.raises(SystemExit) as caught:
            main(["flash", "--port", "p", "--image", "i", *bad])
        assert caught.value.code == 2
        assert "palaute flash: error: argument" in capsys.readouterr().err


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    from serial.tools.list_ports import comports

    code, out, _err = run_cli(capsys, "--list")
    assert code == 0
    devices = [p.device for p in comports()]
    if devices:
        assert sorted(line.split()[0] for line in out.splitlines()) == sorted(devices)
    else:
        assert out.startswith("no serial ports found")


_FLASH_AS_USER = """
import sys
from fleet.cli import main
sys.exit(main(["flash", "--port", sys.argv[1], "--image", sys.argv[2]]))
"""


def test_cli_permission_denied(silent_port: str, tmp_path: Path) -> None:
    # The kernel refuses the open: the pty is mode 000 and the command runs without
    # capabilities (root would otherwise open it anyway), as in the raw-REPL test.
    image = write(tmp_path, "fw.bin", merged_image("esp32"))
    mode = os.stat(silent_port).st_mode & 0o777
    os.chmod(silent_port, 0)
    try:
        command = [sys.executable, "-c", _FLASH_AS_USER, silent_port, str(image)]
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv (util-linux): cannot be denied")
            command = [setpriv, "--inh-caps=-all", "--bounding-set=-all", *command]
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                              check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        os.chmod(silent_port, mode)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"palaute flash: permission denied on {silent_port}: add yourself "
                           "to the dialout group (`sudo usermod -aG dialout $USER`), then log "
                           "in again\n")

