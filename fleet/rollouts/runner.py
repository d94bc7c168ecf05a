"""``palaute rollout run``: tick the rollout engine every few seconds over a broker connection.

Run one (or, for availability, more: ticks are safe to run concurrently) next to the ingest
workers.  The engine publishes ``desired`` with QoS 1 and waits for the broker's
acknowledgement before it commits, so this process needs the broker as much as the database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleet.config import Settings
from fleet.mqtt_url import parse_mqtt_url
from fleet.protocol.v1 import Topics
from fleet.rollouts.engine import RolloutEngine
from fleet.rollouts.packages import PackageSource, StoredPackages
from fleet.services.clock import now_ms

log = logging.getLogger("palaute.rollouts")


class BrokerPublisher:
    """A paho client whose ``__call__`` publishes with QoS 1 and waits for the PUBACK.

    Nothing may reach the broker after a failed publish: the caller rolls its transaction
    back, so a message paho still holds would later tell a device something the database
    never recorded (e.g. a ``desired`` of a rollout aborted meanwhile).  So it refuses to
    publish while disconnected (paho would queue the message and send it after the
    reconnect), and after any failure it throws the client away, with whatever it still
    queues, and connects a new one.
    """

    def __init__(self, mqtt_url: str, client_id: str, *, timeout_s: float = 10.0) -> None:
        """Prepare the client; :meth:`start` connects."""
        self.timeout_s = timeout_s
        self.client_id = client_id
        self._target = parse_mqtt_url(mqtt_url)
        self.connected = threading.Event()
        self._started = False
        self._client = self._new_client()

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv311)
        if self._target.username:
            client.username_pw_set(self._target.username, self._target.password)
        # A wave publishes many messages at once; let more than paho's default 20 be in flight.
        client.max_inflight_messages_set(1000)
        # Only the current client's events count: a discarded one may still report late.
        client.on_connect = lambda c, *_: self.connected.set() if c is self._client else None
        client.on_disconnect = lambda c, *_: (self.connected.clear() if c is self._client
                                              else None)
        return client

    def start(self) -> None:
        """Connect in the background (paho reconnects by itself)."""
        self._started = True
        self._client.connect_async(self._target.host, self._target.port, keepalive=30)
        self._client.loop_start()

    def __call__(self, topic: str, payload: bytes, *, retain: bool) -> None:
        """Publish one message and wait until the broker has it; raise if it does not."""
        self.publish_all([(topic, payload)], retain=retain)

    def publish_all(self, messages: Sequence[tuple[str, bytes]], *, retain: bool) -> None:
        """Publish every ``(topic, payload)``, then wait until the broker acknowledged them
        all (in flight together, so a wave of thousands costs round trips once, not each);
        raise ConnectionError if not connected, or if they are not acknowledged within the
        timeout (then nothing still unsent goes out later)."""
        if not messages:
            return
        if not self.connected.is_set():
            raise ConnectionError("not connected to the broker; nothing was published")
        deadline = time.monotonic() + self.timeout_s + len(messages) / 1000
        try:
            infos = [(topic, self._client.publish(topic, payload, qos=1, retain=retain))
                     for topic, payload in messages]
            for topic, info in infos:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
                if not info.is_published():
                    raise ConnectionError(f"the broker did not acknowledge {topic} in time")
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self._discard_client()
            raise ConnectionError(f"publishing failed, unsent messages dropped: {exc}") from exc

    def _discard_client(self) -> None:
        """Replace the client: the old one's queue (messages paho would send after a
        reconnect) is dropped with it."""
        old, self._client = self._client, self._new_client()
        self.connected.clear()
        # disconnect() first: a disconnecting client's loop never reconnects (so never
        # flushes its queue), and loop_stop() alone would wait while unacknowledged
        # messages remain, until the keepalive gives up.
        old.disconnect()
        old.loop_stop()
        log.warning("broker connection reset; messages not acknowledged were dropped")
        if self._started:
            self._client.connect_async(self._target.host, self._target.port, keepalive=30)
            self._client.loop_start()

    def stop(self) -> None:
        """Disconnect."""
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()


class RolloutRunner:
    """Ticks the engine every ``interval_s`` until stopped."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *,
                 interval_s: float, packages: PackageSource | None = None,
                 client_id: str = "palaute-rollouts") -> None:
        """Prepare the publisher and engine; :meth:`run` starts ticking."""
        self.publisher = BrokerPublisher(settings.mqtt_url, client_id)
        self.engine = RolloutEngine(sessions, packages or StoredPackages(), self.publisher,
                                    topics=Topics(settings.topic_root))
        self.interval_s = interval_s
        self.stopping = threading.Event()

    def run(self) -> None:
        """Tick until :meth:`stop`; a failed tick is logged and tried again next time."""
        self.publisher.start()
        try:
            while not self.stopping.is_set():
                if self.publisher.connected.wait(self.interval_s):
                    try:
                        self.engine.tick(now_ms())
                    except (SQLAlchemyError, ConnectionError, RuntimeError,
                            LookupError) as exc:
                        log.error("rollout tick failed, trying again in %.0fs: %s",
                                  self.interval_s, exc)
                self.stopping.wait(self.interval_s)
        finally:
            self.publisher.stop()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current tick."""
        self.stopping.set()
