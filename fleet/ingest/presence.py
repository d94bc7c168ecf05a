"""Presence: devices that fall silent are marked offline by a periodic sweep.

``status`` messages (retained, with the MQTT will as the offline message) say when a terminal
connects and disconnects.  A will is not always published, though: a broker that restarts
without its persistence, a session taken over, a network that drops packets without closing
the connection for a long time.  So a device that has sent nothing at all — no vote, no
health sample, no status — for three health intervals is marked offline as well.  Terminals
send health every interval, so three missed samples in a row mean the device is gone.

The sweep is one ``UPDATE … WHERE online AND last_seen_ms < now - timeout``: idempotent, so
every worker of a fleet may run it (they do; the extra statements are negligible).
"""

from __future__ import annotations

import threading

from sqlalchemy import or_, update
from sqlalchemy.orm import Session

from fleet.db.models import Device

# A device is offline after this many health intervals of silence.
MISSED_INTERVALS = 3
# The sweep runs at most this often; timeouts are minutes, so a minute of delay is noise.
MAX_SWEEP_PERIOD_MS = 60_000


def mark_silent_offline(session: Session, *, now_ms: int, timeout_ms: int) -> int:
    """Mark online devices not heard from since ``now_ms - timeout_ms`` offline; return count."""
    result = session.execute(
        update(Device)
        .where(Device.online.is_(True),
               or_(Device.last_seen_ms.is_(None), Device.last_seen_ms < now_ms - timeout_ms))
        .values(online=False)
        .execution_options(synchronize_session=False))
    return int(getattr(result, "rowcount", 0) or 0)


class PresenceSweeper:
    """Decides when the next sweep is due (on the worker's clock) and records each sweep.

    ``health_interval_s`` is the terminals' health period; the timeout is three of them and a
    sweep runs every interval (at most every minute), so a silent device is marked offline
    between ``timeout`` and ``timeout + period`` after its last message.
    """

    def __init__(self, health_interval_s: float) -> None:
        if health_interval_s <= 0:
            raise ValueError("health_interval_s must be positive")
        self.timeout_ms = round(MISSED_INTERVALS * health_interval_s * 1000)
        self.period_ms = max(1, min(round(health_interval_s * 1000), MAX_SWEEP_PERIOD_MS))
        self._next_ms: int | None = None
        self._done = threading.Condition()
        self.sweeps = 0
        self.marked_offline = 0
        self.last_sweep_ms: int | None = None

    def due(self, now_ms: int) -> bool:
        """True when a sweep should run at ``now_ms`` (the first call schedules one)."""
        if self._next_ms is None:
            # Not at start-up: devices whose status is still on its way would flap.
            self._next_ms = now_ms + self.period_ms
            return False
        return now_ms >= self._next_ms

    def sweep(self, session: Session, now_ms: int) -> int:
        """Run the UPDATE in ``session`` (the caller commits, then calls :meth:`record`)."""
        return mark_silent_offline(session, now_ms=now_ms, timeout_ms=self.timeout_ms)

    def record(self, now_ms: int, marked: int) -> None:
        """Note a committed sweep and schedule the next one."""
        self._next_ms = now_ms + self.period_ms
        with self._done:
            self.sweeps += 1
            self.marked_offline += marked
            self.last_sweep_ms = now_ms
            self._done.notify_all()

    def wait_for_sweep(self, at_ms: int, timeout: float) -> bool:
        """Block until a sweep as of ``at_ms`` or later has committed (tests, diagnostics)."""
        def swept() -> bool:
            return self.last_sweep_ms is not None and self.last_sweep_ms >= at_ms
        with self._done:
            return self._done.wait_for(swept, timeout)
