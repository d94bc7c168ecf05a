"""Health telemetry into InfluxDB, without ever slowing vote ingest.

The ingest worker hands every health sample to ``InfluxTelemetry.write``, which only appends
to a bounded in-memory buffer.  A background thread sends the buffer in batches (gzip, one
HTTP request per batch) and retries a failed batch with backoff.  If InfluxDB stays away the
buffer fills; then the oldest samples are dropped and counted: health is a time series where
the newest sample matters most, and votes — which live in the SQL database — are never
involved.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS

log = logging.getLogger("palaute.telemetry")

# Numeric health fields written as InfluxDB fields (protocol v1 health payload).
NUMERIC_FIELDS = ("uptime_s", "heap_free", "rssi", "battery_mv", "queue", "content_version",
                  "reconnects", "dropped", "resends", "corrupt")
# Low-cardinality strings become tags so they can be grouped by.
STRING_TAGS = ("fw", "reset_cause")


@dataclass
class TelemetryStats:
    """Counters of what the writer did."""

    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    failed_batches: int = 0

    def drop(self, reason: str, count: int) -> None:
        """Count ``count`` samples lost for ``reason``."""
        self.dropped[reason] = self.dropped.get(reason, 0) + count


def health_point(device_id: str, sample: Mapping[str, Any], tags: Mapping[str, str],
                 received_ms: int) -> Point | None:
    """A ``health`` point from a health payload; None if it has no numeric field."""
    point = Point("health").tag("device", device_id)
    for key, value in tags.items():
        if value:
            point = point.tag(key, value)
    for key in STRING_TAGS:
        text = sample.get(key)
        if isinstance(text, str) and text:
            point = point.tag(key, text[:64])
    fields = 0
    for key in NUMERIC_FIELDS:
        number = sample.get(key)
        if isinstance(number, int | float) and not isinstance(number, bool):
            point = point.field(key, number)
            fields += 1
    if not fields:
        return None
    # The terminal's clock may be unset (null) or wrong; the fleet's receive time is the
    # trustworthy one for a sample that is only interesting while it is fresh.
    return point.time(received_ms, WritePrecision.MS)


class InfluxTelemetry:
    """Buffered, non-blocking writer of health points to InfluxDB (see module docstring)."""

    max_buffer = 50_000
    batch_size = 5_000
    flush_interval_s = 1.0
    retry_initial_s = 1.0
    retry_max_s = 30.0
    request_timeout_ms = 10_000

    def __init__(self, url: str, token: str, org: str, bucket: str, *,
                 max_buffer: int | None = None, flush_interval_s: float | None = None) -> None:
        if max_buffer is not None:
            self.max_buffer = max_buffer
        if flush_interval_s is not None:
            self.flush_interval_s = flush_interval_s
        self.bucket = bucket
        self.stats = TelemetryStats()
        self._client = InfluxDBClient(url=url, token=token, org=org, enable_gzip=True,
                                      timeout=self.request_timeout_ms)
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._buffer: deque[Point] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def write(self, device_id: str, sample: Mapping[str, Any], tags: Mapping[str, str],
              received_ms: int) -> None:
        """Queue one health sample; returns at once whatever state InfluxDB is in."""
        point = health_point(device_id, sample, tags, received_ms)
        if point is None:
            return
        with self._lock:
            if len(self._buffer) >= self.max_buffer:
                self._buffer.popleft()
                self.stats.drop("buffer_full", 1)
            self._buffer.append(point)
            self._idle.clear()
        if len(self._buffer) >= self.batch_size:
            self._wake.set()

    @property
    def buffered(self) -> int:
        """Samples waiting to be sent."""
        return len(self._buffer)

    def flush(self, timeout: float = 10.0) -> bool:
        """Ask for an immediate send and wait until the buffer is empty (or ``timeout``)."""
        self._wake.set()
        return self._idle.wait(timeout)

    def _take(self) -> list[Point]:
        with self._lock:
            count = min(self.batch_size, len(self._buffer))
            return [self._buffer.popleft() for _ in range(count)]

    def _send(self, batch: list[Point]) -> bool:
        try:
            self._write_api.write(bucket=self.bucket, record=batch,
                                  write_precision=WritePrecision.MS)
        except Exception as exc:  # any client/HTTP/network failure: keep the batch, retry
            self.stats.failed_batches += 1
            log.warning("telemetry write of %d points failed: %s", len(batch), exc)
            return False
        self.stats.written += len(batch)
        return True

    def _run(self) -> None:
        delay = self.retry_initial_s
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            while not self._stop.is_set():
                batch = self._take()
                if not batch:
                    self._idle.set()
                    break
                if self._send(batch):
                    delay = self.retry_initial_s
                    continue
                with self._lock:
                    # Put the batch back in front, within the bound; what does not fit is
                    # the oldest data and is counted as lost.
                    room = self.max_buffer - len(self._buffer)
                    keep = batch[-room:] if room > 0 else []
                    self.stats.drop("buffer_full", len(batch) - len(keep))
                    self._buffer.extendleft(reversed(keep))
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max_s)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered (best effort within ``timeout``) and stop."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            if self._buffer:
                self.stats.drop("shutdown", len(self._buffer))
                self._buffer.clear()
        self._client.close()
