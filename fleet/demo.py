"""``palaute demo``: the whole system on one machine, with no external services.

An embedded MQTT broker (amqtt), SQLite, the fleet API, the ingest worker, the rollout engine
and simulated terminals running the real firmware code, with visitors pressing buttons.  A
fresh demo also creates a content version (a question in three languages, signed with a key
made for the demo) and rolls it out to every terminal in waves, so the terminals switch from
their built-in question to the fleet's over the air while the demo runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from fleet.api.app import create_app
from fleet.config import Settings
from fleet.content import signing
from fleet.content.body import ContentBody, LanguageTexts
from fleet.content.service import create_content
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Role, Rollout, RolloutDevice, RolloutDeviceState, RolloutState
from fleet.ingest.metrics import Metrics
from fleet.ingest.worker import IngestWorker
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.runner import RolloutRunner
from fleet.rollouts.service import RolloutPlan, create_rollout
from fleet.services import registry
from fleet.services.auth import create_user
from fleet.services.stats import fleet_totals

SITES = ("Helsinki Airport T2", "Tampere Central Library", "Oulu Clinic", "Turku Market Hall")


@dataclass
class DemoSummary:
    """What a demo run did; ``votes_pressed`` must equal ``votes_stored``."""

    duration_s: float
    terminals: int
    votes_pressed: int
    votes_stored: int
    votes_filtered: int
    votes_pending_in_flash: int
    refused: int
    content_version: int
    terminals_showing_content: int
    api_docs: str
    data_dir: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_available(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def demo_device_id(index: int) -> str:
    """Deterministic device ids for the demo's terminals."""
    return f"pt-de{index:010x}"


DEMO_ADMIN = "admin@demo.palaute"


DEMO_CONTENT = ContentBody(
    name="Demo: how was your visit?",
    languages={
        "fi": LanguageTexts(question="Miten onnistuimme tänään?", thanks="Kiitos!"),
        "sv": LanguageTexts(question="Hur lyckades vi i dag?", thanks="Tack!"),
        "en": LanguageTexts(question="How did we do today?", thanks="Thank you!"),
    },
    show="rotate", rotate_s=5)


def seed(settings: Settings, terminals: int, key: Ed25519PrivateKey) -> str:
    """Create a demo customer with sites, assign the terminals round-robin, and an admin;
    create the demo content version and a rollout of it to the customer's terminals (one
    canary, then half, then all).

    Returns the admin's generated password (the demo prints it; nothing is hard-coded).
    """
    password = secrets.token_urlsafe(12)
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        create_user(session, email=DEMO_ADMIN, password=password, role=Role.admin,
                    name="Demo admin")
        customer = registry.create_customer(session, name="Demo Oy")
        sites = [registry.create_site(session, customer_id=customer.id, name=name,
                                      timezone="Europe/Helsinki") for name in SITES]
        start = 0  # assigned since the epoch: every vote of the demo belongs to its site
        for index in range(terminals):
            device = registry.register_device(session, device_id=demo_device_id(index),
                                              board="sim")
            registry.assign_device(session, device_id=device.id,
                                   site_id=sites[index % len(sites)].id, at_ms=start)
        content = create_content(session, DEMO_CONTENT, key=key, user=None)
        session.flush()
        if terminals:
            create_rollout(session, packages=StoredPackages(), plan=RolloutPlan(
                content_version=content.version, target_kind="customer",
                target_ref=str(customer.id), canary=[demo_device_id(0)], waves=(50, 100),
                device_timeout_s=120))
    engine.dispose()
    return password


async def _start_broker(port: int) -> Any:
    from amqtt.broker import Broker

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        # Loopback only and gone when the demo ends; production brokers require credentials.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {
            "allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    return broker


async def run_demo(*, terminals: int, duration: float | None, api_port: int,
                   presses_per_minute: float, data_dir: Path | None, as_json: bool) -> DemoSummary:
    """Run the demo until ``duration`` seconds pass (or forever) and return its summary."""
    from simulator.virtual import VirtualFleet

    for noisy in ("amqtt", "transitions", "uvicorn.error", "palaute.ingest"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    workdir = data_dir or Path(tempfile.mkdtemp(prefix="palaute-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    db_path = workdir / "palaute.db"
    fresh = not db_path.exists()
    broker_port = _free_port()
    key_file = workdir / "content.key"
    # The demo's own signing key, 0600, in its data dir (kept across runs like the database).
    key = (signing.load_key_file(key_file) if key_file.exists()
           else signing.generate_key_file(key_file))
    content_key = signing.public_key_hex(key)
    settings = Settings(
        db_url=f"sqlite:///{db_path}", mqtt_url=f"mqtt://127.0.0.1:{broker_port}",
        mqtt_protocol="3.1.1", ingest_shared_group="", mqtt_client_id="palaute-demo-ingest",
        content_key_file=str(key_file))
    upgrade(settings.db_url)
    login_hint = f"log in as {DEMO_ADMIN} with the password printed by the first run"
    if fresh:
        login_hint = f"log in as {DEMO_ADMIN} / {seed(settings, terminals, key)}"
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        stored_before = fleet_totals(session).votes

    broker = await _start_broker(broker_port)
    metrics = Metrics()
    worker = IngestWorker(settings, sessions, metrics=metrics)
    worker.start()
    if not await asyncio.to_thread(worker.wait_ready, 15):
        raise RuntimeError("the ingest worker could not subscribe to the embedded broker")

    port = api_port if api_port and _port_available(api_port) else _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(sessions, metrics=metrics, settings=settings),
                                           host="127.0.0.1", port=port, log_level="warning"))
    api_task = asyncio.create_task(server.serve())
    docs = f"http://127.0.0.1:{port}/docs"

    rollouts = RolloutRunner(settings, sessions, interval_s=1.0,
                             client_id="palaute-demo-rollouts")
    rollout_thread = threading.Thread(target=rollouts.run, name="rollouts", daemon=True)
    rollout_thread.start()

    fleet = VirtualFleet(workdir / "terminals", "127.0.0.1", broker_port,
                         settings={"health_interval_s": 60, "ack_timeout_s": 5,
                                   "content_key": content_key})
    for index in range(terminals):
        fleet.add(demo_device_id(index))
    fleet.start()
    visitors = asyncio.create_task(fleet.visitors(presses_per_minute=presses_per_minute))
    out = sys.stderr if as_json else sys.stdout
    print(f"Palaute demo: {terminals} terminals, embedded MQTT broker on port {broker_port}, "
          f"SQLite at {db_path}", file=out)
    print(f"API docs: {docs}   (Ctrl-C to stop)", file=out)
    print(f"API login: POST /api/v1/auth/login — {login_hint}", file=out)
    started = time.monotonic()
    try:
        while duration is None or time.monotonic() - started < duration:
            await asyncio.sleep(1)
            with sessions() as session:
                totals = fleet_totals(session)
            line = (f"pressed {fleet.pressed:6d} | stored {totals.votes - stored_before:6d} | "
                    f"in flash {fleet.pending:4d} | online {fleet.online:2d}/{terminals} | "
                    f"fleet content on {fleet.showing_content:2d} | "
                    f"refused {metrics.total('palaute_ingest_refused_total')}")
            print("\r" + line if out.isatty() else line, end="" if out.isatty() else "\n",
                  file=out, flush=True)
    except asyncio.CancelledError:
        pass
    finally:
        visitors.cancel()
        # Let every terminal upload what it holds before counting: nothing may be left behind.
        # Likewise let the running rollout reach every online terminal it has started on, so
        # the summary says where content stands, not how far a wave got by chance.
        drain_deadline = time.monotonic() + 60
        while ((fleet.pending or _rollout_in_flight(sessions))
               and time.monotonic() < drain_deadline):
            await asyncio.sleep(0.1)
        if out.isatty():
            print(file=out)
        await fleet.stop()
        rollouts.stop()
        await asyncio.to_thread(rollout_thread.join, 10)
        await asyncio.to_thread(worker.stop)
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await api_task
        await broker.shutdown()
    with sessions() as session:
        totals = fleet_totals(session)
    engine.dispose()
    return DemoSummary(
        duration_s=round(time.monotonic() - started, 1), terminals=terminals,
        votes_pressed=fleet.pressed, votes_stored=totals.votes - stored_before,
        votes_filtered=totals.votes_filtered, votes_pending_in_flash=fleet.pending,
        refused=metrics.total("palaute_ingest_refused_total"),
        content_version=max((v.terminal.content_version for v in fleet.terminals), default=0),
        terminals_showing_content=fleet.showing_content, api_docs=docs,
        data_dir=str(workdir))


def _rollout_in_flight(sessions: sessionmaker[Session]) -> bool:
    """True while a running rollout has devices it has not reached or heard back from."""
    busy = (RolloutDeviceState.pending, RolloutDeviceState.delivered)
    with sessions() as session:
        return session.scalar(
            select(func.count()).select_from(RolloutDevice).join(Rollout)
            .where(Rollout.state == RolloutState.running, RolloutDevice.state.in_(busy))) != 0


def print_summary(summary: DemoSummary, *, as_json: bool) -> None:
    """Print the summary as text or as one JSON object."""
    if as_json:
        print(json.dumps(asdict(summary)))
        return
    ok = "OK" if summary.votes_pressed == summary.votes_stored else "MISMATCH"
    print(f"Summary ({summary.duration_s}s, {summary.terminals} terminals): "
          f"{summary.votes_pressed} pressed, {summary.votes_stored} stored "
          f"({summary.votes_filtered} flagged by the abuse filter), "
          f"{summary.votes_pending_in_flash} left in flash, {summary.refused} refused; "
          f"{summary.terminals_showing_content} terminals show content version "
          f"{summary.content_version} — {ok}")
