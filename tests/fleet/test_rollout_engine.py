"""The rollout engine on SQLite and PostgreSQL with a real Mosquitto: waves, thresholds,
timeouts, halting on a failed canary, pause/resume/abort, superseding, and two processes
ticking at once.  Time is the ``now`` each test passes to ``tick``; presence is set as the
ingest worker sets it, and reports go through the same service the worker calls."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet.db.models import Device, RolloutDeviceState, RolloutState
from fleet.protocol.v1 import Reported
from fleet.rollouts import service
from fleet.rollouts.engine import RolloutEngine
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.runner import BrokerPublisher
from fleet.rollouts.service import RolloutPlan
from fleet.services import registry
from fleet.services.registry import Conflict, Invalid, NotFound
from tests.fleet.rollout_helpers import (
    Watcher,
    desired_of,
    device_ids,
    make_fleet,
    retained_desired,
    sessions_for,
    set_online,
    store_content,
)
from tests.services.mosquitto import MosquittoBroker

pytestmark = pytest.mark.mosquitto
T0 = 1_800_000_000_000


@dataclass
class Rig:
    sessions: sessionmaker[Session]
    engine: RolloutEngine
    publisher: BrokerPublisher
    watcher: Watcher
    site_id: int
    ids: list[str]
    broker: MosquittoBroker

    def tick(self, now: int) -> list[tuple[str, dict[str, object] | None]]:
        """One tick; the desired messages it published, in order."""
        self.engine.tick(now)
        return [desired_of(m) for m in self.watcher.since(self.publisher)]

    def report(self, device_id: str, version: int, state: str = "applied",
               desired: int | None = None, reason: str | None = None, now: int = T0) -> None:
        with self.sessions.begin() as session:
            service.apply_reported(session, Reported(device_id, version, state, desired, reason),
                                   now)

    def create(self, **plan: object) -> int:
        fields: dict[str, object] = {"content_version": 2, "target_kind": "site",
                                     "target_ref": str(self.site_id)}
        fields.update(plan)
        with self.sessions.begin() as session:
            return service.create_rollout(session, plan=RolloutPlan(**fields),  # type: ignore[arg-type]
                                          packages=StoredPackages(), now=T0).id

    def states(self, rollout_id: int) -> dict[str, str]:
        with self.sessions() as session:
            return {row.device_id: row.state.value
                    for row in service.rollout_devices(session, rollout_id)}

    def rollout(self, rollout_id: int) -> tuple[RolloutState, int]:
        with self.sessions() as session:
            rollout = service.get_rollout(session, rollout_id=rollout_id)
            return rollout.state, rollout.current_wave


    def retire(self, device_id: str) -> None:
        with self.sessions.begin() as session:
            registry.retire_device(session, device_id=device_id)

    def ticked(self, now: int) -> list[int]:
        """The rollouts one tick looked at."""
        return self.engine.tick(now).ticked


@pytest.fixture
def rig(mosquitto: MosquittoBroker, db_url: str) -> Iterator[Rig]:
    sessions = sessions_for(db_url)
    ids = device_ids(10)
    with sessions.begin() as session:
        site_id = make_fleet(session, ids)
        store_content(session, 2)
        store_content(session, 3)
    publisher = BrokerPublisher(mosquitto.url_for(mosquitto.admin_user,
                                                  mosquitto.admin_password), "engine-test")
    publisher.start()
    assert publisher.connected.wait(10)
    watcher = Watcher(mosquitto)
    yield Rig(sessions, RolloutEngine(sessions, StoredPackages(), publisher), publisher,
              watcher, site_id, ids, mosquitto)
    watcher.close()
    publisher.stop()


def test_waves_start_one_after_another_and_the_rollout_completes(rig: Rig) -> None:
    ids = rig.ids
    rollout_id = rig.create(canary=[ids[9]], waves=[50, 100], success_threshold=100)
    published = rig.tick(T0)
    assert [d for d, _ in published] == [ids[9]]
    document = published[0][1]
    assert document is not None and document["version"] == 2 and document["chunk"] == 4096
    with rig.sessions() as session:
        counts = service.rollout_counts(session, rollout_id)
    assert counts.waves == {0: {"delivered": 1}, 1: {"pending": 5}, 2: {"pending": 4}}
    assert rig.tick(T0 + 1000) == []  # the canary has not applied yet
    rig.report(ids[9], 2)
    assert [d for d, _ in rig.tick(T0 + 2000)] == ids[:5]  # ceil(50% of 9)
    for device_id in ids[:4]:
        rig.report(device_id, 2)
    assert rig.tick(T0 + 3000) == []  # 4 of 5 is below 100 %
    rig.report(ids[4], 2)
    assert [d for d, _ in rig.tick(T0 + 4000)] == ids[5:9]
    for device_id in ids[5:9]:
        rig.report(device_id, 2)
    assert rig.tick(T0 + 5000) == []
    assert rig.rollout(rollout_id) == (RolloutState.completed, 2)
    assert set(rig.states(rollout_id).values()) == {"applied"}
    with rig.sessions() as session:
        assert session.scalar(select(Device.content_version).where(Device.id == ids[0])) == 2


def test_offline_devices_wait_time_out_only_while_online_and_late_applied_wins(rig: Rig) -> None:
    ids = rig.ids
    with rig.sessions.begin() as session:
        set_online(session, ids[:3], False)
    rollout_id = rig.create(device_timeout_s=60, success_threshold=100, failure_threshold=100)
    assert len(rig.tick(T0)) == 10  # desired is retained: offline devices get it later
    states = rig.states(rollout_id)
    assert [states[d] for d in ids[:4]] == ["offline", "offline", "offline", "delivered"]
    with rig.sessions.begin() as session:
        set_online(session, [ids[0]], True)
    rig.tick(T0 + 30_000)
    assert rig.states(rollout_id)[ids[0]] == "delivered"  # its timeout starts now
    rig.tick(T0 + 61_000)
    states = rig.states(rollout_id)
    assert states[ids[3]] == "timed_out" and states[ids[0]] == "delivered"
    assert states[ids[1]] == "offline"  # never online: never timed out
    rig.tick(T0 + 91_000)
    assert rig.states(rollout_id)[ids[0]] == "timed_out"
    rig.report(ids[3], 2)  # a late applied beats timed_out
    assert rig.states(rollout_id)[ids[3]] == "applied"
    rig.report(ids[1], 1, "downloading", desired=2)
    assert rig.states(rollout_id)[ids[1]] == "delivered"


def test_a_failed_canary_halts_the_rollout_and_nothing_more_is_sent(rig: Rig) -> None:
    ids = rig.ids
    rollout_id = rig.create(canary=ids[:2], waves=[100], failure_threshold=10)
    assert len(rig.tick(T0)) == 2
    rig.report(ids[0], 2)
    rig.report(ids[1], 1, "refused", desired=2, reason="bad_signature")
    assert rig.tick(T0 + 1000) == []
    state, wave = rig.rollout(rollout_id)
    assert (state, wave) == (RolloutState.halted, 0)
    with rig.sessions() as session:
        rollout = service.get_rollout(session, rollout_id=rollout_id)
        assert "1 of 2 devices" in rollout.state_reason
        rows = {r.device_id: r for r in service.rollout_devices(session, rollout_id)}
    assert rows[ids[1]].reason == "bad_signature"
    assert {rows[d].state for d in ids[2:]} == {RolloutDeviceState.pending}
    assert rig.tick(T0 + 2000) == []  # halted stays halted


def test_pause_holds_waves_resume_continues_abort_clears_desired(rig: Rig) -> None:
    ids = rig.ids
    rollout_id = rig.create(canary=[ids[0]], waves=[50, 100], success_threshold=100)
    rig.tick(T0)
    with rig.sessions.begin() as session:
        service.pause_rollout(session, rollout_id=rollout_id)
    rig.report(ids[0], 2)
    assert rig.tick(T0 + 1000) == []
    with rig.sessions.begin() as session, pytest.raises(Conflict, match="is paused"):
        service.pause_rollout(session, rollout_id=rollout_id)
    with rig.sessions.begin() as session:
        service.resume_rollout(session, rollout_id=rollout_id)
    started = [d for d, _ in rig.tick(T0 + 2000)]
    assert started == ids[1:6]
    rig.report(ids[1], 2)
    with rig.sessions.begin() as session:
        service.abort_rollout(session, rollout_id=rollout_id)
    cleared = rig.tick(T0 + 3000)
    # Devices asked and not yet applied get an empty retained desired; the applied keep theirs.
    assert sorted(cleared) == [(d, None) for d in ids[2:6]]
    assert rig.tick(T0 + 4000) == []  # cleared once
    assert rig.rollout(rollout_id)[0] == RolloutState.aborted
    with rig.sessions.begin() as session, pytest.raises(Conflict, match="is aborted"):
        service.resume_rollout(session, rollout_id=rollout_id)


def test_a_newer_rollout_supersedes_unfinished_entries(rig: Rig) -> None:
    ids = rig.ids
    old = rig.create(success_threshold=100)
    rig.tick(T0)
    rig.report(ids[0], 2)
    new = rig.create(content_version=3, target_kind="device", target_ref=ids[1])
    states = rig.states(old)
    assert states[ids[0]] == "applied" and states[ids[1]] == "superseded"
    published = rig.tick(T0 + 1000)
    assert [(d, doc and doc["version"]) for d, doc in published] == [(ids[1], 3)]
    rig.report(ids[1], 3)
    assert rig.states(new)[ids[1]] == "applied"
    assert rig.states(old)[ids[1]] == "superseded"  # reports go to the newest entry only
    with rig.sessions() as session:
        counts = service.rollout_counts(session, old)
    assert counts.total == {"applied": 1, "delivered": 8, "superseded": 1}


def test_two_processes_ticking_at_once_start_each_wave_once(rig: Rig, db_url: str) -> None:
    ids = rig.ids
    rollout_id = rig.create(canary=ids[:3], waves=[100], success_threshold=100)
    other = RolloutEngine(sessions_for(db_url), StoredPackages(), rig.publisher)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(engine: RolloutEngine) -> None:
        try:
            barrier.wait(10)
            engine.tick(T0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in (rig.engine, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    published = [d for d, _ in rig.tick(T0 + 1)]
    assert sorted(published) == ids[:3]  # not six: the losing tick published nothing
    assert rig.rollout(rollout_id) == (RolloutState.running, 0)


def test_bad_plans_are_refused_with_reasons(rig: Rig) -> None:
    ids = rig.ids
    with pytest.raises(Invalid, match="last wave must be 100"):
        rig.create(waves=[10, 50])
    with pytest.raises(Invalid, match="strictly increasing"):
        rig.create(waves=[50, 20, 100])
    with pytest.raises(Invalid, match="not in the rollout's target"):
        rig.create(canary=["pt-0000000000ff"])
    with pytest.raises(NotFound, match="no package for display 128x64"):
        rig.create(content_version=9)
    with pytest.raises(NotFound, match="site 999"):
        rig.create(target_ref="999")
    with pytest.raises(Invalid, match="numeric id"):
        rig.create(target_ref="lobby")
    with pytest.raises(Invalid, match="target_kind"):
        rig.create(target_kind="planet")
    with pytest.raises(Invalid, match="device_timeout_s"):
        rig.create(device_timeout_s=1)
    with rig.sessions.begin() as session:
        selection = service.create_selection(session, name="pair", device_ids=ids[:2])
        selection_id = selection.id
    rollout_id = rig.create(target_kind="selection", target_ref=str(selection_id))
    assert sorted(rig.states(rollout_id)) == ids[:2]


def test_aborting_a_halted_rollout_keeps_the_desired_a_newer_rollout_sent(rig: Rig) -> None:
    ids = rig.ids
    old = rig.create(canary=[ids[0]], waves=[100], failure_threshold=10)
    assert [d for d, _ in rig.tick(T0)] == [ids[0]]
    rig.report(ids[0], 1, "refused", desired=2, reason="bad_signature")
    rig.tick(T0 + 1000)
    assert rig.rollout(old)[0] == RolloutState.halted
    new = rig.create(content_version=3, canary=[ids[0]], waves=[100], success_threshold=100)
    assert rig.states(old)[ids[0]] == "refused"  # finished entries are never superseded
    assert [(d, doc and doc["version"]) for d, doc in rig.tick(T0 + 2000)] == [(ids[0], 3)]
    with rig.sessions.begin() as session:
        service.abort_rollout(session, rollout_id=old)
    assert rig.tick(T0 + 3000) == []  # the canary's desired now belongs to the newer rollout
    held = retained_desired(rig.broker, ids[:1])[ids[0]]
    assert held is not None and held["version"] == 3
    rig.report(ids[0], 3)
    assert sorted(d for d, _ in rig.tick(T0 + 4000)) == ids[1:]
    for device_id in ids[1:]:
        rig.report(device_id, 3)
    rig.tick(T0 + 5000)
    assert rig.rollout(new) == (RolloutState.completed, 1)
    assert set(rig.states(new).values()) == {"applied"}


def test_aborting_clears_a_device_whose_newer_rollout_has_not_sent_yet(rig: Rig) -> None:
    ids = rig.ids
    old = rig.create(canary=[ids[0]], waves=[100], failure_threshold=10)
    rig.tick(T0)
    rig.report(ids[0], 1, "refused", desired=2, reason="downgrade")
    rig.tick(T0 + 1000)
    # The newer rollout's canary is another device: ids[0] waits, pending, in its wave 1.
    new = rig.create(content_version=3, canary=[ids[1]], waves=[100], success_threshold=100)
    assert [d for d, _ in rig.tick(T0 + 2000)] == [ids[1]]
    with rig.sessions.begin() as session:
        service.abort_rollout(session, rollout_id=old)
    assert rig.tick(T0 + 3000) == [(ids[0], None)]  # the old desired must not linger
    rig.report(ids[1], 3)
    assert ids[0] in [d for d, _ in rig.tick(T0 + 4000)]  # the newer one sends its own
    assert rig.states(new)[ids[0]] == "delivered"


def test_a_retired_canary_of_one_neither_blocks_nor_halts_the_rollout(rig: Rig) -> None:
    ids = rig.ids
    rollout_id = rig.create(canary=[ids[0]], waves=[100], success_threshold=100,
                            failure_threshold=0)
    assert [d for d, _ in rig.tick(T0)] == [ids[0]]
    rig.retire(ids[0])
    assert rig.states(rollout_id)[ids[0]] == "retired"
    with rig.sessions() as session:
        assert session.scalar(select(Device.online).where(Device.id == ids[0])) is False
    published = rig.tick(T0 + 1000)
    # The canary wave is empty now, so wave 1 starts; the retired device's desired is cleared.
    assert published == [(d, published[0][1]) for d in ids[1:]] + [(ids[0], None)]
    assert retained_desired(rig.broker, ids[:1]) == {ids[0]: None}
    for device_id in ids[1:]:
        rig.report(device_id, 2)
    assert rig.tick(T0 + 2000) == []  # cleared once
    assert rig.rollout(rollout_id) == (RolloutState.completed, 1)
    with rig.sessions() as session:
        counts = service.rollout_counts(session, rollout_id)
    assert counts.total == {"applied": 9, "retired": 1}
    assert rig.ticked(T0 + 3000) == []  # nothing left to follow


def test_a_retired_device_that_timed_out_does_not_halt_the_rollout(rig: Rig) -> None:
    ids = rig.ids
    rollout_id = rig.create(canary=ids[:2], waves=[100], failure_threshold=10,
                            device_timeout_s=60)
    rig.tick(T0)
    rig.report(ids[0], 2)
    rig.tick(T0 + 61_000)
    assert rig.states(rollout_id)[ids[1]] == "timed_out"
    assert rig.rollout(rollout_id)[0] == RolloutState.halted
    rig.retire(ids[1])
    with rig.sessions.begin() as session:
        service.resume_rollout(session, rollout_id=rollout_id)
    published = [d for d, _ in rig.tick(T0 + 62_000)]
    assert published == [*ids[2:], ids[1]]  # wave 1, then the retired device's clearing
    assert rig.rollout(rollout_id) == (RolloutState.running, 1)


def test_a_completed_rollout_is_ticked_only_while_it_has_something_to_follow(rig: Rig) -> None:
    ids = rig.ids
    with rig.sessions.begin() as session:
        set_online(session, [ids[9]], False)
    rollout_id = rig.create(success_threshold=50, device_timeout_s=60)
    rig.tick(T0)
    for device_id in ids[:9]:
        rig.report(device_id, 2)
    rig.tick(T0 + 1000)
    assert rig.rollout(rollout_id)[0] == RolloutState.completed
    assert rig.ticked(T0 + 2000) == []  # its one offline device may never come back
    with rig.sessions.begin() as session:
        set_online(session, [ids[9]], True)
    assert rig.ticked(T0 + 3000) == [rollout_id]
    assert rig.states(rollout_id)[ids[9]] == "delivered"  # its timeout runs from now
    assert rig.ticked(T0 + 4000) == [rollout_id]
    assert rig.ticked(T0 + 64_000) == [rollout_id]
    assert rig.states(rollout_id)[ids[9]] == "timed_out"
    assert rig.ticked(T0 + 65_000) == []
