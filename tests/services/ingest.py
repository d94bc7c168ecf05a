"""Run ``palaute ingest`` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.ingest.supervisor import child_id
from fleet.services.clock import now_ms
from tests.services.common import wait_until

if TYPE_CHECKING:
    from tests.services.mosquitto import MosquittoBroker

PALAUTE = Path(sys.executable).parent / "palaute"


class IngestProcess:
    """One ``palaute ingest`` command with its own MQTT client id: one worker process, or
    with ``processes`` > 1 a supervisor of that many (client ids ``<worker_id>-1…N``)."""

    def __init__(self, *, db_url: str, mqtt_url: str, workdir: Path, worker_id: str,
                 extra_env: dict[str, str] | None = None, processes: int | None = None
                 ) -> None:
        self.worker_id = worker_id
        self.log_path = workdir / f"{worker_id}.log"
        self.env = dict(os.environ, PALAUTE_DB_URL=db_url, PALAUTE_MQTT_URL=mqtt_url,
                        PALAUTE_ENVIRONMENT="test", **(extra_env or {}))
        # As `palaute ingest` decides it: the argument, else PALAUTE_INGEST_PROCESSES.  The
        # option is passed only when given (the benchmark also runs commits without it).
        self.option = [] if processes is None else ["--processes", str(processes)]
        self.processes = (processes if processes is not None
                          else int(self.env.get("PALAUTE_INGEST_PROCESSES", "1")))
        self.client_ids = ([worker_id] if self.processes == 1 else
                           [child_id(worker_id, i) for i in range(1, self.processes + 1)])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the worker; terminals re-send until it is subscribed, so no wait is needed."""
        with open(self.log_path, "ab") as log:
            log.write(f"--- start at {now_ms()}\n".encode())
            self.process = subprocess.Popen(
                [str(PALAUTE), "ingest", "--worker-id", self.worker_id, *self.option],
                env=self.env,
                stdout=log, stderr=subprocess.STDOUT)

    def start_subscribed(self, broker: MosquittoBroker, timeout: float = 30) -> None:
        """Start, then wait until ``broker`` logs this worker's subscription.

        No event reaches the caller from another process; the broker's subscribe log line is
        the earliest proof that deliveries will flow to this worker.
        """
        offset = broker.log_file.stat().st_size
        self.start()
        self.wait_subscribed(broker, offset, self.client_ids, timeout)

    def wait_subscribed(self, broker: MosquittoBroker, offset: int, client_ids: list[str],
                        timeout: float = 30) -> None:
        """Wait until ``broker`` has logged, after byte ``offset`` of its log, the
        subscription of every one of ``client_ids``."""
        # Default shared group and topic root (neither is overridden by the callers).
        patterns = [re.compile(rf"{re.escape(c)} 1 \$share/palaute-ingest/fb/v1/d/\+/status")
                    for c in client_ids]

        def subscribed() -> bool:
            with open(broker.log_file, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            return all(p.search(text) for p in patterns)
        wait_until(subscribed, timeout, f"{client_ids} to subscribe\n{self.log_tail()}")

    def children(self) -> dict[int, str]:
        """The supervisor's worker processes now: pid → MQTT client id (Linux ``/proc``)."""
        assert self.process is not None
        pid = self.process.pid
        found = {}
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            argv = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
            found[int(child)] = argv[argv.index("--worker-id") + 1]
        return found

    def stop(self) -> None:
        """SIGTERM and wait (a clean shutdown)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: the worker dies mid-stream."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the worker's output."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
