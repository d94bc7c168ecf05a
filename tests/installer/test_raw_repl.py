"""The raw-REPL transport against a real MicroPython interpreter on a pty, and broken ports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from terminal.config import valid_device_id, validate

from fleet.firmware_bundle import build_bundle
from installer.raw_repl import (
    ExecTimeout,
    InvalidConfig,
    NoAnswer,
    NoSuchPort,
    NotMicroPython,
    PortPermission,
    RawRepl,
    RemoteError,
    connect,
    device_id_from_unique_id,
)
from tests.services.micropython import micropython_command

if TYPE_CHECKING:
    # Only for annotations: importing it at run time would defeat the plugin's assert rewrite.
    from tests.installer.pty_board import PtyBoard

pytest_plugins = ["tests.installer.pty_board"]
pytestmark = pytest.mark.micropython

REPO = Path(__file__).resolve().parents[2]


def open_board(board: PtyBoard) -> RawRepl:
    # No pause between writes: a pty has no small UART receive buffer to overrun.
    return RawRepl(board.port, root=board.root, write_pause=0, timeout=5)


def test_exec_round_trip(pty_board: PtyBoard) -> None:
    with open_board(pty_board) as repl:
        assert repl.exec("print(6 * 7)") == b"42\n"
        # Globals live until a soft reset, as on a board.
        repl.exec("x = 'kept'")
        assert repl.exec("print(x)") == b"kept\n"
        repl.soft_reset()
        with pytest.raises(RemoteError, match="NameError"):
            repl.exec("print(x)")
        # The interpreter really is MicroPython.
        assert repl.exec("import sys; print(sys.implementation.name)") == b"micropython\n"


def test_remote_exception_carries_the_traceback(pty_board: PtyBoard) -> None:
    with open_board(pty_board) as repl:
        with pytest.raises(RemoteError) as caught:
            repl.exec("def f():\n    raise ValueError('bad pin')\nf()\n")
        assert "Traceback (most recent call last)" in caught.value.traceback
        assert 'File "<stdin>", line 2, in f' in caught.value.traceback
        assert str(caught.value) == "the board raised ValueError: bad pin"
        # The emulator's own frame is not in it, as on a board.
        assert "mp_raw_repl_board" not in caught.value.traceback
        # The connection is still usable after an error.
        assert repl.exec("print('still here')") == b"still here\n"


def test_exec_timeout_is_bounded_and_recoverable(pty_board: PtyBoard) -> None:
    with open_board(pty_board) as repl:
        start = time.monotonic()
        with pytest.raises(ExecTimeout, match=r"did not finish within 0\.3 s"):
            repl.exec("import time\ntime.sleep(1)\n", timeout=0.3)
        assert time.monotonic() - start < 5
        # Interrupted and back in the raw REPL: the next command works.
        assert repl.exec("print('after')") == b"after\n"


def test_put_file_and_sha256(pty_board: PtyBoard) -> None:
    data = os.urandom(5000)  # several chunks, every byte value
    with open_board(pty_board) as repl:
        assert not repl.file_exists("/data/blob.bin")
        assert repl.sha256("/data/blob.bin") is None
        repl.put_file("/data/blob.bin", data)
        assert repl.file_exists("/data/blob.bin")
        assert repl.sha256("/data/blob.bin") == hashlib.sha256(data).hexdigest()
        assert repl.read_file("/data/blob.bin") == data
        repl.put_file("/data/blob.bin", b"")  # overwriting works, and so do empty files
        assert repl.sha256("/data/blob.bin") == hashlib.sha256(b"").hexdigest()
    assert (pty_board.flash_dir / "data" / "blob.bin").read_bytes() == b""
    assert not (pty_board.flash_dir / "data" / "blob.bin.tmp").exists()


def test_copy_bundle_is_verified_and_idempotent(pty_board: PtyBoard, tmp_path: Path) -> None:
    manifest = build_bundle(tmp_path / "bundle")
    with open_board(pty_board) as repl:
        first = repl.copy_bundle(tmp_path / "bundle")
        assert sorted(first.copied) == sorted([*manifest.files, "manifest.json"])
        assert first.skipped == []
        assert first.copied[-1] == "manifest.json"  # last: it vouches for the rest
        second = repl.copy_bundle(tmp_path / "bundle")
        assert second.copied == []
        assert sorted(second.skipped) == sorted(first.copied)
        # One file damaged on the device: only that one is copied again.
        repl.put_file("/lib/terminal/app.mpy", b"broken")
        third = repl.copy_bundle(tmp_path / "bundle")
        assert third.copied == ["lib/terminal/app.mpy"]
    for path, entry in manifest.files.items():
        on_flash = (pty_board.flash_dir / path).read_bytes()
        assert hashlib.sha256(on_flash).hexdigest() == entry.sha256, path
    assert ((pty_board.flash_dir / "manifest.json").read_bytes()
            == (tmp_path / "bundle" / "manifest.json").read_bytes())


def test_write_config_round_trip(pty_board: PtyBoard) -> None:
    config = {"device_id": device_id_from_unique_id(pty_board.unique_id),
              "mqtt": {"host": "broker.example", "port": 8883, "user": "u",
                       "password": "p\u00e4ss \"quoted\""},
              "wifi": {"ssid": "Caf\u00e9", "password": "w"}}
    with open_board(pty_board) as repl:
        repl.write_config(config)
        # Read back and parsed by MicroPython's own json, on the board.
        path = repl.device_path("/config.json")
        text = repl.exec(f"import json\nprint(json.dumps(json.load(open({path!r}))))")
    assert validate(json.loads(text)) == validate(config)
    assert json.loads((pty_board.flash_dir / "config.json").read_text()) == config
    assert not (pty_board.flash_dir / "config.json.tmp").exists()


def test_write_config_refuses_an_invalid_config(pty_board: PtyBoard) -> None:
    with open_board(pty_board) as repl:
        with pytest.raises(InvalidConfig, match="device_id"):
            repl.write_config({"device_id": "nope", "mqtt": {}})
        assert not repl.file_exists("/config.json")


def test_read_unique_id(pty_board: PtyBoard) -> None:
    with open_board(pty_board) as repl:
        assert repl.read_unique_id() == pty_board.unique_id
        device_id = repl.device_id()
    assert device_id == "pt-" + pty_board.unique_id.hex()
    assert valid_device_id(device_id)


def test_each_board_has_its_own_identity(
        pty_board: PtyBoard, pty_board_factory: Callable[[bytes], PtyBoard]) -> None:
    other = pty_board_factory(bytes.fromhex("a1b2c3d4e5f6"))
    with connect(other.port, root=other.root, write_pause=0) as repl:
        assert repl.device_id() == "pt-a1b2c3d4e5f6"
        repl.put_file("/only-here", b"x")
    with open_board(pty_board) as repl:
        assert repl.device_id() == "pt-" + pty_board.unique_id.hex()
        assert not repl.file_exists("/only-here")


def test_reconnecting_interrupts_and_reenters(pty_board: PtyBoard) -> None:
    with open_board(pty_board) as repl:
        repl.exec("y = 1")
    # A second connection finds the board in its friendly REPL and takes it back.
    with open_board(pty_board) as repl:
        assert repl.exec("print(y)") == b"1\n"


def test_device_id_needs_six_bytes() -> None:
    assert device_id_from_unique_id(bytes.fromhex("24a160aabbcc")) == "pt-24a160aabbcc"
    assert device_id_from_unique_id(bytes(range(8))) == "pt-020304050607"
    with pytest.raises(Exception, match="shorter than 6 bytes"):
        device_id_from_unique_id(b"\x01\x02")


# -- ports that are not a working board ---------------------------------------------------------
def test_no_such_port(tmp_path: Path) -> None:
    port = str(tmp_path / "ttyUSB9")
    with pytest.raises(NoSuchPort) as caught:
        RawRepl(port, timeout=0.5)
    message = str(caught.value)
    assert message.startswith(f"no such port {port}: is the board plugged in?")
    assert "\n" not in message


def test_garbage_port_is_not_micropython(garbage_port: str) -> None:
    start = time.monotonic()
    with pytest.raises(NotMicroPython) as caught:
        RawRepl(garbage_port, timeout=0.5)
    assert time.monotonic() - start < 5
    assert "not like MicroPython" in str(caught.value)
    assert "palaute flash" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_silent_port_is_no_answer(silent_port: str) -> None:
    start = time.monotonic()
    with pytest.raises(NoAnswer) as caught:
        RawRepl(silent_port, timeout=0.5)
    assert time.monotonic() - start < 5
    assert str(caught.value).startswith(f"nothing answers on {silent_port}")
    assert "\n" not in str(caught.value)


_OPEN_AS_USER = """
import sys
from installer.raw_repl import InstallerError, RawRepl
try:
    RawRepl(sys.argv[1], timeout=0.5)
except InstallerError as exc:
    print(type(exc).__name__, exc, sep=": ")
"""


def test_permission_denied(tmp_path: Path) -> None:
    # A real open() that the kernel refuses; no part of pyserial is faked.  root opens a
    # mode-000 file anyway (CAP_DAC_OVERRIDE), so as root the open runs in a child process
    # started by setpriv with every capability dropped: root then obeys the file mode.
    port = tmp_path / "ttyUSB0"
    port.write_bytes(b"")
    port.chmod(0o000)
    try:
        if os.geteuid() != 0:
            with pytest.raises(PortPermission) as caught:
                RawRepl(str(port), timeout=0.5)
            out = f"PortPermission: {caught.value}"
        else:
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root without setpriv (util-linux): cannot be denied")
            proc = subprocess.run(
                [setpriv, "--inh-caps=-all", "--bounding-set=-all",
                 sys.executable, "-c", _OPEN_AS_USER, str(port)],
                cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "PYTHONPATH": str(REPO)})
            assert proc.returncode == 0, proc.stderr
            out = proc.stdout.strip()
    finally:
        port.chmod(0o600)
    assert out == (f"PortPermission: permission denied on {port}: add yourself to the dialout "
                   "group (`sudo usermod -aG dialout $USER`), then log in again")


def test_micropython_is_the_interpreter() -> None:
    # The fixture must run the real unix port, not CPython.
    assert Path(micropython_command()[0]).name == "micropython"
