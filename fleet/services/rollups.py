"""Vote rollups: counts per 15-minute bucket, kept by database triggers; check and repair.

The triggers created by migration 0003 maintain ``vote_rollups`` on every INSERT, DELETE and
UPDATE of ``votes``, in the same transaction, so nothing in the ingest path calls this
module.  It exists for the rare repair (``rebuild_rollups`` after someone truncated or edited
the table by hand, or after restoring votes without triggers) and for checking that the
rollups agree with the votes (``verify_rollups``, used by the tests and by operators).

The rollup key of a vote is ``(site_id, ts_ms - ts_ms % BUCKET_MS, device_id,
content_version, flags & FLAG_CLASS_MASK)`` and it adds one to the column of its button; the
same expressions are written in the migration's SQL.  Votes without a site are not rolled up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    SQLColumnExpression,
    delete,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.orm import Session

from fleet.db.models import Vote, VoteRollup
from fleet.protocol.v1 import FLAG_FILTERED, FLAG_TEST_MODE

BUCKET_MS = 15 * 60 * 1000
# The flag bits that decide how a vote is counted: bit 0 (filtered by the abuse rule) and
# bit 2 (test mode).  Bit 1 (time not synced) is kept on the vote but not in the rollup key.
FLAG_CLASS_MASK = FLAG_FILTERED | FLAG_TEST_MODE


class RollupKey(NamedTuple):
    """One rollup row's key; its value is the vote count of each button (1 to 5)."""

    site_id: int
    bucket_start_ms: int
    device_id: str
    content_version: int
    flag_class: int


Counts = tuple[int, int, int, int, int]
BUTTON_COLUMNS = (VoteRollup.button_1, VoteRollup.button_2, VoteRollup.button_3,
                  VoteRollup.button_4, VoteRollup.button_5)


def _int(value: int) -> ColumnElement[Any]:
    # Integer literals inline rather than as parameters: identical text in SELECT and GROUP BY
    # (PostgreSQL matches grouped expressions textually) and no float/numeric guessing.
    return literal_column(str(int(value)), BigInteger)


def _vote_key_columns() -> list[SQLColumnExpression[Any]]:
    return [Vote.site_id, Vote.ts_ms - Vote.ts_ms % _int(BUCKET_MS), Vote.device_id,
            Vote.content_version, Vote.flags.op("&")(_int(FLAG_CLASS_MASK))]


def _vote_counts() -> list[SQLColumnExpression[Any]]:
    return [func.count().filter(Vote.button == _int(button)) for button in range(1, 6)]


def _counts(row: Sequence[Any]) -> Counts:
    return (int(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]))


def aggregate_votes(session: Session, site_id: int | None = None) -> dict[RollupKey, Counts]:
    """What the rollups should hold: a direct aggregation of the raw votes."""
    key = _vote_key_columns()
    query = (select(*key, *_vote_counts()).where(Vote.site_id.is_not(None)).group_by(*key))
    if site_id is not None:
        query = query.where(Vote.site_id == site_id)
    return {RollupKey(*row[:5]): _counts(row[5:]) for row in session.execute(query)}


def rollup_counts(session: Session, site_id: int | None = None) -> dict[RollupKey, Counts]:
    """What the rollups hold."""
    query = select(VoteRollup.site_id, VoteRollup.bucket_start_ms, VoteRollup.device_id,
                   VoteRollup.content_version, VoteRollup.flag_class, *BUTTON_COLUMNS)
    if site_id is not None:
        query = query.where(VoteRollup.site_id == site_id)
    return {RollupKey(*row[:5]): _counts(row[5:]) for row in session.execute(query)}


def verify_rollups(session: Session, site_id: int | None = None
                   ) -> dict[RollupKey, tuple[Counts, Counts]]:
    """Keys whose rollup counts differ from the votes: ``{key: (expected, stored)}``.

    Empty when all is well.  Reads every vote of the site (or of the fleet): an operator's
    check, not something to run per request.
    """
    none: Counts = (0, 0, 0, 0, 0)
    expected = aggregate_votes(session, site_id)
    stored = rollup_counts(session, site_id)
    return {key: (expected.get(key, none), stored.get(key, none))
            for key in expected.keys() | stored.keys()
            if expected.get(key, none) != stored.get(key, none)}


def rebuild_rollups(session: Session, site_id: int | None = None) -> int:
    """Recompute the rollups of one site (or all) from the votes; return the rows written.

    Votes are never updated or deleted by the application and the triggers follow manual
    changes too, so this is for repairs only.  On PostgreSQL it locks ``votes`` against
    writes (reads go on) until the caller commits: a vote inserted between the DELETE and the
    INSERT below would otherwise be counted twice or not at all.  SQLite has a single writer,
    so the transaction is already exclusive.  The caller commits.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("LOCK TABLE votes IN SHARE ROW EXCLUSIVE MODE"))
    wipe = delete(VoteRollup)
    key = _vote_key_columns()
    source = select(*key, *_vote_counts()).where(Vote.site_id.is_not(None)).group_by(*key)
    if site_id is not None:
        wipe = wipe.where(VoteRollup.site_id == site_id)
        source = source.where(Vote.site_id == site_id)
    session.execute(wipe)
    session.execute(insert(VoteRollup).from_select(
        ["site_id", "bucket_start_ms", "device_id", "content_version", "flag_class",
         *(column.key for column in BUTTON_COLUMNS)], source))
    count_query = select(func.count()).select_from(VoteRollup)
    if site_id is not None:
        count_query = count_query.where(VoteRollup.site_id == site_id)
    return int(session.scalar(count_query) or 0)
