"""Storing votes: idempotent, site at the vote's time, refused devices, ack watermark."""

from __future__ import annotations

from sqlalchemy import select

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Device, DeviceState
from fleet.db.models import Vote as VoteRow
from fleet.protocol.v1 import FLAG_TIME_UNSYNCED, Vote, VoteBatch
from fleet.services import registry
from fleet.services.votes import store_batches

T0 = 1_800_000_000_000


def batch(device: str, seqs: list[int], *, ts: int = T0, after: int | None = None) -> VoteBatch:
    return VoteBatch(device, tuple(Vote(s, ts + s, 1 + s % 4, 0, 7) for s in seqs), after)


def setup_registry(url: str):
    sessions = make_sessionmaker(make_engine(url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="C")
        site_a = registry.create_site(session, customer_id=customer.id, name="A")
        site_b = registry.create_site(session, customer_id=customer.id, name="B")
        registry.register_device(session, device_id="pt-aaaaaaaaaaaa")
        registry.assign_device(session, device_id="pt-aaaaaaaaaaaa", site_id=site_a.id, at_ms=0)
        registry.assign_device(session, device_id="pt-aaaaaaaaaaaa", site_id=site_b.id,
                               at_ms=T0 + 100)
    return sessions, site_a.id, site_b.id


def test_duplicates_stored_once_and_acked_again(db_url: str) -> None:
    sessions, _, _ = setup_registry(db_url)
    with sessions.begin() as session:
        first = store_batches(session, [batch("pt-aaaaaaaaaaaa", [1, 2, 3])], received_ms=T0)
    with sessions.begin() as session:
        again = store_batches(session, [batch("pt-aaaaaaaaaaaa", [1, 2, 3])], received_ms=T0)
    assert (first.stored, first.duplicates, first.acks) == (3, 0, {"pt-aaaaaaaaaaaa": 3})
    assert (again.stored, again.duplicates, again.acks) == (0, 3, {"pt-aaaaaaaaaaaa": 3})
    with sessions() as session:
        assert session.scalars(select(VoteRow.seq).order_by(VoteRow.seq)).all() == [1, 2, 3]


def test_vote_belongs_to_site_assigned_at_its_timestamp(db_url: str) -> None:
    sessions, site_a, site_b = setup_registry(db_url)
    # Uploaded late, after the move: seq 99 was pressed before the move, 101 after it.
    with sessions.begin() as session:
        store_batches(session, [batch("pt-aaaaaaaaaaaa", [99, 101])], received_ms=T0 + 10**6)
    with sessions() as session:
        rows = session.execute(select(VoteRow.seq, VoteRow.site_id)).all()
    sites = {seq: site for seq, site in rows}
    assert sites == {99: site_a, 101: site_b}


def test_unknown_and_retired_devices_are_refused_and_not_acked(db_url: str) -> None:
    sessions, _, _ = setup_registry(db_url)
    with sessions.begin() as session:
        registry.register_device(session, device_id="pt-bbbbbbbbbbbb")
        session.get_one(Device, "pt-bbbbbbbbbbbb").state = DeviceState.retired
    with sessions.begin() as session:
        result = store_batches(session, [batch("pt-cccccccccccc", [1]),
                                         batch("pt-bbbbbbbbbbbb", [1, 2])], received_ms=T0)
    assert result.acks == {}
    assert result.refused == {"unknown_device": 1, "retired_device": 2}
    with sessions() as session:
        assert session.scalars(select(VoteRow)).all() == []


def test_watermark_is_contiguous_without_a_claim_and_jumps_with_one(db_url: str) -> None:
    sessions, _, _ = setup_registry(db_url)
    dev = "pt-aaaaaaaaaaaa"
    with sessions.begin() as session:
        gap = store_batches(session, [batch(dev, [1, 2, 4])], received_ms=T0)
    assert gap.acks[dev] == 2  # seq 3 missing: 4 is stored but not acknowledged yet
    with sessions.begin() as session:
        filled = store_batches(session, [batch(dev, [3])], received_ms=T0)
    assert filled.acks[dev] == 4
    with sessions.begin() as session:
        # The terminal dropped 5..9 (log full) and vouches for it with `after`.
        claimed = store_batches(session, [batch(dev, [10, 11], after=4)], received_ms=T0)
    assert claimed.acks[dev] == 11
    with sessions() as session:
        assert session.get_one(Device, dev).acked_seq == 11


def test_vote_with_unknown_time_counts_at_receive_time(db_url: str) -> None:
    sessions, site_a, site_b = setup_registry(db_url)
    dev = "pt-aaaaaaaaaaaa"
    # Flag bit 1 with an uptime (5 s after boot): the terminal never learnt the time.
    unknown = VoteBatch(dev, (Vote(1, 5_000, 2, FLAG_TIME_UNSYNCED, 0),), None)
    # Flag bit 1 with a rebased wall-clock estimate: kept as it is.
    estimated = VoteBatch(dev, (Vote(2, T0 - 1_000, 2, FLAG_TIME_UNSYNCED, 0),), None)
    with sessions.begin() as session:
        store_batches(session, [unknown, estimated], received_ms=T0 + 500)
    with sessions() as session:
        rows = {r.seq: (r.ts_ms, r.site_id, r.flags) for r in session.scalars(select(VoteRow))}
    assert rows[1] == (T0 + 500, site_b, FLAG_TIME_UNSYNCED)  # at the site it stands at now
    assert rows[2] == (T0 - 1_000, site_a, FLAG_TIME_UNSYNCED)
