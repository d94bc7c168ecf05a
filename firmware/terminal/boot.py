"""Boot sequence: load the config and the pin map, build the board, run the terminal.

A terminal must never crash-loop over a bad or missing file.  While ``/config.json`` or
``/board.json`` is missing or invalid the terminal stays in **safe mode**: it shows the problem
(naming the key, as an installer can act on it) on the display when the pin map allows one,
logs it to the console, and tries again every ``retry_s`` seconds, so a fixed file is picked
up without a power cycle.

Plain MicroPython that also runs under CPython: the hardware comes in through the
``make_board(pins, config)`` factory (``Esp32Board`` on the device, a fake in tests).
``make_board(pins, None)`` must give a display-only board for safe mode.

A Wi-Fi password the access point rejects is also safe mode (key ``wifi``): retrying with the
same password cannot work.  Other network failures are left to the terminal's reconnect loop.

Console lines (the USB serial console; ``palaute provision`` parses them, see
docs/installer.md), each starting with ``palaute: ``:

- ``palaute: safe mode: KEY: REASON (retrying in Ns)``: the terminal cannot run; REASON says
  what to fix;
- ``palaute: network: REASON (the terminal keeps trying)``: Wi-Fi not joined at boot;
- ``palaute: running DEVICE_ID (firmware VERSION)``: files valid, the terminal starts;
- ``palaute: REPL locked: ...``: ``repl_lock`` is on, Ctrl-C is ignored until test mode;
- ``palaute: fatal: TRACEBACK``: an unexpected crash (``main.py`` resets the chip).
"""

import asyncio
import gc
import io
import sys

from terminal import FW_VERSION
from terminal.config import ConfigError, CredentialsRejected, read_json
from terminal.config import load as load_config

CONFIG_PATH = "/config.json"
BOARD_PATH = "/board.json"
CRASH_LOG = "/crash.log"
CRASH_LOG_MAX = 2048  # bytes kept of the last crash's traceback
RETRY_S = 30  # safe mode: seconds between attempts to load the files again
WATCHDOG_MS = 60000  # longer than the worst blocking call (DNS + NTP at boot)
FEED_S = 5
CLOCK_RETRY_S = 600  # NTP retry while the clock is unset (the fleet's acks also set it)
SAFE_MODE_TITLE = "Setup needed"


def load_pins(path):
    """Read the installed pin map (``hardware/boards/<board>.json``, checked on the host)."""
    pins = read_json(path, "board", "cannot read %s; install the board's pin map",
                     "%s is not valid JSON; reinstall the pin map")
    if (not isinstance(pins, dict) or not isinstance(pins.get("board"), str)
            or not isinstance(pins.get("buttons"), list)):
        raise ConfigError("board", "%s is not a pin map; reinstall it from hardware/boards"
                          % path)
    return pins


def check_match(config, pins):
    """The config must be meant for this board and ask for no more buttons than are wired."""
    if config["board"] != pins["board"]:
        raise ConfigError("board", "config.json is for %s but the pin map is for %s; install "
                                   "the matching pin map or fix config.json"
                          % (config["board"], pins["board"]))
    wired = len(pins["buttons"])
    if config["buttons"] > wired:
        raise ConfigError("buttons", "config.json asks for %d buttons but %s wires %d"
                          % (config["buttons"], pins["board"], wired))


def describe(exc):
    """The traceback of ``exc`` as text (MicroPython), or its type and message (CPython)."""
    buf = io.StringIO()
    printer = getattr(sys, "print_exception", None)
    if printer is not None:
        printer(exc, buf)
    else:
        buf.write("%s: %s\n" % (type(exc).__name__, exc))
    return buf.getvalue()


def log_crash(exc, path=CRASH_LOG, log=print):
    """Log an unexpected exception and keep its traceback in ``path`` for after the reset."""
    text = describe(exc)
    log("palaute: fatal: " + text)
    try:
        with open(path, "w") as f:
            f.write(text[-CRASH_LOG_MAX:])
    except OSError:
        pass  # the filesystem itself may be the problem; the console line is all we get
    return text


class Boot:
    """Safe mode until the files are valid, then the terminal with a watchdog."""

    def __init__(self, make_board, make_terminal, *, config_path=CONFIG_PATH,
                 board_path=BOARD_PATH, retry_s=RETRY_S, watchdog_ms=WATCHDOG_MS,
                 log=print, sleep=None):
        self.make_board = make_board
        self.make_terminal = make_terminal
        self.config_path = config_path
        self.board_path = board_path
        self.retry_s = retry_s
        self.watchdog_ms = watchdog_ms
        self.log = log
        self.sleep = sleep or asyncio.sleep
        self.board = None
        self.terminal = None
        self.safe_board = None
        self.errors = []  # every problem that kept the terminal in safe mode, in order

    def _load(self):
        """Load, check and build everything; raise ConfigError on the first problem."""
        pins = load_pins(self.board_path)
        config = load_config(self.config_path)
        check_match(config, pins)
        self._leave_safe_mode()
        try:
            return self.make_board(pins, config), config
        except (ValueError, OSError) as exc:  # a pin the chip refuses, a bus that fails
            raise ConfigError("board", "%s: %s" % (self.board_path, exc)) from None

    def _leave_safe_mode(self):
        if self.safe_board is not None:
            self.safe_board.deinit()
            self.safe_board = None

    def _safe_mode(self, error):
        """Show ``error`` on a display-only board, if the pin map allows one."""
        self.errors.append(error)
        self.log("palaute: safe mode: %s (retrying in %ds)" % (error, self.retry_s))
        if self.safe_board is None:
            try:
                self.safe_board = self.make_board(load_pins(self.board_path), None)
            except Exception as exc:  # no usable pin map or display: the console must do
                self.log("palaute: no display in safe mode: %s" % exc)
                return
        self.safe_board.show((SAFE_MODE_TITLE, str(error)))

    async def setup(self):
        """Return ``(board, config)``, staying in safe mode until both files are valid."""
        while True:
            try:
                board, config = self._load()
                await self._check_network(board, config)
                return board, config
            except ConfigError as exc:
                self._safe_mode(exc)
            await self.sleep(self.retry_s)

    async def _check_network(self, board, config):
        """Join Wi-Fi once; a rejected password is a ConfigError (safe mode), anything else
        is only logged: the access point may simply be out of reach for now."""
        join = getattr(board, "join_network", None)
        if join is None or not config.get("wifi"):
            return
        try:
            await join()
        except CredentialsRejected as exc:
            deinit = getattr(board, "deinit", None)
            if deinit is not None:
                deinit()  # safe mode builds its own display-only board on the same pins
            raise ConfigError("wifi", str(exc)) from None
        except OSError as exc:
            self.log("palaute: network: %s (the terminal keeps trying)" % exc)

    async def _feed(self, board):
        while True:
            board.feed()
            await asyncio.sleep(FEED_S)

    async def _clock(self, board):
        # Set the wall clock once from NTP; the fleet's now_ms on every ack keeps it right.
        while board.time_ms() is None:
            if await board.sync_time():
                return
            await asyncio.sleep(CLOCK_RETRY_S)

    async def run(self):
        """Boot and run the terminal until it stops."""
        board, config = await self.setup()
        self.board = board
        self.log("palaute: running %s (firmware %s)" % (config["device_id"], FW_VERSION))
        if config.get("repl_lock") and hasattr(board, "lock_repl"):
            # After safe mode, never before: a board that cannot run stays reachable.
            board.lock_repl()
            self.log("palaute: REPL locked: Ctrl-C is off until test mode (hold buttons 1 "
                     "and %d for 5 s)" % config["buttons"])
        helpers = []
        if hasattr(board, "start_watchdog"):
            board.start_watchdog(self.watchdog_ms)
            helpers.append(asyncio.create_task(self._feed(board)))
        if hasattr(board, "sync_time"):
            helpers.append(asyncio.create_task(self._clock(board)))
        try:
            gc.collect()
            self.terminal = self.make_terminal(board, config)
            await self.terminal.run()
        finally:
            for task in helpers:
                task.cancel()
