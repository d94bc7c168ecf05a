"""Vote reports per site, device and customer, bucketed in each site's local time.

A report counts votes per button per local hour, day, ISO week (Monday first) or month of a
date range, and derives the Happy Index and CSAT from the counts.  docs/reports.md has the
exact definitions; in short:

- *raw* counts every press; *filtered* (the default) leaves out votes with flag bit 0 (the
  terminal's abuse rule).  Test-mode votes (bit 2) are left out of both unless
  ``include_test``.
- Happy Index = mean of 100·(N-b)/(N-1) over the votes, b = button (1 most positive), N = the
  site's number of buttons.
- CSAT = share of votes on the top two buttons (the top one on 2-button sites), in %.

How it stays fast: the numbers come from ``vote_rollups`` (15-minute UTC buckets kept by
triggers, see ``fleet.services.rollups``), and the database does the bucketing.  Python
works out the site's UTC offsets over the range (a handful of DST segments per year); the
SQL adds the right offset to each bucket with a CASE, and integer division by a day or an
hour gives the local bucket.  That is plain integer arithmetic, identical on SQLite and
PostgreSQL, and it returns a few hundred rows for a year of days.  Weeks and months are
summed from days in Python.

A quarter hour is exact only when the time zone's offsets and transitions fall on quarter
hours (all zones in use since 1980 do) and opening hours start and end on quarter hours.  A
zone that does not is reported from the raw votes; opening hours such as 08:10-19:50 are
reported from the rollups for the whole quarter hours inside them and from the raw votes for
the partial quarter hours at their edges, so the numbers are always exact.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    SQLColumnExpression,
    and_,
    case,
    false,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.orm import Session

from fleet.db.models import Assignment, Customer, Device, Site, Vote, VoteRollup
from fleet.protocol.v1 import FLAG_FILTERED, FLAG_TEST_MODE, MAX_BUTTONS
from fleet.services.rollups import BUCKET_MS, BUTTON_COLUMNS, FLAG_CLASS_MASK

Granularity = Literal["hour", "day", "week", "month"]
By = Literal["content_version", "device", "site"]
Source = Literal["rollups", "votes"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
BY_OPTIONS: tuple[str, ...] = get_args(By)

DEFAULT_BUTTONS = 4
MIN_BUTTONS = 2
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
EPOCH = date(1970, 1, 1)
# Votes of terminals whose clock was never set carry 1970 timestamps (flag bit 1); a report
# range starting in 2000 keeps them out and keeps every timestamp comfortably positive, which
# the integer division below relies on.
FIRST_DAY = date(2000, 1, 1)
LAST_DAY = date(2199, 12, 31)
MAX_DAYS = 3660  # ten years of days, weeks or months
MAX_HOUR_DAYS = 366  # a year of hours (8,784 buckets) is the most a report may hold
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_BY_COLUMN = {"content_version": "content_version", "device": "device_id", "site": "site_id"}

Interval = tuple[int, int]  # [start, end) in ms after local midnight


class ReportError(ValueError):
    """The report cannot be made as asked (bad range, bad option); the message says why."""


class ReportNotFound(LookupError):
    """The site, device or customer does not exist or is not visible to the caller."""


@dataclass(frozen=True)
class ReportQuery:
    """What to report: a range of local dates (both inclusive) and how to count."""

    start: date
    end: date
    granularity: Granularity = "day"
    filtered: bool = True
    include_test: bool = False
    opening_hours_only: bool = False
    by: By | None = None
    # None: each site's highest button ever recorded (at least 2; 4 if it has no votes).
    buttons: int | None = None
    # "votes" aggregates the raw votes; for tests and benchmarks that compare the two.
    source: Source = "rollups"

    def check(self) -> None:
        """Raise ReportError if the query cannot be answered."""
        if self.start > self.end:
            raise ReportError(f"from {self.start} is after to {self.end}")
        if self.start < FIRST_DAY or self.end > LAST_DAY:
            raise ReportError(f"dates must lie between {FIRST_DAY} and {LAST_DAY}")
        days = (self.end - self.start).days + 1
        if self.granularity == "hour" and days > MAX_HOUR_DAYS:
            raise ReportError(f"an hourly report covers at most {MAX_HOUR_DAYS} days "
                              f"(asked for {days}); use granularity day")
        if days > MAX_DAYS:
            raise ReportError(f"a report covers at most {MAX_DAYS} days (asked for {days})")
        if self.granularity not in GRANULARITIES:
            raise ReportError(f"granularity must be one of {', '.join(GRANULARITIES)}")
        if self.by is not None and self.by not in BY_OPTIONS:
            raise ReportError(f"by must be one of {', '.join(BY_OPTIONS)}")
        if self.buttons is not None and not MIN_BUTTONS <= self.buttons <= MAX_BUTTONS:
            raise ReportError(f"buttons must be {MIN_BUTTONS} to {MAX_BUTTONS}")


@dataclass(frozen=True)
class ReportSite:
    """A site in a report and the number of buttons its Happy Index was computed with."""

    id: int
    name: str
    customer_id: int
    timezone: str
    buttons: int


@dataclass(frozen=True)
class Bucket:
    """Counts and metrics of one local hour, day, week or month (or of the whole range).

    ``start`` is local wall-clock time: ``YYYY-MM-DD`` (the Monday of an ISO week, the first of
    a month) or ``YYYY-MM-DDTHH:MM`` for hours.  ``fold`` is 1 only for the second occurrence
    of an hour that repeats when daylight saving time ends (as in ``datetime.fold``).
    """

    start: str
    fold: int
    counts: tuple[int, ...]
    total: int
    happy_index: float | None
    csat: float | None


@dataclass(frozen=True)
class Series:
    """The buckets of one group (``key`` is None unless the report is split with ``by``)."""

    key: dict[str, int | str] | None
    buckets: tuple[Bucket, ...]
    totals: Bucket


@dataclass(frozen=True)
class Report:
    """A finished report; ``buttons`` is the number of count columns."""

    scope: Literal["site", "device", "customer"]
    scope_id: str
    name: str
    query: ReportQuery
    buttons: int
    sites: tuple[ReportSite, ...]
    series: tuple[Series, ...]


# -- metrics ----------------------------------------------------------------------------------

def happy_weight(button: int, buttons: int) -> float:
    """Happy Index weight of ``button`` on an N-button site: 100 for 1 … 0 for N, linear."""
    return 100.0 * (buttons - button) / (buttons - 1)


def csat_top(buttons: int) -> int:
    """How many of the most positive buttons count as satisfied: 2 (1 on 2-button sites)."""
    return 1 if buttons == 2 else 2


@dataclass
class _Tally:
    """Counts of one bucket, plus the sums the metrics need (sites may differ in N)."""

    counts: list[int] = field(default_factory=lambda: [0] * MAX_BUTTONS)
    happy: float = 0.0
    satisfied: int = 0

    def add(self, button: int, votes: int, buttons: int) -> None:
        self.counts[button - 1] += votes
        self.happy += votes * happy_weight(button, buttons)
        if button <= csat_top(buttons):
            self.satisfied += votes

    def merge(self, other: _Tally) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.happy += other.happy
        self.satisfied += other.satisfied

    def bucket(self, start: str, fold: int, columns: int) -> Bucket:
        total = sum(self.counts)
        return Bucket(
            start=start, fold=fold, counts=tuple(self.counts[:columns]), total=total,
            happy_index=round(self.happy / total, 1) if total else None,
            csat=round(100.0 * self.satisfied / total, 1) if total else None)


# -- time zones -------------------------------------------------------------------------------

def _zone(name: str, site_id: int) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ReportError(f"site {site_id} has an unknown time zone {name!r}") from None


def _offset_ms(zone: ZoneInfo, at_ms: int) -> int:
    offset = datetime.fromtimestamp(at_ms / 1000, zone).utcoffset()
    assert offset is not None
    return int(offset.total_seconds() * 1000)


def _local_midnight_ms(day: date, zone: ZoneInfo) -> int:
    # Where midnight does not exist (DST starting at 00:00), fold=0 resolves to the moment
    # the clocks jump, which is when that local day starts.
    return int(datetime.combine(day, time(), zone).timestamp()) * 1000


@lru_cache(maxsize=512)
def _segments(zone_name: str, start_ms: int, end_ms: int) -> tuple[tuple[int, int], ...]:
    """``(from_ms, offset_ms)`` pieces of [start, end) over which the UTC offset is constant.

    Offsets are sampled every 6 hours (zones change offset at most a few times a year) and
    each change is pinned to the millisecond by bisection.
    """
    zone = ZoneInfo(zone_name)
    pieces = [(start_ms, _offset_ms(zone, start_ms))]
    step = 6 * HOUR_MS
    low = start_ms
    while low < end_ms - 1:
        high = min(low + step, end_ms - 1)
        if _offset_ms(zone, high) != pieces[-1][1]:
            before, after = low, high
            while after - before > 1:
                middle = (before + after) // 2
                if _offset_ms(zone, middle) == pieces[-1][1]:
                    before = middle
                else:
                    after = middle
            pieces.append((after, _offset_ms(zone, after)))
            high = after
        low = high
    return tuple(pieces)


# -- opening hours ----------------------------------------------------------------------------

@dataclass(frozen=True)
class OpeningHours:
    """A site's opening hours as [start, end) ms-of-day intervals, merged and sorted.

    ``weekly`` is indexed Monday = 0; None means no weekly hours were set, i.e. open all day
    (sites created before opening hours existed).  ``exceptions`` replace the weekly hours on
    their dates; an empty list means closed.
    """

    weekly: tuple[tuple[Interval, ...], ...] | None
    exceptions: dict[date, tuple[Interval, ...]]


def _clock_ms(value: Any, where: str, *, end: bool) -> int:
    if not isinstance(value, str) or len(value) != 5 or value[2] != ":":
        raise ReportError(f"{where}: expected a time as \"HH:MM\", got {value!r}")
    try:
        hours, minutes = int(value[:2]), int(value[3:])
    except ValueError:
        raise ReportError(f"{where}: expected a time as \"HH:MM\", got {value!r}") from None
    if not (0 <= hours < 24 and 0 <= minutes < 60) and not (end and value == "24:00"):
        raise ReportError(f"{where}: {value!r} is not a time of day")
    return (hours * 60 + minutes) * 60_000


def _intervals(raw: Any, where: str) -> tuple[Interval, ...]:
    if not isinstance(raw, list):
        raise ReportError(f"{where}: expected a list of [\"HH:MM\", \"HH:MM\"] pairs")
    spans: list[Interval] = []
    for index, pair in enumerate(raw):
        if not isinstance(pair, list) or len(pair) != 2:
            raise ReportError(f"{where}[{index}]: expected [\"HH:MM\", \"HH:MM\"]")
        start = _clock_ms(pair[0], f"{where}[{index}]", end=False)
        stop = _clock_ms(pair[1], f"{where}[{index}]", end=True)
        if stop <= start:
            raise ReportError(f"{where}[{index}]: {pair[1]} is not after {pair[0]} (intervals "
                              "past midnight must be split at 24:00)")
        spans.append((start, stop))
    return tuple(_merge(spans))


def parse_opening_hours(site: Site) -> OpeningHours:
    """The site's ``opening_hours`` and ``opening_exceptions`` JSON; ReportError if invalid."""
    where = f"site {site.id} opening_hours"
    try:
        weekly_raw = json.loads(site.opening_hours or "{}")
        exceptions_raw = json.loads(site.opening_exceptions or "{}")
    except ValueError:
        raise ReportError(f"{where}: not valid JSON") from None
    if not isinstance(weekly_raw, dict) or not isinstance(exceptions_raw, dict):
        raise ReportError(f"{where}: expected JSON objects")
    for key in weekly_raw:
        if key not in WEEKDAYS:
            raise ReportError(f"{where}: unknown day {key!r}; use {', '.join(WEEKDAYS)}")
    weekly = (tuple(_intervals(weekly_raw.get(day, []), f"{where}.{day}") for day in WEEKDAYS)
              if weekly_raw else None)
    exceptions: dict[date, tuple[Interval, ...]] = {}
    for key, value in exceptions_raw.items():
        try:
            day = date.fromisoformat(key)
        except (TypeError, ValueError):
            raise ReportError(f"site {site.id} opening_exceptions: {key!r} is not a "
                              "YYYY-MM-DD date") from None
        exceptions[day] = _intervals(value, f"site {site.id} opening_exceptions.{key}")
    return OpeningHours(weekly, exceptions)


def _split_at_quarters(spans: Sequence[Interval]) -> tuple[list[Interval], list[Interval]]:
    """Split intervals into whole quarter hours (rollups) and the partial ones at the edges.

    08:10-19:50 gives 08:15-19:45 (whole rollup buckets) and 08:10-08:15, 19:45-19:50 (to be
    counted from raw votes).  Intervals are merged, so the pieces never overlap.
    """
    whole: list[Interval] = []
    edges: list[Interval] = []
    for start, stop in spans:
        inner_start = -(-start // BUCKET_MS) * BUCKET_MS
        inner_stop = stop // BUCKET_MS * BUCKET_MS
        if inner_start >= inner_stop:
            edges.append((start, stop))
            continue
        whole.append((inner_start, inner_stop))
        if start < inner_start:
            edges.append((start, inner_start))
        if inner_stop < stop:
            edges.append((inner_stop, stop))
    return whole, edges


# -- SQL --------------------------------------------------------------------------------------

def _int(value: int) -> ColumnElement[Any]:
    # Inline integer literals: the bucket expression appears in SELECT and GROUP BY, and
    # PostgreSQL only matches them when their text is identical (parameters get new numbers).
    return literal_column(str(int(value)), BigInteger)


@dataclass(frozen=True)
class _Table:
    """The columns a report reads, from the rollups or from the raw votes."""

    instant: SQLColumnExpression[Any]
    counts: tuple[SQLColumnExpression[Any], ...]  # aggregates: votes on button 1 … 5
    top_button: SQLColumnExpression[Any]
    flag_class: SQLColumnExpression[Any]
    site_id: SQLColumnExpression[Any]
    device_id: SQLColumnExpression[Any]
    content_version: SQLColumnExpression[Any]


ROLLUPS = _Table(VoteRollup.bucket_start_ms,
                 tuple(func.sum(column) for column in BUTTON_COLUMNS), VoteRollup.top_button,
                 VoteRollup.flag_class, VoteRollup.site_id, VoteRollup.device_id,
                 VoteRollup.content_version)
VOTES = _Table(Vote.ts_ms,
               tuple(func.count().filter(Vote.button == _int(b)) for b in range(1, 6)),
               Vote.button, Vote.flags.op("&")(_int(FLAG_CLASS_MASK)), Vote.site_id,
               Vote.device_id, Vote.content_version)


def _offset_expr(instant: SQLColumnExpression[Any], segments: Sequence[tuple[int, int]]
                 ) -> ColumnElement[Any]:
    if len(segments) == 1:
        return _int(segments[0][1])
    whens = [(instant < _int(segments[index + 1][0]), _int(segments[index][1]))
             for index in range(len(segments) - 1)]
    return case(*whens, else_=_int(segments[-1][1]))


def _merge(spans: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, stop in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _within(value: ColumnElement[Any], spans: Iterable[Interval], upper: int | None = None
            ) -> ColumnElement[bool]:
    """``value`` lies in one of the [start, stop) ``spans``; ``upper`` is its exclusive max."""
    terms: list[ColumnElement[bool]] = []
    for start, stop in _merge(spans):
        low = value >= _int(start) if start > 0 else None
        high = value < _int(stop) if upper is None or stop < upper else None
        if low is None and high is None:
            return true()
        terms.append(and_(*[t for t in (low, high) if t is not None]))
    return or_(false(), *terms)


def _open_predicate(local: ColumnElement[Any], hours: OpeningHours, first_day: int,
                    last_day: int, part: Callable[[Sequence[Interval]], list[Interval]]
                    ) -> ColumnElement[bool]:
    """True where local time ``local`` (ms) is within ``part`` of the opening hours.

    Weekly hours are tested on one value, the time since Monday 00:00 (day 0, 1970-01-01,
    was a Thursday), so each opening interval costs two comparisons.  Exception dates are
    tested on the local time itself.
    """
    week = 7 * DAY_MS
    week_clock = (local + _int(3 * DAY_MS)) % _int(week)
    days = hours.weekly if hours.weekly is not None else [[(0, DAY_MS)]] * 7
    weekly = _within(week_clock, [(index * DAY_MS + start, index * DAY_MS + stop)
                                  for index, spans in enumerate(days)
                                  for start, stop in part(spans)], upper=week)
    special = {(day_date - EPOCH).days: spans for day_date, spans in hours.exceptions.items()
               if first_day <= (day_date - EPOCH).days <= last_day}
    if not special:
        return weekly
    day = local // _int(DAY_MS)
    return or_(and_(day.not_in([_int(number) for number in sorted(special)]), weekly),
               *[_within(local, [(number * DAY_MS + start, number * DAY_MS + stop)
                                 for start, stop in part(spans)])
                 for number, spans in special.items() if part(spans)])


def _whole(spans: Sequence[Interval]) -> list[Interval]:
    return _split_at_quarters(spans)[0]


def _edges(spans: Sequence[Interval]) -> list[Interval]:
    return _split_at_quarters(spans)[1]


def _all(spans: Sequence[Interval]) -> list[Interval]:
    return list(spans)


def _classes(query: ReportQuery) -> list[int]:
    classes = [0] if query.filtered else [0, FLAG_FILTERED]
    if query.include_test:
        classes += [cls | FLAG_TEST_MODE for cls in classes]
    return classes


# -- scope ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Group:
    """Sites that share a time zone (and opening hours, when those matter): one query."""

    zone_name: str
    zone: ZoneInfo
    site_ids: tuple[int, ...]
    hours: OpeningHours | None
    start_ms: int
    end_ms: int
    segments: tuple[tuple[int, int], ...]

    @property
    def quarter_aligned(self) -> bool:
        """True when every local hour and day boundary falls on a rollup bucket boundary."""
        return all(at % BUCKET_MS == 0 and offset % BUCKET_MS == 0
                   for at, offset in self.segments) and self.end_ms % BUCKET_MS == 0


def _groups(sites: Sequence[Site], query: ReportQuery) -> list[_Group]:
    members: dict[tuple[str, str, str], list[Site]] = defaultdict(list)
    for site in sites:
        hours_key = ((site.opening_hours, site.opening_exceptions) if query.opening_hours_only
                     else ("", ""))
        members[(site.timezone, *hours_key)].append(site)
    groups = []
    for (zone_name, _, _), group_sites in members.items():
        zone = _zone(zone_name, group_sites[0].id)
        start_ms = _local_midnight_ms(query.start, zone)
        end_ms = _local_midnight_ms(query.end + timedelta(days=1), zone)
        hours = parse_opening_hours(group_sites[0]) if query.opening_hours_only else None
        groups.append(_Group(zone_name, zone, tuple(s.id for s in group_sites), hours,
                             start_ms, end_ms, _segments(zone_name, start_ms, end_ms)))
    return groups


def _site_buttons(session: Session, sites: Sequence[Site], query: ReportQuery
                  ) -> dict[int, int]:
    """N per site: the ``buttons`` option, else the highest button the site ever recorded."""
    if query.buttons is not None:
        return {site.id: query.buttons for site in sites}
    if not sites:
        return {}
    # One correlated max() per site; each is one lookup in index (site_id, top_button).
    table = VOTES if query.source == "votes" else ROLLUPS
    highest = (select(func.max(table.top_button)).where(table.site_id == Site.id)
               .scalar_subquery())
    found: dict[int, int | None] = dict(session.execute(
        select(Site.id, highest).where(Site.id.in_([s.id for s in sites]))).all())
    result = {}
    for site in sites:
        highest_button = found.get(site.id)
        result[site.id] = (DEFAULT_BUTTONS if highest_button is None
                           else max(MIN_BUTTONS, int(highest_button)))
    return result


# -- bucket labels ----------------------------------------------------------------------------

def _labeller(granularity: Granularity, zone: ZoneInfo) -> Callable[[int], tuple[str, int]]:
    """Turns a bucket key from SQL (UTC ms of a local hour, or a local day number) into
    ``(start, fold)``."""
    cache: dict[int, tuple[str, int]] = {}

    def hour(key: int) -> tuple[str, int]:
        local = datetime.fromtimestamp(key / 1000, zone)
        return local.strftime("%Y-%m-%dT%H:%M"), local.fold

    def day(key: int) -> tuple[str, int]:
        when = EPOCH + timedelta(days=key)
        if granularity == "week":
            when -= timedelta(days=when.weekday())
        elif granularity == "month":
            when = when.replace(day=1)
        return when.isoformat(), 0

    convert = hour if granularity == "hour" else day

    def label(key: int) -> tuple[str, int]:
        if key not in cache:
            cache[key] = convert(key)
        return cache[key]

    return label


def _bucket_keys(group: _Group, granularity: Granularity) -> Iterable[int]:
    """Every bucket key of the group's range, as SQL would compute it, for empty buckets."""
    ends = [at for at, _ in group.segments[1:]] + [group.end_ms]
    for (start, offset), end in zip(group.segments, ends, strict=True):
        unit = HOUR_MS if granularity == "hour" else DAY_MS
        first, last = (start + offset) // unit, (end - 1 + offset) // unit
        for number in range(first, last + 1):
            yield number * unit - offset if granularity == "hour" else number


# -- the report -------------------------------------------------------------------------------

def _run(session: Session, query: ReportQuery, group: _Group, device_id: str | None,
         table: _Table, part: Callable[[Sequence[Interval]], list[Interval]] | None
         ) -> list[Any]:
    offset = _offset_expr(table.instant, group.segments)
    local = table.instant + offset
    if query.granularity == "hour":
        key = (local // _int(HOUR_MS)) * _int(HOUR_MS) - offset
    else:
        key = local // _int(DAY_MS)
    conditions = [table.site_id.in_(group.site_ids), table.instant >= _int(group.start_ms),
                  table.instant < _int(group.end_ms), table.flag_class.in_(_classes(query))]
    if device_id is not None:
        conditions.append(table.device_id == device_id)
    if group.hours is not None and part is not None:
        first = (query.start - EPOCH).days
        conditions.append(_open_predicate(local, group.hours, first,
                                          (query.end - EPOCH).days, part))
    columns = [key, table.site_id]
    if query.by is not None and query.by != "site":
        columns.append(getattr(table, _BY_COLUMN[query.by]))
    statement = select(*columns, *table.counts).where(*conditions).group_by(*columns)
    return list(session.execute(statement))


def _has_edges(hours: OpeningHours) -> bool:
    days = [*(hours.weekly or ()), *hours.exceptions.values()]
    return any(_edges(spans) for spans in days)


def build_report(session: Session, query: ReportQuery, sites: Sequence[Site], *,
                 scope: Literal["site", "device", "customer"], scope_id: str, name: str,
                 device_id: str | None = None) -> Report:
    """Count the votes of ``sites`` (of one device if given) as ``query`` asks."""
    query.check()
    if session.get_bind().dialect.name == "postgresql":
        # PostgreSQL's JIT compiler judges a year's scan "expensive" and spends more time
        # compiling it (about 60 ms) than it saves.  SET LOCAL ends with the transaction.
        session.execute(text("SET LOCAL jit = off"))
    buttons = _site_buttons(session, sites, query)
    tallies: dict[tuple[Any, ...], dict[tuple[str, int], _Tally]] = defaultdict(dict)
    labels: set[tuple[str, int]] = set()
    for group in _groups(sites, query):
        label = _labeller(query.granularity, group.zone)
        labels.update(label(key) for key in _bucket_keys(group, query.granularity))
        runs: list[tuple[_Table, Callable[[Sequence[Interval]], list[Interval]] | None]]
        if query.source == "votes" or not group.quarter_aligned:
            runs = [(VOTES, _all)]
        elif group.hours is not None and _has_edges(group.hours):
            runs = [(ROLLUPS, _whole), (VOTES, _edges)]
        else:
            runs = [(ROLLUPS, _whole)]
        for table, part in runs:
            for row in _run(session, query, group, device_id, table, part):
                key, site_id, *by_value = row[:-MAX_BUTTONS]
                counts = [int(count or 0) for count in row[-MAX_BUTTONS:]]
                highest = max((b for b, count in enumerate(counts, 1) if count), default=0)
                if query.buttons is not None and highest > query.buttons:
                    raise ReportError(f"buttons={query.buttons} but site {site_id} has votes "
                                      f"for button {highest}; pass buttons={highest}")
                series_key: tuple[Any, ...] = (
                    () if query.by is None else (site_id,) if query.by == "site"
                    else tuple(by_value))
                bucket = tallies[series_key].setdefault(label(key), _Tally())
                for button, count in enumerate(counts, 1):
                    if count:
                        bucket.add(button, count, buttons[site_id])
    columns = max(buttons.values(), default=query.buttons or DEFAULT_BUTTONS)
    ordered = sorted(labels)
    series_keys = sorted(tallies) if query.by is not None else [()]
    series = []
    for series_key in series_keys:
        found = tallies.get(series_key, {})
        total = _Tally()
        rows = []
        for start, fold in ordered:
            tally = found.get((start, fold), _Tally())
            total.merge(tally)
            rows.append(tally.bucket(start, fold, columns))
        key_dict = (None if query.by is None
                    else {_BY_COLUMN[query.by]: series_key[0]})
        series.append(Series(key_dict, tuple(rows), total.bucket("total", 0, columns)))
    report_sites = tuple(ReportSite(s.id, s.name, s.customer_id, s.timezone, buttons[s.id])
                         for s in sorted(sites, key=lambda s: s.id))
    return Report(scope, scope_id, name, query, columns, report_sites, tuple(series))


def site_report(session: Session, site_id: int, query: ReportQuery, *,
                customer_id: int | None = None) -> Report:
    """Report of one site.  ``customer_id`` restricts what is visible (customer viewers)."""
    statement = select(Site).where(Site.id == site_id)
    if customer_id is not None:
        statement = statement.where(Site.customer_id == customer_id)
    site = session.scalar(statement)
    if site is None:
        raise ReportNotFound(f"site {site_id} does not exist")
    return build_report(session, query, [site], scope="site", scope_id=str(site.id),
                        name=site.name)


def device_report(session: Session, device_id: str, query: ReportQuery, *,
                  customer_id: int | None = None) -> Report:
    """Report of one device's votes, each in the time zone of the site it stood at.

    A customer viewer sees only the votes the device collected at its customer's sites, and
    a device that never stood at one of them does not exist for it.  Votes pressed while the
    device was not assigned to any site have no site and appear in no report.
    """
    device = session.get(Device, device_id)
    statement = select(Site).where(Site.id.in_(
        select(Assignment.site_id).where(Assignment.device_id == device_id)))
    if customer_id is not None:
        statement = statement.where(Site.customer_id == customer_id)
    sites = list(session.scalars(statement))
    if device is None or (customer_id is not None and not sites):
        raise ReportNotFound(f"device {device_id} does not exist")
    return build_report(session, query, sites, scope="device", scope_id=device_id,
                        name=device_id, device_id=device_id)


def customer_report(session: Session, target_id: int, query: ReportQuery, *,
                    customer_id: int | None = None) -> Report:
    """Report of every site of a customer, each bucketed in its own time zone.

    A bucket is a local calendar period: the customer's "Monday" is Monday at each site.
    """
    if customer_id is not None and customer_id != target_id:
        raise ReportNotFound(f"customer {target_id} does not exist")
    customer = session.get(Customer, target_id)
    if customer is None:
        raise ReportNotFound(f"customer {target_id} does not exist")
    sites = list(session.scalars(select(Site).where(Site.customer_id == target_id)))
    return build_report(session, query, sites, scope="customer", scope_id=str(target_id),
                        name=customer.name)


# -- output -----------------------------------------------------------------------------------

def _bucket_dict(bucket: Bucket) -> dict[str, Any]:
    return {"start": bucket.start, "fold": bucket.fold, "counts": list(bucket.counts),
            "total": bucket.total, "happy_index": bucket.happy_index, "csat": bucket.csat}


def report_to_dict(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data (the API's and the CLI's JSON format)."""
    query = report.query
    return {
        "scope": report.scope, "id": report.scope_id, "name": report.name,
        "from": query.start.isoformat(), "to": query.end.isoformat(),
        "granularity": query.granularity, "filtered": query.filtered,
        "include_test": query.include_test, "opening_hours_only": query.opening_hours_only,
        "by": query.by, "buttons": report.buttons,
        "sites": [{"id": s.id, "name": s.name, "customer_id": s.customer_id,
                   "timezone": s.timezone, "buttons": s.buttons} for s in report.sites],
        "series": [{"key": s.key, "totals": _bucket_dict(s.totals),
                    "buckets": [_bucket_dict(b) for b in s.buckets]} for s in report.series],
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def report_to_csv(report: Report) -> str:
    """The report as CSV: one row per (series,) bucket; the header names the columns.

    Columns: the ``by`` column if any, ``start``, ``fold`` (hourly reports only),
    ``button_1`` … ``button_N``, ``total``, ``happy_index``, ``csat``.  Empty metric cells
    mean "no votes".
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    by_column = [_BY_COLUMN[report.query.by]] if report.query.by else []
    fold = ["fold"] if report.query.granularity == "hour" else []
    writer.writerow([*by_column, "start", *fold,
                     *(f"button_{n}" for n in range(1, report.buttons + 1)),
                     "total", "happy_index", "csat"])
    for series in report.series:
        key = [next(iter(series.key.values()))] if series.key else []
        for bucket in series.buckets:
            writer.writerow([*key, bucket.start, *([bucket.fold] if fold else []),
                             *bucket.counts, bucket.total,
                             "" if bucket.happy_index is None else bucket.happy_index,
                             "" if bucket.csat is None else bucket.csat])
    return out.getvalue()
