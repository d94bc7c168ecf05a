"""Board pin maps: every shipped board validates; each rule names the file, key and advice."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fleet.chips import CHIPS
from fleet.pinmaps import (
    BoardPinMap,
    PinMapError,
    check_board,
    load_board,
    main,
    validate_all,
    validate_board,
)

ROOT = Path(__file__).resolve().parents[2]
BOARDS = ROOT / "hardware" / "boards"
SOURCE = "hardware/boards/test.json"


def esp32() -> dict[str, Any]:
    return {
        "board": "test", "chip": "esp32", "description": "test board",
        "buttons": [{"pin": 32, "led": 4}, {"pin": 33, "led": 18}, {"pin": 25, "led": 19}],
        "display": {"type": "ssd1306", "bus": "i2c", "sda": 21, "scl": 22, "address": 60,
                    "width": 128, "height": 64},
        "battery_adc": 34, "status_led": 14,
    }


def esp32s3() -> dict[str, Any]:
    data = esp32()
    data.update(chip="esp32s3", battery_adc=10, status_led=13)
    data["buttons"] = [{"pin": 4, "led": 16}, {"pin": 5, "led": 17}]
    data["display"].update(sda=8, scl=9)
    return data


def error_for(data: dict[str, Any]) -> PinMapError:
    with pytest.raises(PinMapError) as info:
        validate_board(data, SOURCE)
    return info.value


def changed(mutate: Callable[[dict[str, Any]], None], base: Callable[[], dict[str, Any]] = esp32
            ) -> dict[str, Any]:
    data = copy.deepcopy(base())
    mutate(data)
    return data


# -- the CI check -----------------------------------------------------------------------------
def test_every_shipped_board_file_validates() -> None:
    results = validate_all(BOARDS)
    names = {r.path.name for r in results}
    assert {"esp32-devkitc.json", "esp32-s3-devkitc-1.json"} <= names
    for result in results:
        assert result.ok, str(result.error)
        assert result.board is not None and result.board.board == result.path.stem
        assert not result.warnings, [str(w) for w in result.warnings]


def test_shipped_boards_follow_the_wiring_rules() -> None:
    for path in sorted(BOARDS.glob("*.json")):
        board = load_board(path)
        chip = CHIPS[board.chip]
        assert 2 <= len(board.buttons) <= 5
        assert board.battery_adc is None or board.battery_adc in chip.adc1
        for button in board.buttons:
            assert button.pull == "internal" and button.pin not in chip.no_pullup
        for key, pin in board.pins().items():
            assert pin not in chip.strapping, (path.name, key)


def test_valid_maps_parse_into_the_model() -> None:
    board, warnings = validate_board(esp32(), SOURCE)
    assert isinstance(board, BoardPinMap) and warnings == []
    assert [b.pin for b in board.buttons] == [32, 33, 25]
    assert board.display is not None and board.display.address == 0x3C
    assert board.battery_divider == 2.0 and board.psram is None
    assert board.pins()["buttons[2].led"] == 19
    s3, warnings = validate_board(esp32s3(), SOURCE)
    assert s3.chip == "esp32s3" and warnings == []
    headless, _ = validate_board(changed(lambda d: d.update(display=None, battery_adc=None,
                                                            status_led=None)), SOURCE)
    assert headless.display is None and headless.pins().keys() == {
        "buttons[0].pin", "buttons[0].led", "buttons[1].pin", "buttons[1].led",
        "buttons[2].pin", "buttons[2].led"}


# -- each rule: file + key + advice -----------------------------------------------------------
@pytest.mark.parametrize(("mutate", "key", "words"), [
    # flash pins
    (lambda d: d["buttons"][1].update(pin=6), "buttons[1].pin",
     ["GPIO6", "SPI flash", "ESP32", "choose another pin"]),
    (lambda d: d.update(status_led=11), "status_led", ["GPIO11", "SPI flash"]),
    # pins that do not exist
    (lambda d: d["buttons"][0].update(led=20), "buttons[0].led",
     ["GPIO20 does not exist on ESP32", "valid GPIOs are 0-19, 21-23, 25-27, 32-39"]),
    (lambda d: d["buttons"][0].update(led=40), "buttons[0].led", ["GPIO40 does not exist"]),
    # input-only pins as outputs
    (lambda d: d["buttons"][2].update(led=35), "buttons[2].led",
     ["GPIO35 is input-only on ESP32", "drive an LED", "output-capable"]),
    (lambda d: d["display"].update(sda=36), "display.sda", ["GPIO36 is input-only", "I2C"]),
    (lambda d: d.update(status_led=39), "status_led", ["GPIO39 is input-only"]),
    # buttons without a pull-up
    (lambda d: d["buttons"][0].update(pin=34), "buttons[0].pin",
     ["GPIO34 has no internal pull-up", '"pull": "external"']),
    # battery sense on ADC2
    (lambda d: d.update(battery_adc=25), "battery_adc",
     ["GPIO25 is not an ADC1 pin", "Wi-Fi", "GPIO 32-39"]),
    # the serial console
    (lambda d: d["buttons"][0].update(pin=1), "buttons[0].pin", ["GPIO1 is UART0 TX"]),
    # duplicates name both keys
    (lambda d: d["buttons"][2].update(led=4), "buttons[2].led",
     ["GPIO4 is already used by buttons[0].led", "own pin"]),
    (lambda d: d["display"].update(scl=32), "display.scl",
     ["GPIO32 is already used by buttons[0].pin"]),
    # unknown keys, anywhere
    (lambda d: d.update(colour="red"), "colour", ["unknown key", "allowed keys here"]),
    (lambda d: d["buttons"][1].update(ledd=5), "buttons[1].ledd",
     ["unknown key", 'did you mean "led"']),
    (lambda d: d["display"].update(adress=60), "display.adress",
     ["unknown key", 'did you mean "address"']),
    # missing keys
    (lambda d: d["buttons"][1].pop("led"), "buttons[1].led", ["missing"]),
    (lambda d: d.pop("status_led"), "status_led", ["missing"]),
    # button count
    (lambda d: d["buttons"].extend([{"pin": 26, "led": 23}, {"pin": 27, "led": 13},
                                    {"pin": 16, "led": 17}]),
     "buttons", ["has 6 buttons", "2 to 5"]),
    (lambda d: d.update(buttons=[{"pin": 32, "led": 4}]), "buttons", ["has 1 buttons"]),
    # wrong types
    (lambda d: d["buttons"][0].update(pin="32"), "buttons[0].pin",
     ['expected an integer GPIO number, got "32" (a string)']),
    (lambda d: d["buttons"][0].update(led=True), "buttons[0].led", ["got true (a boolean)"]),
    (lambda d: d["buttons"][0].update(led=4.0), "buttons[0].led", ["got 4.0 (a number)"]),
    (lambda d: d.update(buttons={"1": 32}), "buttons", ["expected a list"]),
    (lambda d: d["buttons"].__setitem__(1, 33), "buttons[1]", ["expected an object"]),
    (lambda d: d.update(description=7), "description", ["expected a non-empty string"]),
    (lambda d: d["buttons"][0].update(pull="down"), "buttons[0].pull",
     ['expected "internal" or "external"']),
    # display
    (lambda d: d["display"].update(address=80), "display.address",
     ["80 (0x50) is not an SSD1306 address", "60 (0x3C) or 61 (0x3D)"]),
    (lambda d: d["display"].update(type="sh1106"), "display.type", ['use "ssd1306"']),
    (lambda d: d["display"].update(height=60), "display.height", ["not an SSD1306 panel"]),
    # the rest
    (lambda d: d.update(chip="esp8266"), "chip", ["not supported", "esp32, esp32s3"]),
    (lambda d: d.update(board="My Board"), "board", ["lowercase letters"]),
    (lambda d: d.update(battery_divider=0.5), "battery_divider", ["outside 1..10"]),
    (lambda d: d.update(psram="octal"), "psram", ["not a PSRAM kind for ESP32"]),
    (lambda d: d.update(psram=["quad"]), "psram", ["not a PSRAM kind", "none, quad"]),
    (lambda d: d.update(chip=["esp32"]), "chip", ["not supported"]),
])
def test_each_esp32_rule_names_file_key_and_advice(
        mutate: Callable[[dict[str, Any]], None], key: str, words: list[str]) -> None:
    err = error_for(changed(mutate))
    assert err.key == key, str(err)
    assert str(err).startswith(f"{SOURCE}: {key}: "), str(err)
    for word in words:
        assert word in str(err), (word, str(err))


@pytest.mark.parametrize(("mutate", "key", "words"), [
    (lambda d: d["buttons"][0].update(pin=27), "buttons[0].pin",
     ["GPIO27", "SPI flash and PSRAM", "choose another pin"]),
    (lambda d: d["buttons"][0].update(led=22), "buttons[0].led",
     ["GPIO22 does not exist on ESP32-S3", "0-21, 26-48"]),
    (lambda d: d.update(battery_adc=11), "battery_adc", ["not an ADC1 pin", "GPIO 1-10"]),
    (lambda d: d.update(psram="octal", status_led=35), "status_led",
     ["GPIO35", "octal PSRAM", '"psram": "octal"', "choose another pin"]),
])
def test_each_esp32s3_rule_names_file_key_and_advice(
        mutate: Callable[[dict[str, Any]], None], key: str, words: list[str]) -> None:
    err = error_for(changed(mutate, esp32s3))
    assert err.key == key and str(err).startswith(f"{SOURCE}: {key}: "), str(err)
    for word in words:
        assert word in str(err), (word, str(err))


def test_the_top_level_must_be_an_object() -> None:
    err = error_for([1, 2])  # type: ignore[arg-type]
    assert str(err) == f"{SOURCE}: expected a JSON object {{...}} at the top, got [1, 2] (a list)"


# -- warnings ---------------------------------------------------------------------------------
def test_strapping_pins_warn_but_validate() -> None:
    board, warnings = validate_board(changed(lambda d: d["buttons"][0].update(pin=0)), SOURCE)
    assert board.buttons[0].pin == 0
    assert [w.key for w in warnings] == ["buttons[0].pin"]
    text = str(warnings[0])
    assert text.startswith(f"{SOURCE}: buttons[0].pin: GPIO0 is a strapping pin"), text
    assert "download mode" in text and "prefer another pin" in text
    _, warnings = validate_board(changed(lambda d: d.update(status_led=12)), SOURCE)
    assert "flash voltage" in str(warnings[0])
    _, warnings = validate_board(changed(lambda d: d.update(status_led=46), esp32s3), SOURCE)
    assert "GPIO46 is a strapping pin" in str(warnings[0])


def test_usb_and_psram_pins_warn_on_esp32s3() -> None:
    _, warnings = validate_board(changed(lambda d: d.update(status_led=19), esp32s3), SOURCE)
    assert "GPIO19 is USB D-" in str(warnings[0])
    _, warnings = validate_board(changed(lambda d: d.update(status_led=35), esp32s3), SOURCE)
    assert "octal PSRAM" in str(warnings[0]) and '"none" or "quad"' in str(warnings[0])
    _, warnings = validate_board(
        changed(lambda d: d.update(status_led=35, psram="quad"), esp32s3), SOURCE)
    assert warnings == []


def test_wrover_psram_pins_on_esp32() -> None:
    _, warnings = validate_board(changed(lambda d: d.update(status_led=16)), SOURCE)
    assert "WROVER" in str(warnings[0])
    err = error_for(changed(lambda d: d.update(status_led=16, psram="quad")))
    assert err.key == "status_led" and "PSRAM chip select" in str(err)
    _, warnings = validate_board(changed(lambda d: d.update(status_led=16, psram="none")),
                                 SOURCE)
    assert warnings == []


def test_external_pull_up_allows_input_only_button_pins() -> None:
    board, _ = validate_board(
        changed(lambda d: d["buttons"][0].update(pin=34, pull="external")
                or d.update(battery_adc=35)), SOURCE)
    assert board.buttons[0].pin == 34 and board.buttons[0].pull == "external"


# -- files ------------------------------------------------------------------------------------
def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "test.json", '{"board": "test",')
    with pytest.raises(PinMapError, match=r"test\.json: is not valid JSON .* line 1"):
        load_board(path)
    with pytest.raises(PinMapError, match="cannot read"):
        load_board(tmp_path / "missing.json")
    path = write(tmp_path, "other-name.json", esp32())
    with pytest.raises(PinMapError, match=r'board: "test" does not match the file name'):
        load_board(path)
    path = write(tmp_path, "test.json", changed(lambda d: d["buttons"][1].update(pin=6)))
    with pytest.raises(PinMapError) as info:
        check_board(path)
    assert str(info.value).startswith(f"{path}: buttons[1].pin: GPIO6 is connected to the SPI")


def test_validate_all_reports_each_file(tmp_path: Path) -> None:
    write(tmp_path, "test.json", esp32())
    write(tmp_path, "zz-bad.json", changed(lambda d: d.update(board="zz-bad", status_led=7)))
    results = validate_all(tmp_path)
    assert [r.path.name for r in results] == ["test.json", "zz-bad.json"]
    assert results[0].ok and results[0].board is not None
    assert not results[1].ok and results[1].error is not None
    assert results[1].error.key == "status_led"


# -- the command ------------------------------------------------------------------------------
def test_cli_fails_and_prints_the_message_for_a_bad_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "test.json", esp32())
    bad = write(tmp_path, "bad.json", changed(lambda d: d.update(board="bad") or
                                              d["buttons"][1].update(pin=6)))
    assert main(["hardware", "check", str(good), str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{good}: ok (ESP32, 3 buttons)"
    assert out[1] == (f"error: {bad}: buttons[1].pin: GPIO6 is connected to the SPI flash "
                      "inside ESP32 modules; choose another pin")


def test_cli_prints_warnings_and_passes(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    warn = write(tmp_path, "test.json", changed(lambda d: d.update(status_led=15)))
    assert main(["hardware", "check", str(warn)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{warn}: ok (ESP32, 3 buttons), 1 warning"
    assert out[1].startswith(f"warning: {warn}: status_led: GPIO15 is a strapping pin")


def test_cli_checks_the_shipped_boards_by_default(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["hardware", "check"]) == 0
    out = capsys.readouterr().out
    assert "hardware/boards/esp32-devkitc.json: ok (ESP32, 5 buttons)" in out
    assert "hardware/boards/esp32-s3-devkitc-1.json: ok (ESP32-S3, 5 buttons)" in out


def test_cli_without_board_files_is_an_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fleet.pinmaps

    monkeypatch.setattr(fleet.pinmaps, "_default_boards_dir", lambda: tmp_path)
    assert main(["hardware", "check"]) == 2
