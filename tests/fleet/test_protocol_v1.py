"""Protocol v1 parsing: every malformed payload is refused with a reason, never a crash."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial

import pytest

from fleet.protocol.v1 import (
    ProtocolError,
    Topics,
    _check_votes,
    encode_ack,
    parse_object,
    parse_votes,
)

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
                "fb/v1/d/pt-0123/votes", "fb/v1/d//votes",
                # Python's $ would let a final newline through into the database.
                "fb/v1/d/pt-0123456789ab\n/votes"):
        with pytest.raises(ProtocolError):
            topics.parse(bad)


def test_ack_payload_and_object_parser() -> None:
    assert json.loads(encode_ack(42, NOW)) == {"seq": 42, "now_ms": NOW}
    assert parse_object(b'{"online": false}', max_bytes=100) == {"online": False}
    with pytest.raises(ProtocolError):
        parse_object(b'"x"', max_bytes=100)


def test_deeply_nested_json_is_refused_not_a_crash() -> None:
    with pytest.raises(ProtocolError) as info:
        parse(b"[" * 16000)
    assert info.value.reason == "bad_json"
    with pytest.raises(ProtocolError):
        parse_object(b'{"a":' * 3000 + b"1" + b"}" * 3000, max_bytes=16384)


def _outcome(call: Callable[..., object], *args: object) -> object:
    try:
        return call(*args)
    except ProtocolError as exc:
        return ("refused", exc.reason, str(exc))


def test_fast_path_agrees_with_the_field_by_field_checks() -> None:
    """parse_votes' fast path accepts exactly what the field-by-field checks accept, and a
    refusal carries their reason and message, over thousands of mutated batches."""
    rng = random.Random(5)
    odd: list[object] = [True, False, None, -1, 0, 1, 5, 6, 255, 256, 2**32 - 1, 2**32,
                         2**53, 2**53 + 1, 1.0, "1", [], {}, NOW + 86_400_000,
                         NOW + 86_400_001, 2, 3, 4]
    for _ in range(5000):
        rows: list[object] = [[seq, NOW, 1 + seq % 5, seq % 8, 7]
                              for seq in range(10, 10 + rng.randint(1, 4))]
        for _ in range(rng.randint(0, 2)):
            index = rng.randrange(len(rows))
            row = rows[index]
            if rng.random() < 0.1 or not isinstance(row, list):
                rows[index] = rng.choice([[1, 2, 3, 4], "x", 5, {}])
            else:
                row[rng.randrange(len(row))] = rng.choice(odd)
        body: dict[str, object] = {"votes": rows}
        if rng.random() < 0.5:
            body["after"] = rng.choice([*odd, 9, 10])
        payload = json.dumps(body).encode()
        if rng.random() < 0.05:
            payload = b" " + payload + b"\n"
        expected = _outcome(partial(_check_votes, now_ms=NOW, max_future_ms=86_400_000),
                            DEV, json.loads(payload))
        assert _outcome(parse, payload) == expected, payload


def test_objects_decode_as_json_loads_does() -> None:
    for payload in (b'{"a": [1, 2.5, "\\u00e9"], "b": {"c": null}}', b'{"a":1} ', b"\xef\xbb\xbf{}",
                    '{"é": 1}'.encode("utf-16"), b'{"a":1}{"b":2}', b'{"a": NaN}', b"{}"):
        assert _outcome(partial(parse_object, max_bytes=1000), payload) == _outcome(
            _legacy_object, payload), payload


def _legacy_object(payload: bytes) -> object:
    try:
        data = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError("bad_json", f"payload is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_shape", "payload must be a JSON object")
    return data


def test_registry_refuses_a_device_id_with_a_final_newline() -> None:
    from fleet.services.registry import Invalid, check_device_id

    assert check_device_id(DEV) == DEV
    with pytest.raises(Invalid):
        check_device_id(DEV + "\n")
