"""Shared set-up for the rollout tests: a fleet in the registry, signed content, and a
subscriber that sees what the engine publishes on the real broker."""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from fleet.content.package import SCREENS, build_package, screen_bytes
from fleet.content.signing import public_key_hex, sign
from fleet.db.models import ContentPackage, ContentVersion, Device
from fleet.services import registry
from tests.services.mosquitto import MosquittoBroker

MARKER = "fb/v1/d/pt-ffffffffffff/desired"
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def device_ids(count: int, prefix: str = "0000aa") -> list[str]:
    """``count`` device ids, sorted."""
    return [f"pt-{prefix}{n:06x}" for n in range(count)]


def make_fleet(session: Session, ids: Sequence[str], *, board: str = "esp32-devkitc",
               online: bool = True) -> int:
    """Register ``ids`` at one new site; return the site id."""
    customer = registry.create_customer(session, name=f"Rollout Oy {ids[0]}")
    site = registry.create_site(session, customer_id=customer.id, name="Lobby")
    for device_id in ids:
        registry.register_device(session, device_id=device_id, board=board)
        registry.assign_device(session, device_id=device_id, site_id=site.id, at_ms=0)
    set_online(session, ids, online)
    return site.id


def set_online(session: Session, ids: Sequence[str], online: bool) -> None:
    """What the ingest worker does on a status message."""
    session.execute(update(Device).where(Device.id.in_(list(ids))).values(online=online))


def store_content(session: Session, version: int, displays: Sequence[str] = ("128x64",),
                  pattern: int = 0, question: bytes | None = None) -> dict[str, bytes]:
    """Store a signed content version, one language; return its packages by display.

    Every screen is filled with ``pattern``, except the question screen when ``question``
    (a whole bitmap for the first display) is given."""
    session.add(ContentVersion(version=version, name=f"v{version}", body="{}", created_ms=0))
    session.flush()  # no ORM relationship orders the two inserts
    packages = {}
    for display in displays:
        width, height = (int(x) for x in display.split("x"))
        screen = bytes([pattern]) * screen_bytes(width, height)
        screens = {kind: {"fi": screen} for kind in SCREENS}
        if question is not None and display == displays[0]:
            screens["question"] = {"fi": question}
        data = build_package(version, width, height, ["fi"], screens, show="fi",
                             rotate_s=8, settings={}, hours=None)
        session.add(ContentPackage(version=version, display=display, data=data, size=len(data),
                                   sha256=hashlib.sha256(data).hexdigest(),
                                   signature=sign(KEY, version, data).hex(),
                                   public_key=public_key_hex(KEY)))
        packages[display] = data
    session.flush()
    return packages


class Watcher:
    """A real MQTT subscriber to ``desired`` and ``chunk`` of every device."""

    def __init__(self, broker: MosquittoBroker, leaves: Sequence[str] = ("desired",)) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rollout-watcher")
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        self.client.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain)))
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(
            [(f"fb/v1/d/+/{leaf}", 1) for leaf in leaves])
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10), "watcher did not subscribe"

    def drain(self) -> list[tuple[str, bytes, bool]]:
        """Everything received so far."""
        out: list[tuple[str, bytes, bool]] = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def take(self, count: int, timeout: float = 10) -> list[tuple[str, bytes, bool]]:
        """Exactly the next ``count`` messages (fails if they do not come)."""
        return [self.messages.get(timeout=timeout) for _ in range(count)]

    def since(self, publish: Callable[..., None]) -> list[tuple[str, bytes, bool]]:
        """Everything published before a marker message sent now through ``publish``.

        The broker keeps one publisher's messages in order, so once the marker arrives every
        earlier message has: no waiting for messages that do not come."""
        publish(MARKER, b"marker", retain=False)
        out: list[tuple[str, bytes, bool]] = []
        while True:
            message = self.messages.get(timeout=10)
            if message[0] == MARKER:
                return out
            out.append(message)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def desired_of(message: tuple[str, bytes, bool]) -> tuple[str, dict[str, object] | None]:
    """(device id, desired document or None for a cleared one)."""
    topic, payload, _ = message
    return topic.split("/")[3], json.loads(payload) if payload else None


def sessions_for(db_url: str) -> sessionmaker[Session]:
    """A session factory on ``db_url``."""
    from fleet.db.engine import make_engine, make_sessionmaker

    return make_sessionmaker(make_engine(db_url))


def retained_desired(broker: MosquittoBroker, ids: Sequence[str]
                     ) -> dict[str, dict[str, object] | None]:
    """The retained ``desired`` the broker holds now for each of ``ids`` (None: none).

    A fresh subscriber gets the retained messages right after its subscription; a marker
    it publishes itself afterwards (on a topic no Watcher hears) comes back behind them, so
    no waiting on silence."""
    marker = "fb/v1/probe/retained-marker"
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rollout-retained")
    client.username_pw_set(broker.admin_user, broker.admin_password)
    client.on_message = lambda _c, _u, m: got.put((m.topic, bytes(m.payload)))
    client.on_subscribe = lambda c, *_: c.publish(marker, b"marker", qos=1)
    client.on_connect = lambda c, *_: c.subscribe(
        [(f"fb/v1/d/{d}/desired", 1) for d in ids] + [(marker, 1)])
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        held: dict[str, dict[str, object] | None] = {d: None for d in ids}
        while True:
            topic, payload = got.get(timeout=10)
            if topic == marker:
                return held
            device_id, document = desired_of((topic, payload, True))
            if device_id in held:
                held[device_id] = document
    finally:
        client.disconnect()
        client.loop_stop()
