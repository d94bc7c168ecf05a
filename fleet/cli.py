"""The ``palaute`` command: one entry point for every user of the system."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from fleet.config import Settings


def _settings() -> Settings:
    from fleet.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                           for e in exc.errors())
        raise SystemExit(f"palaute: invalid settings: {errors}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the self-contained demo."""
    from fleet.demo import print_summary, run_demo

    try:
        summary = asyncio.run(run_demo(
            terminals=args.terminals, duration=args.duration, api_port=args.port,
            presses_per_minute=args.rate, data_dir=args.data_dir, as_json=args.json))
    except KeyboardInterrupt:
        return 130
    print_summary(summary, as_json=args.json)
    return 0 if summary.votes_pressed == summary.votes_stored else 1


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    """Apply database migrations."""
    from fleet.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.db_url)
    print(f"database at {settings.db_url.split('@')[-1]} is up to date")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the fleet API."""
    import uvicorn

    from fleet.api.app import create_app
    from fleet.db.engine import make_engine, make_sessionmaker

    settings = _settings()
    app = create_app(make_sessionmaker(make_engine(settings.db_url)), settings=settings)
    uvicorn.run(app, host=args.host or settings.api_host, port=args.port or settings.api_port)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Run an ingest worker (or ``--processes N`` supervised ones) until SIGTERM or Ctrl-C."""
    from fleet.db.engine import make_engine, make_sessionmaker
    from fleet.ingest.supervisor import Supervisor, supervisor_gone
    from fleet.ingest.worker import IngestWorker, tune_gc
    from fleet.mqtt_url import parse_mqtt_url

    settings = _settings()
    processes = args.processes if args.processes is not None else settings.ingest_processes
    if processes < 1:
        raise SystemExit(f"palaute ingest: --processes must be at least 1, not {processes}")
    # --metrics-port wins over PALAUTE_METRICS_PORT; 0 (the default) serves nothing.
    metrics_port = (args.metrics_port if args.metrics_port is not None
                    else settings.metrics_port)
    if processes > 1:
        if not settings.ingest_shared_group:
            raise SystemExit(f"palaute ingest: --processes {processes} needs a shared "
                             "subscription, but PALAUTE_INGEST_SHARED_GROUP is empty: every "
                             "process would get every message; run one process")
        if metrics_port and metrics_port + processes - 1 > 65535:
            raise SystemExit(f"palaute ingest: metrics ports {metrics_port}…"
                             f"{metrics_port + processes - 1} do not fit below 65536")
        supervisor = Supervisor(processes, worker_id=args.worker_id or settings.mqtt_client_id,
                                metrics_port=metrics_port, metrics_host=args.metrics_host,
                                connect_timeout=args.connect_timeout)
        signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
        signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
        return supervisor.run()
    telemetry = None
    if settings.influx_url:
        from fleet.services.telemetry import InfluxTelemetry

        telemetry = InfluxTelemetry(settings.influx_url, settings.influx_token,
                                    settings.influx_org, settings.influx_bucket)
    worker = IngestWorker(settings,
                          make_sessionmaker(make_engine(settings.db_url, pre_ping=False)),
                          client_id=args.worker_id, telemetry=telemetry)
    server = None
    if metrics_port:
        from fleet.ingest.http import MetricsServer

        try:
            server = MetricsServer(worker.metrics, host=args.metrics_host, port=metrics_port,
                                   health=worker.health)
        except OSError as exc:
            raise SystemExit(f"palaute ingest: cannot serve metrics on "
                             f"{args.metrics_host}:{metrics_port}: {exc}") from None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tune_gc()
    worker.start()
    if server is not None:
        server.start()
    try:
        if not worker.wait_ready(args.connect_timeout):
            target = parse_mqtt_url(settings.mqtt_url)  # never print the password
            print(f"palaute ingest: could not connect and subscribe to "
                  f"{target.host}:{target.port} "
                  f"within {args.connect_timeout}s; still retrying", file=sys.stderr)
        logging.getLogger("palaute.ingest").info("ingest worker running")
        while not stop.wait(1.0):
            if args.supervisor_pid and supervisor_gone(args.supervisor_pid):
                # Nobody would restart or stop this worker any more: stop now, leaving
                # unacknowledged messages in its persistent session.
                logging.getLogger("palaute.ingest").error(
                    "supervisor (pid %d) is gone; stopping", args.supervisor_pid)
                break
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()
        if server is not None:
            server.stop()
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    """Run simulated terminals against a broker."""
    import json

    from fleet.mqtt_url import parse_mqtt_url
    from simulator.virtual import VirtualFleet

    target = parse_mqtt_url(args.mqtt_url)
    passwords: dict[str, str] = {}
    if args.credentials:
        try:
            passwords = json.loads(Path(args.credentials).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"palaute sim: cannot read credentials file: {exc}") from None

    async def run() -> None:
        fleet = VirtualFleet(Path(args.data_dir), target.host, target.port,
                             credentials=lambda d: (d, passwords.get(d, "")))
        for index in range(args.count):
            fleet.add(f"pt-{args.id_prefix}{index:0{12 - len(args.id_prefix)}x}")
        fleet.start()
        visitors = asyncio.create_task(fleet.visitors(presses_per_minute=args.rate))
        try:
            await asyncio.sleep(args.duration if args.duration else 10**9)
        finally:
            visitors.cancel()
            await fleet.stop()
            print(f"pressed {fleet.pressed}, still in flash {fleet.pending}")

    asyncio.run(run())
    return 0


def cmd_create_user(args: argparse.Namespace) -> int:
    """Create a user (the first admin, typically); prints a generated password once."""
    import secrets

    from fleet.db.engine import make_engine, make_sessionmaker
    from fleet.db.models import Role
    from fleet.services import audit
    from fleet.services.auth import AuthError, create_user

    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    generated = password is None
    password = password or secrets.token_urlsafe(18)
    settings = _settings()
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            user = create_user(session, email=args.email, password=password,
                               role=Role(args.role), name=args.name,
                               customer_id=args.customer_id)
            audit.record(session, user=None, action="create_user", entity="user",
                         entity_id=user.id, detail={"email": user.email, "via": "cli"})
    except AuthError as exc:
        print(f"palaute admin create-user: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(f"created {args.role} {args.email}")
    if generated:
        print(f"password (shown once): {password}")
    return 0


def cmd_create_token(args: argparse.Namespace) -> int:
    """Issue an API token for an existing user (e.g. an installer laptop); shown once."""
    from sqlalchemy import select

    from fleet.db.engine import make_engine, make_sessionmaker
    from fleet.db.models import User
    from fleet.services import audit
    from fleet.services.auth import AuthError, create_api_token

    settings = _settings()
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine).begin() as session:
            user = session.scalar(select(User).where(User.email == args.email.strip().lower()))
            if user is None:
                print(f"palaute admin create-token: no user {args.email}; create it first "
                      "with `palaute admin create-user`", file=sys.stderr)
                return 2
            issued = create_api_token(session, user=user, name=args.name)
            audit.record(session, user=None, action="create_token", entity="token",
                         entity_id=issued.id, detail={"name": args.name, "via": "cli"})
    except AuthError as exc:
        print(f"palaute admin create-token: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    print(issued.secret)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="palaute", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run broker, database, API, ingest and 20 terminals")
    demo.add_argument("--terminals", type=int, default=20)
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds and print a summary")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.add_argument("--port", type=int, default=8000, help="API port (another if busy)")
    demo.add_argument("--rate", type=float, default=12.0,
                      help="presses per terminal per minute")
    demo.add_argument("--data-dir", type=Path, default=None,
                      help="keep the database and terminal flash here (default: a temp dir)")
    demo.set_defaults(func=cmd_demo)

    serve = sub.add_parser("serve", help="run the fleet API (PALAUTE_DB_URL)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(func=cmd_serve)

    ingest = sub.add_parser("ingest", help="run an ingest worker (PALAUTE_MQTT_URL, _DB_URL)")
    ingest.add_argument("--worker-id", default=None,
                        help="MQTT client id; unique and stable per worker (persistent session)")
    ingest.add_argument("--connect-timeout", type=float, default=15.0)
    ingest.add_argument("--processes", type=int, default=None,
                        help="worker processes to start and supervise (client ids "
                             "<worker-id>-1…N, metrics ports from --metrics-port on); "
                             "default PALAUTE_INGEST_PROCESSES or 1")
    # Set by the supervisor for its children: stop when that process is gone.
    ingest.add_argument("--supervisor-pid", type=int, default=0, help=argparse.SUPPRESS)
    ingest.add_argument("--metrics-port", type=int, default=None,
                        help="serve /metrics and /healthz over HTTP on this port (0: off, "
                             "the default)")
    ingest.add_argument("--metrics-host", default="127.0.0.1",
                        help="address for --metrics-port (0.0.0.0 to let a remote "
                             "Prometheus scrape)")
    ingest.set_defaults(func=cmd_ingest)

    sim = sub.add_parser("sim", help="run simulated terminals against a broker")
    sim.add_argument("--mqtt-url", default="mqtt://127.0.0.1:1883")
    sim.add_argument("--count", type=int, default=20)
    sim.add_argument("--rate", type=float, default=12.0, help="presses per terminal per minute")
    sim.add_argument("--duration", type=float, default=None)
    sim.add_argument("--data-dir", default="sim-flash")
    sim.add_argument("--id-prefix", default="51", help="hex prefix of simulated device ids")
    sim.add_argument("--credentials", default=None,
                     help="JSON file mapping device id to MQTT password")
    sim.set_defaults(func=cmd_sim)

    db = sub.add_parser("db", help="database administration")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    admin = sub.add_parser("admin", help="user and token administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create_user = admin_sub.add_parser("create-user", help="create a user (e.g. the first admin)")
    create_user.add_argument("--email", required=True)
    create_user.add_argument("--role", required=True,
                             choices=["admin", "coordinator", "ops", "installer",
                                      "customer_viewer"])
    create_user.add_argument("--name", default="")
    create_user.add_argument("--customer-id", type=int, default=None,
                             help="required for customer_viewer")
    create_user.add_argument("--password-stdin", action="store_true",
                             help="read the password from standard input (default: generate)")
    create_user.set_defaults(func=cmd_create_user)
    create_token = admin_sub.add_parser("create-token", help="issue an API token for a user")
    create_token.add_argument("--email", required=True)
    create_token.add_argument("--name", required=True, help="where it is used")
    create_token.set_defaults(func=cmd_create_token)

    from fleet.content.cli import add_content_parser
    from fleet.firmware_bundle import add_firmware_parser
    from fleet.pinmaps import add_hardware_parser
    from fleet.reports_cli import add_report_parser
    from fleet.rollouts.cli import add_rollout_parser

    add_hardware_parser(sub)
    add_firmware_parser(sub)
    add_report_parser(sub)
    add_rollout_parser(sub)
    add_content_parser(sub)

    from fleet.broker.cli import add_broker_parser

    add_broker_parser(sub)

    from installer.flash import add_flash_parser

    add_flash_parser(sub)

    from installer.provision import add_provision_parser

    add_provision_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``palaute`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Alembic narrates every plugin and migration step at INFO; keep startup readable.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
