"""Shared plumbing for the service fixtures: free ports, waiting, and missing binaries."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest

VENV_BIN = Path(sys.executable).parent


def in_ci() -> bool:
    """True when running under CI, where every real-service test is mandatory."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def require_binary(name: str, hint: str, extra_dirs: tuple[str, ...] = ()) -> str:
    """Return the path of executable ``name``; fail (CI) or skip (local) loudly if absent."""
    for directory in (str(VENV_BIN), *extra_dirs):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: {hint}"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; raise with ``what`` in the message on timeout.

    Used only where no event can be awaited (a server process becoming ready).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def kill_process(process: subprocess.Popen[bytes]) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit): SIGKILL if still alive."""
    if process.poll() is None:
        process.kill()
        process.wait()


def file_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file under a header naming it ('' if absent)."""
    if not path.exists():
        return ""
    tail = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path}:\n" + "\n".join(tail)


class ServerProcess:
    """What the service fixtures share: waiting for readiness with the log in every error.

    Subclasses provide ``service_name``, ``running`` and ``log_tail()``, and keep their
    process in ``_process``, its kill-at-exit finalizer in ``_finalizer`` and the open output
    file in ``_log``.
    """

    service_name = "server"
    stop_timeout = 30.0
    _process: subprocess.Popen[bytes] | None = None
    _finalizer: weakref.finalize[Any, Any] | None = None
    _log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        raise NotImplementedError

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        raise NotImplementedError

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_until`` that fails at once, with the log, if the server has exited."""
        def check() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.service_name} exited while waiting for {what}\n"
                                   f"{self.log_tail()}")
            return predicate()
        try:
            wait_until(check, timeout, what)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def _signal_and_wait(self, signum: signal.Signals) -> None:
        """Send ``signum``, wait (SIGKILL if it hangs), and release the process's resources."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
