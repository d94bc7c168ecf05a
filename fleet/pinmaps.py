"""Board pin maps (``hardware/boards/*.json``): load, validate, and the ``hardware`` command.

A pin map says which GPIO each button, LED, the display and the battery sense use on one
board.  The terminal firmware trusts it, so everything is checked here, on the host, against
the chip's pin facts (`fleet.chips`): a bad pin map must fail in CI or on the installer's
laptop, never on a terminal on a wall.

Every error names the board file, the exact key (``buttons[2].led``) and what to do::

    hardware/boards/x.json: buttons[1].pin: GPIO6 is connected to the SPI flash inside
    ESP32 modules; choose another pin

Pins that work but deserve a second look (strapping pins, the native USB pins) give warnings.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fleet.chips import CHIPS, ChipFacts

MIN_BUTTONS = 2
MAX_BUTTONS = 5
SSD1306_ADDRESSES = (0x3C, 0x3D)
DEFAULT_BATTERY_DIVIDER = 2.0
BOARDS_DIR = Path("hardware") / "boards"

_TOP_KEYS = ("board", "chip", "description", "buttons", "display", "battery_adc",
             "battery_divider", "status_led", "psram")
_TOP_REQUIRED = ("board", "chip", "description", "buttons", "display", "battery_adc",
                 "status_led")
_BUTTON_KEYS = ("pin", "led", "pull")
_DISPLAY_KEYS = ("type", "bus", "sda", "scl", "address", "width", "height")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")

Role = Literal["button", "led", "i2c", "adc"]


class PinMapError(ValueError):
    """A pin map problem: ``source`` (the file), ``key`` (the key path) and the advice."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass(frozen=True)
class PinMapWarning:
    """A pin that works but deserves a second look."""

    source: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.key}: {self.message}"


@dataclass(frozen=True)
class ButtonPins:
    """One button: its input pin and the pin of its LED."""

    pin: int
    led: int
    pull: Literal["internal", "external"] = "internal"


@dataclass(frozen=True)
class DisplayPins:
    """The OLED display on the I2C bus."""

    type: str
    bus: str
    sda: int
    scl: int
    address: int
    width: int
    height: int


@dataclass(frozen=True)
class BoardPinMap:
    """A validated pin map.  Buttons are ordered most positive first."""

    board: str
    chip: str
    description: str
    buttons: tuple[ButtonPins, ...]
    display: DisplayPins | None
    battery_adc: int | None
    battery_divider: float
    status_led: int | None
    psram: str | None = None

    def pins(self) -> dict[str, int]:
        """Every pin in use, by key path (``buttons[0].led`` -> 4)."""
        used: dict[str, int] = {}
        for index, button in enumerate(self.buttons):
            used[f"buttons[{index}].pin"] = button.pin
            used[f"buttons[{index}].led"] = button.led
        if self.display is not None:
            used["display.sda"] = self.display.sda
            used["display.scl"] = self.display.scl
        if self.battery_adc is not None:
            used["battery_adc"] = self.battery_adc
        if self.status_led is not None:
            used["status_led"] = self.status_led
        return used


@dataclass(frozen=True)
class BoardResult:
    """The outcome of checking one board file."""

    path: Path
    board: BoardPinMap | None
    warnings: tuple[PinMapWarning, ...]
    error: PinMapError | None

    @property
    def ok(self) -> bool:
        """True when the file is valid (warnings allowed)."""
        return self.error is None


# -- helpers ----------------------------------------------------------------------------------
def _show(value: Any) -> str:
    """A value as the installer wrote it in JSON, with its JSON type."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object", type(None): "null"}
    return f"{json.dumps(value)} ({kinds.get(type(value), type(value).__name__)})"


def _ranges(pins: frozenset[int]) -> str:
    """``0-5, 12, 14-19``: a compact list of GPIO numbers."""
    parts: list[str] = []
    ordered = sorted(pins)
    start = prev = ordered[0]
    for pin in [*ordered[1:], None]:
        if pin is not None and pin == prev + 1:
            prev = pin
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if pin is not None:
            start = prev = pin
    return ", ".join(parts)


class _Checker:
    """Validates one pin map; raises PinMapError on the first problem, collects warnings."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.warnings: list[PinMapWarning] = []
        self.used: dict[int, str] = {}
        self.chip: ChipFacts | None = None
        self.psram: str | None = None

    def fail(self, key: str, message: str) -> PinMapError:
        return PinMapError(self.source, key, message)

    def warn(self, key: str, message: str) -> None:
        self.warnings.append(PinMapWarning(self.source, key, message))

    # -- structure ----------------------------------------------------------------------------
    def keys(self, obj: dict[str, Any], path: str, allowed: Sequence[str],
             required: Sequence[str]) -> None:
        for key in obj:
            if key not in allowed:
                where = f"{path}.{key}" if path else key
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f'did you mean "{close[0]}"? ' if close else ""
                raise self.fail(where, f"unknown key; {hint}allowed keys here: "
                                       f"{', '.join(allowed)}")
        for key in required:
            if key not in obj:
                where = f"{path}.{key}" if path else key
                raise self.fail(where, "missing; every board file needs it "
                                       "(copy an existing file in hardware/boards/)")

    def object(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected an object {{...}}, got {_show(value)}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {_show(value)}")
        return value

    def integer(self, value: Any, key: str, what: str = "an integer GPIO number") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected {what}, got {_show(value)}")
        return value

    # -- pins ---------------------------------------------------------------------------------
    def pin(self, value: Any, key: str, role: Role, pull: str = "internal") -> int:
        gpio = self.integer(value, key)
        chip = self.chip
        assert chip is not None
        name = f"GPIO{gpio}"
        if gpio not in chip.gpios:
            raise self.fail(key, f"{name} does not exist on {chip.label}; valid GPIOs are "
                                 f"{_ranges(chip.gpios)}")
        if gpio in chip.flash:
            raise self.fail(key, f"{name} {chip.flash[gpio]}; choose another pin")
        if gpio in chip.reserved:
            raise self.fail(key, f"{name} {chip.reserved[gpio]}; choose another pin")
        if gpio in chip.psram:
            kinds, why = chip.psram[gpio]
            if self.psram in kinds:
                raise self.fail(key, f'{name} {why} and this board has "psram": '
                                     f'"{self.psram}"; choose another pin')
            if self.psram is None:
                others = " or ".join(f'"{k}"' for k in sorted(chip.psram_kinds - kinds))
                self.warn(key, f'{name} {why}; set "psram" to {others} if this module has '
                               "no such memory, or choose another pin")
        if role in ("led", "i2c") and gpio in chip.input_only:
            what = "drive an LED" if role == "led" else "drive the I2C bus"
            raise self.fail(key, f"{name} is input-only on {chip.label} and cannot {what}; "
                                 "choose an output-capable pin")
        if role == "button" and pull == "internal" and gpio in chip.no_pullup:
            raise self.fail(key, f"{name} has no internal pull-up on {chip.label}; choose "
                                 "another pin, or wire a 10 kOhm pull-up to 3V3 and set "
                                 f'"pull": "external" on this button')
        if role == "adc" and gpio not in chip.adc1:
            adc1 = frozenset(chip.adc1)
            raise self.fail(key, f"{name} is not an ADC1 pin on {chip.label} (ADC2 cannot be "
                                 f"read while Wi-Fi is on); use one of GPIO {_ranges(adc1)}")
        if gpio in self.used:
            raise self.fail(key, f"{name} is already used by {self.used[gpio]}; give each "
                                 "function its own pin")
        if gpio in chip.strapping:
            self.warn(key, f"{name} is a strapping pin: it {chip.strapping[gpio]}; prefer "
                           "another pin, or make sure nothing wired to it can pull it at "
                           "reset")
        if gpio in chip.caution:
            self.warn(key, f"{name} {chip.caution[gpio]}; wiring it here gives that up")
        self.used[gpio] = key
        return gpio

    # -- sections -----------------------------------------------------------------------------
    def buttons(self, value: Any) -> tuple[ButtonPins, ...]:
        if not isinstance(value, list):
            raise self.fail("buttons", f"expected a list of {MIN_BUTTONS} to {MAX_BUTTONS} "
                                       f"buttons, got {_show(value)}")
        if not MIN_BUTTONS <= len(value) <= MAX_BUTTONS:
            raise self.fail("buttons", f"has {len(value)} buttons; a terminal has "
                                       f"{MIN_BUTTONS} to {MAX_BUTTONS} (most positive first)")
        result = []
        for index, raw in enumerate(value):
            path = f"buttons[{index}]"
            entry = self.object(raw, path)
            self.keys(entry, path, _BUTTON_KEYS, ("pin", "led"))
            pull = entry.get("pull", "internal")
            if pull not in ("internal", "external"):
                raise self.fail(f"{path}.pull", f'expected "internal" or "external", got '
                                                f"{_show(pull)}")
            pin = self.pin(entry["pin"], f"{path}.pin", "button", pull)
            led = self.pin(entry["led"], f"{path}.led", "led")
            result.append(ButtonPins(pin=pin, led=led, pull=pull))
        return tuple(result)

    def display(self, value: Any) -> DisplayPins | None:
        if value is None:
            return None
        raw = self.object(value, "display")
        self.keys(raw, "display", _DISPLAY_KEYS, _DISPLAY_KEYS)
        if raw["type"] != "ssd1306":
            raise self.fail("display.type", f'{_show(raw["type"])} is not supported; '
                                            'use "ssd1306" (0.96" 128x64 OLED)')
        if raw["bus"] != "i2c":
            raise self.fail("display.bus", f'{_show(raw["bus"])} is not supported; use "i2c"')
        sda = self.pin(raw["sda"], "display.sda", "i2c")
        scl = self.pin(raw["scl"], "display.scl", "i2c")
        address = self.integer(raw["address"], "display.address", "an I2C address number")
        if address not in SSD1306_ADDRESSES:
            raise self.fail("display.address", f"{address} (0x{address:X}) is not an SSD1306 "
                                               "address; use 60 (0x3C) or 61 (0x3D), as set "
                                               "by the module's address jumper")
        width = self.integer(raw["width"], "display.width", "a width in pixels")
        if not 8 <= width <= 128:
            raise self.fail("display.width", f"{width} is outside 8..128 (SSD1306 columns)")
        height = self.integer(raw["height"], "display.height", "a height in pixels")
        if height not in (16, 32, 48, 64):
            raise self.fail("display.height", f"{height} is not an SSD1306 panel height; "
                                              "use 64 (0.96\") or 32 (0.91\")")
        return DisplayPins(type="ssd1306", bus="i2c", sda=sda, scl=scl, address=address,
                           width=width, height=height)

    def battery_divider(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail("battery_divider", "expected a number (battery voltage / ADC pin "
                                               f"voltage, 2.0 for 100k/100k), got {_show(value)}")
        if not 1.0 <= value <= 10.0:
            raise self.fail("battery_divider", f"{value} is outside 1..10; it is (R1 + R2) / R2 "
                                               "of the divider, 2.0 for 100k/100k")
        return float(value)

    # -- the whole file -----------------------------------------------------------------------
    def board(self, data: Any) -> BoardPinMap:
        if not isinstance(data, dict):
            raise self.fail("", f"expected a JSON object {{...}} at the top, got {_show(data)}")
        self.keys(data, "", _TOP_KEYS, _TOP_REQUIRED)
        name = self.text(data["board"], "board")
        if not set(name) <= _NAME_CHARS or name.startswith("-"):
            raise self.fail("board", f"{json.dumps(name)} must use only lowercase letters, "
                                     "digits and '-' (it is the file name and the "
                                     "config.json \"board\" value)")
        chip_name = data["chip"]
        if not isinstance(chip_name, str) or chip_name not in CHIPS:
            raise self.fail("chip", f"{_show(chip_name)} is not supported; use one of "
                                    f"{', '.join(sorted(CHIPS))}")
        self.chip = chip = CHIPS[chip_name]
        description = self.text(data["description"], "description")
        psram = data.get("psram")
        if psram is not None and (not isinstance(psram, str) or psram not in chip.psram_kinds):
            raise self.fail("psram", f"{_show(psram)} is not a PSRAM kind for {chip.label}; use "
                                     f"one of {', '.join(sorted(chip.psram_kinds))}, or leave "
                                     "it out")
        self.psram = psram
        buttons = self.buttons(data["buttons"])
        display = self.display(data["display"])
        battery_adc = None
        if data["battery_adc"] is not None:
            battery_adc = self.pin(data["battery_adc"], "battery_adc", "adc")
        divider = DEFAULT_BATTERY_DIVIDER
        if "battery_divider" in data:
            divider = self.battery_divider(data["battery_divider"])
        status_led = None
        if data["status_led"] is not None:
            status_led = self.pin(data["status_led"], "status_led", "led")
        return BoardPinMap(board=name, chip=chip.chip, description=description,
                           buttons=buttons, display=display, battery_adc=battery_adc,
                           battery_divider=divider, status_led=status_led, psram=psram)


# -- public API -------------------------------------------------------------------------------
def validate_board(data: Any, source: str) -> tuple[BoardPinMap, list[PinMapWarning]]:
    """Validate parsed JSON ``data`` from ``source`` (used in messages).

    Returns the pin map and its warnings; raises PinMapError on the first problem.
    """
    checker = _Checker(source)
    board = checker.board(data)
    return board, checker.warnings


def check_board(path: str | Path) -> tuple[BoardPinMap, list[PinMapWarning]]:
    """Read and validate the board file at ``path``; the ``board`` must match the file name."""
    source = str(path)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PinMapError(source, "", f"cannot read the file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise PinMapError(source, "", "is not UTF-8 text; save it as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PinMapError(source, "", f"is not valid JSON ({exc.msg} at line {exc.lineno} "
                                      f"column {exc.colno}); fix the syntax") from None
    board, warnings = validate_board(data, source)
    if path.suffix == ".json" and board.board != path.stem:
        raise PinMapError(source, "board", f'{json.dumps(board.board)} does not match the file '
                                           f'name; rename the file to {board.board}.json or '
                                           f'set "board" to {json.dumps(path.stem)}')
    return board, warnings


def load_board(path: str | Path) -> BoardPinMap:
    """Read and validate the board file at ``path``; raises PinMapError."""
    return check_board(path)[0]


def validate_all(directory: str | Path = BOARDS_DIR) -> list[BoardResult]:
    """Check every ``*.json`` board file in ``directory``, in name order."""
    return [_result(path) for path in sorted(Path(directory).glob("*.json"))]


def _result(path: Path) -> BoardResult:
    try:
        board, warnings = check_board(path)
    except PinMapError as exc:
        return BoardResult(path=path, board=None, warnings=(), error=exc)
    return BoardResult(path=path, board=board, warnings=tuple(warnings), error=None)


# -- the `palaute hardware` command -----------------------------------------------------------
def _default_boards_dir() -> Path:
    if BOARDS_DIR.is_dir():
        return BOARDS_DIR
    return Path(__file__).resolve().parents[1] / BOARDS_DIR


def cmd_hardware_check(args: argparse.Namespace) -> int:
    """Check board files; one line per board, one per warning; 1 if any file is invalid."""
    files = [Path(f) for f in args.files]
    if not files:
        directory = _default_boards_dir()
        files = sorted(directory.glob("*.json"))
        if not files:
            print(f"palaute hardware check: no board files in {directory}", file=sys.stderr)
            return 2
    failed = 0
    for path in files:
        result = _result(path)
        if result.error is not None:
            failed += 1
            print(f"error: {result.error}")
            continue
        board = result.board
        assert board is not None
        summary = f"{CHIPS[board.chip].label}, {len(board.buttons)} buttons"
        count = len(result.warnings)
        more = f", {count} warning{'s' if count != 1 else ''}" if count else ""
        print(f"{path}: ok ({summary}){more}")
        for warning in result.warnings:
            print(f"warning: {warning}")
    return 1 if failed else 0


def add_hardware_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``hardware check [FILES...]`` to the ``palaute`` command's sub-commands."""
    hardware = subparsers.add_parser("hardware", help="board pin maps (hardware/boards/*.json)")
    hardware_sub = hardware.add_subparsers(dest="hardware_command", required=True)
    check = hardware_sub.add_parser(
        "check", help="validate board pin maps against the chip's pin rules",
        description="Validate board pin maps; exits non-zero if any file has an error.")
    check.add_argument("files", nargs="*", metavar="FILE",
                       help=f"board files (default: every {BOARDS_DIR}/*.json)")
    check.set_defaults(func=cmd_hardware_check)
    return hardware


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.pinmaps hardware check [FILES...]`` (as ``palaute hardware ...``)."""
    parser = argparse.ArgumentParser(prog="palaute")
    add_hardware_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
