"""The ingest worker's content messages against a real Mosquitto and database: ``reported``
updates the device and its rollout entry, ``fetch`` is answered with chunks of the stored
package, and every bad request is refused and counted."""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select, update

from fleet.config import Settings
from fleet.db.models import Device, RolloutDevice, RolloutDeviceState
from fleet.ingest.worker import IngestWorker
from fleet.rollouts import service
from fleet.rollouts.engine import RolloutEngine
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.runner import BrokerPublisher
from fleet.rollouts.service import RolloutPlan
from fleet.services.clock import now_ms
from tests.fleet.rollout_helpers import (
    Watcher,
    device_ids,
    make_fleet,
    sessions_for,
    store_content,
)
from tests.services.common import wait_until
from tests.services.mosquitto import MosquittoBroker

pytestmark = pytest.mark.mosquitto
IDS = device_ids(3, prefix="0000bb")


class Terminal:
    """A stand-in MQTT client speaking as one device: publishes, and collects its chunks."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.device_id = device_id
        self.chunks: queue.Queue[bytes] = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{device_id}")
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        self.client.on_message = lambda _c, _u, m: self.chunks.put(bytes(m.payload))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(f"fb/v1/d/{device_id}/chunk", 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def send(self, leaf: str, payload: object) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.client.publish(f"fb/v1/d/{self.device_id}/{leaf}", data, qos=1).wait_for_publish(10)

    def fetch(self, version: int, offset: int, display: str = "128x64") -> bytes:
        self.send("fetch", {"version": version, "offset": offset, "display": display})
        return self.chunks.get(timeout=15)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def setup(mosquitto: MosquittoBroker, db_url: str) -> Iterator[tuple[IngestWorker, int, bytes]]:
    sessions = sessions_for(db_url)
    with sessions.begin() as session:
        site_id = make_fleet(session, IDS)
        package = store_content(session, 4, pattern=0x5A)["128x64"]
        rollout = service.create_rollout(session, plan=RolloutPlan(
            content_version=4, target_kind="site", target_ref=str(site_id),
            failure_threshold=100), packages=StoredPackages())
        rollout_id = rollout.id
    url = mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password)
    publisher = BrokerPublisher(url, "ingest-test-engine")
    publisher.start()
    assert publisher.connected.wait(10)
    RolloutEngine(sessions, StoredPackages(), publisher).tick(now_ms())
    publisher.stop()
    worker = IngestWorker(Settings(db_url=db_url, environment="test", mqtt_url=url),
                          sessions, client_id="content-ingest")
    worker.start()
    assert worker.wait_ready(15)
    yield worker, rollout_id, package
    worker.stop()


def test_fetch_is_answered_chunk_by_chunk_with_the_stored_bytes(
        mosquitto: MosquittoBroker, setup: tuple[IngestWorker, int, bytes]) -> None:
    worker, _, package = setup
    terminal = Terminal(mosquitto, IDS[0])
    received = bytearray()
    try:
        while len(received) < len(package):
            chunk = terminal.fetch(4, len(received))
            assert int.from_bytes(chunk[:2], "little") == 4
            assert int.from_bytes(chunk[2:6], "little") == len(received)
            assert 0 < len(chunk) - 6 <= 4096
            received += chunk[6:]
    finally:
        terminal.close()
    assert bytes(received) == package
    assert worker.metrics.get("palaute_ingest_chunks_total") == -(-len(package) // 4096)


@pytest.mark.parametrize(("payload", "reason"), [
    ({"version": 9, "offset": 0, "display": "128x64"}, "unknown_version"),
    ({"version": 4, "offset": 60000, "display": "128x64"}, "offset_out_of_range"),
    ({"version": 4, "offset": 0, "display": "296x128"}, "wrong_display"),
    ({"version": 4, "offset": 0}, "bad_shape"),
    (b"not json", "bad_json"),
])
def test_bad_fetches_are_refused_and_counted(
        mosquitto: MosquittoBroker, setup: tuple[IngestWorker, int, bytes],
        payload: object, reason: str) -> None:
    worker, _, _ = setup
    terminal = Terminal(mosquitto, IDS[1])
    try:
        terminal.send("fetch", payload)
        wait_until(lambda: worker.metrics.get("palaute_ingest_refused_total",
                                              reason=reason) == 1, 15, f"{reason} counted")
        # The worker still answers good requests afterwards.
        assert terminal.fetch(4, 0)[6:] != b""
    finally:
        terminal.close()
    assert terminal.chunks.empty()


def test_reported_updates_the_device_and_its_rollout_entry(
        mosquitto: MosquittoBroker, db_url: str,
        setup: tuple[IngestWorker, int, bytes]) -> None:
    worker, rollout_id, _ = setup
    sessions = sessions_for(db_url)

    def states() -> dict[str, str]:
        with sessions() as session:
            return {r.device_id: r.state.value
                    for r in service.rollout_devices(session, rollout_id)}

    first, second, third = (Terminal(mosquitto, d) for d in IDS)
    try:
        first.send("reported", {"version": 4, "state": "applied", "desired": 4, "ts_ms": 1})
        second.send("reported", {"version": 1, "state": "refused", "desired": 4,
                                 "reason": "sha256_mismatch"})
        third.send("reported", {"version": 1, "state": "refused"})  # no reason: malformed
        wait_until(lambda: states()[IDS[0]] == "applied" and states()[IDS[1]] == "refused",
                   15, "reports stored")
        wait_until(lambda: worker.metrics.get("palaute_ingest_refused_total",
                                              reason="bad_shape") == 1, 15, "bad report counted")
        with sessions() as session:
            assert session.scalar(select(Device.content_version)
                                  .where(Device.id == IDS[0])) == 4
            rows = {r.device_id: r for r in service.rollout_devices(session, rollout_id)}
        assert rows[IDS[1]].reason == "sha256_mismatch"
        assert rows[IDS[2]].state.value == "delivered"
        # A device that reconnects reports again (retained) and is reconciled: it applied
        # after all (e.g. the fleet missed the report before a power cut).
        second.send("reported", {"version": 4, "state": "applied", "desired": 4})
        wait_until(lambda: states()[IDS[1]] == "applied", 15, "reconciled after reconnect")
    finally:
        for terminal in (first, second, third):
            terminal.close()
    unknown = Terminal(mosquitto, "pt-0000deadbeef")
    try:
        unknown.send("reported", {"version": 1, "state": "applied"})
        wait_until(lambda: worker.metrics.get("palaute_ingest_refused_total",
                                              reason="unknown_device") == 1, 15,
                   "unknown device counted")
    finally:
        unknown.close()


def test_a_timed_out_device_that_never_got_desired_gets_it_again(
        mosquitto: MosquittoBroker, db_url: str,
        setup: tuple[IngestWorker, int, bytes]) -> None:
    worker, rollout_id, package = setup
    sessions = sessions_for(db_url)
    with sessions.begin() as session:
        session.execute(update(RolloutDevice).where(RolloutDevice.device_id == IDS[0])
                        .values(state=RolloutDeviceState.timed_out))
    # As after a broker restart without persistence: the retained desired is gone.
    lost = Terminal(mosquitto, IDS[0])
    lost.client.publish(f"fb/v1/d/{IDS[0]}/desired", b"", qos=1,
                        retain=True).wait_for_publish(10)
    watcher = Watcher(mosquitto)

    def marker(topic: str, payload: bytes, **_: object) -> None:
        lost.client.publish(topic, payload, qos=1).wait_for_publish(10)

    try:
        watcher.since(marker)  # the other devices' retained desired, delivered on subscribe
        lost.send("reported", {"version": 1, "state": "applied"})  # knows of no desired
        topic, payload, _ = watcher.take(1, timeout=15)[0]
        assert topic == f"fb/v1/d/{IDS[0]}/desired"
        document = json.loads(payload)
        assert (document["version"], document["size"]) == (4, len(package))
        assert worker.metrics.get("palaute_ingest_desired_repeated_total") == 1
        # A device that knows of its desired (it names it) is not sent it again.
        lost.send("reported", {"version": 1, "state": "refused", "desired": 4,
                               "reason": "fetch_timeout"})
        def refused() -> bool:
            with sessions() as session:
                return any(r.state == RolloutDeviceState.refused
                           for r in service.rollout_devices(session, rollout_id))
        wait_until(refused, 15, "refusal stored")
        assert watcher.since(marker) == []
    finally:
        watcher.close()
        lost.close()
