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

import os
import random
import select
import subprocess
import threading
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from installer.raw_repl import UNIQUE_ID_ENV
from tests.services.micropython import micropython_command

BOARD_SCRIPT = Path(__file__).with_name("mp_raw_repl_board.py")


def _open_raw_pty() -> tuple[int, int, str]:
    """A pty in raw mode (bytes pass unchanged both ways): (master fd, slave fd, slave path)."""
    master, slave = os.openpty()
    # Line discipline settings live on the slave; raw mode turns off echo, CR/LF mapping and
    # signal characters (Ctrl-C must reach the board as a byte, not as SIGINT).
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


@dataclass
class PtyBoard:
    """A running test board: ``port`` to open, ``flash_dir`` holding its files."""

    port: str
    flash_dir: Path
    unique_id: bytes
    process: subprocess.Popen[bytes]
    # The test keeps the slave open: reading the master of a pty whose slave has no open fd
    # fails with EIO, which would "unplug" the board between installer connections.
    _slave: int
    _stderr: Path
    _closed: bool = field(default=False)

    @property
    def root(self) -> str:
        """The ``root`` argument that maps device paths into ``flash_dir``."""
        return str(self.flash_dir)

    def stderr(self) -> str:
        """What the interpreter wrote on stderr (crashes of the emulator land here)."""
        return self._stderr.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the interpreter and close the pty ("unplug" the board)."""
        if self._closed:
            return
        self._closed = True
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        os.close(self._slave)


def start_board(flash_dir: Path, unique_id: bytes, log_dir: Path) -> PtyBoard:
    """Start a board whose flash is ``flash_dir`` and whose ``machine.unique_id()`` would be
    ``unique_id`` (given to the emulator in its environment)."""
    flash_dir.mkdir(parents=True, exist_ok=True)
    master, slave, path = _open_raw_pty()
    stderr_path = log_dir / f"board-{unique_id.hex()}.stderr"
    env = dict(os.environ, **{UNIQUE_ID_ENV: unique_id.hex()})
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [*micropython_command(), str(BOARD_SCRIPT)], stdin=master, stdout=master,
            stderr=stderr, cwd=flash_dir, env=env)
    os.close(master)  # the interpreter holds its own copy
    return PtyBoard(port=path, flash_dir=flash_dir, unique_id=unique_id, process=process,
                    _slave=slave, _stderr=stderr_path)


@pytest.fixture
def pty_board(tmp_path: Path) -> Iterator[PtyBoard]:
    """A MicroPython board on a pty, with its own random unique id and an empty flash."""
    board = start_board(tmp_path / "flash", random.randbytes(6), tmp_path)
    try:
        yield board
    finally:
        board.stop()


@pytest.fixture
def pty_board_factory(tmp_path: Path) -> Iterator[Callable[[bytes], PtyBoard]]:
    """Start more boards: ``factory(unique_id)``; each gets its own flash, all are stopped."""
    boards: list[PtyBoard] = []

    def factory(unique_id: bytes) -> PtyBoard:
        board = start_board(tmp_path / f"flash-{len(boards)}", unique_id, tmp_path)
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
