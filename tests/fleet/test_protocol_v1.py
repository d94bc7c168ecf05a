"""Protocol v1 parsing: every malformed payload is refused with a reason, never a crash."""

from __future__ import annotations

import json

import pytest

from fleet.protocol.v1 import ProtocolError, Topics, encode_ack, parse_object, parse_votes

NOW = 1_800_000_000_000
DEV = "pt-0123456789ab"


def votes(payload: object) -> bytes:
    return json.dumps(payload).encode()


def parse(payload: bytes):
    return parse_votes(DEV, payload, max_bytes=16384, now_ms=NOW, max_future_ms=86_400_000)


def test_valid_batch_parses_in_order_and_ignores_unknown_fields() -> None:
    batch = parse(votes({"votes": [[1, NOW, 1, 0, 3], [2, NOW, 4, 1, 3]], "x": 1, "after": 0}))
    assert [v.seq for v in batch.votes] == [1, 2]
    assert batch.votes[1].button == 4 and batch.votes[1].flags == 1
    assert batch.after == 0


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[1,2]", "bad_shape"),
    (votes({"votes": []}), "bad_shape"),
    (votes({"votes": [[1, NOW, 1, 0, 0]] * 51}), "bad_shape"),
    (votes({"votes": [[1, NOW, 1, 0]]}), "bad_shape"),
    (votes({"votes": [["1", NOW, 1, 0, 0]]}), "bad_type"),
    (votes({"votes": [[True, NOW, 1, 0, 0]]}), "bad_type"),
    (votes({"votes": [[1, NOW, 1.5, 0, 0]]}), "bad_type"),
    (votes({"votes": [[0, NOW, 1, 0, 0]]}), "out_of_range"),
    (votes({"votes": [[1, NOW, 6, 0, 0]]}), "out_of_range"),
    (votes({"votes": [[1, NOW, 0, 0, 0]]}), "out_of_range"),
    (votes({"votes": [[1, -5, 1, 0, 0]]}), "out_of_range"),
    (votes({"votes": [[2, NOW, 1, 0, 0], [1, NOW, 1, 0, 0]]}), "seq_order"),
    (votes({"votes": [[2, NOW, 1, 0, 0], [2, NOW, 1, 0, 0]]}), "seq_order"),
    (votes({"votes": [[5, NOW, 1, 0, 0]], "after": 5}), "seq_order"),
    (votes({"votes": [[1, NOW + 2 * 86_400_000, 1, 0, 0]]}), "future_ts"),
    (b"{" + b" " * 20000 + b"}", "too_large"),
])
def test_malformed_votes_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(payload)
    assert info.value.reason == reason


def test_future_timestamp_is_accepted_when_clock_flagged_unsynced() -> None:
    batch = parse(votes({"votes": [[1, NOW * 2, 1, 2, 0]]}))
    assert batch.votes[0].flags == 2


def test_unknown_flag_bits_are_cleared() -> None:
    assert parse(votes({"votes": [[1, NOW, 1, 0xF1, 0]]})).votes[0].flags == 1


def test_topics_round_trip_and_reject_foreign_ids() -> None:
    topics = Topics("fb/v1")
    assert topics.device(DEV, "votes") == f"fb/v1/d/{DEV}/votes"
    assert topics.parse(f"fb/v1/d/{DEV}/votes") == (DEV, "votes")
    assert topics.wildcard("health") == "fb/v1/d/+/health"
    for bad in ("fb/v2/d/pt-0123456789ab/votes", "fb/v1/d/pt-0123456789AB/votes",
                "fb/v1/d/pt-0123/votes", "fb/v1/d//votes"):
        with pytest.raises(ProtocolError):
            topics.parse(bad)


def test_ack_payload_and_object_parser() -> None:
    assert json.loads(encode_ack(42, NOW)) == {"seq": 42, "now_ms": NOW}
    assert parse_object(b'{"online": false}', max_bytes=100) == {"online": False}
    with pytest.raises(ProtocolError):
        parse_object(b'"x"', max_bytes=100)
