"""``palaute flash``: write MicroPython onto a terminal's ESP32 with esptool's Python API.

The steps, each printed as one line with its duration:

1. check the image file (:mod:`installer.flash_image`) — before the board is touched;
2. open the port (the same one-line errors as the raw-REPL transport: no such port,
   permission denied, busy);
3. reset the board into its ROM bootloader and detect the chip (``esptool.cmds.detect_chip``);
   check it against ``--chip`` and against the chip the image is built for; read its base MAC,
   which gives the device id (``pt-`` + 12 hex, the rule :func:`device_id_from_unique_id`
   applies to ``machine.unique_id()`` — the same 6 bytes on an ESP32);
4. load esptool's flasher stub, raise the baud rate, erase the whole flash (skip with
   ``--no-erase``), write the image at the chip's bootloader offset with a progress bar;
   esptool then compares the MD5 of the written region, computed by the chip, with the
   image's (``write_flash`` raises if they differ);
5. hard-reset the board so MicroPython boots.

esptool is imported inside the functions that use it: it pulls in click and rich, which
other ``palaute`` commands do not need.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from installer.flash_image import (
    SUPPORTED_CHIPS,
    Chip,
    ChipMismatch,
    FirmwareImage,
    check_image_chip,
    chip_by_name,
    chips,
    read_image,
)
from installer.raw_repl import (
    InstallerError,
    NoAnswer,
    PortError,
    _open_port,
    device_id_from_unique_id,
)

ROM_BAUD = 115200
"""The ROM bootloader talks at this rate until esptool raises it."""
DEFAULT_BAUD = 460800
"""What MicroPython's download page uses for writing; reliable with common USB-UART chips."""
DEFAULT_CONNECT_ATTEMPTS = 7
"""esptool's own default: each attempt resets the board and tries to sync for ~0.5-1 s."""
BOOTLOADER_HINT = ("hold BOOT, press RESET, release BOOT, retry; check the cable (some are "
                   "charge-only)")


class NoBootloader(InstallerError):
    """Nothing answers like an ESP ROM bootloader on the port."""


class UnsupportedChip(InstallerError):
    """A bootloader answers, but for a chip (or mode) Palaute cannot flash."""


class FlashFailed(InstallerError):
    """Erasing, writing or verifying failed after the chip was reached."""


@dataclass(frozen=True)
class FlashResult:
    """What :func:`flash` did."""

    port: str
    chip: Chip
    description: str
    """esptool's chip description, e.g. ``ESP32-D0WD-V3 (revision v3.1)``."""
    mac: bytes
    device_id: str
    offset: int
    size: int
    seconds: float


def mac_text(mac: bytes) -> str:
    """``24:6f:28:aa:bb:cc``."""
    return ":".join(f"{byte:02x}" for byte in mac)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class _Steps:
    """Prints one line per step with the seconds it took."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.start = self.last = time.monotonic()

    def say(self, text: str) -> None:
        """A line announcing a step that takes a while."""
        print(text, file=self.out, flush=True)

    def done(self, label: str, detail: str) -> None:
        """A finished step: label, what came of it, how long it took."""
        now = time.monotonic()
        print(f"{label:<10} {detail}  ({now - self.last:.1f} s)", file=self.out, flush=True)
        self.last = now


def _check_port(port: str) -> None:
    """Open and close ``port`` so a missing port or a permission problem gets the installer's
    one-line message (esptool's own is several lines, with a hint in the middle)."""
    _open_port(port, ROM_BAUD, 0.05, 1.0).close()


def _connect(port: str, baud: int, attempts: int) -> Any:
    """Reset the board into its bootloader and detect the chip: an esptool ``ESPLoader``."""
    import serial
    from esptool.cmds import detect_chip
    from esptool.util import FatalError

    try:
        return detect_chip(port, min(baud, ROM_BAUD), connect_attempts=attempts)
    except FatalError as exc:
        first = _first_line(exc)
        if first.startswith("Failed to connect"):
            # "Failed to connect to ESP32: No serial data received." -> the reason.
            reason = first.split(": ", 1)[-1].rstrip(".")
            raise NoBootloader(f"no bootloader answers on {port} ({reason}): "
                               f"{BOOTLOADER_HINT}") from None
        if first.startswith("Could not open"):
            raise PortError(f"cannot open {port}: {first}") from None
        raise UnsupportedChip(f"the chip on {port} is not one this esptool knows ({first}): "
                              "Palaute terminals use ESP32 or ESP32-S3") from None
    except (serial.SerialException, OSError) as exc:
        raise NoAnswer(f"lost the connection to {port} ({exc}): is the board still plugged "
                       "in?") from None


def _detected_chip(esp: Any, port: str, wanted: str) -> Chip:
    """The supported chip esptool found, checked against ``--chip``."""
    found = chip_by_name(str(esp.CHIP_NAME))
    if found is None:
        raise UnsupportedChip(f"the board on {port} has an {esp.CHIP_NAME}; Palaute terminals "
                              "use " + " or ".join(c.name for c in chips().values()))
    if wanted != "auto" and found.key != wanted:
        raise ChipMismatch(f"the board on {port} has an {found.name}, but --chip {wanted} "
                           f"was given: use --chip {found.key} (or auto) with an image for "
                           f"{found.name}")
    if esp.secure_download_mode:
        raise UnsupportedChip(f"the {found.name} on {port} is in Secure Download Mode: its "
                              "MAC cannot be read nor its flash verified; flash it with "
                              "esptool by hand")
    return found


def flash(port: str, image_path: Path | str, *, chip: str = "auto", baud: int = DEFAULT_BAUD,
          erase: bool = True, connect_attempts: int = DEFAULT_CONNECT_ATTEMPTS,
          out: TextIO | None = None) -> FlashResult:
    """Flash the MicroPython image at ``image_path`` onto the board on ``port``.

    ``chip`` is ``auto`` or one of :data:`SUPPORTED_CHIPS`; ``connect_attempts`` bounds how
    often esptool resets the board and tries to reach its bootloader.  Progress goes to
    ``out`` (stdout by default).  Raises an :class:`InstallerError` subclass with a one-line
    message for everything an installer can act on.
    """
    import serial
    from esptool import cmds
    from esptool.util import FatalError

    from installer.flash_output import esptool_output

    out = out if out is not None else sys.stdout
    if chip != "auto" and chip not in SUPPORTED_CHIPS:
        raise ChipMismatch(f"--chip {chip} is not supported: use auto or one of "
                           + ", ".join(SUPPORTED_CHIPS))
    image: FirmwareImage = read_image(image_path)
    if chip != "auto":
        check_image_chip(image, chips()[chip], where="--chip asks for an")
    steps = _Steps(out)
    steps.say(f"image      {image.path.name}: {len(image.data):,} bytes for {image.chip_name}")
    _check_port(port)
    with esptool_output(out), _connect(port, baud, connect_attempts) as loader:
        # `with` closes the port at the end; the stub loader below shares it.
        esp = loader
        try:
            target = _detected_chip(esp, port, chip)
            check_image_chip(image, target, where="the board is an")
            mac = bytes(esp.read_mac("BASE_MAC"))
            device_id = device_id_from_unique_id(mac)
            description = str(esp.get_chip_description())
            steps.done("connected", f"{description} on {port}, MAC {mac_text(mac)}")
            esp = cmds.run_stub(esp)
            if baud > ROM_BAUD:
                esp.change_baud(baud)
            cmds.attach_flash(esp)
            if erase:
                steps.say("erasing    the whole flash (10-30 s; --no-erase skips this)")
                cmds.erase_flash(esp)
                steps.done("erased", "flash")
            cmds.write_flash(esp, [(target.offset, image.data)])
            steps.done("written", f"{len(image.data):,} bytes at {target.offset:#x}, "
                                  "MD5 verified by the chip")
            cmds.reset_chip(esp, "hard-reset")
        except InstallerError:
            # A check failed and nothing was written: let the board run what it had.
            with contextlib.suppress(FatalError, serial.SerialException, OSError):
                cmds.reset_chip(esp, "hard-reset")
            raise
        except FatalError as exc:
            raise FlashFailed(f"flashing {port} failed: {_first_line(exc)}; press RESET "
                              "and run palaute flash again") from None
        except (serial.SerialException, OSError) as exc:
            raise FlashFailed(f"lost the connection to {port} ({exc}): plug the board in "
                              "again and run palaute flash again (the ROM bootloader "
                              "cannot be overwritten, a half-written board can always be "
                              "flashed again)") from None
    return FlashResult(port=port, chip=target, description=description, mac=mac,
                       device_id=device_id, offset=target.offset, size=len(image.data),
                       seconds=time.monotonic() - steps.start)


# -- the `palaute flash` command ----------------------------------------------------------------
def list_ports(out: TextIO) -> int:
    """Print the serial ports pyserial sees, one per line; how many there are."""
    from serial.tools.list_ports import comports

    ports = sorted(comports(), key=lambda p: p.device)
    for info in ports:
        print(f"{info.device}  {info.description}  {info.hwid}", file=out)
    if not ports:
        print("no serial ports found: plug the board in with a data USB cable", file=out)
    return len(ports)


def cmd_flash(args: argparse.Namespace) -> int:
    """Flash MicroPython (or list the ports); one error line and status 2 if it fails."""
    if args.list:
        list_ports(sys.stdout)
        return 0
    if not args.port or not args.image:
        print("palaute flash: give --port and --image (or --list to see the serial ports)",
              file=sys.stderr)
        return 2
    try:
        result = flash(args.port, args.image, chip=args.chip, baud=args.baud,
                       erase=not args.no_erase, connect_attempts=args.connect_attempts)
    except InstallerError as exc:
        print(f"palaute flash: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("palaute flash: interrupted; run palaute flash again (a half-written board "
              "can always be flashed again)", file=sys.stderr)
        return 130
    print(f"flashed    {result.chip.name} in {result.seconds:.0f} s; device id "
          f"{result.device_id}")
    return 0


def _at_least(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def add_flash_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``flash --port PORT --image FILE [...]`` to the ``palaute`` sub-commands."""
    parser = subparsers.add_parser(
        "flash", help="flash MicroPython onto a terminal (esptool)",
        description="Detect the ESP chip, erase it, write the MicroPython image at the "
                    "chip's offset, verify it, and print the device id. See "
                    "docs/installer.md.")
    parser.add_argument("--port", help="serial port of the board, e.g. /dev/ttyUSB0")
    parser.add_argument("--image", type=Path,
                        help="MicroPython firmware .bin from micropython.org/download")
    parser.add_argument("--chip", choices=("auto", *SUPPORTED_CHIPS), default="auto",
                        help="refuse any other chip (default: auto, detect it)")
    parser.add_argument("--baud", type=_at_least(9600), default=DEFAULT_BAUD,
                        help=f"baud rate for writing (default {DEFAULT_BAUD}; try 115200 "
                             "with long or poor cables)")
    parser.add_argument("--no-erase", action="store_true",
                        help="do not erase the whole flash first (the files on the board survive)")
    parser.add_argument("--connect-attempts", type=_at_least(1),
                        default=DEFAULT_CONNECT_ATTEMPTS,
                        help="how often to reset the board and try to reach its bootloader "
                             f"(default {DEFAULT_CONNECT_ATTEMPTS})")
    parser.add_argument("--list", action="store_true", help="list the serial ports and exit")
    parser.set_defaults(func=cmd_flash)
    return parser
