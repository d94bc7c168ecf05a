"""``palaute report``: a vote report straight from the database (PALAUTE_DB_URL), no API.

    palaute report --site 3 --from 2026-01-01 --to 2026-12-31 --granularity month --format csv

It calls the same service as ``GET /api/v1/reports/...`` (fleet/services/reports.py), so the
numbers are the API's.  Whoever can run it can read the database, so there are no roles here.
Errors (unknown site, bad date, ``--from`` after ``--to``) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path

# The service's options, spelled out so that `palaute --help` does not import SQLAlchemy
# (tests/fleet/test_reports.py checks they match fleet.services.reports).
GRANULARITIES = ("hour", "day", "week", "month")
BY_OPTIONS = ("content_version", "device", "site")


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date; use YYYY-MM-DD") from None


def cmd_report(args: argparse.Namespace) -> int:
    """Print (or write to ``--output``) the report the arguments ask for."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from fleet.config import Settings
    from fleet.db.engine import make_engine, make_sessionmaker
    from fleet.services.reports import (
        ReportError,
        ReportNotFound,
        ReportQuery,
        customer_report,
        device_report,
        report_to_csv,
        report_to_dict,
        site_report,
    )

    def fail(message: str, code: int = 2) -> int:
        print(f"palaute report: {message}", file=sys.stderr)
        return code

    if args.start > args.end:
        return fail(f"--from {args.start} is after --to {args.end}")
    query = ReportQuery(start=args.start, end=args.end, granularity=args.granularity,
                        filtered=not args.raw, include_test=args.include_test,
                        opening_hours_only=args.opening_hours_only, by=args.by,
                        buttons=args.buttons)
    try:
        query.check()
    except ReportError as exc:
        return fail(str(exc))
    try:
        url = Settings().db_url
    except ValidationError as exc:
        return fail(f"invalid settings: {exc.errors()[0]['msg']}")
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as session:
            if args.site is not None:
                report = site_report(session, args.site, query)
            elif args.device is not None:
                report = device_report(session, args.device, query)
            else:
                report = customer_report(session, args.customer, query)
    except (ReportNotFound, ReportError) as exc:
        return fail(str(exc))
    except SQLAlchemyError as exc:
        where = url.split("@")[-1]
        return fail(f"cannot read the database at {where} ({type(exc).__name__}); check "
                    "PALAUTE_DB_URL and run `palaute db upgrade`", code=1)
    finally:
        engine.dispose()
    text = (report_to_csv(report) if args.format == "csv"
            else json.dumps(report_to_dict(report), indent=2) + "\n")
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0


def add_report_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``report`` to the ``palaute`` command's sub-commands."""
    report = subparsers.add_parser(
        "report", help="vote report of a site, device or customer (PALAUTE_DB_URL)",
        description="Votes per button and local period with Happy Index and CSAT, read "
                    "straight from the database (docs/reports.md).")
    target = report.add_mutually_exclusive_group(required=True)
    target.add_argument("--site", type=int, help="site id")
    target.add_argument("--device", help="device id (pt-...)")
    target.add_argument("--customer", type=int, help="customer id (all its sites)")
    report.add_argument("--from", dest="start", type=_date, required=True, metavar="YYYY-MM-DD",
                        help="first local date")
    report.add_argument("--to", dest="end", type=_date, required=True, metavar="YYYY-MM-DD",
                        help="last local date (inclusive)")
    report.add_argument("--granularity", choices=GRANULARITIES, default="day")
    report.add_argument("--raw", action="store_true",
                        help="count votes flagged by the abuse rule too (default: filtered)")
    report.add_argument("--include-test", action="store_true", help="count test-mode votes")
    report.add_argument("--opening-hours-only", action="store_true",
                        help="count only votes pressed during the site's opening hours")
    report.add_argument("--by", choices=BY_OPTIONS, default=None,
                        help="one series per content version, device or site")
    report.add_argument("--buttons", type=int, choices=range(2, 6), default=None,
                        help="buttons per site (default: the highest one recorded)")
    report.add_argument("--format", choices=("csv", "json"), default="csv",
                        help="default: csv")
    report.add_argument("--output", type=Path, default=None, metavar="FILE",
                        help="write here (default: standard output)")
    report.set_defaults(func=cmd_report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fleet.reports_cli report ...`` (as ``palaute report ...``)."""
    parser = argparse.ArgumentParser(prog="palaute")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
