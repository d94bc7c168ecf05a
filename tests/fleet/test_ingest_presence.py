"""Presence: a device silent for three health intervals is marked offline by the sweep.

The worker runs on a controllable clock, so "ten minutes later" is one assignment and the
test waits for the worker's next committed sweep (an event), not for time to pass.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from fleet.config import Settings
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Device
from fleet.ingest.presence import PresenceSweeper, mark_silent_offline
from fleet.ingest.worker import IngestWorker
from fleet.services import registry
from fleet.services.clock import now_ms
from tests.fleet.test_ingest_worker import AckListener, publish
from tests.services.mosquitto import MosquittoBroker

QUIET = "pt-00000000aaaa"
CHATTY = "pt-00000000bbbb"
HEALTH_INTERVAL_S = 10.0  # on the fake clock: timeout 30 s, a sweep every 10 s


class FakeClock:
    """Epoch milliseconds that move only when the test says so."""

    def __init__(self) -> None:
        self.ms = now_ms()
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self.ms

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.ms += round(seconds * 1000)


def registered(db_url: str) -> sessionmaker[Session]:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        for device_id in (QUIET, CHATTY):
            registry.register_device(session, device_id=device_id)
    return sessions


def test_sweep_marks_only_devices_silent_past_the_timeout(db_url: str) -> None:
    sessions = registered(db_url)
    t = 1_800_000_000_000
    with sessions.begin() as session:
        session.get_one(Device, QUIET).online = True
        session.get_one(Device, QUIET).last_seen_ms = t - 30_001
        session.get_one(Device, CHATTY).online = True
        session.get_one(Device, CHATTY).last_seen_ms = t - 29_999
    with sessions.begin() as session:
        assert mark_silent_offline(session, now_ms=t, timeout_ms=30_000) == 1
    with sessions.begin() as session:  # idempotent: nothing left to mark
        assert mark_silent_offline(session, now_ms=t, timeout_ms=30_000) == 0
    with sessions() as session:
        assert session.get_one(Device, QUIET).online is False
        assert session.get_one(Device, CHATTY).online is True


def test_sweeper_schedule_follows_the_health_interval() -> None:
    sweeper = PresenceSweeper(300)
    assert (sweeper.timeout_ms, sweeper.period_ms) == (900_000, 60_000)
    assert not sweeper.due(0)  # never at start-up
    assert not sweeper.due(59_999)
    assert sweeper.due(60_000)
    sweeper.record(60_000, 2)
    assert not sweeper.due(60_001)
    assert (sweeper.sweeps, sweeper.marked_offline) == (1, 2)
    with pytest.raises(ValueError):
        PresenceSweeper(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def worker(mosquitto: MosquittoBroker, db_url: str, clock: FakeClock
           ) -> Iterator[IngestWorker]:
    settings = Settings(db_url=db_url, environment="test",
                        mqtt_url=mosquitto.url_for(mosquitto.admin_user,
                                                   mosquitto.admin_password))
    worker = IngestWorker(settings, registered(db_url), client_id="presence-ingest",
                          clock=clock, health_interval_s=HEALTH_INTERVAL_S)
    worker.start()
    assert worker.wait_ready(15), "ingest worker did not subscribe"
    yield worker
    worker.stop()


@pytest.mark.mosquitto
def test_worker_marks_a_silent_device_offline_and_keeps_a_chatty_one(
        mosquitto: MosquittoBroker, worker: IngestWorker, clock: FakeClock) -> None:
    listener = AckListener(mosquitto)
    try:
        for device_id in (QUIET, CHATTY):
            publish(mosquitto, f"fb/v1/d/{device_id}/status", b'{"online": true}')
        # The ack of a vote proves both status messages before it were processed.
        publish(mosquitto, f"fb/v1/d/{CHATTY}/votes",
                json.dumps({"votes": [[1, clock(), 1, 0, 0]], "after": 0}).encode())
        listener.next()
        with worker.sessions() as session:
            assert session.get_one(Device, QUIET).online is True

        # 25 s later only CHATTY speaks (a vote counts as being heard from) ...
        clock.advance(25)
        publish(mosquitto, f"fb/v1/d/{CHATTY}/votes",
                json.dumps({"votes": [[2, clock(), 1, 0, 0]], "after": 1}).encode())
        listener.next()
        # ... and 10 s after that QUIET has been silent for 35 s (> 3 x 10 s), CHATTY for 10 s.
        clock.advance(10)
        assert worker.presence.wait_for_sweep(clock(), timeout=10), "no sweep ran"
    finally:
        listener.close()
    with worker.sessions() as session:
        assert session.get_one(Device, QUIET).online is False
        assert session.get_one(Device, CHATTY).online is True
    assert worker.metrics.get("palaute_ingest_presence_timeouts_total") == 1
