"""Run ``palaute ingest`` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.services.clock import now_ms
from tests.services.common import wait_until

if TYPE_CHECKING:
    from tests.services.mosquitto import MosquittoBroker

PALAUTE = Path(sys.executable).parent / "palaute"


class IngestProcess:
    """One ``palaute ingest`` worker process with its own MQTT client id."""

    def __init__(self, *, db_url: str, mqtt_url: str, workdir: Path, worker_id: str,
                 extra_env: dict[str, str] | None = None) -> None:
        self.worker_id = worker_id
        self.log_path = workdir / f"{worker_id}.log"
        self.env = dict(os.environ, PALAUTE_DB_URL=db_url, PALAUTE_MQTT_URL=mqtt_url,
                        PALAUTE_ENVIRONMENT="test", **(extra_env or {}))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the worker; terminals re-send until it is subscribed, so no wait is needed."""
        with open(self.log_path, "ab") as log:
            log.write(f"--- start at {now_ms()}\n".encode())
            self.process = subprocess.Popen(
                [str(PALAUTE), "ingest", "--worker-id", self.worker_id], env=self.env,
                stdout=log, stderr=subprocess.STDOUT)

    def start_subscribed(self, broker: MosquittoBroker, timeout: float = 30) -> None:
        """Start, then wait until ``broker`` logs this worker's subscription.

        No event reaches the caller from another process; the broker's subscribe log line is
        the earliest proof that deliveries will flow to this worker.
        """
        offset = broker.log_file.stat().st_size
        self.start()
        # Default shared group and topic root (neither is overridden by the callers).
        pattern = re.compile(
            rf"{re.escape(self.worker_id)} 1 \$share/palaute-ingest/fb/v1/d/\+/status")

        def subscribed() -> bool:
            with open(broker.log_file, "rb") as log:
                log.seek(offset)
                return bool(pattern.search(log.read().decode(errors="replace")))
        wait_until(subscribed, timeout, f"{self.worker_id} to subscribe\n{self.log_tail()}")

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
