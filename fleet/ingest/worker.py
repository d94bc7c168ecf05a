"""The ingest worker (``palaute ingest``).

A paho-mqtt network thread receives messages into a bounded inbox (a list of them per socket
read, ``fleet/ingest/mqtt_client.py``); a parser thread takes them in batches and validates
them; writer threads store every vote of a batch in one transaction, commit, and only then
publish the ``ack`` messages and acknowledge the MQTT deliveries to the broker.  (Validating
the next batch overlaps with the database storing this one.)  Devices are split between the
writers (``PALAUTE_INGEST_WRITERS``, each with its own database connection) by a hash of
their id, so one device's messages always go through the same writer, in arrival order, and
two writers never touch the same device's rows: while one waits for the database the other
can use it.  A worker killed at any point therefore loses nothing: unacknowledged deliveries
come back from the broker's persistent session, and terminals re-send anything they have no
``ack`` for.

Several workers share the load through an MQTT shared subscription
(``$share/<group>/fb/v1/d/+/votes``); they hold no state of their own.

Between batches the writer also sweeps presence (``fleet/ingest/presence.py``): devices not
heard from for three health intervals are marked offline.  ``health()`` reports whether the
worker is connected and its writer is making progress, for ``/healthz``
(``fleet/ingest/http.py``).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import Table, and_, bindparam, func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleet.config import Settings
from fleet.db.models import Assignment, Device, Site
from fleet.ingest import content_requests
from fleet.ingest.content_requests import ContentMessage, ContentRequests
from fleet.ingest.metrics import Kind, Metrics
from fleet.ingest.mqtt_client import Delivery, IngestClient
from fleet.ingest.presence import PresenceSweeper
from fleet.mqtt_url import parse_mqtt_url
from fleet.protocol.v1 import (
    ProtocolError,
    Topics,
    VoteBatch,
    encode_ack,
    parse_object,
    parse_votes,
)
from fleet.services.clock import now_ms
from fleet.services.votes import store_batches

log = logging.getLogger("palaute.ingest")

# Leaves of the device topic tree that the worker consumes.
LEAVES = ("votes", "health", "status", *content_requests.LEAVES)
# /healthz fails when the writer loop has not come round for this long (it does every 0.2 s
# when idle): a hung database call or a dead thread.
WRITER_STALL_S = 60.0
# Parsed topics kept (10,000 devices x a handful of leaves fit); emptied when full, so a flood
# of made-up topics costs parsing, never memory.
TOPIC_CACHE_MAX = 100_000

_devices = cast(Table, Device.__table__)
# One executemany per batch for all health samples and one for all status messages: with
# thousands of devices a statement each would cost more than the votes.  COALESCE keeps the
# stored firmware/content version when a sample does not carry one.
_HEALTH_UPDATE = (update(_devices).where(_devices.c.id == bindparam("b_id")).values(
    last_seen_ms=bindparam("b_seen"), online=True,
    fw_version=func.coalesce(bindparam("b_fw"), _devices.c.fw_version),
    content_version=func.coalesce(bindparam("b_cv"), _devices.c.content_version)))
_STATUS_UPDATE = (update(_devices).where(_devices.c.id == bindparam("b_id")).values(
    online=bindparam("b_online"), last_seen_ms=bindparam("b_seen")))

METRICS: tuple[tuple[str, str, Kind], ...] = (
    ("palaute_ingest_received_total", "MQTT messages received, by topic leaf", "counter"),
    ("palaute_ingest_votes_stored_total", "Votes newly stored", "counter"),
    ("palaute_ingest_votes_duplicate_total", "Votes received again and ignored", "counter"),
    ("palaute_ingest_copy_fallbacks_total",
     "PostgreSQL batches whose straight COPY met a stored vote and went through the stage",
     "counter"),
    ("palaute_ingest_refused_total", "Messages or votes refused, by reason", "counter"),
    ("palaute_ingest_acks_total", "Ack messages published to terminals", "counter"),
    ("palaute_ingest_db_errors_total", "Failed database transactions (retried)", "counter"),
    ("palaute_ingest_batches_total", "Transactions committed by the writer", "counter"),
    ("palaute_ingest_presence_timeouts_total",
     "Devices marked offline after three health intervals of silence", "counter"),
    ("palaute_ingest_queue_depth", "Messages waiting for the writer", "gauge"),
    ("palaute_ingest_lag_ms", "Age of the newest stored vote batch when committed", "gauge"),
    ("palaute_ingest_batch_messages", "Messages in the last committed batch", "gauge"),
    ("palaute_ingest_commit_seconds", "Duration of the last batch transaction", "gauge"),
    ("palaute_ingest_connected", "1 while connected to the broker", "gauge"),
)


def tune_gc() -> None:
    """Make Python's cyclic garbage collector cheap for a long-running ingest process.

    At one vote per message the worker allocates several container objects per message
    and holds up to ``queue_max`` received messages; with the default thresholds (a
    collection every 700 allocations) the collector was a tenth of the process's CPU time
    and its older generations scanned the whole backlog again and again (docs/performance.md).
    The hot path makes no reference cycles, so collecting rarely frees the same memory.
    Objects made while starting (modules, settings, the ORM) are frozen out of collections.
    Called by ``palaute ingest`` only: the thresholds are process-wide.
    """
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class TelemetrySink(Protocol):
    """Where health samples go after commit (``fleet.services.telemetry.InfluxTelemetry``)."""

    def write(self, device_id: str, sample: Mapping[str, Any], tags: Mapping[str, str],
              received_ms: int) -> None:
        """Queue one sample; must return at once."""

    def close(self) -> None:
        """Flush what can be flushed and stop."""


@dataclass(slots=True)
class _Ticket:
    """The broker acknowledgements of one chunk of deliveries (QoS 1 packet ids in arrival
    order), sent when every writer holding part of the chunk is done with it.

    Tickets are released strictly in arrival order, whichever writer finishes first: the
    broker looks each PUBACK up in its in-flight list from the oldest message on, so acks in
    arrival order are found at once, and out of order ones cost it a walk past every older
    message still in flight (measured with two writers: 11-14 µs of broker CPU per message
    in commit order, 10.5-11.5 in arrival order).
    """

    mids: list[int]
    waiting: int  # parts of the chunk not yet done
    withheld: set[int] = field(default_factory=set)  # of parts that failed: never acked


@dataclass(slots=True)
class _Prepared:
    """A batch after validation, ready for its transaction (parser -> writer thread)."""

    messages: list[Delivery]
    now: int
    vote_batches: list[VoteBatch]
    health: dict[str, dict[str, Any]]
    presence: dict[str, bool]
    votes: int = 0  # in vote_batches, duplicates included
    content: list[ContentMessage] = field(default_factory=list)  # reported, fetch
    tickets: list[_Ticket] = field(default_factory=list)  # the chunks it holds part of

    @classmethod
    def empty(cls, now: int) -> _Prepared:
        """A batch with nothing in it yet."""
        return cls([], now, [], {}, {})

    def merge(self, later: _Prepared) -> None:
        """Append a later chunk; for health and status the latest message of a device wins."""
        self.messages.extend(later.messages)
        self.vote_batches.extend(later.vote_batches)
        self.votes += later.votes
        self.health.update(later.health)
        self.presence.update(later.presence)
        self.content.extend(later.content)
        self.tickets.extend(later.tickets)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class IngestWorker:
    """Consume device messages from MQTT and store them; see the module docstring."""

    queue_max = 100_000
    db_retry_s = 0.5
    # Besides PALAUTE_INGEST_BATCH_MAX messages, a transaction carries at most this many votes:
    # 2000 backlog messages of 50 votes would make one 100,000-row transaction, slow to
    # commit (latency for everyone behind it) and heavy in memory.  Measured on PostgreSQL:
    # 20,000 cost a tenth of the rate (more round trips per vote), 50,000 nothing.
    batch_votes_max = 50_000

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 client_id: str | None = None, metrics: Metrics | None = None,
                 telemetry: TelemetrySink | None = None,
                 clock: Callable[[], int] = now_ms,
                 health_interval_s: float | None = None) -> None:
        """Prepare (not start) a worker.

        ``clock`` gives epoch milliseconds (tests pass a controllable one).
        ``health_interval_s`` is the terminals' health period; three of them without any
        message mark a device offline (default: setting ``PALAUTE_HEALTH_INTERVAL_S``, 300).
        """
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics or Metrics()
        self.telemetry = telemetry
        self.topics = Topics(settings.topic_root)
        self.clock = clock
        if health_interval_s is None:
            health_interval_s = float(settings.health_interval_s)
        self.presence = PresenceSweeper(health_interval_s)
        self._db_failing = False
        # Received, not yet validated: the network thread appends whole reads, the parser
        # takes from the left (deque appends and pops are atomic, so no lock per message).
        # ``_arrived`` wakes an idle parser; ``_space`` a network thread waiting for room.
        self._inbox: deque[Delivery] = deque()
        self._arrived = threading.Event()
        self._space = threading.Event()
        self._topic_cache: dict[bytes, tuple[str, str, int]] = {}
        self.writers = settings.ingest_writers
        # The hand-over slots between the parser and the writers (one batch each at most).
        self._slots: list[_Prepared | None] = [None] * self.writers
        # True while a writer stores a batch (read by the parser to decide when to hand over).
        self._storing = [False] * self.writers
        self._slot_changed = threading.Condition()
        self._parser: threading.Thread | None = None
        self._stop = threading.Event()
        self._writer_threads: list[threading.Thread] = []
        self._writer_beats = [time.monotonic()] * self.writers
        # Chunks whose broker acknowledgements are not sent yet, oldest first.
        self._tickets: deque[_Ticket] = deque()
        self._tickets_lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        target = parse_mqtt_url(settings.mqtt_url)
        self._target = target
        self._v5 = settings.mqtt_protocol == "5"
        self._client = IngestClient(
            CallbackAPIVersion.VERSION2, client_id=client_id or settings.mqtt_client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else False, manual_ack=True)
        if target.username:
            self._client.username_pw_set(target.username, target.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_deliveries = self._on_deliveries
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        for name, text, kind in METRICS:
            self.metrics.describe(name, text, kind)
        self.metrics.set("palaute_ingest_connected", 0)
        self.content = ContentRequests(
            self.metrics, lambda topic, payload: self._client.publish(topic, payload, qos=1),
            topics=self.topics, max_payload=settings.ingest_max_payload,
            publish_retained=lambda topic, payload: self._client.publish(
                topic, payload, qos=1, retain=True))

    # -- MQTT callbacks (paho network thread) ---------------------------------------------
    def _filters(self) -> list[str]:
        group = self.settings.ingest_shared_group
        filters = [self.topics.wildcard(leaf) for leaf in LEAVES]
        return [f"$share/{group}/{f}" for f in filters] if group else filters

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any,
                    reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the ingest connection: %s", reason)
            return
        log.info("connected to %s:%s", self._target.host, self._target.port)
        self.connected.set()
        self.metrics.set("palaute_ingest_connected", 1)
        # Subscribing on every connect keeps working after the broker lost its state.
        client.subscribe([(f, 1) for f in self._filters()])

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int,
                      reasons: list[Any], _props: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("subscription refused by the broker: %s (check the ACL of %s)",
                      ", ".join(failed), self._target.username)
            return
        self.subscribed.set()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason: Any, _props: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        self.metrics.set("palaute_ingest_connected", 0)
        if not self._stop.is_set():
            log.warning("lost the broker connection (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # What paho's own path delivers (QoS 2; the lean path hands over everything else).
        self._on_deliveries([(msg._topic, bytes(msg.payload), msg.mid, msg.qos)])

    def _on_deliveries(self, deliveries: list[Delivery]) -> None:
        inbox = self._inbox
        inbox.extend(deliveries)
        if not self._arrived.is_set():
            self._arrived.set()
        # Blocks the network thread when the writer falls behind: back-pressure to the broker,
        # which keeps the messages queued instead of this process growing without bound.
        while len(inbox) >= self.queue_max and not self._stop.is_set():
            self._space.clear()
            if len(inbox) < self.queue_max:
                break
            self._space.wait(0.2)

    # -- parser and writer threads -------------------------------------------------------------
    def _drain(self, timeout: float, limit: int) -> list[Delivery]:
        """Up to ``limit`` received messages, waiting at most ``timeout`` for the first one."""
        inbox = self._inbox
        if not inbox:
            # Cleared before looking again: a delivery after this point sets it.
            self._arrived.clear()
            if not inbox and not self._arrived.wait(timeout):
                return []
        popleft = inbox.popleft
        chunk = [popleft() for _ in range(min(limit, len(inbox)))]
        if not self._space.is_set():
            self._space.set()
        return chunk

    def _refuse(self, message: Delivery, reason: str, detail: str) -> None:
        self.metrics.inc("palaute_ingest_refused_total", reason=reason)
        log.warning("refused message on %s: %s", message[0].decode(errors="replace"), detail)

    def _parse_topic(self, topic: bytes) -> tuple[str, str, int]:
        """``(device_id, leaf, writer)`` of a device topic (cached), or ProtocolError."""
        parsed = self._topic_cache.get(topic)
        if parsed is None:
            device_id, leaf = self.topics.parse(topic.decode(errors="replace"))
            # Content requests all go to the first writer: they update shared rollout rows,
            # which two writers would contend for.  Everything else of a device goes to the
            # writer its id hashes to (crc32: the same in every process and run).
            writer = (0 if leaf in content_requests.LEAVES
                      else zlib.crc32(device_id.encode()) % self.writers)
            parsed = (device_id, leaf, writer)
            if len(self._topic_cache) >= TOPIC_CACHE_MAX:
                self._topic_cache.clear()
            self._topic_cache[topic] = parsed
        return parsed

    def process(self, messages: list[Delivery]) -> None:
        """Validate, store and acknowledge one batch of messages, in the calling thread."""
        for part in self.prepare(messages):
            if part.messages:
                self.store(part)

    def prepare(self, messages: list[Delivery]) -> list[_Prepared]:
        """Validate one batch, split by writer: refuse (and count) what is malformed
        (parser thread).  Refused messages go with the first writer's part, to be
        acknowledged to the broker with it."""
        now = self.clock()
        parts = [_Prepared.empty(now) for _ in range(self.writers)]
        # Counted here and added once per batch: one locked increment per message would be a
        # measurable share of the per-message cost at 1 vote per message.
        received: dict[str, int] = {}
        max_bytes = self.settings.ingest_max_payload
        max_future_ms = self.settings.ingest_max_future_ms
        parse_topic = self._parse_topic
        for message in messages:
            part = parts[0]
            try:
                device_id, leaf, writer = parse_topic(message[0])
                part = parts[writer]
                received[leaf] = received.get(leaf, 0) + 1
                payload = message[1]
                if leaf == "votes":
                    batch = parse_votes(device_id, payload, max_bytes=max_bytes, now_ms=now,
                                        max_future_ms=max_future_ms)
                    part.vote_batches.append(batch)
                    part.votes += len(batch.votes)
                elif leaf == "health":
                    part.health[device_id] = parse_object(payload, max_bytes=max_bytes)
                elif leaf == "status":
                    status = parse_object(payload, max_bytes=max_bytes)
                    part.presence[device_id] = status.get("online") is True
                elif leaf in content_requests.LEAVES:
                    part.content.append(self.content.parse(device_id, leaf, payload))
            except ProtocolError as exc:
                self._refuse(message, exc.reason, str(exc))
            part.messages.append(message)
        for leaf, count in received.items():
            self.metrics.inc("palaute_ingest_received_total", count, leaf=leaf)
        used = [part for part in parts if part.messages]
        ticket = _Ticket([mid for _, _, mid, qos in messages if qos == 1], len(used))
        for part in used:
            part.tickets.append(ticket)
        with self._tickets_lock:
            self._tickets.append(ticket)
        return parts

    def store(self, prepared: _Prepared) -> None:
        """Store one validated batch, commit, then ack terminals and broker (writer thread)."""
        messages, now = prepared.messages, prepared.now
        vote_batches, health, presence = (prepared.vote_batches, prepared.health,
                                          prepared.presence)
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with self.sessions.begin() as session:
                    result = store_batches(session, vote_batches, received_ms=now)
                    health_tags = self._store_presence(session, health, presence, now)
                self._db_failing = False
                break
            except SQLAlchemyError as exc:
                # Nothing was acknowledged yet, so retrying the same batch loses nothing.
                # (Also the way out of a deadlock between two workers storing the same
                # re-sent votes: PostgreSQL aborts one, which tries again.)
                self._db_failing = True
                self.metrics.inc("palaute_ingest_db_errors_total")
                log.error("database write failed, retrying in %.1fs: %s", self.db_retry_s, exc)
                self._stop.wait(self.db_retry_s)
        else:
            return  # stopping: leave the deliveries unacknowledged for the broker to resend
        self.metrics.inc("palaute_ingest_batches_total")
        self.metrics.set("palaute_ingest_commit_seconds", round(time.perf_counter() - started, 6))
        self.metrics.set("palaute_ingest_batch_messages", len(messages))
        self.metrics.inc("palaute_ingest_votes_stored_total", result.stored)
        self.metrics.inc("palaute_ingest_votes_duplicate_total", result.duplicates)
        if result.copy_fallback:
            self.metrics.inc("palaute_ingest_copy_fallbacks_total")
        for reason, count in result.refused.items():
            self.metrics.inc("palaute_ingest_refused_total", count, reason=reason)
        for device_id, reason in result.refused_devices:
            log.warning("refused votes from %s: %s", device_id, reason.replace("_", " "))
        for device_id, seq in result.acks.items():
            self._client.publish(self.topics.device(device_id, "ack"), encode_ack(seq, now), qos=1)
        self.metrics.inc("palaute_ingest_acks_total", len(result.acks))
        if vote_batches:
            newest = max(v.ts_ms for b in vote_batches for v in b.votes)
            self.metrics.set("palaute_ingest_lag_ms", max(0, self.clock() - newest))
        for device_id, sample in health.items():
            tags = health_tags.get(device_id)
            if tags is None:
                self._refuse_health(device_id)
            elif self.telemetry is not None:
                self.telemetry.write(device_id, sample, tags, now)
        if prepared.content:
            self._handle_content(prepared.content, now)
        self._ack_deliveries(prepared)

    def _ack_deliveries(self, prepared: _Prepared, *, stored: bool = True) -> None:
        """Acknowledge to the broker the deliveries of every chunk now done, in arrival order
        and in one write (at one vote per message, one write per PUBACK was a measurable
        share of the time).  ``stored=False``: this part failed; its deliveries are never
        acknowledged (the broker sends them again after a reconnect), the others are."""
        if not stored:
            failed = {mid for _, _, mid, qos in prepared.messages if qos == 1}
        with self._tickets_lock:
            for ticket in prepared.tickets:
                ticket.waiting -= 1
                if not stored:
                    ticket.withheld |= failed
            mids: list[int] = []
            tickets = self._tickets
            while tickets and tickets[0].waiting <= 0:
                ticket = tickets.popleft()
                withheld = ticket.withheld
                mids.extend([m for m in ticket.mids if m not in withheld] if withheld
                            else ticket.mids)
            # Queued under the lock, so that two writers' releases reach the socket in order.
            self._client.ack_many(mids)
        if stored:
            for _, _, mid, qos in prepared.messages:
                if qos == 2:  # the subscriptions are QoS 1, so never; kept correct anyway
                    self._client.ack(mid, qos)

    def _handle_content(self, content: list[ContentMessage], now: int) -> None:
        try:
            self.content.handle(self.sessions, content, now)
        except SQLAlchemyError as exc:
            # Not retried: terminals re-send `reported` on reconnect and re-ask for a chunk.
            self.metrics.inc("palaute_ingest_db_errors_total")
            log.error("storing %d content message(s) failed: %s", len(content), exc)
        except Exception:
            # Votes of this batch are committed and acked to terminals already: whatever went
            # wrong with content requests must not skip the broker acks that follow.
            self.metrics.inc("palaute_ingest_refused_total", len(content),
                             reason="internal")
            log.exception("handling %d content message(s) failed", len(content))

    def _refuse_health(self, device_id: str) -> None:
        self.metrics.inc("palaute_ingest_refused_total", reason="unknown_device")
        log.warning("refused health from %s: unknown device", device_id)

    def _store_presence(self, session: Session, health: dict[str, dict[str, Any]],
                        presence: dict[str, bool], now: int) -> dict[str, dict[str, str]]:
        """Update device state; return telemetry tags of every known device that sent health."""
        tags: dict[str, dict[str, str]] = {}
        if health:
            rows = session.execute(
                select(Device.id, Device.board, Assignment.site_id, Site.customer_id)
                .outerjoin(Assignment, and_(Assignment.device_id == Device.id,
                                            Assignment.end_ms.is_(None)))
                .outerjoin(Site, Site.id == Assignment.site_id)
                .where(Device.id.in_(list(health))))
            for row in rows:
                tags[row.id] = {"board": row.board or "",
                                "site": "" if row.site_id is None else str(row.site_id),
                                "customer": "" if row.customer_id is None
                                else str(row.customer_id)}
        if health:
            connection = session.connection()
            connection.execute(_HEALTH_UPDATE, [
                {"b_id": device_id, "b_seen": now,
                 "b_fw": sample["fw"][:32] if isinstance(sample.get("fw"), str) else None,
                 "b_cv": sample["content_version"]
                 if _is_int(sample.get("content_version")) else None}
                for device_id, sample in sorted(health.items())])
        if presence:
            session.connection().execute(_STATUS_UPDATE, [
                {"b_id": device_id, "b_online": online, "b_seen": now}
                for device_id, online in sorted(presence.items())])
        return tags

    # Two stages, so that validating messages (Python, holding the GIL) overlaps with storing
    # the previous batch (mostly waiting for the database, GIL released): at 50 votes per
    # message the database is the bottleneck, and a single thread would leave it idle while
    # it parses (docs/performance.md).  The parser validates messages as they arrive and hands
    # everything validated so far to the writer as soon as the writer is free and the batch
    # is old enough (PALAUTE_INGEST_BATCH_WAIT_MS) or full (PALAUTE_INGEST_BATCH_MAX): under
    # load batches grow by themselves, and one commit covers more messages.
    def _full(self, prepared: _Prepared | None) -> bool:
        return prepared is not None and (
            len(prepared.messages) >= self.settings.ingest_batch_max
            or prepared.votes >= self.batch_votes_max)

    def _parse_loop(self) -> None:
        # One batch in the making per writer, and when it became due.
        pending: list[_Prepared | None] = [None] * self.writers
        due = [0.0] * self.writers
        wait_s = self.settings.ingest_batch_wait_ms / 1000
        batch_max = self.settings.ingest_batch_max
        while not self._stop.is_set():
            holding = [p for p in pending if p is not None]
            size = max((len(p.messages) for p in holding), default=0)
            # Idle: block on the queue.  Holding a batch: short waits, to notice a writer
            # becoming free (the hand-over slots are checked after every chunk).  A full
            # batch takes nothing more until its writer has taken it.
            chunk = ([] if any(self._full(p) for p in holding) else
                     self._drain(0.005 if holding else 0.2, min(500, batch_max - size)))
            self.metrics.set("palaute_ingest_queue_depth", len(self._inbox))
            if chunk:
                try:
                    prepared = self.prepare(chunk)
                except Exception:  # a bug must not kill the worker; the messages stay unacked
                    log.exception("unexpected error while validating %d messages", len(chunk))
                    self.metrics.inc("palaute_ingest_refused_total", len(chunk),
                                     reason="internal")
                    continue
                now = time.monotonic()
                for writer, part in enumerate(prepared):
                    held = pending[writer]
                    if not part.messages:
                        continue
                    if held is None:
                        pending[writer], due[writer] = part, now + wait_s
                    else:
                        held.merge(part)
            # Due batches first, without waiting; then wait for the writer of a full one
            # (back-pressure: the network thread's queue absorbs the wait).
            now = time.monotonic()
            for writer in sorted(range(self.writers), key=lambda w: self._full(pending[w])):
                held = pending[writer]
                if held is None:
                    continue
                full = self._full(held)
                # A due batch goes to its writer once that writer is free, not into the slot
                # behind a transaction in progress: meanwhile it keeps growing, so under a
                # steady stream every transaction takes all that came during the one before
                # (handed over at once, it would alternate a 20 ms batch with a large one,
                # paying each transaction's fixed round trips twice as often).
                ready = full or (now >= due[writer] and not self._storing[writer])
                if ready and self._hand_over(writer, held, wait=full):
                    pending[writer] = None

    def _hand_over(self, writer: int, prepared: _Prepared, *, wait: bool) -> bool:
        """Give ``prepared`` to ``writer`` if it is free (or, with ``wait``, once it is)."""
        slots = self._slots
        with self._slot_changed:
            if wait:
                while slots[writer] is not None and not self._stop.is_set():
                    self._slot_changed.wait(0.2)
            if slots[writer] is not None or self._stop.is_set():
                return False
            slots[writer] = prepared
            self._slot_changed.notify_all()
            return True

    def _write_loop(self, writer: int) -> None:
        slots = self._slots
        while not self._stop.is_set():
            self._writer_beats[writer] = time.monotonic()
            with self._slot_changed:
                if slots[writer] is None:
                    self._slot_changed.wait(0.2)
                prepared, slots[writer] = slots[writer], None
                self._storing[writer] = prepared is not None
                self._slot_changed.notify_all()
            if prepared is not None:
                try:
                    self.store(prepared)
                except Exception:  # a bug must not kill the worker; the messages stay unacked
                    count = len(prepared.messages)
                    log.exception("unexpected error while storing %d messages", count)
                    self.metrics.inc("palaute_ingest_refused_total", count, reason="internal")
                    # ... and must not hold back the acknowledgements of later chunks.
                    self._ack_deliveries(prepared, stored=False)
                finally:
                    self._storing[writer] = False
            # In the first writer, between its batches: a sweep never runs concurrently with
            # that writer's own presence updates.  (The other writers' may wait for its
            # locks, as another worker's would; PostgreSQL aborts a deadlock, and the
            # aborted transaction is retried.)
            if writer == 0:
                self.sweep_presence_if_due()

    def sweep_presence_if_due(self) -> None:
        """Mark devices silent for three health intervals offline, if a sweep is due."""
        now = self.clock()
        if not self.presence.due(now):
            return
        try:
            with self.sessions.begin() as session:
                marked = self.presence.sweep(session, now)
        except SQLAlchemyError as exc:
            self.metrics.inc("palaute_ingest_db_errors_total")
            log.error("presence sweep failed, trying again later: %s", exc)
            self.presence.record(now, 0)
            return
        if marked:
            log.info("marked %d silent device(s) offline", marked)
            self.metrics.inc("palaute_ingest_presence_timeouts_total", marked)
        self.presence.record(now, marked)

    def health(self) -> tuple[bool, str]:
        """Whether this worker is doing its job, and if not why (for ``/healthz``)."""
        problems = []
        if not self.subscribed.is_set():
            problems.append("not connected and subscribed to the broker")
        threads = [self._parser, *self._writer_threads]
        if (len(self._writer_threads) != self.writers
                or any(t is None or not t.is_alive() for t in threads)):
            problems.append("parser or writer thread not running")
        elif time.monotonic() - min(self._writer_beats) > WRITER_STALL_S:
            problems.append(f"writer stalled for more than {WRITER_STALL_S:.0f}s")
        if self._db_failing:
            problems.append("database writes failing (retrying)")
        return (not problems, "; ".join(problems) or "ok")

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Connect (persistent session) and start the network and writer threads."""
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # Keep the session (and QoS 1 messages queued for it) for a day while this worker
            # is away, and let the broker keep many deliveries in flight: they are
            # acknowledged only after commit, in batches.
            props.SessionExpiryInterval = 24 * 3600
            props.ReceiveMaximum = 65535
            self._client.connect_async(self._target.host, self._target.port, keepalive=30,
                                       clean_start=False, properties=props)
        else:
            self._client.connect_async(self._target.host, self._target.port, keepalive=30)
        self._client.loop_start()
        self._parser = threading.Thread(target=self._parse_loop, name="ingest-parser",
                                        daemon=True)
        self._writer_threads = [
            threading.Thread(target=self._write_loop, args=(n,), name=f"ingest-writer-{n}",
                             daemon=True) for n in range(self.writers)]
        self._parser.start()
        for thread in self._writer_threads:
            thread.start()

    def stop(self) -> None:
        """Stop consuming; deliveries not yet committed stay with the broker."""
        self._stop.set()
        for thread in (self._parser, *self._writer_threads):
            if thread is not None:
                thread.join(timeout=10)
        self._client.disconnect()
        self._client.loop_stop()
        if self.telemetry is not None:
            self.telemetry.close()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until connected and subscribed."""
        return self.subscribed.wait(timeout)
