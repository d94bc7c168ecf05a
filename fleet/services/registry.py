"""Customers, sites, devices and the assignment history that ties devices to sites.

Every function takes the session and keyword arguments only.  Writes change nothing but the
session (the caller commits, so a change and its audit entry are stored together or not at
all) and record one audit entry per changed entity; ``actor`` is the user behind the change,
None for the CLI and the demo.

Failures raise a :class:`RegistryError` subclass whose message says what was wrong and names
the id or field: :class:`NotFound`, :class:`Conflict` (the request contradicts the stored
state), :class:`Invalid` (a value is malformed) and :class:`Forbidden`.  The API maps them to
404, 409, 422 and 403.

Tenancy: read functions take ``scope``, the customer id a customer viewer is restricted to
(None for staff).  Objects of other customers are reported as *not found* rather than
forbidden, so a viewer cannot even learn that an id exists.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import re
import zoneinfo
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet.db.models import (
    Assignment,
    Customer,
    Device,
    DeviceState,
    Role,
    RolloutDevice,
    RolloutDeviceState,
    Site,
    User,
)
from fleet.db.models import Vote as VoteRow
from fleet.protocol.v1 import DEVICE_ID_RE
from fleet.services import audit
from fleet.services.clock import now_ms

# ``RolloutDevice.reason`` of an entry retire_device turned ``retired``, until the rollout
# engine has cleared the device's retained ``desired``.
RETIRED_NOT_CLEARED = "desired not cleared yet"

# --------------------------------------------------------------------------- errors


class RegistryError(ValueError):
    """A registry change that cannot be made; the message says why and what to do."""


class NotFound(RegistryError):
    """The id names nothing (or nothing the caller may see)."""


class Conflict(RegistryError):
    """The request contradicts what is stored (duplicate, history order, still in use)."""


class Forbidden(RegistryError):
    """The caller's role or tenancy does not allow this."""


class Invalid(RegistryError):
    """A malformed value; ``field`` names the input it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DeviceProblem:
    """Why one device of a bulk assignment cannot be assigned."""

    device_id: str
    reason: str
    not_found: bool = False


class BulkConflict(Conflict):
    """A bulk assignment refused as a whole; ``problems`` lists every device that failed."""

    def __init__(self, message: str, problems: Sequence[DeviceProblem]) -> None:
        super().__init__(message)
        self.problems = list(problems)


# --------------------------------------------------------------------------- tenancy


def customer_scope(user: User) -> int | None:
    """The customer ``user`` is restricted to: their own for viewers, None (all) for staff.

    A customer viewer without a customer (which ``create_user`` refuses, but a hand-edited
    row could hold) is refused outright: treating it as "no restriction" would show it
    everything.
    """
    if user.role is not Role.customer_viewer:
        return None
    if user.customer_id is None:
        raise Forbidden(f"user {user.id} is a customer viewer without a customer")
    return user.customer_id


# --------------------------------------------------------------------------- validation

# Hours as callers hand them in: a mapping of day (or date) to [open, close] pairs.  Keys are
# typed loosely because the API's keys are Literal weekdays and Mapping keys are invariant.
HoursLike = Mapping[Any, Any]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_INTERVALS_PER_DAY = 4
MAX_EXCEPTIONS = 1000
# "24:00" may close a day (open until midnight); it can never open one since open < close.
_HHMM_RE = re.compile(r"^(?:(?:[01]\d|2[0-3]):[0-5]\d|24:00)$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


# Files in the zoneinfo directory that are not zones: the host's own setting and tzdata's
# placeholder.  Debian ships ``localtime`` there, so ``available_timezones()`` lists it.
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def _timezones() -> frozenset[str]:
    # Scanning the tz database takes milliseconds; it does not change while we run.
    # "UTC" always: it is the default, and must work even on a host without tz data.
    return frozenset({"UTC"}) | frozenset(
        name for name in zoneinfo.available_timezones()
        if name not in _NOT_ZONES and not name.startswith(("posix/", "right/")))


def check_timezone(name: str, *, field: str = "timezone") -> str:
    """``name`` if it is an IANA time zone (``Europe/Helsinki``, ``UTC``), else Invalid.

    Membership in the tz database rather than ``ZoneInfo(name)``: the latter accepts any file
    below the zoneinfo directory, and a zone that works on one host must work on the others.
    """
    if name not in _timezones():
        raise Invalid(field, f"{field}: {name!r} is not an IANA time zone such as "
                             "'Europe/Helsinki'")
    return name


def _minutes(value: str) -> int:
    hours, minutes = value.split(":")
    return int(hours) * 60 + int(minutes)


def check_intervals(intervals: Any, *, field: str) -> list[list[str]]:
    """Validate one day's opening intervals and return them sorted by opening time.

    Each interval is ``["HH:MM", "HH:MM"]`` with open < close; at most four a day; they may
    touch (12:00-14:00, 14:00-18:00) but not overlap.  An empty list means closed.
    """
    if not isinstance(intervals, list | tuple):
        raise Invalid(field, f"{field}: expected a list of [open, close] intervals")
    if len(intervals) > MAX_INTERVALS_PER_DAY:
        raise Invalid(field, f"{field}: at most {MAX_INTERVALS_PER_DAY} intervals a day "
                             f"(got {len(intervals)})")
    parsed: list[tuple[int, int, str, str]] = []
    for interval in intervals:
        if (not isinstance(interval, list | tuple) or len(interval) != 2
                or not all(isinstance(t, str) and _HHMM_RE.match(t) for t in interval)):
            raise Invalid(field, f"{field}: {interval!r} is not an [\"HH:MM\", \"HH:MM\"] "
                                 "interval")
        opens, closes = interval
        if _minutes(opens) >= _minutes(closes):
            raise Invalid(field, f"{field}: {opens}-{closes} must open before it closes")
        parsed.append((_minutes(opens), _minutes(closes), opens, closes))
    parsed.sort()
    for before, after in itertools.pairwise(parsed):
        if after[0] < before[1]:
            raise Invalid(field, f"{field}: {before[2]}-{before[3]} overlaps "
                                 f"{after[2]}-{after[3]}")
    return [[opens, closes] for _, _, opens, closes in parsed]


def check_opening_hours(hours: HoursLike, *,
                        field: str = "opening_hours") -> dict[str, list[list[str]]]:
    """Validate weekly hours ``{"mon": [["08:00", "20:00"]], ...}``; keys are mon..sun.

    A day that is missing or empty is closed.  Returns the hours in weekday order with each
    day's intervals sorted.
    """
    unknown = sorted(set(hours) - set(DAYS))
    if unknown:
        raise Invalid(field, f"{field}: unknown day {unknown[0]!r}; days are "
                             f"{', '.join(DAYS)}")
    return {day: check_intervals(hours[day], field=f"{field}.{day}")
            for day in DAYS if day in hours}


def check_opening_exceptions(exceptions: HoursLike, *,
                             field: str = "opening_exceptions") -> dict[str, list[list[str]]]:
    """Validate dated exceptions ``{"2026-12-24": [["08:00", "12:00"]], "2026-12-25": []}``.

    An exception replaces the weekly hours of that date; an empty list means closed all day.
    Returns them sorted by date.
    """
    if len(exceptions) > MAX_EXCEPTIONS:
        raise Invalid(field, f"{field}: at most {MAX_EXCEPTIONS} dates (got "
                             f"{len(exceptions)})")
    checked: dict[str, list[list[str]]] = {}
    for key in sorted(exceptions):
        try:
            if not _DATE_RE.match(key):
                raise ValueError(key)
            datetime.date.fromisoformat(key)
        except ValueError:
            raise Invalid(field, f"{field}: {key!r} is not a date (YYYY-MM-DD)") from None
        checked[key] = check_intervals(exceptions[key], field=f"{field}.{key}")
    return checked


def check_device_id(device_id: str, *, field: str = "id") -> str:
    """``device_id`` if it is ``pt-`` and 12 lowercase hex digits, else Invalid."""
    if not DEVICE_ID_RE.match(device_id):
        raise Invalid(field, f"{field}: device id {device_id!r} must be 'pt-' and 12 "
                             "lowercase hex digits")
    return device_id


def opening_hours_of(site: Site) -> dict[str, list[list[str]]]:
    """The site's weekly hours as stored (a dict; ``{}`` when none are set)."""
    value: dict[str, list[list[str]]] = json.loads(site.opening_hours or "{}")
    return value


def opening_exceptions_of(site: Site) -> dict[str, list[list[str]]]:
    """The site's dated exceptions as stored (a dict; ``{}`` when none are set)."""
    value: dict[str, list[list[str]]] = json.loads(site.opening_exceptions or "{}")
    return value


# --------------------------------------------------------------------------- helpers


# A select of any number of columns (SQLAlchemy 2.1 types Select by its column tuple).
AnySelect = Select[*tuple[Any, ...]]


def _page(session: Session, query: AnySelect, offset: int, limit: int
          ) -> tuple[list[Any], int]:
    """One page of ``query`` (already ordered) and the total number of rows it matches."""
    total = session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = list(session.execute(query.offset(offset).limit(limit)))
    return rows, total or 0


def _flush_unique(session: Session, message: str) -> None:
    """Flush, turning a unique-constraint race (two requests at once) into a Conflict.

    The check before the insert answers the common case; this covers two requests that both
    passed it.  No savepoint: the failed flush has rolled the session's transaction back, the
    Conflict ends the request, and the session is discarded with it.  (A savepoint would not
    help on SQLite either, where pysqlite's implicit transactions make RELEASE commit.)
    """
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(message) from None


def _changes(obj: object, new: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Apply ``new`` to ``obj``; return before/after of the fields that really changed."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for key, value in new.items():
        if value is None or getattr(obj, key) == value:
            continue
        before[key], after[key] = getattr(obj, key), value
        setattr(obj, key, value)
    return before, after


# --------------------------------------------------------------------------- customers


def create_customer(session: Session, *, name: str, actor: User | None = None) -> Customer:
    """Add a customer; names are unique."""
    if session.scalar(select(Customer.id).where(Customer.name == name)) is not None:
        raise Conflict(f"customer {name!r} already exists")
    customer = Customer(name=name, created_ms=now_ms())
    session.add(customer)
    _flush_unique(session, f"customer {name!r} already exists")
    audit.record(session, user=actor, action="create", entity="customer",
                 entity_id=customer.id, detail={"after": {"name": name}})
    return customer


def get_customer(session: Session, *, customer_id: int, scope: int | None = None) -> Customer:
    """The customer ``customer_id`` if it exists and is within ``scope``."""
    customer = session.get(Customer, customer_id)
    if customer is None or (scope is not None and customer.id != scope):
        raise NotFound(f"customer {customer_id} does not exist")
    return customer


def list_customers(session: Session, *, scope: int | None = None, q: str | None = None,
                   offset: int = 0, limit: int = 50) -> tuple[list[Customer], int]:
    """Customers ordered by name (``q``: name contains, any case) and the total count."""
    query = select(Customer)
    if scope is not None:
        query = query.where(Customer.id == scope)
    if q:
        query = query.where(Customer.name.icontains(q, autoescape=True))
    rows, total = _page(session, query.order_by(Customer.name, Customer.id), offset, limit)
    return [row[0] for row in rows], total


def update_customer(session: Session, *, customer_id: int, name: str | None = None,
                    actor: User | None = None) -> Customer:
    """Rename a customer; the new name must be free."""
    customer = get_customer(session, customer_id=customer_id)
    if name is not None and name != customer.name and session.scalar(
            select(Customer.id).where(Customer.name == name)) is not None:
        raise Conflict(f"customer {name!r} already exists")
    before, after = _changes(customer, {"name": name})
    if after:
        _flush_unique(session, f"customer {name!r} already exists")
        audit.record(session, user=actor, action="update", entity="customer",
                     entity_id=customer.id, detail={"before": before, "after": after})
    return customer


def delete_customer(session: Session, *, customer_id: int, actor: User | None = None) -> None:
    """Delete a customer that has no sites and no users left."""
    customer = get_customer(session, customer_id=customer_id)
    sites = session.scalar(select(func.count()).where(Site.customer_id == customer_id)) or 0
    if sites:
        raise Conflict(f"customer {customer_id} has {sites} site(s); delete them first")
    users = session.scalar(select(func.count()).where(User.customer_id == customer_id)) or 0
    if users:
        raise Conflict(f"customer {customer_id} has {users} user(s); delete or move them "
                       "first")
    session.delete(customer)
    session.flush()
    audit.record(session, user=actor, action="delete", entity="customer",
                 entity_id=customer_id, detail={"before": {"name": customer.name}})


# --------------------------------------------------------------------------- sites


def _site_fields(site: Site) -> dict[str, Any]:
    return {"name": site.name, "address": site.address, "timezone": site.timezone,
            "opening_hours": opening_hours_of(site),
            "opening_exceptions": opening_exceptions_of(site)}


def create_site(session: Session, *, customer_id: int, name: str, timezone: str = "UTC",
                address: str = "", opening_hours: HoursLike | None = None,
                opening_exceptions: HoursLike | None = None,
                actor: User | None = None) -> Site:
    """Add a site to an existing customer; time zone and hours are validated here."""
    if session.get(Customer, customer_id) is None:
        raise NotFound(f"customer {customer_id} does not exist")
    site = Site(customer_id=customer_id, name=name, timezone=check_timezone(timezone),
                address=address,
                opening_hours=json.dumps(check_opening_hours(opening_hours or {})),
                opening_exceptions=json.dumps(check_opening_exceptions(opening_exceptions or {})),
                created_ms=now_ms())
    session.add(site)
    session.flush()
    audit.record(session, user=actor, action="create", entity="site", entity_id=site.id,
                 detail={"after": {"customer_id": customer_id, **_site_fields(site)}})
    return site


def get_site(session: Session, *, site_id: int, scope: int | None = None) -> Site:
    """The site ``site_id`` if it exists and belongs to a customer within ``scope``."""
    site = session.get(Site, site_id)
    if site is None or (scope is not None and site.customer_id != scope):
        raise NotFound(f"site {site_id} does not exist")
    return site


def list_sites(session: Session, *, scope: int | None = None, customer_id: int | None = None,
               q: str | None = None, offset: int = 0, limit: int = 50
               ) -> tuple[list[Site], int]:
    """Sites ordered by customer and name, filtered by customer and ``q`` (name contains)."""
    query = select(Site)
    if scope is not None:
        query = query.where(Site.customer_id == scope)
    if customer_id is not None:
        query = query.where(Site.customer_id == customer_id)
    if q:
        query = query.where(Site.name.icontains(q, autoescape=True))
    rows, total = _page(session, query.order_by(Site.customer_id, Site.name, Site.id),
                        offset, limit)
    return [row[0] for row in rows], total


def update_site(session: Session, *, site_id: int, name: str | None = None,
                address: str | None = None, timezone: str | None = None,
                opening_hours: HoursLike | None = None,
                opening_exceptions: HoursLike | None = None,
                actor: User | None = None) -> Site:
    """Change the given fields of a site (None leaves a field as it is).

    The customer cannot change: a site's votes and reports belong to the customer that owned
    it; moving a place to another customer is a new site.
    """
    site = get_site(session, site_id=site_id)
    old = _site_fields(site)
    new: dict[str, Any] = {"name": name, "address": address}
    if timezone is not None:
        new["timezone"] = check_timezone(timezone)
    if opening_hours is not None:
        new["opening_hours"] = json.dumps(check_opening_hours(opening_hours))
    if opening_exceptions is not None:
        new["opening_exceptions"] = json.dumps(check_opening_exceptions(opening_exceptions))
    _, changed = _changes(site, new)
    if changed:
        session.flush()
        current = _site_fields(site)
        audit.record(session, user=actor, action="update", entity="site", entity_id=site.id,
                     detail={"before": {k: old[k] for k in changed},
                             "after": {k: current[k] for k in changed}})
    return site


def delete_site(session: Session, *, site_id: int, actor: User | None = None) -> None:
    """Delete a site that never had a device (its history and votes must stay intact)."""
    site = get_site(session, site_id=site_id)
    assignments = session.scalar(
        select(func.count()).where(Assignment.site_id == site_id)) or 0
    if assignments:
        raise Conflict(f"site {site_id} has {assignments} assignment(s) in its history; "
                       "a site that had devices cannot be deleted")
    if session.scalar(select(VoteRow.seq).where(VoteRow.site_id == site_id).limit(1)) is not None:
        raise Conflict(f"site {site_id} has votes; it cannot be deleted")
    before = {"customer_id": site.customer_id, **_site_fields(site)}
    session.delete(site)
    session.flush()
    audit.record(session, user=actor, action="delete", entity="site", entity_id=site_id,
                 detail={"before": before})


def site_devices(session: Session, *, site_id: int, scope: int | None = None,
                 offset: int = 0, limit: int = 50
                 ) -> tuple[list[tuple[Device, Assignment]], int]:
    """The devices standing at a site now (open assignments), by device id, and their count."""
    get_site(session, site_id=site_id, scope=scope)
    rows, total = _page(
        session, select(Device, Assignment).join(Assignment, Assignment.device_id == Device.id)
        .where(Assignment.site_id == site_id, Assignment.end_ms.is_(None))
        .order_by(Device.id), offset, limit)
    return [(device, assignment) for device, assignment in rows], total


# --------------------------------------------------------------------------- devices


def register_device(session: Session, *, device_id: str, board: str = "", notes: str = "",
                    exist_ok: bool = True, actor: User | None = None) -> Device:
    """Add a terminal to stock.

    With ``exist_ok`` (the default, for provisioning scripts that may run twice) an already
    registered device is returned unchanged; without it that is a Conflict.
    """
    check_device_id(device_id)
    device = session.get(Device, device_id)
    if device is not None:
        if not exist_ok:
            raise Conflict(f"device {device_id} is already registered")
        return device
    device = Device(id=device_id, board=board, state=DeviceState.stocked, notes=notes,
                    created_ms=now_ms(), acked_seq=0, online=False)
    session.add(device)
    _flush_unique(session, f"device {device_id} is already registered")
    audit.record(session, user=actor, action="register", entity="device", entity_id=device_id,
                 detail={"after": {"board": board, "notes": notes}})
    return device


def get_device(session: Session, *, device_id: str, lock: bool = False) -> Device:
    """The device ``device_id``; ``lock`` holds its row until commit (serialises moves)."""
    # A malformed id cannot be registered; answering without a query also keeps bytes the
    # database would choke on (NUL) away from it.
    if not DEVICE_ID_RE.match(device_id):
        raise NotFound(f"device {device_id} is not registered")
    query = select(Device).where(Device.id == device_id)
    device = session.scalar(query.with_for_update() if lock else query)
    if device is None:
        raise NotFound(f"device {device_id} is not registered")
    return device


def _open_assignment(session: Session, device_id: str) -> Assignment | None:
    return session.scalar(select(Assignment).where(
        Assignment.device_id == device_id, Assignment.end_ms.is_(None)))


def _latest_assignment(session: Session, device_id: str) -> Assignment | None:
    return session.scalar(
        select(Assignment).where(Assignment.device_id == device_id)
        .order_by(Assignment.start_ms.desc(), Assignment.id.desc()).limit(1))


def current_assignment(session: Session, *, device_id: str) -> Assignment | None:
    """Where the device stands now: its open assignment, or None."""
    return _open_assignment(session, device_id)


def list_devices(session: Session, *, state: DeviceState | None = None,
                 site_id: int | None = None, customer_id: int | None = None,
                 online: bool | None = None, q: str | None = None, offset: int = 0,
                 limit: int = 50) -> tuple[list[tuple[Device, Assignment | None]], int]:
    """Devices ordered by id with their open assignment, filtered, and the total count.

    ``site_id`` and ``customer_id`` match where a device stands now; ``q`` is an id prefix.
    """
    current = and_(Assignment.device_id == Device.id, Assignment.end_ms.is_(None))
    query: AnySelect = select(Device, Assignment).outerjoin(Assignment, current)
    if state is not None:
        query = query.where(Device.state == state)
    if online is not None:
        query = query.where(Device.online.is_(online))
    if q:
        query = query.where(Device.id.startswith(q, autoescape=True))
    if site_id is not None:
        query = query.where(Assignment.site_id == site_id)
    if customer_id is not None:
        query = query.join(Site, Site.id == Assignment.site_id).where(
            Site.customer_id == customer_id)
    rows, total = _page(session, query.order_by(Device.id), offset, limit)
    return [(device, assignment) for device, assignment in rows], total


def update_device(session: Session, *, device_id: str, board: str | None = None,
                  notes: str | None = None, actor: User | None = None) -> Device:
    """Change a device's board and/or notes (None leaves a field as it is)."""
    device = get_device(session, device_id=device_id)
    before, after = _changes(device, {"board": board, "notes": notes})
    if after:
        session.flush()
        audit.record(session, user=actor, action="update", entity="device",
                     entity_id=device_id, detail={"before": before, "after": after})
    return device


def retire_device(session: Session, *, device_id: str, actor: User | None = None) -> Device:
    """Take a device out of service for good: close its assignment now, refuse its votes."""
    device = get_device(session, device_id=device_id, lock=True)
    if device.state is DeviceState.retired:
        raise Conflict(f"device {device_id} is already retired")
    now = now_ms()
    current = _open_assignment(session, device_id)
    closed: dict[str, int] | None = None
    if current is not None:
        if current.start_ms >= now:
            raise Conflict(f"device {device_id} is assigned to site {current.site_id} from "
                           f"{current.start_ms}, which is in the future; unassign it first")
        current.end_ms = now
        closed = {"assignment_id": current.id, "site_id": current.site_id, "end_ms": now}
    before = device.state.value
    device.state = DeviceState.retired
    # Its broker account goes too (provisioning.retire_device), and the broker may not
    # publish its will: it is offline from now on, whatever its last status said.
    device.online = False
    # Rollouts must neither wait for nor fail on a device that will never answer: its
    # unfinished entries leave every count, and the engine clears its retained desired
    # (fleet/rollouts/engine.py).
    session.execute(update(RolloutDevice).where(
        RolloutDevice.device_id == device_id,
        RolloutDevice.state.in_((RolloutDeviceState.pending, RolloutDeviceState.offline,
                                 RolloutDeviceState.delivered, RolloutDeviceState.timed_out)))
        .values(state=RolloutDeviceState.retired, reason=RETIRED_NOT_CLEARED,
                started_ms=None, updated_ms=now))
    session.flush()
    audit.record(session, user=actor, action="retire", entity="device", entity_id=device_id,
                 detail={"before": {"state": before}, "after": {"state": "retired"},
                         "closed": closed})
    return device


def device_history(session: Session, *, device_id: str, offset: int = 0, limit: int = 50
                   ) -> tuple[list[Assignment], int]:
    """A device's assignments, newest first, and their total count."""
    get_device(session, device_id=device_id)
    rows, total = _page(
        session, select(Assignment).where(Assignment.device_id == device_id)
        .order_by(Assignment.start_ms.desc(), Assignment.id.desc()), offset, limit)
    return [row[0] for row in rows], total


# --------------------------------------------------------------------------- assignments


def _assign_problem(session: Session, device: Device, site_id: int, start: int) -> str | None:
    """Why ``device`` cannot move to ``site_id`` at ``start``, or None if it can."""
    if device.state is DeviceState.retired:
        return f"device {device.id} is retired; it cannot be assigned"
    latest = _latest_assignment(session, device.id)
    if latest is None:
        return None
    if latest.end_ms is None:
        if latest.site_id == site_id:
            return (f"device {device.id} is already assigned to site {site_id} since "
                    f"{latest.start_ms}")
        if start <= latest.start_ms:
            return (f"device {device.id} is assigned to site {latest.site_id} since "
                    f"{latest.start_ms}; a new assignment must start later (got {start})")
    elif start < latest.end_ms:
        # History must not overlap, or a vote's timestamp would match two sites.
        return (f"device {device.id} was at site {latest.site_id} until {latest.end_ms}; a "
                f"new assignment cannot start before that (got {start})")
    return None


def _assign(session: Session, device: Device, site_id: int, start: int, actor: User | None,
            bulk: bool) -> Assignment:
    """Close the device's open assignment at ``start`` and open one at ``site_id``."""
    current = _open_assignment(session, device.id)
    closed: dict[str, int] | None = None
    if current is not None:
        current.end_ms = start
        closed = {"assignment_id": current.id, "site_id": current.site_id, "end_ms": start}
    assignment = Assignment(device_id=device.id, site_id=site_id, start_ms=start, end_ms=None)
    session.add(assignment)
    before = device.state.value
    device.state = DeviceState.assigned
    session.flush()
    detail: dict[str, Any] = {"site_id": site_id, "start_ms": start,
                              "assignment_id": assignment.id, "closed": closed,
                              "before": {"state": before}, "after": {"state": "assigned"}}
    if bulk:
        detail["bulk"] = True
    audit.record(session, user=actor, action="assign", entity="device", entity_id=device.id,
                 detail=detail)
    return assignment


def assign_device(session: Session, *, device_id: str, site_id: int,
                  at_ms: int | None = None, actor: User | None = None) -> Assignment:
    """Move a device to a site from ``at_ms`` (default now) on, closing its current one there.

    The new start must come after the current assignment's start (and not before the end of
    the last closed one): the history never overlaps.
    """
    device = get_device(session, device_id=device_id, lock=True)
    get_site(session, site_id=site_id)
    start = now_ms() if at_ms is None else at_ms
    problem = _assign_problem(session, device, site_id, start)
    if problem is not None:
        raise Conflict(problem)
    return _assign(session, device, site_id, start, actor, bulk=False)


def assign_devices(session: Session, *, site_id: int, device_ids: Iterable[str],
                   at_ms: int | None = None, actor: User | None = None) -> list[Assignment]:
    """Assign several devices to one site, all or none.

    Every device is checked before anything is written; if any cannot be assigned,
    :class:`BulkConflict` lists each of them and nothing changes.
    """
    get_site(session, site_id=site_id)
    ids = list(device_ids)
    if not ids:
        raise Invalid("device_ids", "device_ids: give at least one device")
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise Invalid("device_ids", f"device_ids: {', '.join(duplicates)} given more than once")
    start = now_ms() if at_ms is None else at_ms
    valid = [i for i in ids if DEVICE_ID_RE.match(i)]
    # Lock in id order so that two bulk requests over the same devices cannot deadlock.
    devices = {d.id: d for d in session.scalars(
        select(Device).where(Device.id.in_(valid)).order_by(Device.id).with_for_update())}
    problems: list[DeviceProblem] = []
    for device_id in ids:
        device = devices.get(device_id)
        if device is None:
            problems.append(DeviceProblem(device_id, f"device {device_id} is not registered",
                                          not_found=True))
            continue
        problem = _assign_problem(session, device, site_id, start)
        if problem is not None:
            problems.append(DeviceProblem(device_id, problem))
    if problems:
        raise BulkConflict(f"{len(problems)} of {len(ids)} devices cannot be assigned to site "
                           f"{site_id}; nothing was changed", problems)
    return [_assign(session, devices[i], site_id, start, actor, bulk=True) for i in ids]


def unassign_device(session: Session, *, device_id: str, at_ms: int | None = None,
                    actor: User | None = None) -> Assignment:
    """End a device's current assignment at ``at_ms`` (default now); it goes back to stock."""
    device = get_device(session, device_id=device_id, lock=True)
    current = _open_assignment(session, device_id)
    if current is None:
        raise Conflict(f"device {device_id} is not assigned to any site")
    end = now_ms() if at_ms is None else at_ms
    if end <= current.start_ms:
        raise Conflict(f"device {device_id} is at site {current.site_id} since "
                       f"{current.start_ms}; the assignment must end after that (got {end})")
    current.end_ms = end
    before = device.state.value
    device.state = DeviceState.stocked
    session.flush()
    audit.record(session, user=actor, action="unassign", entity="device", entity_id=device_id,
                 detail={"assignment_id": current.id, "site_id": current.site_id,
                         "end_ms": end, "before": {"state": before},
                         "after": {"state": "stocked"}})
    return current
