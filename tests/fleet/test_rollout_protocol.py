"""Parsing of ``reported`` and ``fetch`` and encoding of ``desired``/``chunk``: every malformed
payload is refused with a reason (docs/content.md, docs/protocol.md)."""

from __future__ import annotations

import json

import pytest

from fleet.protocol.v1 import (
    ProtocolError,
    encode_chunk,
    encode_desired,
    parse_fetch,
    parse_reported,
)

DEV = "pt-0123456789ab"


def js(value: object) -> bytes:
    return json.dumps(value).encode()


def test_reported_applied_and_refused_parse() -> None:
    applied = parse_reported(DEV, js({"version": 3, "state": "applied", "desired": 3,
                                      "reason": "ignored", "ts_ms": 1, "extra": True}),
                             max_bytes=1024)
    assert (applied.version, applied.state, applied.desired, applied.reason) == (
        3, "applied", 3, None)
    refused = parse_reported(DEV, js({"version": 2, "state": "refused", "desired": 3,
                                      "reason": "bad_signature"}), max_bytes=1024)
    assert (refused.state, refused.reason, refused.desired) == ("refused", "bad_signature", 3)
    first = parse_reported(DEV, js({"version": 0, "state": "applied"}), max_bytes=1024)
    assert first.desired is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"[]", "bad_shape"),
    (b"{", "bad_json"),
    (js({"state": "applied"}), "bad_type"),
    (js({"version": True, "state": "applied"}), "bad_type"),
    (js({"version": 70000, "state": "applied"}), "out_of_range"),
    (js({"version": 1, "state": "done"}), "bad_shape"),
    (js({"version": 1, "state": "refused"}), "bad_shape"),
    (js({"version": 1, "state": "refused", "reason": "Nope!"}), "bad_shape"),
    (js({"version": 1, "state": "applied", "desired": "2"}), "bad_type"),
    (js({"version": 1, "state": "applied", "pad": "x" * 2000}), "too_large"),
])
def test_bad_reported_is_refused_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_reported(DEV, payload, max_bytes=1024)
    assert error.value.reason == reason


def test_fetch_parses() -> None:
    fetch = parse_fetch(DEV, js({"version": 4, "offset": 4096, "display": "296x128"}),
                        max_bytes=1024)
    assert (fetch.version, fetch.offset, fetch.display) == (4, 4096, "296x128")


@pytest.mark.parametrize(("payload", "reason"), [
    (js({"offset": 0, "display": "128x64"}), "bad_type"),
    (js({"version": 0, "offset": 0, "display": "128x64"}), "out_of_range"),
    (js({"version": 1, "offset": -1, "display": "128x64"}), "out_of_range"),
    (js({"version": 1, "offset": 65536, "display": "128x64"}), "out_of_range"),
    (js({"version": 1, "offset": 0, "display": "big"}), "bad_shape"),
    (js({"version": 1, "offset": 0}), "bad_shape"),
])
def test_bad_fetch_is_refused_with_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as error:
        parse_fetch(DEV, payload, max_bytes=1024)
    assert error.value.reason == reason


def test_desired_and_chunk_encoding() -> None:
    desired = json.loads(encode_desired(5, 1234, "a" * 64, "b" * 128))
    assert desired == {"version": 5, "size": 1234, "sha256": "a" * 64, "sig": "b" * 128,
                       "chunk": 4096}
    chunk = encode_chunk(5, 70000, b"xyz")
    assert chunk[:2] == (5).to_bytes(2, "little")
    assert int.from_bytes(chunk[2:6], "little") == 70000
    assert chunk[6:] == b"xyz"
