"""The ingest worker's side of over-the-air content: ``reported`` and ``fetch`` messages.

``reported`` (retained, sent after every connect) is the source of truth for a device's
content: its version goes to ``devices.content_version`` and its rollout entry follows it
(``fleet.rollouts.service.apply_reported``).  ``fetch`` asks for the bytes of a package from
an offset; the answer is one ``chunk`` of at most 4,096 bytes, cut from the stored package.
Bad requests are refused, counted (``palaute_ingest_refused_total{reason}``) and logged:
``unknown_device``, ``unknown_version`` (no package of that version for that display),
``wrong_display`` (not the display of the device's board) and ``offset_out_of_range``.
A timed-out device whose report shows it never received its ``desired`` (the broker lost
it) gets that ``desired`` published again, retained.

The worker validates these messages in its parser thread (:meth:`ContentRequests.parse`) and
handles them in its writer thread after the batch's votes are committed
(:meth:`ContentRequests.handle`), in a transaction of their own: neither kind needs the
at-least-once care votes need, because terminals publish ``reported`` again on every connect
and ask again for a chunk that does not come.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet.db.models import Device, DeviceState
from fleet.ingest.metrics import Metrics
from fleet.protocol.v1 import (
    MAX_CHUNK,
    FetchRequest,
    Reported,
    Topics,
    encode_chunk,
    encode_desired,
    parse_fetch,
    parse_reported,
)
from fleet.rollouts.packages import PackageSource, SignedPackage, StoredPackages, display_of_board
from fleet.rollouts.service import apply_reported, desired_to_repeat

log = logging.getLogger("palaute.ingest")

LEAVES = ("reported", "fetch")
ContentMessage = Reported | FetchRequest

METRICS = (
    ("palaute_ingest_chunks_total", "Content chunks sent in answer to fetch requests"),
    ("palaute_ingest_chunk_bytes_total", "Package bytes sent in chunks"),
    ("palaute_ingest_reported_changes_total",
     "Rollout entries changed by a device's reported message"),
    ("palaute_ingest_desired_repeated_total",
     "Retained desired published again to a device whose report showed it never got it"),
)


class ContentRequests:
    """Validate and answer the content messages of one ingest worker."""

    # Packages are immutable, so a few stay in memory: a rollout to a fleet asks for the same
    # one or two packages thousands of times (16 chunks of 4 KiB per device).
    cache_size = 8

    def __init__(self, metrics: Metrics, publish: Callable[[str, bytes], object], *,
                 topics: Topics, max_payload: int,
                 packages: PackageSource | None = None,
                 publish_retained: Callable[[str, bytes], object] | None = None) -> None:
        """``publish(topic, payload)`` sends a QoS 1 message, ``publish_retained`` a retained
        one (both through the worker's MQTT client)."""
        self.metrics = metrics
        self.publish = publish
        self.publish_retained = publish_retained or publish
        self.topics = topics
        self.max_payload = max_payload
        self.packages = packages or StoredPackages()
        self._cache: OrderedDict[tuple[int, str], SignedPackage] = OrderedDict()
        for name, text in METRICS:
            metrics.describe(name, text)

    def parse(self, device_id: str, leaf: str, payload: bytes) -> ContentMessage:
        """Validate one message of a leaf in LEAVES; raises ProtocolError."""
        if leaf == "reported":
            return parse_reported(device_id, payload, max_bytes=self.max_payload)
        return parse_fetch(device_id, payload, max_bytes=self.max_payload)

    def handle(self, sessions: sessionmaker[Session], messages: Sequence[ContentMessage],
               now: int) -> None:
        """Record reports and answer fetches, in one transaction; chunks go out after it."""
        chunks: list[tuple[str, bytes]] = []
        retained: list[tuple[str, bytes]] = []
        changed = 0
        with sessions.begin() as session:
            ids = {m.device_id for m in messages}
            boards = {row.id: row.board for row in session.execute(
                select(Device.id, Device.board).where(Device.id.in_(ids),
                                                      Device.state != DeviceState.retired))}
            for message in messages:
                if message.device_id not in boards:
                    self._refuse(message, "unknown_device", "not in the registry, or retired")
                elif isinstance(message, Reported):
                    changed += apply_reported(session, message, now) is not None
                    repeat = desired_to_repeat(session, message)
                    if repeat is not None:
                        desired = self._desired(session, message.device_id, *repeat)
                        if desired is not None:
                            retained.append(desired)
                else:
                    chunk = self._answer(session, message, boards[message.device_id])
                    if chunk is not None:
                        chunks.append(chunk)
        # Counted before publishing, so a reader that has seen the message sees the count.
        self.metrics.inc("palaute_ingest_reported_changes_total", changed)
        self.metrics.inc("palaute_ingest_desired_repeated_total", len(retained))
        self.metrics.inc("palaute_ingest_chunks_total", len(chunks))
        self.metrics.inc("palaute_ingest_chunk_bytes_total", sum(len(p) - 6 for _, p in chunks))
        for topic, payload in retained:
            self.publish_retained(topic, payload)
        for topic, payload in chunks:
            self.publish(topic, payload)

    def _desired(self, session: Session, device_id: str, version: int,
                 display: str) -> tuple[str, bytes] | None:
        package = self._package(session, version, display)
        if package is None:
            return None
        return (self.topics.device(device_id, "desired"),
                encode_desired(version, len(package.data), package.sha256, package.sig))

    def _answer(self, session: Session, fetch: FetchRequest,
                board: str) -> tuple[str, bytes] | None:
        display = display_of_board(board)
        if fetch.display != display:
            self._refuse(fetch, "wrong_display", f"asked for {fetch.display}, its board "
                         f"{board or '(none)'} has {display}")
            return None
        package = self._package(session, fetch.version, display)
        if package is None:
            self._refuse(fetch, "unknown_version",
                         f"no package of content version {fetch.version} for {display}")
            return None
        if fetch.offset >= len(package.data):
            self._refuse(fetch, "offset_out_of_range", f"offset {fetch.offset} is not below "
                         f"the package size {len(package.data)}")
            return None
        data = package.data[fetch.offset:fetch.offset + MAX_CHUNK]
        return (self.topics.device(fetch.device_id, "chunk"),
                encode_chunk(fetch.version, fetch.offset, data))

    def _package(self, session: Session, version: int, display: str) -> SignedPackage | None:
        key = (version, display)
        package = self._cache.get(key)
        if package is not None:
            self._cache.move_to_end(key)
            return package
        package = self.packages.package(session, version, display)
        if package is not None:
            self._cache[key] = package
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return package

    def _refuse(self, message: ContentMessage, reason: str, detail: str) -> None:
        leaf = "reported" if isinstance(message, Reported) else "fetch"
        self.metrics.inc("palaute_ingest_refused_total", reason=reason)
        log.warning("refused message on %s: %s", self.topics.device(message.device_id, leaf),
                    detail)
