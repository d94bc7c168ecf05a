"""Issue 7's rollout test: 20 terminals under the real MicroPython interpreter, Mosquitto with
per-device ACLs, ``palaute ingest`` as a subprocess, PostgreSQL, and the rollout engine ticked
by the test (each tick is one deterministic step; waits are on database state and terminal
events, never sleeps).

The fleet: two canaries; four terminals offline when their wave starts (one of them then
receives a forged ``desired`` -- a package signature that is not the fleet's); one killed
with SIGKILL right after it downloaded the last chunk, while it verifies and swaps; one that
already shows a higher version.  The rollout must end with every device in its true state,
the new question on the screens that applied it, and votes after the swap carrying the new
content version.  A second test checks that a failing canary halts the rollout.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from fleet.content.package import screen_bytes
from fleet.content.signing import public_key_hex
from fleet.db.migrate import upgrade
from fleet.db.models import Device, RolloutState, Vote
from fleet.protocol.v1 import encode_desired
from fleet.rollouts import service
from fleet.rollouts.engine import RolloutEngine
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.runner import BrokerPublisher
from fleet.rollouts.service import RolloutPlan
from fleet.services.clock import now_ms
from simulator.harness import Harness, TerminalProcess
from tests.fleet.rollout_helpers import KEY, make_fleet, sessions_for, set_online, store_content
from tests.services.common import wait_until
from tests.services.ingest import IngestProcess
from tests.services.micropython import micropython_command
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython, pytest.mark.postgres,
              pytest.mark.slow]

IDS = [f"pt-0a11ed{n:06x}" for n in range(20)]
CANARY = IDS[:2]
OFFLINE = IDS[2:5]  # offline when their wave starts, online later
KILLED = IDS[5]  # SIGKILLed after its last chunk, restarted
TAMPERED = IDS[6]  # offline at first, then gets a desired with a forged signature
NEWER = IDS[7]  # already shows version 9
NEW, HIGHER = 3, 9
TIMEOUT = 60.0


@dataclass
class Fleet:
    sessions: Any
    engine: RolloutEngine
    publisher: BrokerPublisher
    harness: Harness
    terminals: dict[str, TerminalProcess]
    site_id: int
    packages: dict[int, bytes]

    def tick_until(self, what: str, done: Any, timeout: float = TIMEOUT) -> None:
        """Tick the engine until ``done()`` holds (each poll is one tick)."""
        def step() -> bool:
            self.engine.tick(now_ms())
            return bool(done())
        wait_until(step, timeout, what)

    def states(self, rollout_id: int) -> dict[str, str]:
        with self.sessions() as session:
            return {r.device_id: r.state.value if r.reason is None
                    else f"{r.state.value}:{r.reason}"
                    for r in service.rollout_devices(session, rollout_id)}

    def online(self, device_ids: list[str]) -> bool:
        with self.sessions() as session:
            return all(session.scalars(select(Device.online).where(
                Device.id.in_(device_ids))).all()) and bool(device_ids)


def question_screen() -> bytes:
    """A bitmap no built-in screen has: every byte value in turn."""
    size = screen_bytes(128, 64)
    return bytes(i % 251 for i in range(size))


def terminal_config(device_id: str, broker: MosquittoBroker, password: str) -> dict[str, Any]:
    return {
        "device_id": device_id, "board": "sim", "buttons": 4, "min_gap_ms": 0,
        "mqtt": {"host": broker.host, "port": broker.port, "user": device_id,
                 "password": password},
        "ack_timeout_s": 2, "keepalive_s": 10, "health_interval_s": 3600,
        "content_key": public_key_hex(KEY), "fetch_timeout_s": 3,
    }


@pytest.fixture
def fleet(mosquitto: MosquittoBroker, postgres_url: str, tmp_path: Path) -> Iterator[Fleet]:
    upgrade(postgres_url)
    sessions = sessions_for(postgres_url)
    with sessions.begin() as session:
        site_id = make_fleet(session, IDS, board="sim", online=False)
        packages = {
            NEW: store_content(session, NEW, question=question_screen())["128x64"],
            HIGHER: store_content(session, HIGHER,
                                  question=bytes(reversed(question_screen())))["128x64"]}
    admin_url = mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password)
    worker = IngestProcess(db_url=postgres_url, mqtt_url=admin_url, workdir=tmp_path,
                           worker_id="rollout-ingest")
    worker.start_subscribed(mosquitto)
    publisher = BrokerPublisher(admin_url, "rollout-engine")
    publisher.start()
    assert publisher.connected.wait(10)
    harness = Harness(tmp_path / "terminals", micropython_command())
    harness.workdir.mkdir()
    terminals = {}
    for device_id in IDS:
        password = secrets.token_urlsafe(12)
        mosquitto.add_user(device_id, password)
        terminals[device_id] = harness.add(device_id,
                                           terminal_config(device_id, mosquitto, password))
    # NEWER already shows version 9: its flash holds that package.
    content_dir = harness.workdir / NEWER / "flash" / "content"
    content_dir.mkdir(parents=True)
    (content_dir / "content.bin").write_bytes(packages[HIGHER])
    try:
        yield Fleet(sessions, RolloutEngine(sessions, StoredPackages(), publisher), publisher,
                    harness, terminals, site_id, packages)
    finally:
        harness.close()
        publisher.stop()
        worker.stop()


def start(fleet: Fleet, device_ids: list[str]) -> None:
    for device_id in device_ids:
        fleet.terminals[device_id].start()
    wait_until(lambda: fleet.online(device_ids), TIMEOUT, f"{len(device_ids)} terminals online")


def test_rollout_to_20_terminals_ends_with_the_truth(fleet: Fleet) -> None:
    late = [*OFFLINE, TAMPERED]
    start(fleet, [d for d in IDS if d not in late])
    with fleet.sessions.begin() as session:
        rollout_id = service.create_rollout(session, plan=RolloutPlan(
            content_version=NEW, target_kind="site", target_ref=str(fleet.site_id),
            canary=CANARY, waves=[50, 100], success_threshold=70, failure_threshold=20,
            device_timeout_s=120), packages=StoredPackages()).id

    # Canary first: one tick asks them; their reports (through ingest) say when they applied.
    fleet.engine.tick(now_ms())
    wait_until(lambda: all(fleet.states(rollout_id)[d] == "applied" for d in CANARY),
               TIMEOUT, "canaries applied")
    assert set(fleet.states(rollout_id)[d] for d in IDS[2:]) == {"pending"}

    killed = fleet.terminals[KILLED]
    fleet.engine.tick(now_ms())  # wave 1: IDS[2:11]
    states = fleet.states(rollout_id)
    assert [states[d] for d in late] == ["offline"] * 4
    assert states[IDS[11]] == "pending"
    # Kill KILLED right after it asked for its last (only) chunk: it dies while the chunk
    # arrives, is hashed, verified or renamed.
    killed.wait_for("fetch", timeout=TIMEOUT)
    killed.kill()
    # The forged desired: the fleet's package, a signature that is not the fleet's.
    package = fleet.packages[NEW]
    forged = encode_desired(NEW, len(package), hashlib.sha256(package).hexdigest(),
                            secrets.token_hex(64))
    fleet.publisher(f"fb/v1/d/{TAMPERED}/desired", forged, retain=True)
    killed.start()
    start(fleet, late)

    def finished() -> bool:
        with fleet.sessions() as session:
            return service.get_rollout(session, rollout_id=rollout_id).state == \
                RolloutState.completed and all(
                    s in ("applied", "refused") for s in
                    (r.state.value for r in service.rollout_devices(session, rollout_id)))

    fleet.tick_until("the rollout to complete", finished, timeout=2 * TIMEOUT)
    states = fleet.states(rollout_id)
    expected = {d: "applied" for d in IDS}
    expected[TAMPERED] = "refused:bad_signature"
    expected[NEWER] = "refused:downgrade"
    assert states == expected
    with fleet.sessions() as session:
        shown = {row.id: row.content_version for row in
                 session.execute(select(Device.id, Device.content_version))}
    assert shown == {d: NEW for d in IDS} | {TAMPERED: 0, NEWER: HIGHER}

    # What visitors see, pixel for pixel, and what their votes say.
    for device_id in (*CANARY, KILLED, OFFLINE[0], IDS[19]):
        screen = fleet.terminals[device_id].display()
        assert screen["fb"] == question_screen(), device_id
        assert screen["lines"] == [f"question:fi:v{NEW}"]
    assert fleet.terminals[NEWER].display()["fb"] == bytes(reversed(question_screen()))
    assert fleet.terminals[TAMPERED].display()["lines"] != [f"question:fi:v{NEW}"]
    voters = [CANARY[0], KILLED, OFFLINE[1], TAMPERED]
    seqs = {d: fleet.terminals[d].press(1) for d in voters}
    for device_id, seq in seqs.items():
        fleet.terminals[device_id].wait_acked(seq, timeout=TIMEOUT)
    with fleet.sessions() as session:
        stored = {(v.device_id, v.seq): v.content_version
                  for v in session.scalars(select(Vote))}
    assert {d: stored[(d, s)] for d, s in seqs.items()} == {
        CANARY[0]: NEW, KILLED: NEW, OFFLINE[1]: NEW, TAMPERED: 0}


def test_a_failing_canary_halts_the_rollout(fleet: Fleet) -> None:
    canary = [NEWER, IDS[0]]  # NEWER refuses (downgrade)
    start(fleet, [*canary, IDS[1]])
    with fleet.sessions.begin() as session:
        set_online(session, IDS[2:], False)
        rollout_id = service.create_rollout(session, plan=RolloutPlan(
            content_version=NEW, target_kind="site", target_ref=str(fleet.site_id),
            canary=canary, waves=[100], success_threshold=100, failure_threshold=5,
            device_timeout_s=120), packages=StoredPackages()).id

    def halted() -> bool:
        with fleet.sessions() as session:
            return service.get_rollout(session, rollout_id=rollout_id).state == \
                RolloutState.halted
    fleet.tick_until("the rollout to halt", halted)
    states = fleet.states(rollout_id)
    assert states[NEWER] == "refused:downgrade"
    assert {states[d] for d in IDS if d not in canary} == {"pending"}
    # Nothing was asked of the rest: IDS[1] is online and still shows the built-in question.
    assert fleet.terminals[IDS[1]].display()["lines"] != [f"question:fi:v{NEW}"]
