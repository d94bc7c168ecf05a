"""Rollups: the triggers keep them equal to the votes; repair; migration backfill.

On SQLite and PostgreSQL: random votes through the real ingest path (duplicates included),
manual DELETE/UPDATE of votes, a truncated rollup table, and a database that had votes
before migration 0003.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import date

import pytest
from alembic import command
from sqlalchemy import create_engine, delete, func, inspect, select, text, update
from sqlalchemy.orm import Session

from fleet.db.migrate import alembic_config, upgrade
from fleet.db.models import Vote as VoteRow
from fleet.db.models import VoteRollup
from fleet.protocol.v1 import Vote
from fleet.services import registry
from fleet.services.reports import (
    Granularity,
    Report,
    ReportQuery,
    customer_report,
    device_report,
    site_report,
)
from fleet.services.rollups import (
    BUCKET_MS,
    Counts,
    RollupKey,
    aggregate_votes,
    rebuild_rollups,
    rollup_counts,
    verify_rollups,
)
from tests.fleet.test_reports import HELSINKI, KATHMANDU, Fleet, at

DEVICES = ("pt-0000000000c1", "pt-0000000000c2", "pt-0000000000c3")


def total(rollups: dict[RollupKey, Counts]) -> int:
    """Votes counted in a ``{key: per-button counts}`` mapping."""
    return sum(sum(counts) for counts in rollups.values())


def random_fleet(db_url: str, seed: int = 7) -> tuple[Fleet, list[int], int]:
    """Two customers, three sites in three zones, devices that move, random votes stored
    twice and in overlapping batches; returns the fleet, the site ids and the customer."""
    rng = random.Random(seed)
    fleet = Fleet(db_url)
    customer = fleet.customer("Random Oy")
    hours = {day: [["08:05", "12:00"], ["11:30", "19:50"]] for day in ("mon", "wed", "thu", "sat")}
    sites = [fleet.site(customer, "Helsinki", HELSINKI, hours=hours,
                        exceptions={"2026-10-22": [["10:00", "10:20"]]}),
             fleet.site(customer, "Kathmandu", KATHMANDU, hours=hours),
             fleet.site(fleet.customer("Other Oy"), "UTC", "UTC")]
    start = at(HELSINKI, "2026-10-20T00:00")
    # Device 1 starts unassigned (its first votes have no site), then moves twice.
    with fleet.sessions.begin() as session:
        registry.register_device(session, device_id=DEVICES[0])
    fleet.move(DEVICES[0], sites[0], start + 86_400_000)
    fleet.move(DEVICES[0], sites[1], start + 4 * 86_400_000)
    fleet.device(DEVICES[1], sites[1], 0)
    fleet.device(DEVICES[2], sites[2], 0)
    for device in DEVICES:
        votes = [Vote(seq, start + rng.randrange(8 * 86_400_000), rng.randint(1, 5),
                      rng.randrange(8), rng.choice((1, 2)))
                 for seq in range(1, 601)]
        fleet.store(device, votes[:400])
        fleet.store(device, votes[:400])  # every vote again: duplicates, stored once
        fleet.store(device, votes[350:])  # overlapping re-send plus new votes
    return fleet, sites, customer


def test_rollups_equal_the_votes_after_random_ingest(db_url: str) -> None:
    fleet, _, _ = random_fleet(db_url)
    with fleet.sessions() as session:
        expected = aggregate_votes(session)
        assert expected and rollup_counts(session) == expected
        assert verify_rollups(session) == {}
        assert session.scalar(select(func.count()).select_from(VoteRow)) == 1800
        unassigned = session.scalar(select(func.count()).where(VoteRow.site_id.is_(None)))
        assert unassigned and total(expected) == 1800 - unassigned
        assert all(key.bucket_start_ms % BUCKET_MS == 0 and key.flag_class in (0, 1, 4, 5)
                   for key in expected)


@pytest.mark.parametrize("granularity", ["hour", "day", "week", "month"])
def test_reports_from_rollups_equal_reports_from_raw_votes(db_url: str,
                                                           granularity: Granularity) -> None:
    fleet, sites, customer = random_fleet(db_url, seed=11)
    MakeReport = Callable[[Session, ReportQuery], Report]
    makers: list[MakeReport] = [
        *[lambda s, q, site=site: site_report(s, site, q) for site in sites],
        lambda s, q: customer_report(s, customer, q),
        lambda s, q: device_report(s, DEVICES[0], q),
    ]
    with fleet.sessions() as session:
        for options in ({}, {"filtered": False, "include_test": True},
                        {"opening_hours_only": True, "by": "content_version"},
                        {"opening_hours_only": True, "by": "device", "filtered": False}):
            for make in makers:
                from_rollups, from_votes = (make(session, ReportQuery(
                    date(2026, 10, 19), date(2026, 10, 29), granularity=granularity,
                    source=source, **options)) for source in ("rollups", "votes"))
                assert from_rollups.series == from_votes.series
                assert any(s.totals.total for s in from_rollups.series), options


def test_rebuild_repairs_a_truncated_or_damaged_table(db_url: str) -> None:
    fleet, sites, _ = random_fleet(db_url)
    with fleet.sessions() as session:
        expected = aggregate_votes(session)
        before = site_report(session, sites[0], ReportQuery(date(2026, 10, 19),
                                                            date(2026, 10, 29)))
    with fleet.sessions.begin() as session:
        session.execute(delete(VoteRollup))
    with fleet.sessions() as session:
        assert rollup_counts(session) == {}
        assert len(verify_rollups(session)) == len(expected)
    with fleet.sessions.begin() as session:
        assert rebuild_rollups(session) == len(expected)
    with fleet.sessions() as session:
        assert rollup_counts(session) == expected
        after = site_report(session, sites[0], ReportQuery(date(2026, 10, 19),
                                                           date(2026, 10, 29)))
        assert after.series == before.series

    # One site damaged: rebuilding that site fixes it and leaves the others alone.
    with fleet.sessions.begin() as session:
        session.execute(update(VoteRollup).where(VoteRollup.site_id == sites[1])
                        .values(button_1=VoteRollup.button_1 + 5))
        session.execute(delete(VoteRollup).where(VoteRollup.site_id == sites[2],
                                                 VoteRollup.flag_class == 0))
    with fleet.sessions.begin() as session:
        damaged = verify_rollups(session)
        assert {key.site_id for key in damaged} == {sites[1], sites[2]}
        rebuild_rollups(session, site_id=sites[1])
    with fleet.sessions() as session:
        assert {key.site_id for key in verify_rollups(session)} == {sites[2]}
        assert verify_rollups(session, site_id=sites[1]) == {}


def test_triggers_follow_manual_deletes_and_updates(db_url: str) -> None:
    fleet, sites, _ = random_fleet(db_url)
    with fleet.sessions.begin() as session:
        # A repair an operator might make: re-stamp votes after fixing an assignment, delete
        # a test device's votes, correct a content version.
        session.execute(update(VoteRow).where(VoteRow.device_id == DEVICES[1],
                                              VoteRow.seq <= 100).values(site_id=sites[0]))
        session.execute(update(VoteRow).where(VoteRow.device_id == DEVICES[0],
                                              VoteRow.seq > 500).values(site_id=None))
        session.execute(update(VoteRow).where(VoteRow.button == 2).values(content_version=9))
        session.execute(update(VoteRow).values(received_ms=VoteRow.received_ms + 1))
        session.execute(delete(VoteRow).where(VoteRow.device_id == DEVICES[2],
                                              VoteRow.seq % 3 == 0))
        session.execute(delete(VoteRow).where(VoteRow.flags == 7))
    with fleet.sessions() as session:
        assert verify_rollups(session) == {}
        # Keys whose last vote went away are deleted, not left at zero.
        row_totals = (VoteRollup.button_1 + VoteRollup.button_2 + VoteRollup.button_3
                      + VoteRollup.button_4 + VoteRollup.button_5)
        assert session.scalar(select(func.min(row_totals))) == 1


def test_migration_backfills_rollups_for_existing_votes(unmigrated_db_url: str) -> None:
    upgrade(unmigrated_db_url, "0002")
    engine = create_engine(unmigrated_db_url)
    rng = random.Random(3)
    t0 = at("UTC", "2026-01-01T00:00")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO customers (id, name, created_ms) VALUES (1, 'Old', 1)"))
        conn.execute(text("INSERT INTO sites (id, customer_id, name, address, timezone, "
                          "created_ms) VALUES (1, 1, 'A', '', 'Europe/Helsinki', 1), "
                          "(2, 1, 'B', '', 'Asia/Kathmandu', 1)"))
        for device in ("pt-0000000000d1", "pt-0000000000d2"):
            conn.execute(text("INSERT INTO devices (id, board, state, notes, created_ms, "
                              "acked_seq, online) VALUES (:id, '', 'assigned', '', 1, 0, "
                              "false)"), {"id": device})
        conn.execute(text(
            "INSERT INTO votes (device_id, seq, ts_ms, button, flags, content_version, "
            "site_id, received_ms) VALUES (:d, :seq, :ts, :b, :f, 1, :site, 1)"),
            [{"d": device, "seq": seq, "ts": t0 + rng.randrange(3 * 86_400_000),
              "b": rng.randint(1, 4), "f": rng.randrange(8),
              "site": rng.choice((1, 2, None))}
             for device in ("pt-0000000000d1", "pt-0000000000d2") for seq in range(1, 301)])
        stamped = conn.execute(text("SELECT count(*) FROM votes WHERE site_id IS NOT NULL")
                               ).scalar_one()
    upgrade(unmigrated_db_url)
    upgrade(unmigrated_db_url)  # idempotent
    fleet = Fleet(unmigrated_db_url)
    with fleet.sessions() as session:
        expected = aggregate_votes(session)
        assert rollup_counts(session) == expected
        assert total(expected) == stamped > 0
    # New votes after the upgrade go through the triggers.
    fleet.seq["pt-0000000000d1"] = 300
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO assignments (device_id, site_id, start_ms) "
                          "VALUES ('pt-0000000000d1', 1, 0)"))
    fleet.votes("pt-0000000000d1", [(t0 + 1000, 1, 0, 1)] * 3)
    with fleet.sessions() as session:
        assert verify_rollups(session) == {}
        assert total(rollup_counts(session)) == stamped + 3
    # Down and up again: the table, triggers and functions go, then come back backfilled.
    command.downgrade(alembic_config(unmigrated_db_url), "0002")
    with engine.connect() as conn:
        assert "vote_rollups" not in inspect(conn).get_table_names()
    upgrade(unmigrated_db_url)
    with fleet.sessions() as session:
        assert verify_rollups(session) == {} and total(rollup_counts(session)) == stamped + 3
    engine.dispose()
