"""The ingest worker (``palaute ingest``).

A paho-mqtt network thread receives messages into a bounded queue; one writer thread takes
them in batches, stores every vote of the batch in one transaction, commits, and only then
publishes the ``ack`` messages and acknowledges the MQTT deliveries to the broker.  A worker
killed at any point therefore loses nothing: unacknowledged deliveries come back from the
broker's persistent session, and terminals re-send anything they have no ``ack`` for.

Several workers share the load through an MQTT shared subscription
(``$share/<group>/fb/v1/d/+/votes``); they hold no state of their own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import and_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleet.config import Settings
from fleet.db.models import Assignment, Device, Site
from fleet.ingest.metrics import Metrics
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
LEAVES = ("votes", "health", "status")


class TelemetrySink(Protocol):
    """Where health samples go after commit (``fleet.services.telemetry.InfluxTelemetry``)."""

    def write(self, device_id: str, sample: Mapping[str, Any], tags: Mapping[str, str],
              received_ms: int) -> None:
        """Queue one sample; must return at once."""

    def close(self) -> None:
        """Flush what can be flushed and stop."""


@dataclass(slots=True)
class _Message:
    topic: str
    payload: bytes
    mid: int
    qos: int


class IngestWorker:
    """Consume device messages from MQTT and store them; see the module docstring."""

    queue_max = 100_000
    db_retry_s = 0.5

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 client_id: str | None = None, metrics: Metrics | None = None,
                 telemetry: TelemetrySink | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.settings = settings
        self.sessions = sessions
        self.metrics = metrics or Metrics()
        self.telemetry = telemetry
        self.topics = Topics(settings.topic_root)
        self.clock = clock
        self._queue: queue.Queue[_Message] = queue.Queue(self.queue_max)
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        target = parse_mqtt_url(settings.mqtt_url)
        self._target = target
        self._v5 = settings.mqtt_protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or settings.mqtt_client_id,
            protocol=mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311,
            clean_session=None if self._v5 else False, manual_ack=True)
        if target.username:
            self._client.username_pw_set(target.username, target.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        for name, text in (
            ("palaute_ingest_received_total", "MQTT messages received, by topic leaf"),
            ("palaute_ingest_votes_stored_total", "Votes newly stored"),
            ("palaute_ingest_votes_duplicate_total", "Votes received again and ignored"),
            ("palaute_ingest_refused_total", "Messages or votes refused, by reason"),
            ("palaute_ingest_acks_total", "Ack messages published to terminals"),
            ("palaute_ingest_db_errors_total", "Failed database transactions (retried)"),
            ("palaute_ingest_queue_depth", "Messages waiting for the writer"),
            ("palaute_ingest_lag_ms", "Age of the newest stored vote batch when committed"),
        ):
            self.metrics.describe(name, text)

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
        if not self._stop.is_set():
            log.warning("lost the broker connection (%s); reconnecting", reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Blocks the network thread when the writer falls behind: back-pressure to the broker,
        # which keeps the messages queued instead of this process growing without bound.
        self._queue.put(_Message(msg.topic, bytes(msg.payload), msg.mid, msg.qos))

    # -- writer thread -----------------------------------------------------------------------
    def _take_batch(self) -> list[_Message]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.ingest_batch_wait_ms / 1000
        while len(batch) < self.settings.ingest_batch_max:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0
                             else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _refuse(self, message: _Message, reason: str, detail: str) -> None:
        self.metrics.inc("palaute_ingest_refused_total", reason=reason)
        log.warning("refused message on %s: %s", message.topic, detail)

    def process(self, messages: list[_Message]) -> None:
        """Validate, store and acknowledge one batch of messages (writer thread)."""
        now = self.clock()
        vote_batches: list[VoteBatch] = []
        health: dict[str, dict[str, Any]] = {}
        presence: dict[str, bool] = {}
        for message in messages:
            try:
                device_id, leaf = self.topics.parse(message.topic)
                self.metrics.inc("palaute_ingest_received_total", leaf=leaf)
                if leaf == "votes":
                    vote_batches.append(parse_votes(
                        device_id, message.payload, max_bytes=self.settings.ingest_max_payload,
                        now_ms=now, max_future_ms=self.settings.ingest_max_future_ms))
                elif leaf == "health":
                    health[device_id] = parse_object(
                        message.payload, max_bytes=self.settings.ingest_max_payload)
                elif leaf == "status":
                    status = parse_object(message.payload,
                                          max_bytes=self.settings.ingest_max_payload)
                    presence[device_id] = status.get("online") is True
            except ProtocolError as exc:
                self._refuse(message, exc.reason, str(exc))
        while not self._stop.is_set():
            try:
                with self.sessions.begin() as session:
                    result = store_batches(session, vote_batches, received_ms=now)
                    health_tags = self._store_presence(session, health, presence, now)
                break
            except SQLAlchemyError as exc:
                # Nothing was acknowledged yet, so retrying the same batch loses nothing.
                self.metrics.inc("palaute_ingest_db_errors_total")
                log.error("database write failed, retrying in %.1fs: %s", self.db_retry_s, exc)
                self._stop.wait(self.db_retry_s)
        else:
            return  # stopping: leave the deliveries unacknowledged for the broker to resend
        self.metrics.inc("palaute_ingest_votes_stored_total", result.stored)
        self.metrics.inc("palaute_ingest_votes_duplicate_total", result.duplicates)
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
        for message in messages:
            if message.qos > 0:
                self._client.ack(message.mid, message.qos)

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
        for device_id, sample in health.items():
            values: dict[str, Any] = {"last_seen_ms": now, "online": True}
            if isinstance(sample.get("fw"), str):
                values["fw_version"] = sample["fw"][:32]
            if isinstance(sample.get("content_version"), int):
                values["content_version"] = sample["content_version"]
            session.execute(update(Device).where(Device.id == device_id).values(**values))
        for device_id, online in presence.items():
            session.execute(update(Device).where(Device.id == device_id).values(
                online=online, last_seen_ms=now))
        return tags

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            self.metrics.set("palaute_ingest_queue_depth", self._queue.qsize())
            if batch:
                try:
                    self.process(batch)
                except Exception:  # a bug must not kill the worker; the messages stay unacked
                    log.exception("unexpected error while processing %d messages", len(batch))
                    self.metrics.inc("palaute_ingest_refused_total", len(batch), reason="internal")

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
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer",
                                        daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Stop consuming; deliveries not yet committed stay with the broker."""
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        self._client.disconnect()
        self._client.loop_stop()
        if self.telemetry is not None:
            self.telemetry.close()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until connected and subscribed."""
        return self.subscribed.wait(timeout)
