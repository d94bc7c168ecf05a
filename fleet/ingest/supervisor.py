"""``palaute ingest --processes N``: N worker processes on one host, kept running.

One Python process uses about one core: its threads share the interpreter lock.  A host
with more cores runs more workers, which share the load through the MQTT shared
subscription like workers on different hosts do.  This supervisor starts them as child
processes of one command (one systemd unit, one container), restarts a child that dies,
and stops them all on SIGTERM or Ctrl-C.

Each child is a plain ``palaute ingest`` with a client id of its own, stable across
restarts (``<id>-1`` … ``<id>-N``), so the broker keeps each one's persistent session and
a restarted child gets what it missed.  Its ``/metrics`` and ``/healthz`` are on the metrics
port plus its index minus one.  A child also stops by itself when the supervisor is gone
(SIGKILLed, say), so no orphaned worker keeps consuming without supervision.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("palaute.ingest")

# A child that ran this long before dying counts as having started fine: it is restarted
# at once; one that keeps dying sooner waits twice as long each time, up to MAX_BACKOFF_S.
HEALTHY_RUN_S = 30.0
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
# How long children get to finish their batch and disconnect after SIGTERM.
STOP_GRACE_S = 30.0


def child_id(base: str, index: int) -> str:
    """The MQTT client id of child ``index`` (1-based) of a supervisor named ``base``."""
    return f"{base}-{index}"


@dataclass
class _Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Starts, watches and stops ``count`` ``palaute ingest`` child processes."""

    def __init__(self, count: int, *, worker_id: str, metrics_port: int, metrics_host: str,
                 connect_timeout: float) -> None:
        """Prepare ``count`` children; nothing starts before :meth:`run`."""
        self.count = count
        self.worker_id = worker_id
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.connect_timeout = connect_timeout
        self.restarts = 0
        self._children = [_Child(index) for index in range(1, count + 1)]
        self._stop = threading.Event()

    def command(self, index: int) -> list[str]:
        """The command line of child ``index``: one worker, no supervisor of its own."""
        port = self.metrics_port + index - 1 if self.metrics_port else 0
        return [sys.executable, "-m", "fleet.cli", "ingest", "--processes", "1",
                "--worker-id", child_id(self.worker_id, index),
                "--metrics-port", str(port), "--metrics-host", self.metrics_host,
                "--connect-timeout", str(self.connect_timeout),
                "--supervisor-pid", str(os.getpid())]

    def stop(self) -> None:
        """Ask :meth:`run` to stop the children and return (safe from a signal handler)."""
        self._stop.set()

    def run(self) -> int:
        """Start the children and keep them running until :meth:`stop`; then stop them."""
        log.info("starting %d ingest worker processes", self.count)
        try:
            for child in self._children:
                self._start(child)
            while not self._stop.wait(0.2):
                self._check(time.monotonic())
        finally:
            self._stop_all()
        return 0

    def _start(self, child: _Child) -> None:
        # stdout and stderr are the supervisor's: one log stream for the whole unit.
        child.process = subprocess.Popen(self.command(child.index))
        child.started = time.monotonic()
        log.info("ingest worker %s started (pid %d)",
                 child_id(self.worker_id, child.index), child.process.pid)

    def _check(self, now: float) -> None:
        for child in self._children:
            process = child.process
            if process is not None:
                code = process.poll()
                if code is None:
                    continue
                ran = now - child.started
                child.backoff_s = (0.0 if ran >= HEALTHY_RUN_S else
                                   min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, 2 * child.backoff_s)))
                child.restart_at = now + child.backoff_s
                child.process = None
                log.error("ingest worker %s exited with %s after %.1fs; restarting in %.0fs",
                          child_id(self.worker_id, child.index), _describe(code), ran,
                          child.backoff_s)
            if now >= child.restart_at:
                self.restarts += 1
                self._start(child)

    def _stop_all(self) -> None:
        running = [c.process for c in self._children
                   if c.process is not None and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in running:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("ingest worker pid %d did not stop in %.0fs; killing it",
                          process.pid, STOP_GRACE_S)
                process.kill()
                process.wait()


def _describe(code: int) -> str:
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def supervisor_gone(pid: int) -> bool:
    """True when the process that started this one as its supervisor is no longer its
    parent (it died: the child was re-parented)."""
    return os.getppid() != pid
