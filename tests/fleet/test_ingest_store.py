"""The fast vote store: fixed statement count, no watermark query with ``after``, rollbacks,
and PostgreSQL's straight COPY falling back to the stage when it meets a stored vote.

Runs on SQLite (portable executemany) and PostgreSQL (COPY straight into votes, or into a
stage table).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Device, DeviceState
from fleet.db.models import Vote as VoteRow
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.services.rollups import rollup_counts, verify_rollups
from fleet.services.votes import store_batches
from tests.fleet.test_reports import Fleet

T0 = 1_800_000_000_000
DEVICES = [f"pt-5707e{i:07x}" for i in range(300)]


def fleet(db_url: str) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        session.execute(insert(Device), [
            {"id": d, "board": "", "state": DeviceState.stocked, "notes": "",
             "created_ms": 0, "acked_seq": 0, "online": False} for d in DEVICES])
    return engine, sessions


def batch(device: str, first: int, count: int, after: int | None) -> VoteBatch:
    return VoteBatch(device, tuple(Vote(s, T0 + s, 1 + s % 4, 0, 1)
                                   for s in range(first, first + count)), after)


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """Collect the SQL of every statement the engine executes meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_many_devices_take_a_fixed_number_of_statements_and_no_watermark_query(
        db_url: str) -> None:
    engine, sessions = fleet(db_url)
    batches = [batch(d, 1, 5, 0) for d in DEVICES]
    with statements(engine) as seen, sessions.begin() as session:
        result = store_batches(session, batches, received_ms=T0)
    assert (result.stored, result.duplicates) == (1500, 0)
    assert result.acks == dict.fromkeys(DEVICES, 5)
    # Every message carried `after`: nothing may read the votes table back.
    assert not [s for s in seen if s.startswith("SELECT") and "FROM votes" in s]
    # Devices, assignments, the vote insert and one device update, however many devices
    # (SQLAlchemy may split an executemany into a few pages; PostgreSQL adds its COPY stage).
    assert len(seen) <= 8, seen
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(VoteRow)) == 1500
        assert set(session.scalars(select(Device.acked_seq))) == {5}
        assert set(session.scalars(select(Device.last_seen_ms))) == {T0}


def test_watermark_query_only_for_devices_without_after(db_url: str) -> None:
    engine, sessions = fleet(db_url)
    claimed, simple = DEVICES[0], DEVICES[1]
    with statements(engine) as seen, sessions.begin() as session:
        result = store_batches(session, [batch(claimed, 3, 2, 2), batch(simple, 1, 3, None)],
                               received_ms=T0)
    assert result.acks == {claimed: 4, simple: 3}
    reads = [s for s in seen if s.startswith("SELECT") and "FROM votes" in s]
    assert len(reads) == 1


def test_a_vote_twice_in_one_call_is_stored_once(db_url: str) -> None:
    _, sessions = fleet(db_url)
    device = DEVICES[0]
    with sessions.begin() as session:
        result = store_batches(session, [batch(device, 1, 3, 0), batch(device, 1, 3, 0),
                                         batch(device, 4, 1, 3)], received_ms=T0)
    assert (result.stored, result.duplicates, result.acks) == (4, 3, {device: 4})


def test_a_rolled_back_store_leaves_nothing_and_the_next_one_works(db_url: str) -> None:
    engine, sessions = fleet(db_url)
    device = DEVICES[0]
    # One connection, so the retry meets whatever the rolled-back transaction left behind
    # (on PostgreSQL: a stage table created inside it, and gone with it).
    engine.pool.dispose()
    with sessions() as session:
        session.begin()
        store_batches(session, [batch(device, 1, 3, 0)], received_ms=T0)
        session.rollback()
    with sessions.begin() as session:
        result = store_batches(session, [batch(device, 1, 3, 0)], received_ms=T0)
    assert (result.stored, result.duplicates) == (3, 0)
    with sessions.begin() as session:
        again = store_batches(session, [batch(device, 1, 4, 0)], received_ms=T0)
    assert (again.stored, again.duplicates, again.acks) == (1, 3, {device: 4})


def test_a_stored_vote_above_the_watermark_sends_the_batch_through_the_stage(
        db_url: str) -> None:
    fleet = Fleet(db_url)
    device = fleet.device(DEVICES[0], fleet.site(fleet.customer("C"), "S", "UTC"))
    # A simple client (no `after`) leaves a gap: seq 3 is stored, the watermark stays at 0.
    with fleet.sessions.begin() as session:
        gap = store_batches(session, [batch(device, 3, 1, None)], received_ms=T0)
    assert (gap.stored, gap.acks, gap.copy_fallback) == (1, {device: 0}, False)
    # Every vote of the next batch is above the watermark, so PostgreSQL tries the straight
    # COPY, meets seq 3 and must store the other three through the stage, counted once each.
    with fleet.sessions.begin() as session:
        result = store_batches(session, [batch(device, 1, 4, 0)], received_ms=T0)
    assert (result.stored, result.duplicates, result.acks) == (3, 1, {device: 4})
    assert result.copy_fallback is (make_engine(db_url).dialect.name == "postgresql")
    with fleet.sessions() as session:
        assert sorted(session.scalars(select(VoteRow.seq))) == [1, 2, 3, 4]
        # The rolled-back COPY left nothing in the rollups either.
        assert sum(sum(c) for c in rollup_counts(session).values()) == 4
        assert verify_rollups(session) == {}


def test_database_errors_below_sqlalchemy_come_out_as_sqlalchemy_errors(db_url: str) -> None:
    # The vote insert runs on the DBAPI connection (COPY, plain executemany); the worker
    # retries a batch on SQLAlchemyError, so a driver error there must arrive as one.
    engine, sessions = fleet(db_url)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE votes"))
    with pytest.raises(DBAPIError, match="votes"), sessions.begin() as session:
        store_batches(session, [batch(DEVICES[0], 1, 1, 0)], received_ms=T0)
