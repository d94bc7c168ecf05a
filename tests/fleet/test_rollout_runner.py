"""``palaute rollout run`` as a real process: it ticks on its own, publishes ``desired`` to the
real broker, and stops cleanly on SIGTERM.  And its publisher with the broker stopped: a
tick that fails leaves nothing behind to be sent after the reconnect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from fleet.rollouts import service
from fleet.rollouts.engine import RolloutEngine
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.runner import BrokerPublisher
from fleet.rollouts.service import RolloutPlan
from tests.fleet.rollout_helpers import (
    MARKER,
    Watcher,
    desired_of,
    device_ids,
    make_fleet,
    retained_desired,
    sessions_for,
    store_content,
)
from tests.services.common import wait_until
from tests.services.mosquitto import MosquittoBroker

pytestmark = pytest.mark.mosquitto
PALAUTE = Path(sys.executable).parent / "palaute"


def _site_rollout(db_url: str, ids: list[str], version: int
                  ) -> tuple[sessionmaker[Session], int]:
    """A site of ``ids``, content ``version`` and a running rollout of it to the site."""
    sessions = sessions_for(db_url)
    with sessions.begin() as session:
        site_id = make_fleet(session, ids)
        store_content(session, version)
        rollout_id = service.create_rollout(session, plan=RolloutPlan(
            content_version=version, target_kind="site", target_ref=str(site_id)),
            packages=StoredPackages()).id
    return sessions, rollout_id


def _connected_publisher(broker: MosquittoBroker, client_id: str, *,
                         timeout_s: float) -> BrokerPublisher:
    """A started publisher (admin account) once it is connected; the caller stops it."""
    publisher = BrokerPublisher(broker.url_for(broker.admin_user, broker.admin_password),
                                client_id, timeout_s=timeout_s)
    publisher.start()
    if not publisher.connected.wait(10):
        publisher.stop()
        raise AssertionError("the publisher did not connect")
    return publisher


def test_the_engine_process_delivers_and_stops_on_sigterm(
        mosquitto: MosquittoBroker, db_url: str, tmp_path: Path) -> None:
    ids = device_ids(3, prefix="0000ee")
    sessions, rollout_id = _site_rollout(db_url, ids, 7)
    watcher = Watcher(mosquitto)
    env = dict(os.environ, PALAUTE_DB_URL=db_url, PALAUTE_ENVIRONMENT="test",
               PALAUTE_MQTT_URL=mosquitto.url_for(mosquitto.admin_user,
                                                  mosquitto.admin_password),
               PALAUTE_ROLLOUT_TICK_S="0.2")
    log = tmp_path / "engine.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(PALAUTE), "rollout", "run", "--client-id", "t-engine"],
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        got = sorted(desired_of(m) for m in watcher.take(3, timeout=30))
        assert [d for d, _ in got] == ids
        assert all(doc is not None and doc["version"] == 7 for _, doc in got)
        # desired goes out before the engine commits: the database follows a moment later.
        def delivered() -> bool:
            with sessions() as session:
                return service.rollout_counts(session, rollout_id).total == {"delivered": 3}
        wait_until(delivered, 15, "the wave to be committed")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
        watcher.close()
    assert code == 0, log.read_text()


def test_a_tick_failing_while_the_broker_is_down_sends_nothing_after_the_restart(
        mosquitto: MosquittoBroker, db_url: str) -> None:
    ids = device_ids(3, prefix="0000ef")
    sessions, rollout_id = _site_rollout(db_url, ids, 7)
    publisher = _connected_publisher(mosquitto, "engine-down", timeout_s=2)
    engine = RolloutEngine(sessions, StoredPackages(), publisher)
    try:
        mosquitto.stop()
        wait_until(lambda: not publisher.connected.is_set(), 15, "the publisher to notice")
        with pytest.raises(ConnectionError, match="not connected"):
            engine.tick(1_000)
        with sessions() as session:  # rolled back: the wave did not start
            assert service.rollout_counts(session, rollout_id).total == {"pending": 3}
        # Meanwhile the user aborts: these devices must never get version 7.
        with sessions.begin() as session:
            service.abort_rollout(session, rollout_id=rollout_id)
        mosquitto.start()
        assert publisher.connected.wait(30), "the publisher did not reconnect"
        # Acknowledged means the broker handled everything this connection sent before it.
        publisher(MARKER, b"marker", retain=False)
        assert retained_desired(mosquitto, ids) == {d: None for d in ids}
        assert engine.tick(2_000).published == 0
        assert retained_desired(mosquitto, ids) == {d: None for d in ids}
    finally:
        publisher.stop()


def test_after_a_failed_tick_the_next_one_publishes_what_the_database_records(
        mosquitto: MosquittoBroker, db_url: str) -> None:
    ids = device_ids(2, prefix="0000f0")
    sessions, rollout_id = _site_rollout(db_url, ids, 8)
    publisher = _connected_publisher(mosquitto, "engine-again", timeout_s=2)
    engine = RolloutEngine(sessions, StoredPackages(), publisher)
    try:
        mosquitto.kill()
        wait_until(lambda: not publisher.connected.is_set(), 15, "the publisher to notice")
        with pytest.raises(ConnectionError):
            engine.tick(1_000)
        mosquitto.start()
        assert publisher.connected.wait(30), "the publisher did not reconnect"
        assert engine.tick(2_000).published == 2
        with sessions() as session:
            assert service.rollout_counts(session, rollout_id).total == {"delivered": 2}
        held = retained_desired(mosquitto, ids)
        assert all(doc is not None and doc["version"] == 8 for doc in held.values())
    finally:
        publisher.stop()


def test_a_publish_the_broker_never_acknowledges_resets_the_connection(
        mosquitto: MosquittoBroker) -> None:
    publisher = _connected_publisher(mosquitto, "engine-frozen", timeout_s=1)
    pid = mosquitto.pid
    assert pid is not None
    try:
        os.kill(pid, signal.SIGSTOP)  # a hung broker: the TCP connection stays up
        try:
            with pytest.raises(ConnectionError, match="unsent messages dropped"):
                publisher.publish_all([("fb/v1/d/pt-0000f1000000/desired", b"")], retain=True)
            assert not publisher.connected.is_set()
        finally:
            os.kill(pid, signal.SIGCONT)
        # A new client connects by itself and publishes again.
        assert publisher.connected.wait(30), "the publisher did not reconnect"
        publisher(MARKER, b"marker", retain=False)
    finally:
        publisher.stop()
