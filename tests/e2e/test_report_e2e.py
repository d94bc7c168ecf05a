"""Votes reach the customer's report: publisher → Mosquitto → ``palaute ingest`` → report API.

The votes are published by the real C client (``mosquitto_pub``, with each device's own broker
account) and by the firmware running under the real MicroPython interpreter; a real
``palaute ingest`` process stores them; the counts are read back from the real FastAPI app's
``/api/v1/reports/...`` endpoints (so through the rollups the ingest transaction maintains),
never from the votes table.  Each test runs on SQLite and PostgreSQL.

What is proved: each site's report counts exactly the votes pressed there, per button; a
message delivered twice is counted once; a device moved between sites splits its votes at the
moment of the move, also for votes pressed before the move but uploaded after it.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from fleet.api.app import create_app
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Role
from fleet.services import registry
from fleet.services.clock import now_ms
from simulator.harness import Harness, TerminalProcess
from tests.e2e.test_walking_skeleton import terminal_config
from tests.fleet.auth_helpers import make_user
from tests.fleet.test_ingest_worker import AckListener, votes
from tests.services.common import require_binary, wait_until
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import MosquittoBroker

pytestmark = pytest.mark.mosquitto
BUTTONS = 4


class Fleet:
    """The registry, the report API (the real app, in process) and one ingest process."""

    def __init__(self, db_url: str, broker: MosquittoBroker, workdir: Path) -> None:
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(db_url))
        self.broker = broker
        with self.sessions.begin() as session:
            customer = registry.create_customer(session, name="Report Oy")
            self.site_a = registry.create_site(session, customer_id=customer.id, name="Lobby",
                                               timezone="Europe/Helsinki").id
            self.site_b = registry.create_site(session, customer_id=customer.id, name="Exit",
                                               timezone="Asia/Kathmandu").id
        self.api = TestClient(create_app(self.sessions))
        self.api.headers.update(make_user(self.sessions, Role.coordinator))
        self.worker = IngestProcess(
            db_url=db_url, workdir=workdir, worker_id="report-ingest",
            mqtt_url=broker.url_for(broker.admin_user, broker.admin_password))

    def device(self, device_id: str, site_id: int) -> str:
        """Register ``device_id`` at ``site_id`` (since the epoch) with its own broker account;
        return its password."""
        with self.sessions.begin() as session:
            registry.register_device(session, device_id=device_id, board="sim")
            registry.assign_device(session, device_id=device_id, site_id=site_id, at_ms=0)
        password = secrets.token_urlsafe(16)
        self.broker.add_user(device_id, password)
        return password

    def move(self, device_id: str, site_id: int, start_ms: int | None = None) -> int:
        """Move a device through the API, as a coordinator does; return the move's instant."""
        body: dict[str, Any] = {"device_id": device_id, "site_id": site_id}
        if start_ms is not None:
            body["start_ms"] = start_ms
        response = self.api.post("/api/v1/assignments", json=body)
        assert response.status_code == 201, response.text
        return int(response.json()["start_ms"])

    def report(self, path: str, **options: str) -> Any:
        """A report over yesterday..tomorrow (UTC dates, so local today is inside anywhere):
        the JSON, or the response when ``format`` is given."""
        today = datetime.now(UTC).date()
        response = self.api.get(f"/api/v1/reports/{path}", params={
            "from": str(today - timedelta(days=1)), "to": str(today + timedelta(days=1)),
            "buttons": str(BUTTONS), **options})
        assert response.status_code == 200, response.text
        return response if "format" in options else response.json()

    def counts(self, site_id: int) -> list[int]:
        """Votes per button (button 1 first) in the site's report."""
        return list(self.report(f"sites/{site_id}")["series"][0]["totals"]["counts"])

    def device_split(self, device_id: str) -> dict[int, list[int]]:
        """A device's votes per button, split by the site it stood at."""
        report = self.report(f"devices/{device_id}", by="site")
        return {int(s["key"]["site_id"]): list(s["totals"]["counts"])
                for s in report["series"]}


@pytest.fixture
def fleet(db_url: str, mosquitto: MosquittoBroker, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(db_url, mosquitto, tmp_path)
    fleet.worker.start_subscribed(mosquitto)
    yield fleet
    fleet.worker.stop()


def publish(broker: MosquittoBroker, device_id: str, password: str, payload: bytes) -> None:
    """Publish a votes message as ``device_id`` with the real C client, QoS 1."""
    subprocess.run(
        [require_binary("mosquitto_pub", "apt-get install mosquitto-clients"),
         "-h", broker.host, "-p", str(broker.port), "-u", device_id, "-P", password,
         "-i", f"{device_id}-pub", "-q", "1", "-t", f"fb/v1/d/{device_id}/votes", "-s"],
        input=payload, check=True, timeout=30)


def wait_ack(listener: AckListener, device_id: str, seq: int, timeout: float = 60) -> None:
    """Wait for the ``ack`` of ``device_id`` that covers ``seq`` (earlier acks are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no ack of {device_id} up to seq {seq}"
        topic, ack = listener.next(timeout=remaining)
        if topic == f"fb/v1/d/{device_id}/ack" and ack["seq"] >= seq:
            return


@pytest.mark.postgres
def test_c_client_votes_land_in_the_right_reports(fleet: Fleet,
                                                  mosquitto: MosquittoBroker) -> None:
    stay_a, stay_b, mover = "pt-00000000a001", "pt-00000000b001", "pt-00000000ab01"
    password = {d: fleet.device(d, s) for d, s in
                ((stay_a, fleet.site_a), (stay_b, fleet.site_b), (mover, fleet.site_a))}
    t = now_ms() - 3_600_000  # an hour ago: inside today's or yesterday's local report
    listener = AckListener(mosquitto)
    try:
        # Site A: buttons 1, 1, 2; the same message is delivered twice (a terminal whose ack
        # was lost re-sends it) and must count once.
        first = votes([1, t, 1, 0, 1], [2, t + 1, 1, 0, 1], [3, t + 2, 2, 0, 1])
        publish(mosquitto, stay_a, password[stay_a], first)
        publish(mosquitto, stay_a, password[stay_a], first)
        # Site B: buttons 3, 4, 4, in two messages.
        publish(mosquitto, stay_b, password[stay_b], votes([1, t, 3, 0, 1]))
        publish(mosquitto, stay_b, password[stay_b], votes([2, t + 5, 4, 0, 1],
                                                           [3, t + 6, 4, 0, 1]))
        # The mover, still at site A: button 1.
        publish(mosquitto, mover, password[mover], votes([1, t, 1, 0, 1]))
        wait_ack(listener, mover, 1)
        # The coordinator records that it was moved to B a minute later; the votes pressed
        # around that instant are uploaded only now: one before the move (site A), one at and
        # one after it (site B).
        moved = fleet.move(mover, fleet.site_b, t + 60_000)
        publish(mosquitto, mover, password[mover], votes(
            [2, moved - 1, 2, 0, 1], [3, moved, 3, 0, 1], [4, moved + 1, 4, 0, 1]))
        # A last message after everything else: one worker handles deliveries in order, so
        # its ack means every earlier message (the duplicate too) has been committed.
        publish(mosquitto, stay_a, password[stay_a], votes([4, t + 10, 4, 0, 1]))
        wait_ack(listener, stay_a, 4)
    finally:
        listener.close()

    assert fleet.counts(fleet.site_a) == [3, 2, 0, 1], fleet.worker.log_tail()
    assert fleet.counts(fleet.site_b) == [0, 0, 2, 3]
    assert fleet.device_split(mover) == {fleet.site_a: [1, 1, 0, 0],
                                         fleet.site_b: [0, 0, 1, 1]}
    # The CSV export of the same report agrees.
    csv = fleet.report(f"sites/{fleet.site_b}", format="csv")
    assert sum(int(row.split(",")[3]) + int(row.split(",")[4])
               for row in csv.text.splitlines()[1:]) == 5



def terminal_health(terminal: TerminalProcess) -> dict[str, Any]:
    """The terminal's health payload, asked for now (its clock, queue, re-sends)."""
    terminal.send({"op": "health"})
    return dict(terminal.wait_for("health")["data"])


def press_all(terminal: TerminalProcess, buttons: list[int]) -> int:
    """Press ``buttons`` in order; return the last seq."""
    seq = 0
    for button in buttons:
        seq = terminal.press(button)
    return seq


@pytest.mark.micropython
@pytest.mark.postgres
def test_firmware_votes_land_in_the_right_reports(fleet: Fleet, mosquitto: MosquittoBroker,
                                                  harness: Harness) -> None:
    terminals: dict[str, TerminalProcess] = {}
    for device_id, site_id in (("pt-00000000a002", fleet.site_a),
                               ("pt-00000000b002", fleet.site_b),
                               ("pt-00000000ab02", fleet.site_a)):
        password = fleet.device(device_id, site_id)
        config = terminal_config(device_id, mosquitto, password)
        config["burst_count"] = 0  # the presses come fast; keep every vote unfiltered
        terminals[device_id] = harness.add(device_id, config)
        terminals[device_id].start()
    stay_a, stay_b, mover = terminals.values()

    for terminal, buttons in ((stay_a, [1, 2, 2]), (stay_b, [3, 4]), (mover, [1, 2])):
        terminal.wait_acked(press_all(terminal, buttons))

    # Duplicates: with the worker away, the terminal gets no ack and sends the same votes
    # again; the broker keeps every copy for the worker's persistent session.
    fleet.worker.stop()
    seq = stay_b.press(4)
    wait_until(lambda: terminal_health(stay_b)["resends"] >= 1, 30,
               "the terminal to re-send its unacknowledged votes")
    fleet.worker.start_subscribed(mosquitto)
    stay_b.wait_acked(seq)

    # The mover is taken offline, pressed once more at site A, moved to site B (now, by the
    # API) and pressed twice there; it uploads all three only when its network is back.
    mover.cut_network()
    last = mover.press(3)
    before_move = terminal_health(mover)["ts_ms"]
    moved = fleet.move(mover.device_id, fleet.site_b)
    # Its clock may lag the fleet's by the ack's transit time (acks set it): it must have
    # passed the move before the presses that belong to site B.
    assert before_move < moved
    wait_until(lambda: terminal_health(mover)["ts_ms"] > moved, 10,
               "the terminal's clock to pass the move")
    press_all(mover, [4, 4])
    assert terminal_health(mover)["queue"] == 3
    mover.restore_network()
    mover.wait_acked(last + 2)
    for terminal in terminals.values():
        assert terminal_health(terminal)["queue"] == 0, terminal.device_id

    assert fleet.counts(fleet.site_a) == [2, 3, 1, 0], fleet.worker.log_tail()
    assert fleet.counts(fleet.site_b) == [0, 0, 1, 4]
    assert fleet.device_split(mover.device_id) == {fleet.site_a: [1, 1, 1, 0],
                                                   fleet.site_b: [0, 0, 0, 2]}
