"""Walking skeleton: terminals under real MicroPython → Mosquitto → ``palaute ingest`` → DB.

Five terminals run the firmware on simulated boards.  The test presses buttons through the
boards and checks that exactly those votes are stored, with the right device, button, seq and
site, and that every terminal's flash log is empty once the fleet has acknowledged them.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from sqlalchemy import select

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Vote
from fleet.services import registry
from simulator.harness import Harness
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython]

DEVICES = [f"pt-5e1e70{i:06x}" for i in range(5)]


def terminal_config(device_id: str, broker: MosquittoBroker, password: str) -> dict[str, object]:
    return {
        "device_id": device_id, "board": "sim", "buttons": 4,
        "mqtt": {"host": broker.host, "port": broker.port, "user": device_id,
                 "password": password},
        # Fast re-sends: the worker may subscribe after the first batch was published.
        "ack_timeout_s": 2, "keepalive_s": 10, "min_gap_ms": 0, "health_interval_s": 3600,
    }



def test_votes_reach_the_database_exactly_once(
        mosquitto: MosquittoBroker, db_url: str, harness: Harness, tmp_path: Path) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    site_of: dict[str, int] = {}
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Skeleton Oy")
        sites = [registry.create_site(session, customer_id=customer.id, name=f"Site {n}")
                 for n in range(2)]
        for index, device_id in enumerate(DEVICES):
            registry.register_device(session, device_id=device_id, board="sim")
            site = sites[index % 2]
            registry.assign_device(session, device_id=device_id, site_id=site.id, at_ms=0)
            site_of[device_id] = site.id

    worker = IngestProcess(
        db_url=db_url, workdir=tmp_path, worker_id="skeleton-ingest",
        mqtt_url=mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password))
    worker.start()
    try:
        terminals = []
        for device_id in DEVICES:
            password = secrets.token_urlsafe(16)
            mosquitto.add_user(device_id, password)
            terminal = harness.add(device_id, terminal_config(device_id, mosquitto, password))
            terminal.start()
            terminals.append(terminal)

        pressed: set[tuple[str, int, int]] = set()
        for round_ in range(6):
            for index, terminal in enumerate(terminals):
                button = 1 + (round_ + index) % 4
                seq = terminal.press(button)
                pressed.add((terminal.device_id, seq, button))
        for terminal in terminals:
            last = max(seq for device, seq, _ in pressed if device == terminal.device_id)
            terminal.wait_acked(last, timeout=60)
            terminal.send({"op": "health"})
            health = terminal.wait_for("health")["data"]
            assert health["queue"] == 0, f"{terminal.device_id} still holds votes in flash"
    finally:
        worker.stop()

    with sessions() as session:
        rows = session.execute(select(Vote.device_id, Vote.seq, Vote.button, Vote.site_id,
                                      Vote.flags)).all()
    stored = {(r.device_id, r.seq, r.button) for r in rows}
    assert stored == pressed, worker.log_tail()
    assert len(rows) == len(pressed) == 30
    assert all(r.site_id == site_of[r.device_id] for r in rows)
    assert all(r.flags == 0 for r in rows)
    # Sequence numbers are 1..6 on every terminal: nothing skipped, nothing repeated.
    for device_id in DEVICES:
        assert sorted(s for d, s, _ in pressed if d == device_id) == list(range(1, 7))
