"""Storing vote batches idempotently and computing what to acknowledge.

One call stores many batches in one transaction (the ingest worker batches messages), so the
cost of a commit is shared by hundreds of votes.  (device_id, seq) is the primary key and
inserts skip existing rows, so a re-sent batch is stored once and acknowledged again.

The statements per call are a fixed handful whatever the batch holds (measured in
docs/performance.md):

1. one query for the state and watermark of every device in the batch, with its
   assignment history (to stamp each vote with its site);
2. the vote insert.  On PostgreSQL: when every vote is above its device's watermark (the
   usual case: nothing of it can be stored yet), ``COPY`` straight into ``votes`` inside a
   savepoint; otherwise, or when that meets a stored key after all, ``COPY`` into a
   temporary stage table and one ``INSERT … SELECT … ON CONFLICT DO NOTHING`` that returns
   only the count of new rows.  SQLite: one ``INSERT … ON CONFLICT DO NOTHING``
   executemany of plain tuples;
3. one executemany that advances every device's watermark and ``last_seen_ms``;
4. only for devices with a message *without* ``after`` (simple clients): the query that finds
   how far the stored seqs are contiguous.  Terminals always send ``after``, so in production
   this query does not run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from sqlalchemy import Table, bindparam, case, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from fleet.db.models import Assignment, Device, DeviceState
from fleet.db.models import Vote as VoteRow
from fleet.protocol.v1 import FLAG_TIME_UNSYNCED, Vote, VoteBatch

# Terminal timestamps below this (2001-09-09) are uptimes, not wall-clock times.
UNKNOWN_TIME_BEFORE_MS = 10**12

# The vote row as a tuple, in this column order (COPY sends the columns in this order too).
_COLUMNS = ("device_id", "seq", "ts_ms", "button", "flags", "content_version", "site_id",
            "received_ms")

# PostgreSQL: votes are streamed with COPY (the fastest way into the server: rows are
# formatted in C by psycopg, no statement per row).  When no vote can be stored yet, COPY
# goes straight into votes; that skips the stage below (its second heap insert and ON
# CONFLICT's speculative insertion): 7.4 -> 4.5 µs of server CPU per vote and 17 -> 11 ms
# per 2,000-vote transaction (docs/performance.md).  The savepoint makes a surprise
# duplicate (a re-send racing another worker, a gap a simple client left above the
# watermark) cost one rolled-back COPY instead of the transaction.
_DIRECT_SAVEPOINT = "SAVEPOINT palaute_direct_copy"
_DIRECT_UNDO = "ROLLBACK TO SAVEPOINT palaute_direct_copy"
_DIRECT_COPY = f"COPY votes ({', '.join(_COLUMNS)}) FROM STDIN"
# Otherwise COPY into a per-connection temporary table, then one INSERT … SELECT that skips
# existing keys and returns only a count.  ON COMMIT DELETE ROWS empties the stage at every
# commit, and a rolled-back transaction takes its rows with it.
_STAGE_DDL = ("CREATE TEMP TABLE IF NOT EXISTS palaute_vote_stage "
              "(LIKE votes INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
_STAGE_COPY = f"COPY palaute_vote_stage ({', '.join(_COLUMNS)}) FROM STDIN"
_STAGE_MOVE = (f"WITH new AS (INSERT INTO votes ({', '.join(_COLUMNS)}) "
               f"SELECT {', '.join(_COLUMNS)} FROM palaute_vote_stage "
               "ON CONFLICT (device_id, seq) DO NOTHING RETURNING 1) SELECT count(*) FROM new")
# SQLite: the same columns as plain parameters; ON CONFLICT skips stored keys.
_SQLITE_INSERT = (f"INSERT INTO votes ({', '.join(_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(_COLUMNS))}) "
                  "ON CONFLICT (device_id, seq) DO NOTHING")

_devices = cast(Table, Device.__table__)
# Several workers may race on one device: the watermark only ever moves forward.
_ADVANCE = (update(_devices).where(_devices.c.id == bindparam("b_id")).values(
    acked_seq=case((_devices.c.acked_seq < bindparam("b_seq"), bindparam("b_seq")),
                   else_=_devices.c.acked_seq),
    last_seen_ms=bindparam("b_seen")))


@dataclass
class StoreResult:
    """What a ``store_batches`` call did: acks to publish and counters for metrics."""

    acks: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    refused_devices: list[tuple[str, str]] = field(default_factory=list)
    # PostgreSQL: the straight COPY met a vote stored after all and fell back to the stage.
    copy_fallback: bool = False


def vote_time(vote: Vote, received_ms: int) -> int:
    """The time a vote counts at: its own, or the receive time when the terminal never knew.

    A terminal that restarted before learning the time sends such presses with flag bit 1
    and its uptime (docs/protocol.md); anything before 2001-09-09 is taken for that.  The
    receive time is the best estimate there is, and keeps the vote in the right site's
    report; flag bit 1 stays set to say the time is an estimate.
    """
    if vote.flags & FLAG_TIME_UNSYNCED and vote.ts_ms < UNKNOWN_TIME_BEFORE_MS:
        return received_ms
    return vote.ts_ms


def _site_at(history: Sequence[tuple[int, int, int | None]], ts_ms: int) -> int | None:
    # history is (start, site, end) sorted by start; assignments are few per device.
    for start, site_id, end in reversed(history):
        if start <= ts_ms and (end is None or ts_ms < end):
            return site_id
    return None


def _copy(cursor: Any, statement: str, rows: list[tuple[Any, ...]]) -> None:
    """Stream ``rows`` through the ``COPY … FROM STDIN`` ``statement``."""
    with cursor.copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def _copy_rows(raw: Any, rows: list[tuple[Any, ...]], *, fresh: bool) -> tuple[int, bool]:
    """PostgreSQL: store ``rows`` with COPY on psycopg connection ``raw``, skipping existing
    keys.

    ``fresh`` says that no row can be stored yet (each seq is above its device's
    watermark): then they go straight into ``votes``, else through the stage.  Returns how
    many rows were new and whether a straight COPY met a stored key and fell back.
    """
    with raw.cursor() as cursor:
        if fresh:
            cursor.execute(_DIRECT_SAVEPOINT)
            try:
                _copy(cursor, _DIRECT_COPY, rows)
                return len(rows), False
            except psycopg.errors.UniqueViolation:
                # Nothing of the COPY is left (nor of the rollup trigger, which had not run);
                # the stage below sorts the new rows from the stored ones.
                cursor.execute(_DIRECT_UNDO)
        # Checked every time (one short round trip) rather than remembered per connection:
        # a table created in a transaction that rolled back is gone again.
        cursor.execute(_STAGE_DDL)
        _copy(cursor, _STAGE_COPY, rows)
        cursor.execute(_STAGE_MOVE)
        return int(cursor.fetchone()[0]), fresh


def _insert_rows_sqlite(raw: Any, rows: list[tuple[Any, ...]]) -> int:
    """SQLite: one executemany of plain tuples on sqlite3 connection ``raw``; return how
    many rows were new (``rowcount`` sums each row's own changes, not the triggers')."""
    cursor = raw.cursor()
    try:
        cursor.executemany(_SQLITE_INSERT, rows)
        return int(cursor.rowcount)
    finally:
        cursor.close()


def _insert_rows(session: Session, rows: list[tuple[Any, ...]], *, fresh: bool
                 ) -> tuple[int, bool]:
    """Insert ``rows`` (skipping existing keys): how many were new, and whether PostgreSQL's
    straight COPY (``fresh``) met a stored key and had to fall back to the stage.

    Both paths run on the DBAPI connection of this very transaction, below SQLAlchemy (whose
    ORM bulk insert spent more time per row than the database did), so the rows commit or
    roll back with everything else.  Their errors (a deadlock, a cancelled statement, a lost
    connection, a locked SQLite file) are raised as SQLAlchemy's: callers retry a
    transaction on ``SQLAlchemyError`` and must see these as the database errors they are.
    """
    dialect = session.get_bind().dialect
    raw: Any = session.connection().connection.dbapi_connection
    dbapi_error = dialect.loaded_dbapi.Error
    try:
        if dialect.name == "postgresql":
            return _copy_rows(raw, rows, fresh=fresh)
        if dialect.name == "sqlite":
            return _insert_rows_sqlite(raw, rows), False
    except dbapi_error as exc:
        raise DBAPIError.instance(None, None, exc, dbapi_error) from exc
    raise RuntimeError(f"unsupported database dialect {dialect.name!r}")


def store_batches(session: Session, batches: Iterable[VoteBatch], *, received_ms: int
                  ) -> StoreResult:
    """Store the votes of ``batches`` and return the ack watermark of every known device.

    Votes from devices that are unknown or retired are refused (counted, not stored, not
    acknowledged).  The caller commits; acks must only be published after that commit.
    """
    result = StoreResult()
    by_device: dict[str, list[VoteBatch]] = defaultdict(list)
    for batch in batches:
        by_device[batch.device_id].append(batch)
    if not by_device:
        return result

    # Core rows, not ORM objects: a batch can name thousands of devices and building an
    # identity-mapped object for each costs more than the insert of their votes.  Devices
    # and their assignment history come in one query (one round trip less per batch: under
    # load each costs the writer milliseconds of waiting).
    devices: dict[str, Any] = {}
    history: dict[str, list[tuple[int, int, int | None]]] = defaultdict(list)
    for row in session.execute(
            select(Device.id, Device.state, Device.acked_seq, Assignment.start_ms,
                   Assignment.site_id, Assignment.end_ms)
            .outerjoin(Assignment, Assignment.device_id == Device.id)
            .where(Device.id.in_(list(by_device)))
            .order_by(Device.id, Assignment.start_ms)):
        devices[row.id] = row
        if row.start_ms is not None:
            history[row.id].append((row.start_ms, row.site_id, row.end_ms))

    # Keyed by (device, seq): a vote that arrives twice in one batch (a re-send racing its
    # original) is inserted once and counted as a duplicate once.
    rows: dict[tuple[str, int], tuple[Any, ...]] = {}
    received = 0
    # Every vote above its device's watermark: none can be stored yet (a re-sent batch
    # whose first delivery was committed and acknowledged is at or below it).
    fresh = True
    accepted: dict[str, list[VoteBatch]] = {}
    for device_id, device_batches in by_device.items():
        device = devices.get(device_id)
        reason = ("unknown_device" if device is None
                  else "retired_device" if device.state == DeviceState.retired else None)
        if reason is not None:
            count = sum(len(b.votes) for b in device_batches)
            result.refused[reason] = result.refused.get(reason, 0) + count
            result.refused_devices.append((device_id, reason))
            continue
        accepted[device_id] = device_batches
        device_history = history[device_id]
        watermark = devices[device_id].acked_seq
        for batch in device_batches:
            received += len(batch.votes)
            if batch.votes[0].seq <= watermark:
                fresh = False
            for vote in batch.votes:
                ts_ms = vote_time(vote, received_ms)
                rows[(device_id, vote.seq)] = (
                    device_id, vote.seq, ts_ms, vote.button, vote.flags,
                    vote.content_version, _site_at(device_history, ts_ms), received_ms)
    if rows:
        # Key order: concurrent workers touching the same keys then lock them in the same
        # order, which keeps deadlocks (retried, but slow) away.
        result.stored, result.copy_fallback = _insert_rows(
            session, [rows[key] for key in sorted(rows)], fresh=fresh)
        result.duplicates = received - result.stored

    advances: list[dict[str, Any]] = []
    for device_id in sorted(accepted):
        previous = devices[device_id].acked_seq
        watermark = _advance_watermark(session, device_id, previous, accepted[device_id])
        advances.append({"b_id": device_id, "b_seq": watermark, "b_seen": received_ms})
        result.acks[device_id] = max(watermark, previous)
    if advances:
        session.connection().execute(_ADVANCE, advances)
    return result


def _advance_watermark(session: Session, device_id: str, watermark: int,
                       batches: list[VoteBatch]) -> int:
    """Highest seq S such that every vote the device holds with seq <= S is stored."""
    claimless = False
    for batch in batches:
        if batch.after is not None:
            # The terminal vouches that the batch lists every vote it holds in (after, last];
            # everything up to `after` was acknowledged earlier, so the batch closes the gap.
            watermark = max(watermark, batch.votes[-1].seq)
        else:
            claimless = True
    if not claimless:
        return watermark  # the common case: no query at all
    # Votes from clients that make no such claim count only when contiguous with what is stored.
    while True:
        following = session.scalars(
            select(VoteRow.seq).where(VoteRow.device_id == device_id, VoteRow.seq > watermark)
            .order_by(VoteRow.seq).limit(500)).all()
        advanced = watermark
        for seq in following:
            if seq != advanced + 1:
                break
            advanced = seq
        if advanced == watermark or len(following) < 500 or advanced != following[-1]:
            return advanced
        watermark = advanced

