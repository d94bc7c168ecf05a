"""Report latency and rollup-trigger overhead on a year of one busy site.

    .venv/bin/python -m bench.reports_bench [--days 365] [--per-day 2000] [--only sqlite]

For SQLite and for a throw-away PostgreSQL server (tests.services.postgres, durability off):

1. generates ``--days`` days of ``--per-day`` votes for one site in Europe/Helsinki (three
   devices, mostly during opening hours 08:00-21:00, 45/30/15/10 % over four buttons, 2 %
   abuse-filtered, 0.5 % test mode, a new content version each quarter).  The votes are bulk
   inserted (COPY on PostgreSQL) with the triggers in place, so the rollups are built by the
   same triggers ingest fires;
2. times the yearly report by day and a monthly report by hour (p50/p95 of ``--runs`` runs
   through ``fleet.services.reports.site_report`` in a fresh session), plus the same reports
   computed from the raw votes for comparison;
3. measures ingest throughput through ``store_batches`` (50-vote messages, one commit per
   message and one per 20 messages) with the rollup triggers enabled and disabled, in
   alternating rounds, and prints the ratio.

Numbers go to stdout; docs/reports.md quotes a run.  Takes about two minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import upgrade
from fleet.db.models import Vote as VoteRow
from fleet.db.models import VoteRollup
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.services import registry
from fleet.services.reports import Granularity, ReportQuery, Source, site_report
from fleet.services.votes import store_batches

ZONE = "Europe/Helsinki"
DEVICES = ("pt-0000000be001", "pt-0000000be002", "pt-0000000be003")
FIRST_DAY = date(2026, 1, 1)
VOTE_COLUMNS = ("device_id", "seq", "ts_ms", "button", "flags", "content_version", "site_id",
                "received_ms")
TRIGGERS = ("vote_rollups_insert", "vote_rollups_delete", "vote_rollups_update")


def generate(days: int, per_day: int, site_id: int, seed: int = 2026
             ) -> dict[str, list[tuple[Any, ...]]]:
    """Vote rows per device, in seq (= time) order."""
    rng = random.Random(seed)
    zone = ZoneInfo(ZONE)
    by_device: dict[str, list[tuple[int, int, int, int]]] = {d: [] for d in DEVICES}
    for offset in range(days):
        day = FIRST_DAY + timedelta(days=offset)
        midnight = int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp() * 1000)
        version = 1 + (day.month - 1) // 3
        for _ in range(per_day):
            # 95 % while open (08:00-21:00 local), the rest at any hour.
            if rng.random() < 0.95:
                clock = rng.randrange(8 * 3_600_000, 21 * 3_600_000)
            else:
                clock = rng.randrange(86_400_000)
            flags = ((1 if rng.random() < 0.02 else 0) | (4 if rng.random() < 0.005 else 0)
                     | (2 if rng.random() < 0.003 else 0))
            button = rng.choices((1, 2, 3, 4), weights=(45, 30, 15, 10))[0]
            by_device[rng.choice(DEVICES)].append((midnight + clock, button, flags, version))
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for device, votes in by_device.items():
        votes.sort()
        rows[device] = [(device, seq, ts, button, flags, version, site_id, ts + 5_000)
                        for seq, (ts, button, flags, version) in enumerate(votes, 1)]
    return rows


def set_up(url: str) -> tuple[Engine, sessionmaker[Session], int]:
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Bench Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Busy shop",
                                    timezone=ZONE)
        site.opening_hours = ('{"mon": [["08:00", "21:00"]], "tue": [["08:00", "21:00"]], '
                              '"wed": [["08:00", "21:00"]], "thu": [["08:00", "21:00"]], '
                              '"fri": [["08:00", "21:00"]], "sat": [["10:00", "18:00"]]}')
        for device in DEVICES:
            registry.register_device(session, device_id=device)
            registry.assign_device(session, device_id=device, site_id=site.id, at_ms=0)
        site_id = site.id
    return engine, sessions, site_id


def bulk_insert(engine: Engine, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    """Insert every vote in one transaction, triggers enabled (they build the rollups)."""
    raw = engine.raw_connection()
    try:
        cursor: Any = raw.cursor()
        if engine.dialect.name == "postgresql":
            with cursor.copy(f"COPY votes ({', '.join(VOTE_COLUMNS)}) FROM STDIN") as copy:
                for device_rows in rows.values():
                    for row in device_rows:
                        copy.write_row(row)
        else:
            marks = ", ".join("?" for _ in VOTE_COLUMNS)
            for device_rows in rows.values():
                cursor.executemany(
                    f"INSERT INTO votes ({', '.join(VOTE_COLUMNS)}) VALUES ({marks})",
                    device_rows)
        raw.commit()
        cursor.close()
    finally:
        raw.close()
    # Fresh statistics, as a long-running database would have; on PostgreSQL also the
    # visibility map (autovacuum would get there too; now, so timings do not depend on when).
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE votes"))
            conn.execute(text("VACUUM ANALYZE vote_rollups"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1000, p95 * 1000


def time_report(sessions: sessionmaker[Session], site_id: int, start: date, end: date,
                granularity: Granularity, runs: int, source: Source = "rollups",
                **options: Any) -> tuple[float, float, int]:
    query = ReportQuery(start, end, granularity=granularity, source=source, **options)
    samples = []
    total = 0
    for run in range(runs + 2):
        began = time.perf_counter()
        with sessions() as session:
            report = site_report(session, site_id, query)
        if run >= 2:  # two warm-up runs: connection pool, plan and page caches
            samples.append(time.perf_counter() - began)
        total = report.series[0].totals.total
    p50, p95 = percentiles(samples)
    return p50, p95, total


@contextmanager
def triggers_disabled(engine: Engine) -> Iterator[None]:
    """Switch the rollup triggers off for the duration (a benchmark-only trick)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            for name in TRIGGERS:
                conn.execute(text(f"ALTER TABLE votes DISABLE TRIGGER {name}"))
            saved: list[str] = []
        else:
            saved = list(conn.execute(text(
                "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'votes'"
            )).scalars())
            for name in TRIGGERS:
                conn.execute(text(f"DROP TRIGGER {name}"))
    try:
        yield
    finally:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                for name in TRIGGERS:
                    conn.execute(text(f"ALTER TABLE votes ENABLE TRIGGER {name}"))
            else:
                for sql in saved:
                    conn.execute(text(sql))


class Ingest:
    """Feeds store_batches with 50-vote messages continuing each device's seq and clock."""

    def __init__(self, sessions: sessionmaker[Session], start_ms: int) -> None:
        self.sessions = sessions
        with sessions() as session:
            self.seq = {d: int(session.scalar(select(func.max(VoteRow.seq))
                                             .where(VoteRow.device_id == d)) or 0)
                        for d in DEVICES}
        self.clock = start_ms
        self.rng = random.Random(5)
        self.turn = 0

    def message(self) -> VoteBatch:
        device = DEVICES[self.turn % len(DEVICES)]
        self.turn += 1
        votes = []
        for _ in range(50):
            self.seq[device] += 1
            self.clock += 43_000  # 2,000 votes a day
            votes.append(Vote(self.seq[device], self.clock, self.rng.randint(1, 4), 0, 9))
        return VoteBatch(device, tuple(votes), self.seq[device] - 50)

    def run(self, messages: int, per_commit: int) -> float:
        """Votes per second storing ``messages`` messages, ``per_commit`` per transaction."""
        batches = [self.message() for _ in range(messages)]
        began = time.perf_counter()
        for index in range(0, messages, per_commit):
            with self.sessions.begin() as session:
                store_batches(session, batches[index:index + per_commit], received_ms=1)
        return messages * 50 / (time.perf_counter() - began)


def insert_overhead(engine: Engine, sessions: sessionmaker[Session], per_commit: int,
                    messages: int, rounds: int) -> tuple[float, float]:
    """Median votes/s with and without the triggers, alternating rounds to share noise."""
    ingest = Ingest(sessions, int(datetime(2027, 1, 2, tzinfo=ZoneInfo(ZONE)).timestamp()
                                  * 1000))
    ingest.run(messages // 2, per_commit)  # warm-up
    with_trigger: list[float] = []
    without: list[float] = []
    for _ in range(rounds):
        with_trigger.append(ingest.run(messages, per_commit))
        with triggers_disabled(engine):
            without.append(ingest.run(messages, per_commit))
    return statistics.median(with_trigger), statistics.median(without)


def bench(name: str, url: str, args: argparse.Namespace) -> list[str]:
    lines = [f"## {name}"]
    engine, sessions, site_id = set_up(url)
    rows = generate(args.days, args.per_day, site_id)
    count = sum(len(r) for r in rows.values())
    began = time.perf_counter()
    bulk_insert(engine, rows)
    load_s = time.perf_counter() - began
    with sessions() as session:
        rollups = session.scalar(select(func.count()).select_from(VoteRollup)) or 0
    lines.append(f"votes: {count:,}; rollup rows: {rollups:,} ({count / max(rollups, 1):.1f} "
                 f"votes per row); bulk load with triggers: {load_s:.1f} s")
    last = FIRST_DAY + timedelta(days=args.days - 1)
    month = (date(2026, 3, 1), date(2026, 3, 31))  # includes the spring DST change
    cases: list[tuple[str, date, date, Granularity, dict[str, Any]]] = [
        ("year by day", FIRST_DAY, last, "day", {}),
        ("month by hour", *month, "hour", {}),
        ("year by day, opening hours only", FIRST_DAY, last, "day",
         {"opening_hours_only": True}),
        ("year by week, raw, by content version", FIRST_DAY, last, "week",
         {"filtered": False, "by": "content_version"}),
    ]
    lines.append("| report | p50 ms | p95 ms | votes counted | from raw votes, p50 ms |")
    lines.append("|---|---:|---:|---:|---:|")
    for label, start, end, granularity, options in cases:
        p50, p95, total = time_report(sessions, site_id, start, end, granularity, args.runs,
                                      **options)
        raw50, _, raw_total = time_report(sessions, site_id, start, end, granularity, 3,
                                          source="votes", **options)
        assert raw_total == total, (label, raw_total, total)
        lines.append(f"| {label} | {p50:.1f} | {p95:.1f} | {total:,} | {raw50:.0f} |")
    for per_commit in (1, 20):
        on, off = insert_overhead(engine, sessions, per_commit, args.messages, args.rounds)
        lines.append(f"ingest, {per_commit} message(s) of 50 votes per commit: "
                     f"{on:,.0f} votes/s with triggers, {off:,.0f} without: "
                     f"ratio {on / off:.2f}")
    engine.dispose()
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on SQLite and PostgreSQL and print the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.reports_bench",
                                     description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--per-day", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per report")
    parser.add_argument("--messages", type=int, default=100,
                        help="50-vote messages per insert round")
    parser.add_argument("--rounds", type=int, default=5, help="insert rounds with/without")
    parser.add_argument("--only", choices=("sqlite", "postgres"), default=None)
    args = parser.parse_args(argv)

    print(f"# reports benchmark: {args.days} days x {args.per_day} votes, "
          f"{platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="palaute-bench-") as tmp:
        workdir = Path(tmp)
        if args.only in (None, "sqlite"):
            print("\n".join(bench("SQLite", f"sqlite:///{workdir / 'bench.db'}", args)))
        if args.only in (None, "postgres"):
            from tests.services.postgres import PostgresServer

            server = PostgresServer(workdir / "postgres")
            try:
                server.start()
                with server.connect() as conn:
                    version = conn.execute("SHOW server_version").fetchone()
                url = server.create_database("bench")
                lines = bench(f"PostgreSQL {version[0] if version else '?'} (fsync off)", url,
                              args)
            finally:
                server.close()
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
