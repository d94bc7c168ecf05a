"""One terminal applies signed content over the air, end to end.

Real parts only: Mosquitto with per-device ACLs, ``palaute ingest`` as a subprocess (its
content handler answers ``fetch`` with ``chunk`` from the package stored in PostgreSQL),
the package built and signed by fleet/content, and the terminal firmware under the real
MicroPython interpreter.  The test publishes the retained ``desired`` as the rollout engine
would, then checks what the visitor sees (pixels of the package's question bitmap), what the
next vote carries (the new version, in the database), and what the terminal reported.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet.content.package import build_package, screen_bytes
from fleet.content.signing import public_key_hex, sign
from fleet.db.migrate import upgrade
from fleet.db.models import ContentPackage, ContentVersion, Device, Vote
from fleet.protocol.v1 import encode_desired
from simulator.harness import Harness, TerminalProcess
from tests.fleet.rollout_helpers import KEY, make_fleet, sessions_for
from tests.services.common import wait_until
from tests.services.ingest import IngestProcess
from tests.services.micropython import micropython_command
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython, pytest.mark.postgres]

DEVICE = "pt-c0a7e0000001"
TIMEOUT = 60.0
SIZE = screen_bytes(128, 64)


def screens(seed: int) -> dict[str, dict[str, bytes]]:
    """Recognisable bitmaps: a different byte pattern for every screen."""
    def pattern(n: int) -> bytes:
        return bytes((i * n + seed) % 256 for i in range(SIZE))
    return {"question": {"fi": pattern(3), "en": pattern(5)},
            "thanks": {"fi": pattern(7), "en": pattern(11)}}


def store(session: Session, version: int, package_screens: dict[str, dict[str, bytes]]) -> bytes:
    """Store ``version`` as the content service does: a signed 128x64 package."""
    data = build_package(version, 128, 64, ["fi", "en"], package_screens, show="en",
                         rotate_s=8, settings={"min_gap_ms": 0}, hours=None)
    session.add(ContentVersion(version=version, name=f"v{version}", body="{}", created_ms=0))
    session.flush()
    session.add(ContentPackage(version=version, display="128x64", data=data, size=len(data),
                               sha256=hashlib.sha256(data).hexdigest(),
                               signature=sign(KEY, version, data).hex(),
                               public_key=public_key_hex(KEY)))
    return data


@dataclass
class Rig:
    broker: MosquittoBroker
    sessions: sessionmaker[Session]
    terminal: TerminalProcess
    packages: dict[int, bytes]

    def desire(self, version: int, *, sig_hex: str | None = None) -> None:
        """Publish the retained ``desired`` for ``version`` (as the rollout engine does)."""
        data = self.packages[version]
        payload = encode_desired(version, len(data), hashlib.sha256(data).hexdigest(),
                                 sig_hex or sign(KEY, version, data).hex())
        mqtt_publish.single(f"fb/v1/d/{DEVICE}/desired", payload, qos=1, retain=True,
                            hostname=self.broker.host, port=self.broker.port,
                            auth={"username": self.broker.admin_user,
                                  "password": self.broker.admin_password})

    def reported(self, state: str, version: int) -> dict[str, Any]:
        event = self.terminal.wait_for(
            "reported", lambda e: e["data"]["state"] == state
            and e["data"]["desired"] == version, timeout=TIMEOUT)
        return dict(event["data"])

    def vote_version(self, seq: int) -> int | None:
        with self.sessions() as session:
            return session.scalar(select(Vote.content_version).where(
                Vote.device_id == DEVICE, Vote.seq == seq))


@pytest.fixture
def rig(mosquitto: MosquittoBroker, postgres_url: str, tmp_path: Path) -> Iterator[Rig]:
    upgrade(postgres_url)
    sessions = sessions_for(postgres_url)
    with sessions.begin() as session:
        make_fleet(session, [DEVICE], board="sim", online=False)
        packages = {3: store(session, 3, screens(1)), 4: store(session, 4, screens(2))}
    admin_url = mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password)
    worker = IngestProcess(db_url=postgres_url, mqtt_url=admin_url, workdir=tmp_path,
                           worker_id="content-ota-ingest")
    worker.start_subscribed(mosquitto)
    harness = Harness(tmp_path / "terminals", micropython_command())
    harness.workdir.mkdir()
    password = secrets.token_urlsafe(12)
    mosquitto.add_user(DEVICE, password)
    terminal = harness.add(DEVICE, {
        "device_id": DEVICE, "board": "sim", "buttons": 4, "min_gap_ms": 0,
        "mqtt": {"host": mosquitto.host, "port": mosquitto.port, "user": DEVICE,
                 "password": password},
        "ack_timeout_s": 2, "keepalive_s": 10, "health_interval_s": 3600,
        "content_key": public_key_hex(KEY), "fetch_timeout_s": 3})
    terminal.start()
    try:
        yield Rig(mosquitto, sessions, terminal, packages)
    finally:
        harness.close()
        worker.stop()


def test_terminal_fetches_verifies_and_shows_new_content(rig: Rig) -> None:
    term = rig.terminal
    first = term.wait_for("reported", timeout=TIMEOUT)["data"]
    assert first["version"] == 0 and first["state"] == "applied"  # built-in question
    before = term.press(1)
    term.wait_acked(before, TIMEOUT)
    assert rig.vote_version(before) == 0

    rig.desire(3)
    assert rig.reported("downloading", 3)["version"] == 0
    done = rig.reported("applied", 3)
    assert (done["version"], done["reason"]) == (3, None)

    # The thank-you of the first press may still be up; then the new question follows.
    wait_until(lambda: term.display()["lines"] == ["question:en:v3"], TIMEOUT,
               "the new question on screen")
    shown = term.display()
    assert shown["content_version"] == 3 and shown["mode"] == "on"
    assert shown["fb"] == screens(1)["question"]["en"]  # pixel for pixel: the package's
    seq = term.press(2)
    assert term.display()["fb"] == screens(1)["thanks"]["en"]
    term.wait_acked(seq, TIMEOUT)
    assert rig.vote_version(seq) == 3

    # The fleet learnt it from the retained reported (through the ingest handler).
    def device_version() -> bool:
        with rig.sessions() as session:
            return session.scalar(select(Device.content_version).where(
                Device.id == DEVICE)) == 3
    wait_until(device_version, TIMEOUT, "devices.content_version == 3")

    # A forged signature is refused and the content stays.
    rig.desire(4, sig_hex=secrets.token_hex(64))
    refused = rig.reported("refused", 4)
    assert (refused["reason"], refused["version"]) == ("bad_signature", 3)
    rig.desire(3)
    assert rig.reported("applied", 3)["version"] == 3  # equal: applied again
    rig.desire(4, sig_hex=secrets.token_hex(64))
    rig.reported("refused", 4)
    rig.desire(4)  # the same package, now with the fleet's signature
    assert rig.reported("applied", 4)["version"] == 4
    wait_until(lambda: term.display()["fb"] == screens(2)["question"]["en"], TIMEOUT,
               "version 4 on screen")


def test_restart_shows_stored_content_and_reports_again(rig: Rig) -> None:
    term = rig.terminal
    rig.desire(3)
    rig.reported("applied", 3)
    term.kill()
    term.start()
    again = rig.reported("applied", 3)  # after the new connect
    assert again["version"] == 3
    shown = term.display()
    assert shown["fb"] == screens(1)["question"]["en"] and shown["content_version"] == 3
