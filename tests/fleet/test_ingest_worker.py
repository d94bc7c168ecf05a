"""The ingest worker against a real Mosquitto: acks after commit, bad input refused and counted.

Messages are published with the real C client ``mosquitto_pub``.  Each check ends with a valid
message whose ``ack`` the test awaits: one worker processes its queue in order, so by then
every earlier message has been handled.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet.config import Settings
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Device
from fleet.db.models import Vote as VoteRow
from fleet.ingest.worker import IngestWorker
from fleet.services import registry
from fleet.services.clock import now_ms
from tests.services.common import require_binary
from tests.services.mosquitto import MosquittoBroker

pytestmark = pytest.mark.mosquitto
DEV = "pt-00000000abcd"


class AckListener:
    """A paho subscriber collecting ``ack`` messages."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.acks: queue.Queue[tuple[str, dict[str, int]]] = queue.Queue()
        self.ready = queue.Queue[bool]()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ack-listener")
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        self.client.on_message = lambda _c, _u, m: self.acks.put(
            (m.topic, json.loads(m.payload)))
        self.client.on_subscribe = lambda *_: self.ready.put(True)
        self.client.on_connect = lambda c, *_: c.subscribe("fb/v1/d/+/ack", 1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.ready.get(timeout=10)

    def next(self, timeout: float = 15) -> tuple[str, dict[str, int]]:
        return self.acks.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def assign_devices(sessions: sessionmaker[Session], ids: list[str]) -> None:
    """Register ``ids`` and assign them to one site (since epoch 0)."""
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Ingest Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Exit")
        for device_id in ids:
            registry.register_device(session, device_id=device_id)
            registry.assign_device(session, device_id=device_id, site_id=site.id, at_ms=0)


def settings_for(broker: MosquittoBroker, db_url: str, **extra: Any) -> Settings:
    """Worker settings for ``db_url`` and the admin account of ``broker``."""
    return Settings(db_url=db_url, environment="test",
                    mqtt_url=broker.url_for(broker.admin_user, broker.admin_password), **extra)


@pytest.fixture
def worker(mosquitto: MosquittoBroker, db_url: str) -> Iterator[IngestWorker]:
    sessions = make_sessionmaker(make_engine(db_url))
    assign_devices(sessions, [DEV])
    settings = settings_for(mosquitto, db_url)
    worker = IngestWorker(settings, sessions, client_id="test-ingest")
    worker.start()
    assert worker.wait_ready(15), "ingest worker did not subscribe"
    yield worker
    worker.stop()


def publish(broker: MosquittoBroker, topic: str, payload: bytes) -> None:
    """Publish with the real C client, QoS 1."""
    subprocess.run(
        [require_binary("mosquitto_pub", "apt-get install mosquitto-clients"),
         "-h", broker.host, "-p", str(broker.port), "-u", broker.admin_user,
         "-P", broker.admin_password, "-q", "1", "-t", topic, "-s"],
        input=payload, check=True, timeout=10)


def votes(*rows: list[int]) -> bytes:
    return json.dumps({"votes": [list(r) for r in rows]}).encode()


def test_votes_from_the_c_client_are_stored_and_acked(
        mosquitto: MosquittoBroker, worker: IngestWorker) -> None:
    listener = AckListener(mosquitto)
    try:
        t = now_ms()
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, t, 1, 0, 0], [2, t, 4, 0, 0]))
        topic, ack = listener.next()
        assert topic == f"fb/v1/d/{DEV}/ack" and ack["seq"] == 2
        assert abs(ack["now_ms"] - now_ms()) < 60_000
        # A re-send is stored once and acknowledged again.
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, t, 1, 0, 0], [2, t, 4, 0, 0]))
        assert listener.next()[1]["seq"] == 2
    finally:
        listener.close()
    with worker.sessions() as session:
        assert session.scalars(select(VoteRow.seq).order_by(VoteRow.seq)).all() == [1, 2]
    assert worker.metrics.get("palaute_ingest_votes_duplicate_total") == 2


def test_malformed_messages_are_refused_counted_and_never_stop_the_worker(
        mosquitto: MosquittoBroker, worker: IngestWorker) -> None:
    listener = AckListener(mosquitto)
    t = now_ms()
    bad = [
        (f"fb/v1/d/{DEV}/votes", b"{not json"),
        (f"fb/v1/d/{DEV}/votes", b"\x00\xff" * 10),
        (f"fb/v1/d/{DEV}/votes", votes([1, t, True, 0, 0])),
        (f"fb/v1/d/{DEV}/votes", votes([3, t, 1, 0, 0], [2, t, 1, 0, 0])),
        (f"fb/v1/d/{DEV}/votes", b"[" * 20_000),
        (f"fb/v1/d/{DEV}/votes", votes([1, t + 10**10, 1, 0, 0])),
        (f"fb/v1/d/{DEV}/health", b"[]"),
        ("fb/v1/d/pt-NOTHEX000000/votes", votes([1, t, 1, 0, 0])),
        ("fb/v1/d/pt-0000000000ff/votes", votes([1, t, 1, 0, 0])),
    ]
    try:
        for topic, payload in bad:
            publish(mosquitto, topic, payload)
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, t, 3, 0, 0]))
        topic, ack = listener.next()
    finally:
        listener.close()
    assert (topic, ack["seq"]) == (f"fb/v1/d/{DEV}/ack", 1)
    refused = {reason: worker.metrics.get("palaute_ingest_refused_total", reason=reason)
               for reason in ("bad_json", "bad_type", "seq_order", "too_large", "future_ts",
                              "bad_shape", "bad_device_id", "unknown_device")}
    assert refused == {"bad_json": 2, "bad_type": 1, "seq_order": 1, "too_large": 1,
                       "future_ts": 1, "bad_shape": 1, "bad_device_id": 1,
                       "unknown_device": 1}
    with worker.sessions() as session:
        assert session.scalars(select(VoteRow.button)).all() == [3]
        assert session.get(Device, "pt-0000000000ff") is None


def test_status_and_will_mark_devices_online_and_offline(
        mosquitto: MosquittoBroker, worker: IngestWorker) -> None:
    listener = AckListener(mosquitto)
    try:
        publish(mosquitto, f"fb/v1/d/{DEV}/status", b'{"online": true, "fw": "0.1.0"}')
        publish(mosquitto, f"fb/v1/d/{DEV}/health",
                b'{"fw": "0.1.0", "content_version": 4, "queue": 0}')
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, now_ms(), 1, 0, 0]))
        listener.next()
        with worker.sessions() as session:
            device = session.get_one(Device, DEV)
            assert (device.online, device.fw_version, device.content_version) == (
                True, "0.1.0", 4)
        publish(mosquitto, f"fb/v1/d/{DEV}/status", b'{"online": false}')
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([2, now_ms(), 1, 0, 0]))
        listener.next()
    finally:
        listener.close()
    with worker.sessions() as session:
        assert session.get_one(Device, DEV).online is False


def _writer_of(worker: IngestWorker, device_id: str) -> int:
    return worker._parse_topic(f"fb/v1/d/{device_id}/votes".encode())[2]


def test_two_writers_split_devices_and_broker_acks_keep_arrival_order(
        mosquitto: MosquittoBroker, db_url: str) -> None:
    settings = settings_for(mosquitto, db_url, ingest_writers=2)
    worker = IngestWorker(settings, make_sessionmaker(make_engine(db_url)))
    # Two devices that hash to different writers (crc32 of the id).
    ids = [f"pt-0000000000{n:02x}" for n in range(16)]
    first = next(d for d in ids if _writer_of(worker, d) == 0)
    second = next(d for d in ids if _writer_of(worker, d) == 1)
    acked: list[list[int]] = []
    worker._client.ack_many = acked.append  # type: ignore[method-assign,assignment]
    t = now_ms()

    def chunk(mids: list[int], devices: list[str]) -> list[tuple[bytes, bytes, int, int]]:
        return [(f"fb/v1/d/{d}/votes".encode(), votes([mid, t, 1, 0, 0]), mid, 1)
                for mid, d in zip(mids, devices, strict=True)]

    older = worker.prepare(chunk([1, 2, 3], [first, second, first]))
    newer = worker.prepare(chunk([4, 5], [second, first]))
    assert [m[2] for m in older[0].messages] == [1, 3]
    assert [m[2] for m in older[1].messages] == [2]
    # The newer chunk is done first, then the second writer's part of the older one: nothing
    # may be acknowledged while the first writer still holds messages 1 and 3.
    worker._ack_deliveries(newer[0])
    worker._ack_deliveries(newer[1])
    worker._ack_deliveries(older[1])
    assert [mid for call in acked for mid in call] == []
    worker._ack_deliveries(older[0])
    assert [mid for call in acked for mid in call] == [1, 2, 3, 4, 5]
    # A part that failed is never acknowledged, and does not hold back the rest.
    acked.clear()
    failed = worker.prepare(chunk([6, 7, 8], [first, second, first]))
    worker._ack_deliveries(failed[0], stored=False)
    worker._ack_deliveries(failed[1])
    assert [mid for call in acked for mid in call] == [7]


def test_a_worker_with_two_writers_stores_and_acks_every_device(
        mosquitto: MosquittoBroker, db_url: str) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    ids = [f"pt-0000000001{n:02x}" for n in range(8)]
    assign_devices(sessions, ids)
    settings = settings_for(mosquitto, db_url, ingest_writers=2)
    worker = IngestWorker(settings, sessions, client_id="test-writers")
    assert {_writer_of(worker, d) for d in ids} == {0, 1}
    worker.start()
    listener = AckListener(mosquitto)
    try:
        assert worker.wait_ready(15)
        t = now_ms()
        for device_id in ids:
            publish(mosquitto, f"fb/v1/d/{device_id}/votes",
                    votes([1, t, 1, 0, 0], [2, t, 2, 0, 0]))
        acks: dict[str, int] = {}
        while len(acks) < len(ids):
            topic, ack = listener.next()
            acks[topic.split("/")[3]] = ack["seq"]
        assert acks == dict.fromkeys(ids, 2)
        assert worker.health() == (True, "ok")
    finally:
        listener.close()
        worker.stop()
    with sessions() as session:
        stored = session.execute(select(VoteRow.device_id, VoteRow.seq)).all()
    assert sorted(stored) == sorted((d, s) for d in ids for s in (1, 2))


@pytest.mark.postgres
def test_killed_database_connections_cost_a_retry_not_a_vote(
        mosquitto: MosquittoBroker, postgres_url: str) -> None:
    # `palaute ingest` pools connections without a ping before each batch: a connection
    # that died since (database restart, failover, idle timeout) fails one attempt, which is
    # retried on a fresh connection, with nothing acknowledged in between.
    upgrade(postgres_url)
    engine = make_engine(postgres_url, pre_ping=False)
    sessions = make_sessionmaker(engine)
    assign_devices(sessions, [DEV])
    settings = settings_for(mosquitto, postgres_url)
    worker = IngestWorker(settings, sessions, client_id="test-no-ping")
    worker.start()
    listener = AckListener(mosquitto)
    try:
        assert worker.wait_ready(15)
        t = now_ms()
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, t, 1, 0, 0]))
        assert listener.next()[1]["seq"] == 1
        with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql"),
                             autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()
        assert killed is not None and killed[0] >= 1
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([2, t, 3, 0, 0]))
        assert listener.next()[1]["seq"] == 2
    finally:
        listener.close()
        worker.stop()
    assert worker.metrics.get("palaute_ingest_db_errors_total") >= 1
    with sessions() as session:
        assert session.execute(select(VoteRow.seq, VoteRow.button)
                               .order_by(VoteRow.seq)).all() == [(1, 1), (2, 3)]
    engine.dispose()


def _backend_waiting_on(admin: psycopg.Connection[Any], statement: str) -> int:
    """The pid of the backend blocked on a lock while running ``statement…`` (polled: the
    server offers no notification for a lock wait)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        row = admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE %s", (statement + "%",)).fetchone()
        if row is not None:
            return int(row[0])
        time.sleep(0.02)
    raise AssertionError(f"no backend waited on a lock in {statement!r}")


@pytest.mark.postgres
@pytest.mark.parametrize("cut", ["pg_cancel_backend", "pg_terminate_backend"])
def test_a_copy_cancelled_or_cut_off_costs_a_retry_not_a_vote(
        mosquitto: MosquittoBroker, postgres_url: str, cut: str) -> None:
    # The votes go in through psycopg's own COPY, below SQLAlchemy: its errors are psycopg's,
    # and they too must mean "retry the batch", not "internal error, leave it unacked".  A
    # cancelled statement stands for a deadlock or a statement timeout (the connection
    # survives), a terminated backend for a lost connection.
    upgrade(postgres_url)
    engine = make_engine(postgres_url)
    sessions = make_sessionmaker(engine)
    assign_devices(sessions, [DEV])
    worker = IngestWorker(settings_for(mosquitto, postgres_url), sessions,
                          client_id="test-copy-killed")
    worker.start()
    listener = AckListener(mosquitto)
    plain_url = postgres_url.replace("postgresql+psycopg", "postgresql")
    try:
        assert worker.wait_ready(15)
        t = now_ms()
        publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([1, t, 1, 0, 0]))
        assert listener.next()[1]["seq"] == 1
        with psycopg.connect(plain_url) as locker, \
                psycopg.connect(plain_url, autocommit=True) as admin:
            # Hold the writer inside its COPY, then cut its connection there.
            locker.execute("LOCK TABLE votes IN ACCESS EXCLUSIVE MODE")
            publish(mosquitto, f"fb/v1/d/{DEV}/votes", votes([2, t, 3, 0, 0]))
            admin.execute(f"SELECT {cut}(%s)", (_backend_waiting_on(admin, "COPY votes"),))
            locker.rollback()
        assert listener.next()[1]["seq"] == 2
    finally:
        listener.close()
        worker.stop()
    assert worker.metrics.get("palaute_ingest_db_errors_total") >= 1
    assert worker.metrics.get("palaute_ingest_refused_total", reason="internal") == 0
    with sessions() as session:
        assert session.execute(select(VoteRow.seq, VoteRow.button)
                               .order_by(VoteRow.seq)).all() == [(1, 1), (2, 3)]
    engine.dispose()


def test_batches_due_while_the_writer_is_busy_wait_for_it_and_grow(
        mosquitto: MosquittoBroker, db_url: str) -> None:
    # Under a steady stream a due batch is not parked behind the transaction in progress:
    # it keeps taking messages until its writer is free, so the next transaction takes all
    # of them at once (fewer, larger transactions; docs/performance.md, fourth round).
    sessions = make_sessionmaker(make_engine(db_url))
    assign_devices(sessions, [DEV])
    worker = IngestWorker(settings_for(mosquitto, db_url, ingest_writers=1,
                                       ingest_batch_wait_ms=0), sessions)
    worker._client.ack_many = lambda mids: None  # type: ignore[method-assign]
    sizes: queue.Queue[int] = queue.Queue()
    entered, release = threading.Event(), threading.Event()
    real_store = worker.store

    def store(prepared: Any) -> None:
        sizes.put(len(prepared.messages))
        if not entered.is_set():
            entered.set()
            assert release.wait(15)
        real_store(prepared)
    worker.store = store  # type: ignore[method-assign]
    # How often the parser came back to the top of its loop (where it drains the inbox).
    rounds = [0]
    turned = threading.Condition()
    real_drain = worker._drain

    def drain(timeout: float, limit: int) -> list[Any]:
        with turned:
            rounds[0] += 1
            turned.notify_all()
        return real_drain(timeout, limit)
    worker._drain = drain  # type: ignore[method-assign]

    def deliver(first_mid: int, count: int) -> None:
        t = now_ms()
        worker._on_deliveries([(f"fb/v1/d/{DEV}/votes".encode(),
                                votes([mid, t, 1, 0, 0]), mid, 1)
                               for mid in range(first_mid, first_mid + count)])
        # Wait until the parser has taken them and then come round its loop twice: they are
        # validated and in a batch by then (merged, or handed over).
        with turned:
            assert turned.wait_for(lambda: not worker._inbox, 15)
            seen = rounds[0]
            assert turned.wait_for(lambda: rounds[0] >= seen + 2, 15)
    worker.start()
    try:
        deliver(1, 1)
        assert entered.wait(15)  # the writer is inside its first transaction
        deliver(2, 3)  # due at once (batch wait 0), but the writer is busy
        deliver(5, 2)
        release.set()
        assert [sizes.get(timeout=15) for _ in range(2)] == [1, 5]
    finally:
        release.set()
        worker.stop()
    assert sizes.empty()
    with sessions() as session:
        assert sorted(session.scalars(select(VoteRow.seq))) == [1, 2, 3, 4, 5, 6]
