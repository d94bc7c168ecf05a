"""``palaute provision`` end to end: pty boards running real MicroPython, the real fleet API
(served by uvicorn on a free port), Mosquitto configured by ``palaute broker-config``
(dynamic-security accounts) and a running ``palaute ingest``.

After the reset the board runs the provisioned firmware from its flash (``Boot`` with a
``SimBoard``, see ``mp_raw_repl_board.py``), connects to the broker with the credential the
fleet made for it, comes online, and its votes are stored.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import uvicorn
from sqlalchemy import select

from fleet.api.app import create_app
from fleet.cli import main
from fleet.config import DEV_SECRET, Settings
from fleet.content import signing
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Role, Vote
from fleet.firmware_bundle import FIRMWARE_DIR, build_bundle
from fleet.services import registry
from tests.fleet.auth_helpers import make_user
from tests.services.common import free_port, wait_until
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import CONNACK_ACCEPTED, CONNACK_NOT_AUTHORISED, DynsecMosquittoBroker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from tests.installer.pty_board import PtyBoard

pytest_plugins = ["tests.installer.pty_board"]
pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython]

WIFI = {"Lab": "right horse"}
"""The one network the simulated boards can join, and the password its access point takes."""


class FleetApi:
    """The fleet API served by uvicorn in a thread, on a free port."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(sessions, settings=settings), host="127.0.0.1", port=self.port,
            log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        # uvicorn sets `started` from its own thread and offers nothing to await.
        wait_until(lambda: self.server.started, 30, "the fleet API to start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class Stack:
    """Everything a provisioning run talks to."""

    broker: DynsecMosquittoBroker
    sessions: sessionmaker[Session]
    api: FleetApi
    token: str
    bundle: Path
    site_id: int
    settings: Settings


def _settings(db_url: str, broker: DynsecMosquittoBroker, key_file: Path) -> Settings:
    return Settings(environment="test", secret_key=DEV_SECRET, db_url=db_url,
                    mqtt_url=broker.ingest_url, broker_admin_url=broker.admin_url,
                    device_mqtt_host=broker.host, device_mqtt_port=broker.port,
                    content_key_file=str(key_file))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A firmware bundle for the default board, built once for the module."""
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_bundle(out)
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, bundle: Path) -> Iterator[Stack]:
    """Broker (broker-config), database, fleet API, ingest worker and a firmware bundle,
    shared by the tests of this module (each uses its own boards)."""
    workdir = tmp_path_factory.mktemp("provision")
    broker = DynsecMosquittoBroker(workdir / "mosquitto")
    broker.start()
    db_url = f"sqlite:///{workdir / 'palaute.db'}"
    upgrade(db_url)
    sessions = make_sessionmaker(make_engine(db_url))
    token = make_user(sessions, Role.installer)["Authorization"].removeprefix("Bearer ")
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Bench Oy")
        site_id = registry.create_site(session, customer_id=customer.id, name="Lobby").id
    signing.generate_key_file(workdir / "content.key")
    settings = _settings(db_url, broker, workdir / "content.key")
    api = FleetApi(sessions, settings)
    ingest = IngestProcess(db_url=db_url, mqtt_url=broker.ingest_url, workdir=workdir,
                           worker_id="provision-ingest")
    try:
        ingest.start_subscribed(broker)
        yield Stack(broker=broker, sessions=sessions, api=api, token=token, bundle=bundle,
                    site_id=site_id, settings=settings)
    finally:
        ingest.stop()
        api.stop()
        broker.stop()


def provision(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``palaute provision ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["provision", *args])
    out, err = capsys.readouterr()
    return code, out, err


def stack_args(stack: Stack, *, fleet: str | None = None, token: str | None = None,
               password: str = WIFI["Lab"], timeout: float = 60) -> list[str]:
    return ["--fleet", fleet or stack.api.url, "--token", token or stack.token,
            "--bundle", str(stack.bundle), "--wifi-ssid", "Lab", "--wifi-password", password,
            "--timeout", str(timeout)]


def flash_config(board: PtyBoard) -> dict[str, object]:
    config: dict[str, object] = json.loads((board.flash_dir / "config.json").read_text())
    return config


def steps(out: str) -> dict[str, str]:
    """``step: outcome (N.N s)`` lines -> {step: outcome}."""
    found = {}
    for line in out.splitlines():
        name, sep, rest = line.partition(": ")
        if sep and rest.endswith(" s)"):
            found[name.strip()] = rest.rpartition(" (")[0]
    return found


# -- the happy paths ------------------------------------------------------------------------
def test_provision_comes_online_votes_are_stored_and_rerun_rotates(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard],
        capsys: pytest.CaptureFixture[str]) -> None:
    board = pty_board_factory(bytes.fromhex("a0b1c2d3e4f5"), networks=WIFI, control=True)
    device = "pt-a0b1c2d3e4f5"
    code, out, err = provision(capsys, "--port", board.port, "--site", str(stack.site_id),
                               *stack_args(stack))
    assert code == 0, out + err + board.stderr()
    done = steps(out)
    assert list(done) == ["open port, raw REPL", "device id", "fleet", "copy bundle",
                          "write config.json", "reset", "wait online"]
    assert done["device id"] == device
    assert done["fleet"] == "new device"
    assert done["copy bundle"].endswith("0 unchanged, all verified by SHA-256")
    assert done["wait online"] == "online (firmware 0.1.0)"
    assert f"  console: running {device} (firmware 0.1.0)" in out
    assert board.resets == 1

    first = flash_config(board)
    mqtt = first["mqtt"]
    assert isinstance(mqtt, dict)
    assert first["device_id"] == device and first["wifi"] == {"ssid": "Lab",
                                                             "password": WIFI["Lab"]}
    assert (mqtt["host"], mqtt["port"], mqtt["user"]) == (stack.broker.host,
                                                          stack.broker.port, device)
    # The terminal will check content signatures with the fleet's public key.
    assert first["content_key"] == signing.public_key_hex(
        signing.load_configured_key(stack.settings.content_key_file))
    # Secrets never reach the installer's screen, nor the bundle.
    for secret in (mqtt["password"], stack.token, WIFI["Lab"]):
        assert secret not in out + err
        assert not [p for p in stack.bundle.rglob("*")
                    if p.is_file() and secret.encode() in p.read_bytes()]

    # A visitor presses a button on the provisioned terminal; the vote lands in the fleet.
    assert board.control is not None
    seq = board.control.press(2)
    board.control.wait_for("acked", timeout=60)
    with stack.sessions() as session:
        votes = session.execute(select(Vote.seq, Vote.button, Vote.site_id)
                                .where(Vote.device_id == device)).all()
    assert [(v.seq, v.button, v.site_id) for v in votes] == [(seq, 2, stack.site_id)]

    # Again on the same board: same identity, new credential, nothing copied twice.
    code, out, err = provision(capsys, "--port", board.port, *stack_args(stack))
    assert code == 0, out + err + board.stderr()
    done = steps(out)
    assert done["device id"] == device
    assert done["fleet"] == "already provisioned: identity kept, credential rotated"
    assert done["copy bundle"].startswith("0 copied, ")
    assert done["wait online"].startswith("online")
    second = flash_config(board)
    assert second["device_id"] == device
    new_mqtt = second["mqtt"]
    assert isinstance(new_mqtt, dict) and new_mqtt["password"] != mqtt["password"]
    assert stack.broker.connack_code(device, mqtt["password"]) == CONNACK_NOT_AUTHORISED
    assert stack.broker.connack_code(device, new_mqtt["password"]) == CONNACK_ACCEPTED


def test_four_boards_in_parallel(stack: Stack, pty_board_factory: Callable[..., PtyBoard],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    boards = [pty_board_factory(bytes([0xb0, 0, 0, 0, 0, n]), networks=WIFI)
              for n in range(1, 5)]
    code, out, err = provision(capsys, "--ports", ",".join(b.port for b in boards),
                               *stack_args(stack, timeout=120))
    assert code == 0, out + err
    lines = out.splitlines()
    for board in boards:
        mine = [line for line in lines if line.startswith(f"{board.port}: ")]
        # One line per step, each prefixed with the board's port, plus the console lines.
        assert f"{board.port}: fleet: new device" in "\n".join(mine)
        assert any(line.startswith(f"{board.port}: wait online: online") for line in mine)
    table = lines[-6:]
    assert table[0].split() == ["PORT", "DEVICE", "RESULT", "SECONDS"]
    rows = [row.split() for row in table[1:5]]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (b.port, f"pt-b0000000000{n}", "ok") for n, b in enumerate(boards, start=1)]
    assert table[5] == "4 of 4 boards online"


# -- errors a person can act on -------------------------------------------------------------
def assert_one_line_error(code: int, err: str, *expected: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_wifi_credentials_rejected_are_reported_from_safe_mode(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard],
        capsys: pytest.CaptureFixture[str]) -> None:
    board = pty_board_factory(bytes.fromhex("c0ffee000001"), networks=WIFI)
    code, out, err = provision(capsys, "--port", board.port,
                               *stack_args(stack, password="wrong horse"))
    line = assert_one_line_error(
        code, err, "palaute provision: device pt-c0ffee000001 is in safe mode: wifi: "
                   "credentials rejected by 'Lab'; re-provision with the right Wi-Fi password")
    assert "wrong horse" not in line
    assert "wait online: FAILED" in out


def test_wrong_token_is_rejected_before_anything_is_copied(
        stack: Stack, pty_board: PtyBoard, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = provision(capsys, "--port", pty_board.port,
                                *stack_args(stack, token="not-a-token"))
    assert_one_line_error(code, err, "the fleet rejected the installer token (HTTP 401",
                          "PALAUTE_INSTALLER_TOKEN")
    assert "not-a-token" not in err
    assert not (pty_board.flash_dir / "config.json").exists()
    assert not (pty_board.flash_dir / "main.py").exists()


def test_stopped_fleet_is_unreachable(stack: Stack, pty_board: PtyBoard,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    code, _out, err = provision(capsys, "--port", pty_board.port,
                                *stack_args(stack, fleet=dead))
    assert_one_line_error(code, err, f"fleet unreachable at {dead}", "Connection refused",
                          "PALAUTE_FLEET_URL")


def test_retired_device_is_refused(stack: Stack, pty_board_factory: Callable[..., PtyBoard],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    board = pty_board_factory(bytes.fromhex("dead00000001"))
    with stack.sessions.begin() as session:
        registry.register_device(session, device_id="pt-dead00000001", board="esp32-devkitc")
        registry.retire_device(session, device_id="pt-dead00000001")
    code, _out, err = provision(capsys, "--port", board.port, *stack_args(stack))
    assert_one_line_error(code, err, "device pt-dead00000001 is retired in the fleet",
                          "set this board aside")
    assert not (board.flash_dir / "config.json").exists()


def test_other_conflicts_show_the_fleets_detail_not_retired(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard],
        capsys: pytest.CaptureFixture[str]) -> None:
    # A 409 that is not about retirement (here: the device's assignment only starts
    # tomorrow) must not tell the installer to throw the board away.
    board = pty_board_factory(bytes.fromhex("dead00000002"))
    tomorrow = int(time.time() * 1000) + 86_400_000
    with stack.sessions.begin() as session:
        registry.register_device(session, device_id="pt-dead00000002", board="esp32-devkitc")
        registry.assign_device(session, device_id="pt-dead00000002", site_id=stack.site_id,
                               at_ms=tomorrow)
        customer = registry.create_customer(session, name="Conflict Oy")
        other_site = registry.create_site(session, customer_id=customer.id, name="Hall").id
    code, _out, err = provision(capsys, "--port", board.port, "--site", str(other_site),
                                *stack_args(stack))
    line = assert_one_line_error(code, err, "refused to provision device pt-dead00000002",
                                 "HTTP 409", f"assigned to site {stack.site_id} since "
                                 f"{tomorrow}", "run again")
    assert "retired" not in line and "set this board aside" not in line
    assert not (board.flash_dir / "config.json").exists()


def test_unknown_site_is_refused(stack: Stack, pty_board: PtyBoard,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = provision(capsys, "--port", pty_board.port, "--site", "999999",
                                *stack_args(stack))
    assert_one_line_error(code, err, "404", "check --site")


def test_device_that_cannot_reach_the_broker_times_out_clearly(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard],
        capsys: pytest.CaptureFixture[str]) -> None:
    # The fleet hands out a broker address where no broker runs: from the device's side
    # the broker is stopped.  (The account itself is made on the real broker.)
    dead_port = free_port()
    settings = stack.settings.model_copy(update={"device_mqtt_port": dead_port})
    api = FleetApi(stack.sessions, settings)
    try:
        board = pty_board_factory(bytes.fromhex("0ff11e000001"), networks=WIFI)
        code, out, err = provision(capsys, "--port", board.port,
                                   *stack_args(stack, fleet=api.url, timeout=8))
    finally:
        api.stop()
    assert_one_line_error(
        code, err, "device pt-0ff11e000001 did not come online within 8 s",
        f"check that the broker at {stack.broker.host}:{dead_port} is running",
        "`palaute ingest` runs", "its console said last: 'palaute: running pt-0ff11e000001")
    assert "wait online: FAILED" in out


def test_garbage_port(garbage_port: str, bundle: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = provision(capsys, "--port", garbage_port, "--fleet",
                                f"http://127.0.0.1:{free_port()}", "--token", "t",
                                "--bundle", str(bundle))
    assert_one_line_error(code, err, "not like MicroPython", "palaute flash")


def test_silent_port(silent_port: str, bundle: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = provision(capsys, "--port", silent_port, "--fleet",
                                f"http://127.0.0.1:{free_port()}", "--token", "t",
                                "--bundle", str(bundle))
    assert_one_line_error(code, err, f"nothing answers on {silent_port}")


def test_unplugged_board(pty_board: PtyBoard, bundle: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    pty_board.stop()  # closes the pty: its device node is gone
    code, _out, err = provision(capsys, "--port", pty_board.port, "--fleet",
                                f"http://127.0.0.1:{free_port()}", "--token", "t",
                                "--bundle", str(bundle))
    assert_one_line_error(code, err, f"no such port {pty_board.port}")


def test_locked_repl_is_unlocked_by_test_mode(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard],
        capsys: pytest.CaptureFixture[str]) -> None:
    board = pty_board_factory(bytes.fromhex("10c4ed000001"), networks=WIFI, control=True)
    code, out, err = provision(capsys, "--port", board.port, "--lock-repl", *stack_args(stack))
    assert code == 0, out + err + board.stderr()
    assert "  console: REPL locked: Ctrl-C is off until test mode (hold buttons 1 and 5" in out
    assert flash_config(board)["repl_lock"] is True

    # Ctrl-C is ignored now: the installer cannot take the board over...
    code, out, err = provision(capsys, "--port", board.port, *stack_args(stack))
    assert_one_line_error(code, err, f"nothing answers on {board.port}",
                          "a terminal with a locked REPL answers after test mode")
    # ...until someone at the terminal holds the test-mode chord.
    assert board.control is not None
    board.control.send("hold", 1)
    board.control.send("hold", 5)
    assert board.control.wait_for("test_mode", timeout=30)["data"] is True
    board.control.send("release", 1)
    board.control.send("release", 5)
    code, out, err = provision(capsys, "--port", board.port, *stack_args(stack))
    assert code == 0, out + err + board.stderr()
    assert steps(out)["fleet"] == "already provisioned: identity kept, credential rotated"
    assert "repl_lock" not in flash_config(board)


def test_stopped_broker_is_reported_by_the_fleet(
        stack: Stack, pty_board: PtyBoard, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A fleet whose broker is down cannot make the device's account: nothing is copied.
    broker = DynsecMosquittoBroker(tmp_path / "stopped-broker")
    broker.start()
    broker.stop()
    settings = stack.settings.model_copy(update={"broker_admin_url": broker.admin_url,
                                                 "broker_timeout_s": 2.0})
    api = FleetApi(stack.sessions, settings)
    try:
        code, _out, err = provision(capsys, "--port", pty_board.port,
                                    *stack_args(stack, fleet=api.url))
    finally:
        api.stop()
    assert_one_line_error(code, err, "the fleet could not make the device's broker account",
                          "check that the broker runs")
    assert not (pty_board.flash_dir / "config.json").exists()


def test_board_whose_port_goes_away_on_reset_is_still_seen_online(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard],
        capsys: pytest.CaptureFixture[str]) -> None:
    board = pty_board_factory(bytes.fromhex("5e0000000001"), networks=WIFI, native_usb=True)
    port = board.port
    code, out, err = provision(capsys, "--port", port, *stack_args(stack))
    assert code == 0, out + err + board.stderr()
    assert "  console: the port went away with the reset; waiting on the fleet only" in out
    assert steps(out)["wait online"].startswith("online")
    assert board.resets == 1


def test_parallel_run_with_a_failing_port_exits_non_zero(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard], garbage_port: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    board = pty_board_factory(bytes.fromhex("b1000000000a"), networks=WIFI)
    code, out, err = provision(capsys, "--ports", f"{board.port},{garbage_port}",
                               *stack_args(stack))
    assert code == 2
    assert err.splitlines() == [line for line in err.splitlines()
                                if line.startswith(f"{garbage_port}: error: ")]
    assert len(err.splitlines()) == 1 and "not like MicroPython" in err
    rows = [line.split()[:3] for line in out.splitlines()[-3:-1]]
    assert rows == [[board.port, "pt-b1000000000a", "ok"], [garbage_port, "-", "FAILED"]]
    assert out.splitlines()[-1] == "1 of 2 boards online, 1 failed"


def test_firmware_crash_at_boot_is_reported_with_its_error(
        stack: Stack, pty_board_factory: Callable[..., PtyBoard], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # A bundle whose terminal raises as it starts: the console's traceback gives the reason.
    firmware = tmp_path / "firmware"
    shutil.copytree(FIRMWARE_DIR, firmware)
    with (firmware / "terminal" / "app.py").open("a") as app:
        app.write("\n\nasync def _broken_run(self):\n"
                  "    raise RuntimeError('simulated firmware bug')\n\n\n"
                  "Terminal.run = _broken_run\n")
    broken = tmp_path / "broken-bundle"
    build_bundle(broken, firmware_dir=firmware)
    board = pty_board_factory(bytes.fromhex("c4a500000001"), networks=WIFI)
    args = stack_args(stack)
    args[args.index("--bundle") + 1] = str(broken)
    code, _out, err = provision(capsys, "--port", board.port, *args)
    assert_one_line_error(code, err, "device pt-c4a500000001 crashed at boot: RuntimeError: "
                                     "simulated firmware bug; re-run the provisioning")
    assert "simulated firmware bug" in (board.flash_dir / "crash.log").read_text()
