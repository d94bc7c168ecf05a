"""Boot and safe mode: a bad or missing file is shown and retried, never crash-looped."""

import asyncio
import json

from _support import raises, tempdir
from terminal.boot import Boot, check_match, describe, load_pins, log_crash
from terminal.config import ConfigError, CredentialsRejected, validate

PINS = {"board": "esp32-devkitc", "chip": "esp32", "description": "test",
        "buttons": [{"pin": 32, "led": 4}, {"pin": 33, "led": 18}, {"pin": 25, "led": 19},
                    {"pin": 26, "led": 23}],
        "display": {"type": "ssd1306", "bus": "i2c", "sda": 21, "scl": 22, "address": 60,
                    "width": 128, "height": 64},
        "battery_adc": 34, "status_led": 14}


def good_config():
    return {"device_id": "pt-0123456789ab", "board": "esp32-devkitc",
            "mqtt": {"host": "broker.example", "port": 1883, "user": "pt-0123456789ab",
                     "password": "s3cret"}}


def write(path, data):
    with open(path, "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))


class FakeBoard:
    """Records what boot does with the hardware."""

    def __init__(self, pins, config, synced=True, fail=None, join_errors=None):
        if fail:
            raise fail
        self.join_errors = join_errors  # a list shared by the boards: one error per join
        self.pins = pins
        self.config = config
        self.screen = []
        self.deinited = False
        self.watchdog_ms = None
        self.feeds = 0
        self.synced = synced
        self.syncs = 0

    def show(self, lines):
        self.screen = list(lines)

    def deinit(self):
        self.deinited = True

    def lock_repl(self):
        self.locked = True

    async def join_network(self):
        if self.join_errors:
            raise self.join_errors.pop(0)

    def start_watchdog(self, timeout_ms):
        self.watchdog_ms = timeout_ms

    def feed(self):
        self.feeds += 1

    def time_ms(self):
        return 1700000000000 if self.synced else None

    async def sync_time(self):
        self.syncs += 1
        self.synced = True
        return True


class FakeTerminal:
    def __init__(self, board, config):
        self.board = board
        self.config = config
        self.ran = False

    async def run(self):
        self.ran = True
        for _ in range(3):
            await asyncio.sleep(0)  # let the watchdog and clock helpers run once


class Rig:
    """A boot with fake hardware, files in a temp dir and a sleep that counts retries."""

    def __init__(self, board_kw=None):
        self.root = tempdir("boot")
        self.config_path = self.root + "/config.json"
        self.board_path = self.root + "/board.json"
        self.boards = []
        self.logged = []
        self.sleeps = 0
        self.on_sleep = None
        self.board_kw = board_kw or {}

    def make_board(self, pins, config):
        board = FakeBoard(pins, config, **self.board_kw)
        self.boards.append(board)
        return board

    async def sleep(self, seconds):
        self.sleeps += 1
        if self.on_sleep:
            self.on_sleep(self.sleeps)
        if self.sleeps > 10:
            raise AssertionError("still in safe mode: %s" % self.logged)

    def boot(self):
        return Boot(self.make_board, FakeTerminal, config_path=self.config_path,
                    board_path=self.board_path, retry_s=7, log=self.logged.append,
                    sleep=self.sleep)


def test_valid_files_run_the_terminal_with_a_watchdog():
    rig = Rig()
    write(rig.board_path, PINS)
    write(rig.config_path, good_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert rig.sleeps == 0 and boot.errors == []
    assert len(rig.boards) == 1
    board = boot.board
    assert board.config["device_id"] == "pt-0123456789ab"
    assert board.pins["board"] == "esp32-devkitc"
    assert boot.terminal.ran and boot.terminal.board is board
    assert board.watchdog_ms == 60000 and board.feeds >= 1
    assert board.syncs == 0  # the clock survived the reset: no NTP needed


def test_unsynced_clock_is_set_from_ntp():
    rig = Rig({"synced": False})
    write(rig.board_path, PINS)
    write(rig.config_path, good_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert boot.board.syncs == 1 and boot.board.time_ms() is not None


def test_missing_config_shows_safe_mode_until_provisioned():
    rig = Rig()
    write(rig.board_path, PINS)

    def provision(n):
        if n == 2:  # the installer provisions during the second wait
            write(rig.config_path, good_config())

    rig.on_sleep = provision
    boot = rig.boot()
    asyncio.run(boot.run())
    assert rig.sleeps == 2
    assert [e.key for e in boot.errors] == ["config", "config"]
    safe = rig.boards[0]
    assert safe.config is None, "safe mode uses a display-only board"
    assert safe.screen[0] == "Setup needed"
    assert "provision" in safe.screen[1] and rig.config_path in safe.screen[1]
    assert safe.deinited, "the safe-mode board is released before the real one"
    assert len(rig.boards) == 2 and boot.board is rig.boards[1] and boot.terminal.ran
    assert "safe mode" in rig.logged[0] and "retrying in 7s" in rig.logged[0]


def test_invalid_config_names_the_key_on_the_display():
    rig = Rig()
    write(rig.board_path, PINS)
    bad = good_config()
    bad["mqtt"]["port"] = 70000
    write(rig.config_path, bad)
    rig.on_sleep = lambda n: write(rig.config_path, good_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert boot.errors[0].key == "mqtt.port"
    assert rig.boards[0].screen == ["Setup needed", str(boot.errors[0])]
    assert boot.terminal.ran


def test_bad_pin_map_means_no_display_but_still_retries():
    rig = Rig()
    write(rig.board_path, '{"board": ')
    write(rig.config_path, good_config())
    rig.on_sleep = lambda n: write(rig.board_path, PINS) if n == 3 else None
    boot = rig.boot()
    asyncio.run(boot.run())
    assert rig.sleeps == 3
    assert "not valid JSON" in str(boot.errors[0]) and boot.errors[0].key == "board"
    assert any("no display in safe mode" in line for line in rig.logged)
    assert len(rig.boards) == 1 and boot.terminal.ran  # only the real board was built


def test_config_for_another_board_is_refused():
    rig = Rig()
    write(rig.board_path, PINS)
    other = good_config()
    other["board"] = "esp32-s3-devkitc-1"
    write(rig.config_path, other)
    rig.on_sleep = lambda n: write(rig.config_path, good_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert boot.errors[0].key == "board"
    assert "esp32-s3-devkitc-1" in str(boot.errors[0])


def test_pins_the_hardware_refuses_are_a_config_error():
    rig = Rig()
    write(rig.board_path, PINS)
    write(rig.config_path, good_config())
    attempts = []
    real = rig.make_board

    def make_board(pins, config):
        attempts.append(config is not None)
        if len(attempts) == 1:
            raise ValueError("invalid pin")
        return real(pins, config)

    rig.make_board = make_board
    boot = rig.boot()
    asyncio.run(boot.run())
    assert "invalid pin" in str(boot.errors[0]) and boot.errors[0].key == "board"
    assert attempts == [True, False, True]
    assert boot.terminal.ran


def test_load_pins_and_check_match():
    root = tempdir("pins")
    assert "install" in str(raises(ConfigError, load_pins, root + "/none.json"))
    write(root + "/list.json", [1, 2])
    assert "not a pin map" in str(raises(ConfigError, load_pins, root + "/list.json"))
    write(root + "/ok.json", PINS)
    pins = load_pins(root + "/ok.json")
    config = validate(good_config())
    check_match(config, pins)
    config["buttons"] = 5
    err = raises(ConfigError, check_match, config, pins)
    assert err.key == "buttons" and "wires 4" in str(err)


def test_crash_log_keeps_the_last_traceback():
    root = tempdir("crash")
    lines = []
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        text = log_crash(exc, root + "/crash.log", lines.append)
    assert "RuntimeError" in text and "boom" in text
    assert lines[0].startswith("palaute: fatal: ")
    with open(root + "/crash.log") as f:
        assert "boom" in f.read()
    assert "boom" in log_crash(ValueError("boom"), root + "/missing-dir/crash.log", lines.append)
    assert "ValueError" in describe(ValueError("x"))


def wifi_config():
    config = good_config()
    config["wifi"] = {"ssid": "Cafe", "password": "wrong"}
    return config


def test_rejected_wifi_password_is_safe_mode_until_fixed():
    errors = [CredentialsRejected("credentials rejected by 'Cafe'; re-provision with the "
                                  "right Wi-Fi password")]
    rig = Rig({"join_errors": errors})
    write(rig.board_path, PINS)
    write(rig.config_path, wifi_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert [e.key for e in boot.errors] == ["wifi"]
    assert rig.logged[0] == ("palaute: safe mode: wifi: credentials rejected by 'Cafe'; "
                             "re-provision with the right Wi-Fi password (retrying in 7s)")
    # The board built with the rejected config was released before safe mode took the pins.
    assert rig.boards[0].deinited and rig.boards[1].config is None
    assert rig.sleeps == 1 and boot.terminal.ran
    assert rig.logged[-1] == "palaute: running pt-0123456789ab (firmware 0.1.0)"


def test_other_wifi_failures_are_logged_and_the_terminal_runs():
    rig = Rig({"join_errors": [OSError("wifi: no network 'Cafe' in range")]})
    write(rig.board_path, PINS)
    write(rig.config_path, wifi_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert boot.errors == [] and rig.sleeps == 0 and boot.terminal.ran
    assert rig.logged[0] == ("palaute: network: wifi: no network 'Cafe' in range "
                             "(the terminal keeps trying)")


def test_no_wifi_in_the_config_skips_the_join():
    rig = Rig({"join_errors": [CredentialsRejected("never raised")]})
    write(rig.board_path, PINS)
    write(rig.config_path, good_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert boot.errors == [] and boot.terminal.ran


def test_repl_lock_is_applied_once_the_terminal_can_run():
    rig = Rig()
    write(rig.board_path, PINS)
    config = good_config()
    config["repl_lock"] = True
    write(rig.config_path, config)
    boot = rig.boot()
    asyncio.run(boot.run())
    assert getattr(boot.board, "locked", False)
    assert rig.logged[-1] == ("palaute: REPL locked: Ctrl-C is off until test mode (hold "
                              "buttons 1 and 4 for 5 s)")


def test_repl_stays_unlocked_without_repl_lock_and_in_safe_mode():
    rig = Rig()
    write(rig.board_path, PINS)
    write(rig.config_path, good_config())
    boot = rig.boot()
    asyncio.run(boot.run())
    assert not getattr(boot.board, "locked", False)
    config = good_config()
    config["repl_lock"] = "yes"
    assert str(raises(ConfigError, validate, config)) == "repl_lock: missing or not a bool"
