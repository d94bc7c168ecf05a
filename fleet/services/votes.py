"""Storing vote batches idempotently and computing what to acknowledge.

One call stores many batches in one transaction (the ingest worker batches messages), so the
cost of a commit is shared by hundreds of votes.  (device_id, seq) is the primary key and
inserts skip existing rows, so a re-sent batch is stored once and acknowledged again.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleet.db.models import Assignment, Device, DeviceState
from fleet.db.models import Vote as VoteRow
from fleet.protocol.v1 import VoteBatch


@dataclass
class StoreResult:
    """What a ``store_batches`` call did: acks to publish and counters for metrics."""

    acks: dict[str, int] = field(default_factory=dict)
    stored: int = 0
    duplicates: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    refused_devices: list[tuple[str, str]] = field(default_factory=list)


def _site_at(history: Sequence[tuple[int, int, int | None]], ts_ms: int) -> int | None:
    # history is (start, site, end) sorted by start; assignments are few per device.
    for start, site_id, end in reversed(history):
        if start <= ts_ms and (end is None or ts_ms < end):
            return site_id
    return None


def _insert(session: Session) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(VoteRow)
    if name == "sqlite":
        return sqlite.insert(VoteRow)
    raise RuntimeError(f"unsupported database dialect {name!r}")


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

    devices = {d.id: d for d in session.scalars(
        select(Device).where(Device.id.in_(list(by_device))))}
    history: dict[str, list[tuple[int, int, int | None]]] = defaultdict(list)
    for row in session.execute(
            select(Assignment.device_id, Assignment.start_ms, Assignment.site_id,
                   Assignment.end_ms)
            .where(Assignment.device_id.in_(list(devices)))
            .order_by(Assignment.device_id, Assignment.start_ms)):
        history[row.device_id].append((row.start_ms, row.site_id, row.end_ms))

    rows: list[dict[str, int | str | None]] = []
    accepted: dict[str, list[VoteBatch]] = {}
    for device_id, device_batches in by_device.items():
        device = devices.get(device_id)
        reason = ("unknown_device" if device is None
                  else "retired_device" if device.state is DeviceState.retired else None)
        if reason is not None:
            count = sum(len(b.votes) for b in device_batches)
            result.refused[reason] = result.refused.get(reason, 0) + count
            result.refused_devices.append((device_id, reason))
            continue
        accepted[device_id] = device_batches
        for batch in device_batches:
            for vote in batch.votes:
                rows.append({
                    "device_id": device_id, "seq": vote.seq, "ts_ms": vote.ts_ms,
                    "button": vote.button, "flags": vote.flags,
                    "content_version": vote.content_version,
                    "site_id": _site_at(history[device_id], vote.ts_ms),
                    "received_ms": received_ms,
                })
    if rows:
        statement = _insert(session).on_conflict_do_nothing(
            index_elements=["device_id", "seq"]).returning(VoteRow.device_id)
        inserted = len(session.execute(statement, rows).all())
        result.stored = inserted
        result.duplicates = len(rows) - inserted

    for device_id, device_batches in accepted.items():
        watermark = _advance_watermark(session, devices[device_id].acked_seq, device_batches)
        # Several workers may race on one device: never move the watermark backwards.
        session.execute(update(Device).where(Device.id == device_id).values(
            acked_seq=case((Device.acked_seq < watermark, watermark), else_=Device.acked_seq),
            last_seen_ms=received_ms))
        result.acks[device_id] = max(watermark, devices[device_id].acked_seq)
    return result


def _advance_watermark(session: Session, watermark: int, batches: list[VoteBatch]) -> int:
    """Highest seq S such that every vote the device holds with seq <= S is stored."""
    for batch in sorted(batches, key=lambda b: b.votes[0].seq):
        if batch.after is not None:
            # The terminal vouches that the batch lists every vote it holds in (after, last];
            # everything up to `after` was acknowledged earlier, so the batch closes the gap.
            watermark = max(watermark, batch.votes[-1].seq)
    if all(batch.after is not None for batch in batches):
        return watermark
    # Votes from clients that make no such claim count only when contiguous with what is stored.
    device_id = batches[0].device_id
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
