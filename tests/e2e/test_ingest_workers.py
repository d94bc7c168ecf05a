"""Two ``palaute ingest`` processes on PostgreSQL, sharing one subscription, under faults.

Fifty simulated terminals press 200 votes each while uploading the way the firmware does:
one message at a time per device (stop-and-wait), every message carrying ``after`` (the
device's acknowledged watermark), the same votes sent again when no ``ack`` comes within the
ack timeout or after a reconnect.  Mid-stream one worker is SIGKILLed (and started again
later), or the broker is restarted.  Afterwards every pressed vote must be stored exactly once
and every device must hold an ``ack`` for its last seq.

The test thread waits on the simulator's progress (a condition variable), never on a clock.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, insert, select

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Assignment, Device, DeviceState
from fleet.db.models import Vote as VoteRow
from fleet.services import registry
from fleet.services.clock import now_ms
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres]

DEVICES = [f"pt-e2e0000{i:05x}" for i in range(50)]
VOTES_PER_DEVICE = 200
# Presses are spread over about five seconds so that the fault lands mid-stream.
PRESS_PERIOD_S = 0.025
ACK_TIMEOUT_S = 2.0
BATCH_MAX = 50
TOTAL = len(DEVICES) * VOTES_PER_DEVICE


@dataclass
class SimDevice:
    """What one terminal holds: its unacknowledged vote log and its upload state."""

    device_id: str
    index: int
    next_seq: int = 1
    acked: int = 0
    log: list[tuple[int, int, int]] = field(default_factory=list)  # (seq, ts_ms, button)
    pressed: list[tuple[int, int, int]] = field(default_factory=list)
    inflight_last: int | None = None
    deadline: float = 0.0
    sends: int = 0


class TerminalSimulator:
    """Many terminals behind one paho connection (MQTT 3.1.1, clean session, like the firmware).

    One thread runs every device: presses on schedule, uploads up to 50 unacknowledged votes
    with ``after``, waits for the ack, re-sends on ack timeout and after a reconnect.
    """

    def __init__(self, broker: MosquittoBroker, device_ids: list[str], votes_per_device: int
                 ) -> None:
        self.devices = {d: SimDevice(d, i) for i, d in enumerate(device_ids)}
        self.votes_per_device = votes_per_device
        self._events: queue.Queue[tuple[str, int]] = queue.Queue()
        self._progress = threading.Condition()
        self._acked_total = 0
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self.reconnects = 0
        self.resends = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="terminal-sim",
                                  protocol=mqtt.MQTTv311, clean_session=True)
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        # Every device may have a message in flight; paho's default cap of 20 would queue
        # the rest inside paho and distort the stop-and-wait timing.
        self.client.max_inflight_messages_set(len(device_ids) * 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.connect(broker.host, broker.port, keepalive=10)
        self._thread = threading.Thread(target=self._run, name="terminal-sim", daemon=True)

    # -- paho network thread ------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: object, _f: object, reason: object,
                    _p: object) -> None:
        client.subscribe("fb/v1/d/+/ack", 1)
        self._events.put(("", -1))  # reconnected: the simulator thread re-sends in-flight

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        device_id = message.topic.split("/")[3]
        self._events.put((device_id, int(json.loads(message.payload)["seq"])))

    # -- simulator thread ---------------------------------------------------------------------
    def start(self) -> None:
        """Connect, wait for the ack subscription, then start pressing and uploading."""
        self.client.loop_start()
        assert self._subscribed.wait(10), "simulator could not subscribe to acks"
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        """Stop the simulator thread and disconnect."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()

    def _press_due(self, device: SimDevice, now: float) -> None:
        # Each device presses every PRESS_PERIOD_S, staggered so uploads interleave.
        offset = device.index * PRESS_PERIOD_S / len(self.devices)
        due = min(self.votes_per_device,
                  int((now - self._started - offset) / PRESS_PERIOD_S) + 1)
        while device.next_seq <= due:
            vote = (device.next_seq, now_ms(), 1 + (device.next_seq + device.index) % 4)
            device.log.append(vote)
            device.pressed.append(vote)
            device.next_seq += 1

    def _send(self, device: SimDevice, now: float) -> None:
        batch = device.log[:BATCH_MAX]
        payload = {"votes": [[seq, ts, button, 0, 1] for seq, ts, button in batch],
                   "after": device.acked}
        self.client.publish(f"fb/v1/d/{device.device_id}/votes",
                            json.dumps(payload, separators=(",", ":")), qos=1)
        device.inflight_last = batch[-1][0]
        device.deadline = now + ACK_TIMEOUT_S
        device.sends += 1

    def _on_ack(self, device_id: str, seq: int) -> None:
        device = self.devices.get(device_id)
        if device is None or seq <= device.acked:
            return
        gained = seq - device.acked
        device.acked = seq
        device.log = [vote for vote in device.log if vote[0] > seq]
        if device.inflight_last is not None and seq >= device.inflight_last:
            device.inflight_last = None
        with self._progress:
            self._acked_total += gained
            self._progress.notify_all()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for device in self.devices.values():
                self._press_due(device, now)
                if device.inflight_last is None:
                    if device.log:
                        self._send(device, now)
                elif now >= device.deadline:
                    self.resends += 1
                    self._send(device, now)
            try:
                event = self._events.get(timeout=0.01)
            except queue.Empty:
                continue
            while True:
                device_id, seq = event
                if seq < 0:
                    # After a reconnect the terminal sends its in-flight votes again at once.
                    self.reconnects += 1
                    for device in self.devices.values():
                        if device.inflight_last is not None:
                            device.deadline = 0.0
                else:
                    self._on_ack(device_id, seq)
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    break

    # -- observation --------------------------------------------------------------------------
    def wait_acked(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` votes of all devices together are acknowledged."""
        with self._progress:
            return self._progress.wait_for(lambda: self._acked_total >= count, timeout)

    def pressed(self) -> set[tuple[str, int, int, int]]:
        """Every pressed vote as (device, seq, ts_ms, button)."""
        return {(d.device_id, seq, ts, button) for d in self.devices.values()
                for seq, ts, button in d.pressed}


@pytest.fixture
def fleet_db(postgres_url: str) -> str:
    """A migrated PostgreSQL database with the simulated devices registered and assigned."""
    upgrade(postgres_url)
    sessions = make_sessionmaker(make_engine(postgres_url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Faults Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Exit")
        session.execute(insert(Device), [
            {"id": d, "board": "sim", "state": DeviceState.assigned, "notes": "",
             "created_ms": 0, "acked_seq": 0, "online": False} for d in DEVICES])
        session.execute(insert(Assignment), [
            {"device_id": d, "site_id": site.id, "start_ms": 0} for d in DEVICES])
    return postgres_url


def start_worker(broker: MosquittoBroker, db_url: str, workdir: Path, worker_id: str,
                 writers: int = 1) -> IngestProcess:
    """Start ``palaute ingest`` and wait (on the broker's log) until it has subscribed."""
    worker = IngestProcess(db_url=db_url, workdir=workdir, worker_id=worker_id,
                           mqtt_url=broker.url_for(broker.admin_user, broker.admin_password),
                           extra_env={"PALAUTE_INGEST_WRITERS": str(writers)})
    worker.start_subscribed(broker)
    return worker


@pytest.fixture
def simulator(mosquitto: MosquittoBroker) -> Iterator[TerminalSimulator]:
    sim = TerminalSimulator(mosquitto, DEVICES, VOTES_PER_DEVICE)
    yield sim
    sim.stop()


def assert_exactly_once(db_url: str, sim: TerminalSimulator, workers: list[IngestProcess]
                        ) -> None:
    """Every pressed vote stored once, every device acknowledged up to its last seq."""
    logs = "\n".join(w.log_tail() for w in workers)
    not_acked = {d.device_id: d.acked for d in sim.devices.values()
                 if d.acked != VOTES_PER_DEVICE}
    assert not not_acked, f"devices without a final ack: {not_acked}\n{logs}"
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions() as session:
        count = session.scalar(select(func.count()).select_from(VoteRow))
        stored = {(r.device_id, r.seq, r.ts_ms, r.button) for r in session.execute(
            select(VoteRow.device_id, VoteRow.seq, VoteRow.ts_ms, VoteRow.button))}
        watermarks = {r.id: r.acked_seq for r in session.execute(
            select(Device.id, Device.acked_seq))}
    assert count == TOTAL, logs
    assert stored == sim.pressed()
    assert watermarks == dict.fromkeys(DEVICES, VOTES_PER_DEVICE)


# With two writer threads per worker, each commits its own devices' votes and the broker
# acknowledgements still go out in arrival order.
@pytest.mark.parametrize("writers", [1, 2])
def test_sigkill_of_one_of_two_workers_mid_stream_loses_and_duplicates_nothing(
        mosquitto: MosquittoBroker, fleet_db: str, simulator: TerminalSimulator,
        tmp_path: Path, writers: int) -> None:
    workers = [start_worker(mosquitto, fleet_db, tmp_path, f"ingest-{n}", writers)
               for n in "ab"]
    try:
        simulator.start()
        assert simulator.wait_acked(TOTAL * 3 // 10, 30), "no progress before the kill"
        workers[0].kill()
        assert simulator.wait_acked(TOTAL * 6 // 10, 30), "no progress with one worker left"
        # The restarted worker resumes its persistent session: what the broker queued for it
        # while it was dead is delivered now, and must be stored once like everything else.
        workers[0].start()
        assert simulator.wait_acked(TOTAL, 40), "not every vote was acknowledged"
    finally:
        for worker in workers:
            worker.stop()
    # Deliveries the dead worker held (and those the broker queued for its session while it
    # was away) were never acknowledged, so terminals had to send them again.
    assert simulator.resends > 0
    assert_exactly_once(fleet_db, simulator, workers)


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
        mosquitto: MosquittoBroker, fleet_db: str, simulator: TerminalSimulator,
        tmp_path: Path) -> None:
    workers = [start_worker(mosquitto, fleet_db, tmp_path, f"ingest-{n}") for n in "ab"]
    try:
        simulator.start()
        assert simulator.wait_acked(TOTAL * 3 // 10, 30), "no progress before the restart"
        mosquitto.restart()
        assert simulator.wait_acked(TOTAL, 45), "not every vote was acknowledged"
        assert simulator.reconnects >= 2  # the first connect and at least one reconnect
    finally:
        for worker in workers:
            worker.stop()
    assert_exactly_once(fleet_db, simulator, workers)


def test_one_command_with_two_processes_restarts_a_killed_one_and_loses_nothing(
        mosquitto: MosquittoBroker, fleet_db: str, simulator: TerminalSimulator,
        tmp_path: Path) -> None:
    # `palaute ingest --processes 2`: two workers under one supervisor; SIGKILL one of them
    # mid-stream and the supervisor starts it again under the same client id (the broker
    # hands it its persistent session back).  SIGTERM to the supervisor stops both.
    command = IngestProcess(db_url=fleet_db, workdir=tmp_path, worker_id="ingest-sup",
                            mqtt_url=mosquitto.url_for(mosquitto.admin_user,
                                                       mosquitto.admin_password),
                            processes=2)
    command.start_subscribed(mosquitto)
    try:
        children = command.children()
        assert sorted(children.values()) == ["ingest-sup-1", "ingest-sup-2"]
        simulator.start()
        assert simulator.wait_acked(TOTAL * 3 // 10, 30), "no progress before the kill"
        offset = mosquitto.log_file.stat().st_size
        victim, survivor = sorted(children)
        os.kill(victim, signal.SIGKILL)
        # The restarted child subscribes again under its old client id.
        command.wait_subscribed(mosquitto, offset, [children[victim]])
        after = command.children()
        assert sorted(after.values()) == ["ingest-sup-1", "ingest-sup-2"]
        assert victim not in after and survivor in after
        assert simulator.wait_acked(TOTAL, 40), "not every vote was acknowledged"
    finally:
        command.stop()
    assert command.process is not None and command.process.returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in after), "children left running"
    assert "exited with SIGKILL" in command.log_tail(200)
    assert_exactly_once(fleet_db, simulator, [command])
