"""Host-side harness that starts simulated terminals as separate processes and drives them.

Each terminal runs ``simulator/terminal_main.py`` under the real MicroPython interpreter (or
CPython) and connects back to a control server here.  Tests press buttons, cut the network
and kill processes, and await the events the terminal reports instead of sleeping.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware"
MAIN = Path(__file__).resolve().parent / "terminal_main.py"

Event = dict[str, Any]
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class TerminalProcess:
    """One simulated terminal process and its control connection."""

    def __init__(self, harness: Harness, device_id: str, config: dict[str, Any],
                 storage: Path, command: list[str]) -> None:
        self.harness = harness
        self.device_id = device_id
        self.config = config
        self.storage = storage
        self.command = command
        self.events: queue.Queue[Event] = queue.Queue()
        self.history: list[Event] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._conn: socket.socket | None = None
        self._reader: threading.Thread | None = None  # reads the current process's events
        self._connected = threading.Event()
        storage.mkdir(parents=True, exist_ok=True)
        self.config_path = storage.parent / f"{device_id}.config.json"
        self.config_path.write_text(json.dumps(config))

    # -- process control ---------------------------------------------------------------------
    def start(self, timeout: float = 20) -> Event:
        """Start the process and wait for its ``ready`` event."""
        self._connected.clear()
        env = dict(os.environ)
        firmware = self.harness.firmware_dir
        env["MICROPYPATH"] = f"{firmware}{os.pathsep}.frozen"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(firmware), str(ROOT / "simulator" / "shims"), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [*self.command, str(MAIN), str(self.config_path), str(self.storage),
             str(self.harness.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=self.harness.log_file(self.device_id))
        if not self._connected.wait(timeout):
            self.kill()
            raise TimeoutError(f"{self.device_id} did not connect to the harness:\n"
                               f"{self.harness.log_tail(self.device_id)}")
        return self.wait_for("ready", timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process: a power cut at an arbitrary instant."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        if self._reader is not None:
            # The dead process's socket is at EOF: once its reader is done, ``history`` holds
            # every event the process sent, and none can arrive after the next start's.
            self._reader.join(timeout=5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def stop(self) -> None:
        """Ask the terminal to shut down cleanly, killing it if it does not."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.send({"op": "stop"})
            self.process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.process is not None and self.process.poll() is None

    # -- commands ----------------------------------------------------------------------------
    def send(self, command: dict[str, Any]) -> None:
        """Send one command line to the terminal."""
        if self._conn is None:
            raise OSError(f"{self.device_id} is not connected")
        self._conn.sendall(json.dumps(command).encode() + b"\n")

    def press(self, button: int) -> int:
        """Press ``button`` and return the seq the terminal stored it under."""
        self.send({"op": "press", "button": button})
        return int(self.wait_for("vote")["data"][0])

    def hold(self, button: int) -> int:
        """Press ``button`` and keep it down; returns the seq of the press it starts with."""
        self.send({"op": "hold", "button": button})
        return int(self.wait_for("vote")["data"][0])

    def release(self, button: int) -> None:
        """Let go of a held ``button``."""
        self.send({"op": "release", "button": button})

    def display(self) -> dict[str, Any]:
        """What the terminal shows: text ``lines`` (``question:fi:v3`` for a content screen),
        ``leds``, the 1-bit ``fb`` (bytes in SSD1306 MONO_VLSB layout; None under CPython
        before any content bitmap), the display ``mode`` (on/dim/off), its ``brightness``
        and the ``content_version`` on screen.  Content updates are reported as
        ``reported`` events (the payload the terminal published)."""
        self.send({"op": "display"})
        data = dict(self.wait_for("display")["data"])
        data["fb"] = bytes.fromhex(data["fb"]) if data["fb"] else None
        return data

    def cut_network(self) -> None:
        """Drop the terminal's network (its broker connection dies)."""
        self.send({"op": "net", "up": False})

    def restore_network(self) -> None:
        """Bring the terminal's network back."""
        self.send({"op": "net", "up": True})

    # -- events ------------------------------------------------------------------------------
    def wait_for(self, name: str, predicate: Callable[[Event], bool] | None = None,
                 timeout: float = 30) -> Event:
        """Return the next event called ``name`` (matching ``predicate``), consuming others."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.device_id}: no {name!r} event within {timeout}s; "
                                   f"log:\n{self.harness.log_tail(self.device_id)}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if event["ev"] == name and (predicate is None or predicate(event)):
                return event

    def wait_acked(self, seq: int, timeout: float = 60) -> None:
        """Wait until the terminal has dropped every vote up to ``seq`` after an ack."""
        self.wait_for("acked", lambda e: int(e["data"]) >= seq, timeout=timeout)

    def _attach(self, conn: socket.socket, reader: Any) -> None:
        self._conn = conn
        self._reader = threading.current_thread()
        self._connected.set()
        for line in reader:
            # The terminal writes each event with its own send(), so Nagle's algorithm holds
            # the second event of a press (led, screen, vote) until this side ACKs the first,
            # and a delayed ACK makes that ~40 ms per press.  Quick ACKs avoid the stall
            # (Linux resets the flag after use; elsewhere the option does not exist).
            if _QUICKACK is not None:
                conn.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            event = json.loads(line)
            self.history.append(event)
            self.events.put(event)


class Harness:
    """Control server for simulated terminal processes."""

    def __init__(self, workdir: Path, command: list[str],
                 firmware_dir: Path = FIRMWARE) -> None:
        """``firmware_dir`` holds the ``terminal`` package the processes import (default: the
        sources; a built bundle's ``lib/`` to run the precompiled firmware)."""
        self.workdir = workdir
        self.command = command
        self.firmware_dir = firmware_dir
        self.terminals: dict[str, TerminalProcess] = {}
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = int(self._server.getsockname()[1])
        self._accept = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept.start()

    def log_file(self, device_id: str) -> Any:
        """Open (append) the stderr log of a terminal process."""
        return open(self.workdir / f"{device_id}.log", "ab")

    def log_tail(self, device_id: str, lines: int = 30) -> str:
        """The last lines a terminal process wrote to stderr."""
        path = self.workdir / f"{device_id}.log"
        if not path.exists():
            return "(no output)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def add(self, device_id: str, config: dict[str, Any]) -> TerminalProcess:
        """Create (not start) a terminal with its own flash directory."""
        terminal = TerminalProcess(self, device_id, config, self.workdir / device_id / "flash",
                                   self.command)
        self.terminals[device_id] = terminal
        return terminal

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # server closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("r", encoding="utf-8")
        try:
            hello = json.loads(reader.readline())
            terminal = self.terminals[hello["data"]]
            terminal._attach(conn, reader)
        except (OSError, ValueError, KeyError):
            conn.close()

    def close(self) -> None:
        """Stop every terminal and the control server."""
        for terminal in self.terminals.values():
            terminal.stop()
        self._server.close()
