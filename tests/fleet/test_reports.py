"""Reports: local-time buckets (DST, +05:45), metrics, flags, opening hours, access, CSV, CLI.

Every test runs on SQLite and PostgreSQL, stores votes through the real ingest path
(``store_batches``, so the rollup triggers run) and reads them back through the service, the
API or the CLI.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from fleet import reports_cli
from fleet.api.app import create_app
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Role, Site
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.services import registry, reports
from fleet.services.reports import (
    Report,
    ReportError,
    ReportNotFound,
    ReportQuery,
    csat_top,
    customer_report,
    device_report,
    happy_weight,
    site_report,
)
from fleet.services.votes import store_batches
from tests.fleet.auth_helpers import make_user

HELSINKI = "Europe/Helsinki"
KATHMANDU = "Asia/Kathmandu"
DEV = "pt-00000000000a"


# -- helpers (also used by test_rollups.py) ---------------------------------------------------

def at(zone: str, local: str, fold: int = 0) -> int:
    """Epoch ms of local wall-clock time ``local`` (ISO) in ``zone``."""
    naive = datetime.fromisoformat(local)
    return int(naive.replace(tzinfo=ZoneInfo(zone), fold=fold).timestamp() * 1000)


class Fleet:
    """A database with registry helpers and a per-device seq counter."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sessions: sessionmaker[Session] = make_sessionmaker(make_engine(url))
        self.seq: dict[str, int] = {}

    def customer(self, name: str) -> int:
        with self.sessions.begin() as session:
            return registry.create_customer(session, name=name).id

    def site(self, customer_id: int, name: str, zone: str = HELSINKI, *,
             hours: dict[str, Any] | None = None,
             exceptions: dict[str, Any] | None = None) -> int:
        with self.sessions.begin() as session:
            site = registry.create_site(session, customer_id=customer_id, name=name,
                                        timezone=zone)
            # Stored as the API stores them: JSON text on the site row.
            site.opening_hours = json.dumps(hours or {})
            site.opening_exceptions = json.dumps(exceptions or {})
            return site.id

    def device(self, device_id: str, site_id: int, at_ms: int = 0) -> str:
        with self.sessions.begin() as session:
            registry.register_device(session, device_id=device_id)
            registry.assign_device(session, device_id=device_id, site_id=site_id, at_ms=at_ms)
        return device_id

    def move(self, device_id: str, site_id: int, at_ms: int) -> None:
        with self.sessions.begin() as session:
            registry.assign_device(session, device_id=device_id, site_id=site_id, at_ms=at_ms)

    def votes(self, device_id: str, votes: Iterable[tuple[int, int, int, int]]) -> list[Vote]:
        """Store ``(ts_ms, button, flags, content_version)`` votes in 50-vote batches."""
        made = []
        for ts_ms, button, flags, content_version in votes:
            self.seq[device_id] = self.seq.get(device_id, 0) + 1
            made.append(Vote(self.seq[device_id], ts_ms, button, flags, content_version))
        self.store(device_id, made)
        return made

    def store(self, device_id: str, votes: Sequence[Vote]) -> None:
        batches = [VoteBatch(device_id, tuple(votes[i:i + 50]))
                   for i in range(0, len(votes), 50)]
        with self.sessions.begin() as session:
            store_batches(session, batches, received_ms=1)

    def report(self, site_id: int, start: str, end: str | None = None, **options: Any
               ) -> Report:
        query = ReportQuery(date.fromisoformat(start), date.fromisoformat(end or start),
                            **options)
        with self.sessions() as session:
            return site_report(session, site_id, query)


def totals(report: Report, series: int = 0) -> dict[str, int]:
    """``{start: total}`` of a report's buckets (``start~1`` for fold 1)."""
    return {b.start + ("~1" if b.fold else ""): b.total for b in report.series[series].buckets}


def nonzero(report: Report, series: int = 0) -> dict[str, int]:
    return {key: value for key, value in totals(report, series).items() if value}


# -- local time -------------------------------------------------------------------------------

def test_helsinki_dst_days_and_hours(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    fleet.device(DEV, site)
    fleet.votes(DEV, [(at(HELSINKI, t, fold), 1, 0, 1) for t, fold in [
        ("2026-03-28T23:59", 0), ("2026-03-29T00:00", 0), ("2026-03-29T02:59", 0),
        ("2026-03-29T04:00", 0),  # 03:00-04:00 does not exist: clocks jump at 01:00 UTC
        ("2026-03-29T23:59", 0), ("2026-03-30T00:00", 0),  # 21:00 UTC on the 29th
        ("2026-10-25T03:30", 0), ("2026-10-25T03:30", 1),  # the repeated hour, twice
        ("2026-10-25T23:59", 0), ("2026-10-26T00:00", 0),
    ]])
    spring = fleet.report(site, "2026-03-28", "2026-03-30")
    assert totals(spring) == {"2026-03-28": 1, "2026-03-29": 4, "2026-03-30": 1}
    autumn = fleet.report(site, "2026-10-25", "2026-10-26")
    assert totals(autumn) == {"2026-10-25": 3, "2026-10-26": 1}

    spring_hours = fleet.report(site, "2026-03-29", granularity="hour")
    hours = [b.start[11:] for b in spring_hours.series[0].buckets]
    assert len(hours) == 23 and "03:00" not in hours
    assert nonzero(spring_hours) == {"2026-03-29T00:00": 1, "2026-03-29T02:00": 1,
                                     "2026-03-29T04:00": 1, "2026-03-29T23:00": 1}
    autumn_hours = fleet.report(site, "2026-10-25", granularity="hour")
    assert len(autumn_hours.series[0].buckets) == 25
    assert nonzero(autumn_hours) == {"2026-10-25T03:00": 1, "2026-10-25T03:00~1": 1,
                                     "2026-10-25T23:00": 1}


def test_kathmandu_quarter_hour_offset(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Kathmandu", KATHMANDU,
                      hours={"mon": [["09:00", "17:00"]], "tue": [["09:00", "17:00"]]})
    fleet.device(DEV, site)
    utc = "UTC"
    fleet.votes(DEV, [
        (at(utc, "2026-06-01T18:14:59"), 1, 0, 1),  # 23:59:59 on Monday 1 June, local
        (at(utc, "2026-06-01T18:15:00"), 2, 0, 1),  # 00:00 on Tuesday 2 June, local
        (at(utc, "2026-06-02T03:14:00"), 3, 0, 1),  # 08:59 local: closed
        (at(utc, "2026-06-02T03:15:00"), 4, 0, 1),  # 09:00 local: open
        (at(utc, "2026-06-02T11:14:00"), 4, 0, 1),  # 16:59 local: open
        (at(utc, "2026-06-02T11:15:00"), 4, 0, 1),  # 17:00 local: closed
    ])
    assert totals(fleet.report(site, "2026-06-01", "2026-06-02")) == {
        "2026-06-01": 1, "2026-06-02": 5}
    hours = fleet.report(site, "2026-06-02", granularity="hour")
    assert nonzero(hours) == {"2026-06-02T00:00": 1, "2026-06-02T08:00": 1,
                              "2026-06-02T09:00": 1, "2026-06-02T16:00": 1,
                              "2026-06-02T17:00": 1}
    assert totals(fleet.report(site, "2026-06-01", "2026-06-02", opening_hours_only=True)) == {
        "2026-06-01": 0, "2026-06-02": 2}


def test_iso_weeks_and_months_in_local_time(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    fleet.device(DEV, site)
    fleet.votes(DEV, [(at(HELSINKI, t), 1, 0, 1) for t in [
        "2026-03-29T12:00",  # Sunday: ISO week starting Monday 23 March
        "2026-03-30T00:30",  # Monday
        "2026-03-31T23:30",  # 20:30 UTC, still March locally
        "2026-04-01T00:30",  # 21:30 UTC on 31 March, April locally
    ]])
    weeks = fleet.report(site, "2026-03-25", "2026-04-05", granularity="week")
    assert totals(weeks) == {"2026-03-23": 1, "2026-03-30": 3}
    months = fleet.report(site, "2026-03-01", "2026-04-30", granularity="month")
    assert totals(months) == {"2026-03-01": 3, "2026-04-01": 1}


# -- metrics ----------------------------------------------------------------------------------

def test_metric_definitions() -> None:
    assert [round(happy_weight(b, 4), 1) for b in range(1, 5)] == [100.0, 66.7, 33.3, 0.0]
    assert [happy_weight(b, 5) for b in range(1, 6)] == [100.0, 75.0, 50.0, 25.0, 0.0]
    assert [happy_weight(b, 2) for b in (1, 2)] == [100.0, 0.0]
    assert (csat_top(2), csat_top(3), csat_top(4), csat_top(5)) == (1, 2, 2, 2)


@pytest.mark.parametrize(("buttons", "counts", "happy", "csat"), [
    (2, [3, 1], 75.0, 75.0),
    (4, [1, 1, 1, 1], 50.0, 50.0),
    (4, [3, 1, 0, 0], 91.7, 100.0),
    (5, [2, 1, 1, 0, 1], 65.0, 60.0),
])
def test_happy_index_and_csat(db_url: str, buttons: int, counts: list[int], happy: float,
                              csat: float) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    fleet.device(DEV, site)
    noon = at(HELSINKI, "2026-05-04T12:00")
    # One vote on the site's last button on another day, so that N is inferred from the
    # votes (the site's highest button) even where the day itself has none.
    fleet.votes(DEV, [(noon - 86_400_000, buttons, 0, 1)] + [
        (noon, button, 0, 1) for button, n in enumerate(counts, 1) for _ in range(n)])
    report = fleet.report(site, "2026-05-04")
    bucket = report.series[0].buckets[0]
    assert (report.buttons, report.sites[0].buttons) == (buttons, buttons)
    assert list(bucket.counts) == counts
    assert (bucket.happy_index, bucket.csat) == (happy, csat)
    explicit = fleet.report(site, "2026-05-04", buttons=5).series[0].buckets[0]
    weights = [happy_weight(b, 5) for b in range(1, 6)]
    assert explicit.happy_index == round(
        sum(w * c for w, c in zip(weights, counts, strict=False)) / sum(counts), 1)


def test_buttons_default_and_explicit_too_few(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    empty = fleet.report(site, "2026-05-04")
    assert empty.buttons == 4 and empty.series[0].buckets[0].happy_index is None
    fleet.device(DEV, site)
    fleet.votes(DEV, [(at(HELSINKI, "2026-05-04T12:00"), 5, 0, 1)])
    with pytest.raises(ReportError, match="button 5"):
        fleet.report(site, "2026-05-04", buttons=4)


def test_filtered_raw_and_test_mode(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    fleet.device(DEV, site)
    noon = at(HELSINKI, "2026-05-04T12:00")
    fleet.votes(DEV, [(noon, 1, 0, 1), (noon, 1, 1, 1),  # counted, abuse-filtered
                      (noon, 2, 4, 1), (noon, 2, 5, 1),  # test mode, test + filtered
                      (noon, 3, 2, 1)])  # time not synced: counted like any other
    def counts(**options: Any) -> list[int]:
        return list(fleet.report(site, "2026-05-04", buttons=4, **options)
                    .series[0].buckets[0].counts)
    assert counts() == [1, 0, 1, 0]
    assert counts(filtered=False) == [2, 0, 1, 0]
    assert counts(include_test=True) == [1, 1, 1, 0]
    assert counts(filtered=False, include_test=True) == [2, 2, 1, 0]


# -- opening hours ----------------------------------------------------------------------------

WEEKDAY = [["08:00", "12:00"], ["13:00", "17:30"]]
HOURS = {"mon": WEEKDAY, "tue": WEEKDAY, "wed": WEEKDAY, "thu": WEEKDAY, "fri": WEEKDAY,
         "sat": [["10:10", "14:50"]]}  # not on quarter hours: edges come from raw votes
EXCEPTIONS = {"2026-12-24": [["08:00", "12:00"]], "2026-12-25": []}


def test_opening_hours_and_exceptions(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Shop", hours=HOURS, exceptions=EXCEPTIONS)
    fleet.device(DEV, site)
    fleet.votes(DEV, [(at(HELSINKI, t), 1, 0, 1) for t in [
        "2026-12-21T07:59", "2026-12-21T08:00", "2026-12-21T11:59", "2026-12-21T12:00",
        "2026-12-21T17:29", "2026-12-21T17:30",  # Monday: 3 open
        "2026-12-24T11:59", "2026-12-24T13:30",  # Christmas Eve: closes at 12
        "2026-12-25T10:00",  # Christmas Day: closed
        "2026-12-26T10:09", "2026-12-26T10:10", "2026-12-26T10:14", "2026-12-26T12:00",
        "2026-12-26T14:49", "2026-12-26T14:50",  # Saturday 10:10-14:50: 4 open
        "2026-12-27T12:00",  # Sunday: no hours, closed
    ]])
    everything = fleet.report(site, "2026-12-21", "2026-12-27")
    assert sum(totals(everything).values()) == 16
    open_only = fleet.report(site, "2026-12-21", "2026-12-27", opening_hours_only=True)
    assert nonzero(open_only) == {"2026-12-21": 3, "2026-12-24": 1, "2026-12-26": 4}
    for granularity in ("hour", "day", "week"):
        from_rollups = fleet.report(site, "2026-12-21", "2026-12-27", granularity=granularity,
                                    opening_hours_only=True)
        from_votes = fleet.report(site, "2026-12-21", "2026-12-27", granularity=granularity,
                                  opening_hours_only=True, source="votes")
        assert from_rollups.series == from_votes.series


def test_site_without_opening_hours_counts_everything(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby", exceptions={"2026-12-25": []})
    fleet.device(DEV, site)
    fleet.votes(DEV, [(at(HELSINKI, "2026-12-24T03:00"), 1, 0, 1),
                      (at(HELSINKI, "2026-12-25T12:00"), 1, 0, 1)])
    report = fleet.report(site, "2026-12-24", "2026-12-25", opening_hours_only=True)
    assert totals(report) == {"2026-12-24": 1, "2026-12-25": 0}


# -- scope ------------------------------------------------------------------------------------

def test_device_moved_between_sites(db_url: str) -> None:
    fleet = Fleet(db_url)
    customer = fleet.customer("C")
    helsinki = fleet.site(customer, "Helsinki")
    kathmandu = fleet.site(customer, "Kathmandu", KATHMANDU)
    moved = at(HELSINKI, "2026-06-01T12:00")
    fleet.device(DEV, helsinki)
    fleet.move(DEV, kathmandu, moved)
    # Uploaded together after the move: each vote goes to the site of its own timestamp.
    fleet.votes(DEV, [(moved - 60_000, 1, 0, 1), (moved - 1, 2, 0, 1), (moved, 3, 0, 2),
                      (at(KATHMANDU, "2026-06-01T23:30"), 4, 0, 2)])
    assert totals(fleet.report(helsinki, "2026-06-01", "2026-06-02")) == {
        "2026-06-01": 2, "2026-06-02": 0}
    assert totals(fleet.report(kathmandu, "2026-06-01", "2026-06-02")) == {
        "2026-06-01": 2, "2026-06-02": 0}
    with fleet.sessions() as session:
        query = ReportQuery(date(2026, 6, 1), date(2026, 6, 2), by="site")
        by_site = device_report(session, DEV, query)
        plain = device_report(session, DEV, ReportQuery(date(2026, 6, 1), date(2026, 6, 2)))
        by_version = site_report(session, kathmandu, ReportQuery(
            date(2026, 6, 1), date(2026, 6, 1), by="content_version"))
    assert [s.key for s in by_site.series] == [{"site_id": helsinki}, {"site_id": kathmandu}]
    assert [list(s.totals.counts) for s in by_site.series] == [[1, 1, 0, 0], [0, 0, 1, 1]]
    assert totals(plain) == {"2026-06-01": 4, "2026-06-02": 0}
    assert [s.key for s in by_version.series] == [{"content_version": 2}]


def test_customer_report_buckets_each_site_in_its_own_zone(db_url: str) -> None:
    fleet = Fleet(db_url)
    customer = fleet.customer("C")
    helsinki = fleet.site(customer, "Helsinki")
    kathmandu = fleet.site(customer, "Kathmandu", KATHMANDU)
    fleet.device(DEV, helsinki)
    fleet.device("pt-00000000000b", kathmandu)
    fleet.votes(DEV, [(at(HELSINKI, "2026-06-01T23:00"), 1, 0, 1)])  # 20:00 UTC
    fleet.votes("pt-00000000000b", [(at(KATHMANDU, "2026-06-01T23:00"), 2, 0, 1),  # 17:15 UTC
                                    (at(KATHMANDU, "2026-06-02T00:30"), 2, 0, 1)])  # 18:45 UTC
    with fleet.sessions() as session:
        report = customer_report(session, customer, ReportQuery(date(2026, 6, 1),
                                                                date(2026, 6, 2)))
        by_site = customer_report(session, customer, ReportQuery(
            date(2026, 6, 1), date(2026, 6, 2), granularity="hour", by="site"))
    assert totals(report) == {"2026-06-01": 2, "2026-06-02": 1}
    assert {s.id for s in report.sites} == {helsinki, kathmandu}
    assert [nonzero(by_site, i) for i in range(2)] == [
        {"2026-06-01T23:00": 1}, {"2026-06-01T23:00": 1, "2026-06-02T00:00": 1}]


def test_unknown_targets_and_bad_queries(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    with pytest.raises(ReportNotFound):
        fleet.report(site + 1, "2026-01-01")
    with fleet.sessions() as session, pytest.raises(ReportNotFound):
        device_report(session, "pt-0000000000ff", ReportQuery(date(2026, 1, 1),
                                                              date(2026, 1, 1)))
    for start, end, options, message in [
        ("2026-02-01", "2026-01-01", {}, "after"),
        ("2025-01-01", "2026-03-01", {"granularity": "hour"}, "at most 366"),
        ("1999-12-31", "2000-01-01", {}, "between"),
    ]:
        with pytest.raises(ReportError, match=message):
            fleet.report(site, start, end, **options)


# -- API --------------------------------------------------------------------------------------

def _access_fleet(db_url: str) -> tuple[Fleet, dict[str, int], TestClient]:
    fleet = Fleet(db_url)
    ids = {"a": fleet.customer("A Oy"), "b": fleet.customer("B Oy")}
    ids["site_a"] = fleet.site(ids["a"], "A shop")
    ids["site_b"] = fleet.site(ids["b"], "B shop", KATHMANDU)
    moved = at(HELSINKI, "2026-06-01T12:00")
    fleet.device("pt-0000000000a1", ids["site_a"])
    fleet.device("pt-0000000000b1", ids["site_b"])
    fleet.device("pt-0000000000ab", ids["site_a"])
    fleet.move("pt-0000000000ab", ids["site_b"], moved)
    fleet.votes("pt-0000000000a1", [(moved, 1, 0, 1)])
    fleet.votes("pt-0000000000b1", [(moved, 2, 0, 1)])
    fleet.votes("pt-0000000000ab", [(moved - 1000, 3, 0, 1), (moved + 1000, 4, 0, 1),
                                    (moved + 2000, 4, 0, 1)])
    return fleet, ids, TestClient(create_app(fleet.sessions))


def test_customer_viewer_sees_only_its_own_customer(db_url: str) -> None:
    fleet, ids, client = _access_fleet(db_url)
    viewer = make_user(fleet.sessions, Role.customer_viewer, customer_id=ids["a"])
    params = {"from": "2026-06-01", "to": "2026-06-01"}

    def get(path: str, headers: dict[str, str]) -> Any:
        return client.get(f"/api/v1/reports/{path}", params=params, headers=headers)

    own = get(f"sites/{ids['site_a']}", viewer)
    assert own.status_code == 200 and own.json()["series"][0]["totals"]["total"] == 2
    for path in (f"sites/{ids['site_b']}", "devices/pt-0000000000b1",
                 f"customers/{ids['b']}", "devices/pt-0000000000ff", "sites/999"):
        assert get(path, viewer).status_code == 404, path
    # The device that moved from A to B: A's viewer sees only the vote pressed at A's site.
    moved = get("devices/pt-0000000000ab", viewer).json()
    # Site A's highest button so far is 3, so its reports have three columns.
    assert moved["series"][0]["totals"]["counts"] == [0, 0, 1]
    assert [s["id"] for s in moved["sites"]] == [ids["site_a"]]
    assert get(f"customers/{ids['a']}", viewer).json()["series"][0]["totals"]["total"] == 2

    installer = make_user(fleet.sessions, Role.installer)
    assert get(f"sites/{ids['site_a']}", installer).status_code == 403
    for role in (Role.coordinator, Role.ops, Role.admin):
        staff = make_user(fleet.sessions, role)
        assert get(f"sites/{ids['site_b']}", staff).status_code == 200
        whole = get("devices/pt-0000000000ab", staff).json()
        assert whole["series"][0]["totals"]["counts"] == [0, 0, 1, 2]
    assert client.get(f"/api/v1/reports/sites/{ids['site_a']}", params=params
                      ).status_code == 401


def test_api_json_csv_and_validation(db_url: str) -> None:
    fleet, ids, client = _access_fleet(db_url)
    client.headers.update(make_user(fleet.sessions, Role.coordinator))
    path = f"/api/v1/reports/sites/{ids['site_b']}"
    params = {"from": "2026-06-01", "to": "2026-06-02", "filtered": "false", "buttons": "4"}
    body = client.get(path, params=params).json()
    assert (body["scope"], body["from"], body["to"], body["granularity"]) == (
        "site", "2026-06-01", "2026-06-02", "day")
    assert body["sites"] == [{"id": ids["site_b"], "name": "B shop", "customer_id": ids["b"],
                              "timezone": KATHMANDU, "buttons": 4}]
    assert body["series"][0]["buckets"][0] == {
        "start": "2026-06-01", "fold": 0, "counts": [0, 1, 0, 2], "total": 3,
        "happy_index": 22.2, "csat": 33.3}

    response = client.get(path, params={**params, "format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.reader(io.StringIO(response.text)))
    assert rows == [
        ["start", "button_1", "button_2", "button_3", "button_4", "total", "happy_index",
         "csat"],
        ["2026-06-01", "0", "1", "0", "2", "3", "22.2", "33.3"],
        ["2026-06-02", "0", "0", "0", "0", "0", "", ""],
    ]
    hourly = client.get(path, params={**params, "format": "csv", "granularity": "hour",
                                      "by": "device", "to": "2026-06-01"})
    lines = list(csv.reader(io.StringIO(hourly.text)))
    assert lines[0][:3] == ["device_id", "start", "fold"]
    assert len(lines) == 1 + 2 * 24  # two devices, 24 hours each
    assert ["pt-0000000000ab", "2026-06-01T14:00", "0", "0", "0", "0", "2", "2", "0.0",
            "0.0"] in lines

    customer = client.get(f"/api/v1/reports/customers/{ids['b']}", params=params).json()
    assert customer["scope"] == "customer" and customer["series"][0]["totals"]["total"] == 3

    for bad, where in [({"from": "2026-06-03"}, "after"), ({"to": "2026-13-01"}, "to"),
                       ({"granularity": "year"}, "granularity"), ({"buttons": "9"}, "buttons"),
                       ({"format": "xml"}, "format")]:
        response = client.get(path, params={**params, **bad})
        assert response.status_code == 422, bad
        assert where in json.dumps(response.json()["detail"]), response.json()
    assert client.get(path, params={"to": "2026-06-01"}).status_code == 422
    for huge in ("sites/9223372036854775808", "customers/2147483648", "sites/0"):
        assert client.get(f"/api/v1/reports/{huge}", params=params).status_code == 422, huge


# -- CLI --------------------------------------------------------------------------------------

def test_cli_report(db_url: str, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby")
    fleet.device(DEV, site)
    fleet.votes(DEV, [(at(HELSINKI, "2026-05-04T12:00"), 2, 0, 1)])
    monkeypatch.setenv("PALAUTE_DB_URL", db_url)
    monkeypatch.chdir(tmp_path)  # no stray .env from the working directory

    assert reports_cli.main(["report", "--site", str(site), "--from", "2026-05-04",
                             "--to", "2026-05-05", "--format", "csv", "--buttons", "4"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "start,button_1,button_2,button_3,button_4,total,happy_index,csat",
        "2026-05-04,0,1,0,0,1,66.7,100.0", "2026-05-05,0,0,0,0,0,,"]

    out = tmp_path / "r.json"
    assert reports_cli.main(["report", "--site", str(site), "--from", "2026-05-01",
                             "--to", "2026-05-31", "--granularity", "week", "--format", "json",
                             "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["granularity"] == "week" and data["series"][0]["totals"]["total"] == 1

    assert reports_cli.main(["report", "--site", "999", "--from", "2026-05-04",
                             "--to", "2026-05-04"]) == 2
    assert "site 999 does not exist" in capsys.readouterr().err
    assert reports_cli.main(["report", "--site", str(site), "--from", "2026-05-05",
                             "--to", "2026-05-04"]) == 2
    assert "is after --to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        reports_cli.main(["report", "--site", str(site), "--from", "2026-5-40",
                          "--to", "2026-05-04"])
    assert exit_info.value.code == 2
    assert "not a date; use YYYY-MM-DD" in capsys.readouterr().err


def test_cli_choices_match_the_service() -> None:
    assert reports_cli.GRANULARITIES == reports.GRANULARITIES
    assert reports_cli.BY_OPTIONS == reports.BY_OPTIONS


def test_invalid_stored_opening_hours_are_reported(db_url: str) -> None:
    fleet = Fleet(db_url)
    site = fleet.site(fleet.customer("C"), "Lobby", hours={"mon": [["18:00", "02:00"]]})
    with pytest.raises(ReportError, match="split at 24:00"):
        fleet.report(site, "2026-05-04", opening_hours_only=True)
    with fleet.sessions.begin() as session:
        session.get_one(Site, site).opening_hours = '{"mon": [["08:00", "24:00"]]}'
    assert fleet.report(site, "2026-05-04", opening_hours_only=True).series[0].totals.total == 0
