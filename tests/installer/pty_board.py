"""Serial ports for the installer tests: a MicroPython "board" on a pty, and broken ports.

``pty_board`` runs ``mp_raw_repl_board.py`` under the real MicroPython unix port with its
stdin/stdout on the master side of a pty; the installer opens the slave side (``.port``, a
``/dev/pts/N`` path) with pyserial, exactly as it opens ``/dev/ttyUSB0``.  The board's working
directory is a temporary "flash" (``.flash_dir``), which the installer reaches with
``root=str(flash_dir)`` (files under ``/`` on a real board).

``garbage_port`` answers every write with random bytes that are not MicroPython's;
``silent_port`` never answers.
"""

from __future__ import annotations

import json
import os
import queue
import random
import select
import socket
import subprocess
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from installer.raw_repl import ROOT_ENV, UNIQUE_ID_ENV
from tests.services.micropython import micropython_command

BOARD_SCRIPT = Path(__file__).with_name("mp_raw_repl_board.py")
SIM_BOARD_SOURCE = Path(__file__).resolve().parents[2] / "firmware" / "terminal" / "board_sim.py"
RESET_EXIT = 3
"""The emulator's exit status after ``machine.reset()`` (``RESET_EXIT`` there)."""


def _open_raw_pty() -> tuple[int, int, str]:
    """A pty in raw mode (bytes pass unchanged both ways): (master fd, slave fd, slave path)."""
    master, slave = os.openpty()
    # Line discipline settings live on the slave; raw mode turns off echo, CR/LF mapping and
    # signal characters (Ctrl-C must reach the board as a byte, not as SIGINT).
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


class BoardControl:
    """The test's end of a running firmware's control channel (``PALAUTE_SIM_CONTROL``):
    events the simulated board reports, and button presses sent to it."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._conn: socket.socket | None = None
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            self._conn = conn
            self._connected.set()
            with conn.makefile("rb") as lines:
                try:
                    for line in lines:
                        self.events.put(json.loads(line))
                except OSError:
                    pass  # the board was reset or stopped

    def wait_for(self, name: str, timeout: float = 30) -> dict[str, Any]:
        """The next event called ``name`` (others are consumed)."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                break
            if event["ev"] == name:
                return event
        raise TimeoutError(f"no {name!r} event from the board within {timeout}s")

    def send(self, op: str, button: int, timeout: float = 30) -> None:
        """Send ``press``, ``hold`` or ``release`` for ``button`` to the running firmware."""
        if not self._connected.wait(timeout):
            raise TimeoutError("the firmware never connected its control channel")
        assert self._conn is not None
        self._conn.sendall(json.dumps({"op": op, "button": button}).encode() + b"\n")

    def press(self, button: int, timeout: float = 30) -> int:
        """Tap ``button`` on the running firmware's board; return the vote's seq."""
        self.send("press", button, timeout)
        return int(self.wait_for("vote", timeout)["data"][0])

    def close(self) -> None:
        """Stop listening and drop the connection."""
        self._server.close()
        if self._conn is not None:
            self._conn.close()


@dataclass
class PtyBoard:
    """A running test board: ``port`` to open, ``flash_dir`` holding its files.

    ``machine.reset()`` on the board ends its interpreter with ``RESET_EXIT``; a watcher
    thread then starts a fresh one on the same pty (the board out of reset, running the
    provisioned ``main.py`` if there is one).  ``resets`` counts those restarts.
    """

    port: str
    flash_dir: Path
    unique_id: bytes
    env: dict[str, str]
    # The fixture keeps both pty ends open: the master is every interpreter's stdin/stdout
    # (kept across resets, as a USB-UART bridge stays enumerated while the chip resets), and
    # reading the master of a pty whose slave has no open fd fails with EIO.
    _master: int
    _slave: int
    _stderr: Path
    process: subprocess.Popen[bytes] | None = None
    control: BoardControl | None = None
    native_usb: bool = False
    """Like an ESP32-S3 on its USB port: a reset takes the serial device away (the host's
    open port fails) and the board comes back on a new one (``port`` changes)."""
    resets: int = 0
    _closed: bool = field(default=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _reset_seen: threading.Condition = field(default_factory=threading.Condition)

    @property
    def root(self) -> str:
        """The ``root`` argument that maps device paths into ``flash_dir``."""
        return str(self.flash_dir)

    def stderr(self) -> str:
        """What the interpreter wrote on stderr (crashes of the emulator land here)."""
        return self._stderr.read_text(errors="replace")

    def _spawn(self) -> None:
        with self._stderr.open("ab") as stderr:
            self.process = subprocess.Popen(
                [*micropython_command(), str(BOARD_SCRIPT)], stdin=self._master,
                stdout=self._master, stderr=stderr, cwd=self.flash_dir, env=self.env)
        threading.Thread(target=self._watch, args=(self.process,), daemon=True).start()

    def _watch(self, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        with self._lock:
            if self._closed or code != RESET_EXIT:
                return
            if self.native_usb:
                os.close(self._master)
                os.close(self._slave)
                self._master, self._slave, self.port = _open_raw_pty()
            self._spawn()
        with self._reset_seen:
            self.resets += 1
            self._reset_seen.notify_all()

    def wait_resets(self, count: int, timeout: float = 30) -> None:
        """Wait until the board has come out of ``count`` resets in all."""
        with self._reset_seen:
            if not self._reset_seen.wait_for(lambda: self.resets >= count, timeout):
                raise TimeoutError(f"the board on {self.port} was reset {self.resets} times, "
                                   f"not {count}")

    def stop(self) -> None:
        """Stop the interpreter and close the pty ("unplug" the board)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        if self.control is not None:
            self.control.close()
        os.close(self._slave)
        os.close(self._master)


def start_board(flash_dir: Path, unique_id: bytes, log_dir: Path, *,
                networks: dict[str, str] | None = None, control: bool = False,
                native_usb: bool = False) -> PtyBoard:
    """Start a board whose flash is ``flash_dir`` and whose ``machine.unique_id()`` would be
    ``unique_id`` (given to the emulator in its environment).

    ``networks`` (SSID -> password) are the Wi-Fi networks its firmware can join (default:
    any); ``control`` opens a :class:`BoardControl` to press its buttons; ``native_usb``: see
    :attr:`PtyBoard.native_usb`.
    """
    flash_dir.mkdir(parents=True, exist_ok=True)
    master, slave, path = _open_raw_pty()
    env = dict(os.environ, **{UNIQUE_ID_ENV: unique_id.hex(), ROOT_ENV: str(flash_dir),
                              "PALAUTE_SIM_BOARD": str(SIM_BOARD_SOURCE)})
    if networks is not None:
        env["PALAUTE_SIM_NETWORKS"] = json.dumps(networks)
    board = PtyBoard(port=path, flash_dir=flash_dir, unique_id=unique_id, env=env,
                     _master=master, _slave=slave, native_usb=native_usb,
                     _stderr=log_dir / f"board-{unique_id.hex()}.stderr")
    if control:
        board.control = BoardControl()
        env["PALAUTE_SIM_CONTROL"] = str(board.control.port)
    board._spawn()
    return board


@pytest.fixture
def pty_board(tmp_path: Path) -> Iterator[PtyBoard]:
    """A MicroPython board on a pty, with its own random unique id and an empty flash."""
    board = start_board(tmp_path / "flash", random.randbytes(6), tmp_path)
    try:
        yield board
    finally:
        board.stop()


@pytest.fixture
def pty_board_factory(tmp_path: Path) -> Iterator[Callable[..., PtyBoard]]:
    """Start more boards: ``factory(unique_id, **start_board_options)``; each gets its own
    flash, all are stopped."""
    boards: list[PtyBoard] = []

    def factory(unique_id: bytes, **options: Any) -> PtyBoard:
        board = start_board(tmp_path / f"flash-{len(boards)}", unique_id, tmp_path, **options)
        boards.append(board)
        return board

    try:
        yield factory
    finally:
        for board in boards:
            board.stop()


class _Responder:
    """The far end of a pty: answer each write with ``reply(data)``, until stopped."""

    def __init__(self, master: int, reply: bytes | None) -> None:
        self.master = master
        self.reply = reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(1234)
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                os.read(self.master, 4096)
                if self.reply is not None:
                    # Line noise as from a wrong baud rate: never MicroPython's banner.
                    os.write(self.master, bytes(rng.choice(self.reply) for _ in range(32)))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def garbage_port() -> Iterator[str]:
    """A port whose other end answers every write with random non-MicroPython bytes."""
    master, slave, path = _open_raw_pty()
    responder = _Responder(master, bytes(range(0x80, 0x100)))
    try:
        yield path
    finally:
        responder.stop()
        os.close(master)
        os.close(slave)


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A port with nothing answering (a board that is off, or stuck in its bootloader)."""
    master, slave, path = _open_raw_pty()
    # Reading (and discarding) keeps the writes from filling the pty buffer; never replies.
    responder = _Responder(master, None)
    try:
        yield path
    finally:
        responder.stop()
        os.close(master)
        os.close(slave)
