"""``palaute rollout create|status|pause|resume|abort|run`` (PALAUTE_DB_URL, PALAUTE_MQTT_URL).

The commands call the same service as ``/api/v1/rollouts`` (fleet/rollouts/service.py),
straight on the database: whoever can run them can read it, so there are no roles here.
``run`` is the engine process (docs/operations.md).  Errors print one line saying what to do
and exit with 2 (1 when the database cannot be reached).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import Any


def _fail(message: str, code: int = 2) -> int:
    print(f"palaute rollout: {message}", file=sys.stderr)
    return code


def _with_session(work: Callable[[Any], int]) -> int:
    """Run ``work(session)`` in one transaction with the settings' database."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.config import Settings
    from fleet.db.engine import make_engine, make_sessionmaker
    from fleet.services.registry import RegistryError

    try:
        url = Settings().db_url
    except ValidationError as exc:
        return _fail(f"invalid settings: {exc.errors()[0]['msg']}")
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            return work(session)
    except RegistryError as exc:
        return _fail(str(exc))
    except SQLAlchemyError as exc:
        return _fail(f"cannot use the database at {url.split('@')[-1]} "
                     f"({type(exc).__name__}); check PALAUTE_DB_URL and run "
                     "`palaute db upgrade`", code=1)
    finally:
        engine.dispose()


def _print_status(session: Any, rollout_id: int) -> None:
    from fleet.rollouts import service
    from fleet.rollouts.engine import waves_of

    rollout = service.get_rollout(session, rollout_id=rollout_id)
    counts = service.rollout_counts(session, rollout_id)
    waves = waves_of(rollout)
    print(f"rollout {rollout.id}: content version {rollout.content_version} to "
          f"{rollout.target_kind} {rollout.target_ref}, {rollout.state.value}"
          + (f" ({rollout.state_reason})" if rollout.state_reason else ""))
    print(f"waves: canary, then {', '.join(f'{p}%' for p in waves)}; current wave "
          f"{rollout.current_wave if rollout.current_wave >= 0 else 'none yet'}; success "
          f"{rollout.success_threshold}%, failure {rollout.failure_threshold}%, device "
          f"timeout {rollout.device_timeout_s}s")
    states = ("pending", "offline", "delivered", "applied", "refused", "timed_out",
              "superseded", "retired")
    print(f"{'wave':<8}" + "".join(f"{s:>11}" for s in states) + f"{'total':>8}")
    rows = [(str(w), counts.waves[w]) for w in sorted(counts.waves)] + [("all", counts.total)]
    for name, per_state in rows:
        print(f"{name:<8}" + "".join(f"{per_state.get(s, 0):>11}" for s in states)
              + f"{sum(per_state.values()):>8}")
    refused = [r for r in service.rollout_devices(session, rollout_id)
               if r.state == "refused" and r.reason]
    for row in refused:
        print(f"refused: {row.device_id} ({row.reason})")


def cmd_create(args: argparse.Namespace) -> int:
    """Create a rollout and print its status."""
    from fleet.rollouts import service
    from fleet.rollouts.packages import StoredPackages

    kinds = [k for k in ("device", "site", "customer", "selection")
             if getattr(args, k) is not None]
    plan = service.RolloutPlan(
        content_version=args.version, target_kind=kinds[0],
        target_ref=str(getattr(args, kinds[0])), canary=args.canary or [],
        waves=args.waves, success_threshold=args.success, failure_threshold=args.failure,
        device_timeout_s=args.timeout)

    def work(session: Any) -> int:
        rollout = service.create_rollout(session, plan=plan, packages=StoredPackages())
        session.flush()
        _print_status(session, rollout.id)
        return 0

    return _with_session(work)


def cmd_status(args: argparse.Namespace) -> int:
    """Print counts per state and per wave."""
    def work(session: Any) -> int:
        _print_status(session, args.rollout_id)
        return 0

    return _with_session(work)


def cmd_change(args: argparse.Namespace) -> int:
    """Pause, resume or abort."""
    from fleet.rollouts import service

    action = getattr(service, f"{args.rollout_command}_rollout")

    def work(session: Any) -> int:
        rollout = action(session, rollout_id=args.rollout_id)
        print(f"rollout {rollout.id} is {rollout.state.value}")
        return 0

    return _with_session(work)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the engine until SIGTERM or Ctrl-C."""
    from pydantic import ValidationError

    from fleet.config import Settings
    from fleet.db.engine import make_engine, make_sessionmaker
    from fleet.rollouts.runner import RolloutRunner

    try:
        settings = Settings()
    except ValidationError as exc:
        return _fail(f"invalid settings: {exc.errors()[0]['msg']}")
    runner = RolloutRunner(settings, make_sessionmaker(make_engine(settings.db_url)),
                           interval_s=settings.rollout_tick_s, client_id=args.client_id)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()
    return 0


def _percentages(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of percentages such as "
                                         "10,50,100") from None


def add_rollout_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``rollout`` to the ``palaute`` command's sub-commands."""
    rollout = subparsers.add_parser("rollout", help="send content to terminals in waves "
                                    "(PALAUTE_DB_URL; `run` also PALAUTE_MQTT_URL)")
    sub = rollout.add_subparsers(dest="rollout_command", required=True)
    create = sub.add_parser("create", help="start a rollout")
    create.add_argument("--version", type=int, required=True, help="content version")
    target = create.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", help="one device id")
    target.add_argument("--site", type=int, help="every device standing at this site")
    target.add_argument("--customer", type=int, help="every device at this customer's sites")
    target.add_argument("--selection", type=int, help="a saved selection's id")
    create.add_argument("--canary", action="append", metavar="DEVICE",
                        help="a device updated first (repeat for more)")
    create.add_argument("--waves", type=_percentages, default=[100],
                        help="cumulative percentages of the rest, e.g. 10,50,100")
    create.add_argument("--success", type=int, default=90,
                        help="percent of a wave that must apply before the next (90)")
    create.add_argument("--failure", type=int, default=10,
                        help="percent refused or timed out that halts the rollout (10)")
    create.add_argument("--timeout", type=int, default=900,
                        help="seconds a device may take before it is timed out (900)")
    create.set_defaults(func=cmd_create)
    status = sub.add_parser("status", help="counts per state and per wave")
    status.add_argument("rollout_id", type=int)
    status.set_defaults(func=cmd_status)
    for name, text in (("pause", "stop starting waves"),
                       ("resume", "run a paused or halted rollout again"),
                       ("abort", "give up; devices that did not apply get desired cleared")):
        change = sub.add_parser(name, help=text)
        change.add_argument("rollout_id", type=int)
        change.set_defaults(func=cmd_change)
    run = sub.add_parser("run", help="run the rollout engine (ticks every "
                         "PALAUTE_ROLLOUT_TICK_S seconds)")
    run.add_argument("--client-id", default="palaute-rollouts",
                     help="MQTT client id, unique per engine process")
    run.set_defaults(func=cmd_run)
    return rollout
