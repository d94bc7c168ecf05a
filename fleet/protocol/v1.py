"""Wire protocol v1 (docs/protocol.md): topics and payload validation on the fleet side.

Everything arriving from the network is untrusted.  Parsers return validated values or raise
``ProtocolError`` with a short machine-readable ``reason`` (used as a metrics label) and a
human-readable message; they never raise anything else on bad input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

VERSION = "v1"
# \Z, not $: in Python $ also matches before a final newline.
DEVICE_ID_RE = re.compile(r"^pt-[0-9a-f]{12}\Z")
MAX_BATCH = 50
MAX_BUTTONS = 5
FLAG_FILTERED = 1
FLAG_TIME_UNSYNCED = 2
FLAG_TEST_MODE = 4
KNOWN_FLAGS = FLAG_FILTERED | FLAG_TIME_UNSYNCED | FLAG_TEST_MODE
MAX_SEQ = 2**32 - 1
MAX_CONTENT_VERSION = 2**32 - 1


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``reason`` is a short metrics label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# Vote and VoteBatch are named tuples rather than frozen dataclasses: immutable all the same,
# and made 2.4x faster (a frozen dataclass sets each field through object.__setattr__; at one
# vote per message the two constructors were half of the validation time).
class Vote(NamedTuple):
    """One button press as reported by a terminal."""

    seq: int
    ts_ms: int
    button: int
    flags: int
    content_version: int


class VoteBatch(NamedTuple):
    """A validated ``votes`` message: votes in strictly increasing seq order."""

    device_id: str
    votes: tuple[Vote, ...]
    # The terminal's claim that the batch lists every vote it holds with seq in (after, last];
    # gaps are votes it dropped (log full).  None for clients that make no such claim.
    after: int | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under a configurable root (default ``fb/v1``)."""

    root: str = "fb/v1"

    def device(self, device_id: str, leaf: str) -> str:
        """The topic ``{root}/d/{device_id}/{leaf}``."""
        return f"{self.root}/d/{device_id}/{leaf}"

    def wildcard(self, leaf: str) -> str:
        """Subscription filter for ``leaf`` of every device."""
        return f"{self.root}/d/+/{leaf}"

    def parse(self, topic: str) -> tuple[str, str]:
        """Split a device topic into ``(device_id, leaf)``; raise ProtocolError otherwise."""
        prefix = self.root + "/d/"
        if not topic.startswith(prefix):
            raise ProtocolError("bad_topic", f"topic {topic!r} is not under {prefix!r}")
        device_id, _, leaf = topic[len(prefix):].partition("/")
        if not DEVICE_ID_RE.match(device_id):
            raise ProtocolError("bad_device_id", f"device id {device_id!r} is not pt-<12 hex>")
        return device_id, leaf


# The C scanner under json.loads: called directly on the UTF-8 text it skips json.loads'
# encoding detection and whitespace handling, a third of its time on a one-vote message.
_scan_json = cast(Callable[[str, int], tuple[Any, int]], cast(Any, json.JSONDecoder()).scan_once)


def _quick_object(payload: bytes) -> dict[str, Any] | None:
    """The JSON object in a UTF-8 ``payload`` without surrounding whitespace, else None
    (then ``json.loads`` decides, and words its error as it always did)."""
    try:
        text = payload.decode()
        data, end = _scan_json(text, 0)
    except (UnicodeDecodeError, ValueError, StopIteration, RecursionError):
        return None
    return data if type(data) is dict and end == len(text) else None


def _load_object(payload: bytes, max_bytes: int) -> dict[str, Any]:
    if len(payload) > max_bytes:
        raise ProtocolError("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    quick = _quick_object(payload)
    if quick is not None:
        return quick
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("bad_json", f"payload is not JSON: {exc}") from None
    except RecursionError:
        # A few kilobytes of "[" nest deeper than the decoder recurses.
        raise ProtocolError("bad_json", "payload is not JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_shape", "payload must be a JSON object")
    return data


def _int(value: Any, name: str, low: int, high: int) -> int:
    # bool is an int subclass in Python; a vote field of `true` is a client bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("bad_type", f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ProtocolError("out_of_range", f"{name}={value} outside {low}..{high}")
    return value


def parse_votes(device_id: str, payload: bytes, *, max_bytes: int, now_ms: int,
                max_future_ms: int) -> VoteBatch:
    """Validate a ``votes`` payload: ``{"votes": [[seq, ts_ms, button, flags, cv], ...]}``.

    Unknown top-level fields are ignored (forward compatibility).  Timestamps further in the
    future than ``max_future_ms`` are refused unless the terminal flagged its clock as unsynced.
    """
    data = _load_object(payload, max_bytes)
    rows = data.get("votes")
    # The common case, a valid batch, is checked here without building any error message
    # (at one vote per message the per-field messages were a third of the validation time).
    # Anything this loop does not accept goes to ``_check_votes``, which applies the same
    # rules field by field and raises the precise error; ``type(x) is int`` is stricter than
    # its check (no bool, no int subclass: JSON yields neither) so nothing passes here that
    # would fail there.
    if type(rows) is list and 1 <= len(rows) <= MAX_BATCH:
        latest = now_ms + max_future_ms
        votes: list[Vote] = []
        previous = 0
        for row in rows:
            if type(row) is not list or len(row) < 5:
                break
            seq, ts_ms, button, flags, content_version = row[0], row[1], row[2], row[3], row[4]
            if not (type(seq) is int and type(ts_ms) is int and type(button) is int
                    and type(flags) is int and type(content_version) is int
                    and previous < seq <= MAX_SEQ and 0 <= ts_ms <= 2**53
                    and 1 <= button <= MAX_BUTTONS and 0 <= flags <= 255
                    and 0 <= content_version <= MAX_CONTENT_VERSION
                    and (ts_ms <= latest or flags & FLAG_TIME_UNSYNCED)):
                break
            previous = seq
            votes.append(Vote(seq, ts_ms, button, flags & KNOWN_FLAGS, content_version))
        else:
            after = data.get("after")
            if after is None or (type(after) is int and 0 <= after < votes[0].seq):
                return VoteBatch(device_id, tuple(votes), after)
    return _check_votes(device_id, data, now_ms=now_ms, max_future_ms=max_future_ms)


def _check_votes(device_id: str, data: dict[str, Any], *, now_ms: int,
                 max_future_ms: int) -> VoteBatch:
    # Field by field with a message naming what is wrong: the path of refused batches.
    rows = data.get("votes")
    if not isinstance(rows, list) or not 1 <= len(rows) <= MAX_BATCH:
        raise ProtocolError("bad_shape", f"votes must be a list of 1..{MAX_BATCH} votes")
    votes: list[Vote] = []
    previous = -1
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) < 5:
            raise ProtocolError("bad_shape", f"votes[{index}] must be [seq, ts_ms, button, "
                                "flags, content_version]")
        seq = _int(row[0], f"votes[{index}].seq", 1, MAX_SEQ)
        ts_ms = _int(row[1], f"votes[{index}].ts_ms", 0, 2**53)
        button = _int(row[2], f"votes[{index}].button", 1, MAX_BUTTONS)
        flags = _int(row[3], f"votes[{index}].flags", 0, 255)
        content_version = _int(row[4], f"votes[{index}].content_version", 0, MAX_CONTENT_VERSION)
        if seq <= previous:
            raise ProtocolError("seq_order", f"votes[{index}].seq={seq} is not above {previous}")
        if not flags & FLAG_TIME_UNSYNCED and ts_ms > now_ms + max_future_ms:
            raise ProtocolError("future_ts", f"votes[{index}].ts_ms={ts_ms} is in the future")
        previous = seq
        votes.append(Vote(seq, ts_ms, button, flags & KNOWN_FLAGS, content_version))
    after = data.get("after")
    if after is not None:
        after = _int(after, "after", 0, MAX_SEQ)
        if after >= votes[0].seq:
            raise ProtocolError("seq_order", f"after={after} is not below the first seq")
    return VoteBatch(device_id, tuple(votes), after)


def parse_object(payload: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Validate that a payload is a size-bounded JSON object (health, status, reported)."""
    return _load_object(payload, max_bytes)


def encode_ack(seq: int, now_ms: int) -> bytes:
    """The ``ack`` payload: every vote with seq ≤ ``seq`` is durably stored."""
    # What json.dumps writes for two integers, without building a dict per ack.
    return b'{"seq":%d,"now_ms":%d}' % (seq, now_ms)


# -- over-the-air content (docs/content.md) ----------------------------------------------------
MAX_CONTENT_PACKAGE = 65_536
MAX_CHUNK = 4_096
REPORTED_STATES = ("applied", "downloading", "refused")
REFUSAL_REASONS = ("downgrade", "too_large", "fetch_timeout", "sha256_mismatch",
                   "bad_signature", "bad_package", "wrong_display", "storage_error", "no_key")
DISPLAY_RE = re.compile(r"^([1-9][0-9]{0,3})x([1-9][0-9]{0,3})$")
_MAX_VERSION = 65_535


@dataclass(frozen=True, slots=True)
class Reported:
    """A validated ``reported`` message: what a terminal shows and the result of a change."""

    device_id: str
    version: int  # the content version shown (0: none yet)
    state: str  # one of REPORTED_STATES
    desired: int | None  # the version it was asked for, if any
    reason: str | None  # with state "refused": one of REFUSAL_REASONS (others kept as sent)


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """A validated ``fetch`` message: send the package bytes of ``version`` from ``offset``."""

    device_id: str
    version: int
    offset: int
    display: str


def parse_reported(device_id: str, payload: bytes, *, max_bytes: int) -> Reported:
    """Validate ``{"version": V, "state": S, "desired": D, "reason": R, "ts_ms": T}``.

    An unknown refusal reason is kept (a newer terminal may know more reasons) but must be a
    short identifier; a ``refused`` report without a reason is refused as ``bad_shape``.
    """
    data = _load_object(payload, max_bytes)
    version = _int(data.get("version"), "version", 0, _MAX_VERSION)
    state = data.get("state")
    if state not in REPORTED_STATES:
        raise ProtocolError("bad_shape", f"state must be one of {', '.join(REPORTED_STATES)}, "
                            f"got {state!r}")
    desired = data.get("desired")
    if desired is not None:
        desired = _int(desired, "desired", 0, _MAX_VERSION)
    reason = data.get("reason")
    if state == "refused":
        if not isinstance(reason, str) or not re.fullmatch(r"[a-z0-9_]{1,32}", reason):
            raise ProtocolError("bad_shape", f"a refused report needs a reason such as "
                                f"'bad_signature', got {reason!r}")
    else:
        reason = None
    return Reported(device_id, version, str(state), desired, reason)


def parse_fetch(device_id: str, payload: bytes, *, max_bytes: int) -> FetchRequest:
    """Validate ``{"version": V, "offset": O, "display": "128x64"}``."""
    data = _load_object(payload, max_bytes)
    version = _int(data.get("version"), "version", 1, _MAX_VERSION)
    offset = _int(data.get("offset"), "offset", 0, MAX_CONTENT_PACKAGE - 1)
    display = data.get("display")
    if not isinstance(display, str) or not DISPLAY_RE.match(display):
        raise ProtocolError("bad_shape", f"display must be '<w>x<h>' such as '128x64', "
                            f"got {display!r}")
    return FetchRequest(device_id, version, offset, display)


def encode_desired(version: int, size: int, sha256_hex: str, sig_hex: str,
                   chunk: int = MAX_CHUNK) -> bytes:
    """The retained ``desired`` payload (empty bytes mean "nothing desired")."""
    return json.dumps({"version": version, "size": size, "sha256": sha256_hex, "sig": sig_hex,
                       "chunk": chunk}, separators=(",", ":")).encode()


def encode_chunk(version: int, offset: int, data: bytes) -> bytes:
    """A ``chunk`` payload: u16le version, u32le offset, then the bytes."""
    return version.to_bytes(2, "little") + offset.to_bytes(4, "little") + data
