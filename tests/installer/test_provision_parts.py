"""The parts of ``palaute provision`` that need no board: console lines, ports, the table,
config merging, argument errors, and the bundle holding no secret."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from terminal.config import validate

from fleet.cli import main
from fleet.config import DEV_SECRET
from fleet.firmware_bundle import build_bundle
from installer.console import ConsoleReader, parse_line
from installer.fleet_client import FleetClient, FleetError, TokenRejected
from installer.provision import Options, Result, device_config, expand_ports, summary_table
from installer.raw_repl import InstallerError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_bundle(out)
    return out


def test_console_lines_are_classified() -> None:
    safe = parse_line("palaute: safe mode: wifi: credentials rejected by 'Lab'; re-provision "
                      "with the right Wi-Fi password (retrying in 30s)")
    assert (safe.kind, safe.stops_the_terminal) == ("safe_mode", True)
    assert safe.text == ("wifi: credentials rejected by 'Lab'; re-provision with the right "
                         "Wi-Fi password")
    config = parse_line("palaute: safe mode: config: cannot read /config.json; provision the "
                        "device (retrying in 30s)")
    assert config.text == "config: cannot read /config.json; provision the device"
    assert parse_line("palaute: fatal: Traceback (most recent call last):").kind == "fatal"
    running = parse_line("palaute: running pt-0123456789ab (firmware 0.1.0)")
    assert (running.kind, running.stops_the_terminal) == ("running", False)
    assert running.text == "running pt-0123456789ab (firmware 0.1.0)"
    assert parse_line("palaute: network: wifi: no network 'Lab' in range").kind == "info"
    assert parse_line("ets Jun  8 2016 00:22:57").kind == "other"


def test_console_reader_joins_lines_split_across_reads() -> None:
    reader = ConsoleReader()
    assert reader.feed(b"\x00\xffrst:0x1 (POWERON)\r\npalaute: safe mo") == [
        parse_line("\x00\ufffdrst:0x1 (POWERON)")]
    lines = reader.feed(b"de: wifi: rejected (retrying in 30s)\r\n\r\n")
    assert [(line.kind, line.text) for line in lines] == [("safe_mode", "wifi: rejected")]
    assert reader.lines[-1] == "palaute: safe mode: wifi: rejected (retrying in 30s)"


def test_ports_and_globs_expand_in_order_without_duplicates(tmp_path: Path) -> None:
    for name in ("ttyUSB1", "ttyUSB0", "ttyACM0"):
        (tmp_path / name).touch()
    spec = f"{tmp_path}/ttyUSB*, {tmp_path}/ttyUSB0,{tmp_path}/ttyACM0"
    assert expand_ports(spec) == [f"{tmp_path}/ttyUSB0", f"{tmp_path}/ttyUSB1",
                                  f"{tmp_path}/ttyACM0"]
    with pytest.raises(InstallerError, match=r"no serial port matches .*/ttyS\*"):
        expand_ports(f"{tmp_path}/ttyS*")
    with pytest.raises(InstallerError, match="lists no port"):
        expand_ports(" , ")


def test_summary_table_lists_every_board() -> None:
    table = summary_table([
        Result(port="/dev/ttyUSB0", device_id="pt-000000000001", ok=True, seconds=41.25),
        Result(port="/dev/ttyUSB10", message="nothing answers", seconds=3.0)])
    assert table.splitlines() == [
        "PORT           DEVICE           RESULT  SECONDS",
        "/dev/ttyUSB0   pt-000000000001  ok         41.2",
        "/dev/ttyUSB10  -                FAILED      3.0",
        "1 of 2 boards online, 1 failed"]


def test_device_config_merges_the_fleet_keys_and_passes_the_terminal_rules() -> None:
    fleet = {"mqtt": {"host": "mqtt.example", "port": 8883, "user": "pt-0123456789ab",
                      "password": "p"}, "topic_root": "fb/v1", "health_interval_s": 600}
    options = Options(fleet=FleetClient("http://fleet", "t"), bundle=Path("b"),
                      board="esp32-devkitc", buttons=3, wifi={"ssid": "Lab", "password": "w"})
    config = device_config(fleet, "pt-0123456789ab", options)
    assert config == {**fleet, "device_id": "pt-0123456789ab", "board": "esp32-devkitc",
                      "buttons": 3, "wifi": {"ssid": "Lab", "password": "w"}}
    assert validate(config)["health_interval_s"] == 600  # a key the fleet added is kept


def test_fleet_client_never_shows_the_token() -> None:
    client = FleetClient("http://fleet.example/", "s3cret-token")
    assert "s3cret" not in repr(client) and client.url == "http://fleet.example"
    with pytest.raises(TokenRejected, match="PALAUTE_INSTALLER_TOKEN"):
        FleetClient("http://fleet.example", "")
    with pytest.raises(FleetError, match="must start with http"):
        FleetClient("fleet.example", "t")


@pytest.mark.parametrize(("args", "message"), [
    (["--wifi-ssid", "Lab"], "give --wifi-ssid and --wifi-password together"),
    (["--token", ""], "no installer token"),
    (["--bundle", "/nonexistent"], "/nonexistent is not a firmware bundle"),
    (["--buttons", "6"], "--buttons must be 2..5 for esp32-devkitc"),
    (["--buttons", "1"], "--buttons must be 2..5 for esp32-devkitc"),
    (["--board", "esp32-s3-devkitc-1"], "is for esp32-devkitc, not esp32-s3-devkitc-1"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
])
def test_argument_errors_are_one_line(args: list[str], message: str, bundle: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PALAUTE_INSTALLER_TOKEN", raising=False)
    base = {"--port": "/dev/ttyUSB0", "--fleet": "http://127.0.0.1:9", "--token": "t",
            "--bundle": str(bundle)}
    for key, value in zip(args[::2], args[1::2], strict=True):
        base[key] = value
    argv = [item for pair in base.items() for item in pair]
    assert main(["provision", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("palaute provision: ") and message in err


SECRET_PATTERNS = [
    re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(rb'"password"\s*:\s*"[^"]+"'),  # a filled-in config
    re.compile(rb"(?i)(token|secret|api[_-]?key)\s*[=:]\s*['\"][A-Za-z0-9_\-]{12,}"),
    re.compile(rb"mqtts?://[^:/\s]+:[^@\s]+@"),  # credentials inside a URL
]


def test_the_firmware_bundle_holds_no_secret(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    names = {p.relative_to(bundle).as_posix() for p in files}
    assert names == {*manifest["files"], "manifest.json"}
    assert not {"config.json", ".env", "palaute-broker.env"} & {Path(n).name for n in names}
    for path in files:
        data = path.read_bytes()
        assert DEV_SECRET.encode() not in data, path
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(data), (path, pattern.pattern)
