"""Rollouts and saved selections: create, read with counts, pause, resume, abort, and the
effect of a device's ``reported`` message.

Writes change only the session (the caller commits, with the audit entry).  Errors are the
registry's: :class:`~fleet.services.registry.NotFound`, ``Conflict`` and ``Invalid`` (the
API maps them to 404, 409 and 422).  MQTT is the engine's business (fleet/rollouts/engine.py):
nothing here publishes.

Overlapping rollouts: creating a rollout *supersedes* every unfinished entry (pending,
offline, delivered, timed out) of its devices in older rollouts; those entries stop counting
towards the older rollouts' waves, and ``reported`` messages update only the newest entry.

Retiring a device (fleet/services/registry.py) turns its unfinished entries ``retired``: they
stop counting too, and the engine clears the device's retained ``desired``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from fleet.db.models import (
    Assignment,
    Customer,
    Device,
    DeviceState,
    Rollout,
    RolloutDevice,
    RolloutDeviceState,
    RolloutState,
    Selection,
    Site,
    User,
)
from fleet.protocol.v1 import DEVICE_ID_RE, Reported
from fleet.rollouts.packages import PackageSource, display_of_board
from fleet.services import audit
from fleet.services.clock import now_ms as _now
from fleet.services.registry import Conflict, Invalid, NotFound

TARGET_KINDS = ("device", "site", "customer", "selection")
S = RolloutDeviceState
# Entries whose outcome is still open: a newer rollout takes them over.
UNFINISHED = (S.pending, S.offline, S.delivered, S.timed_out)
# Rollouts whose state may still change.
LIVE = (RolloutState.running, RolloutState.paused, RolloutState.halted)


@dataclass(frozen=True)
class RolloutPlan:
    """What to roll out, where, and how carefully."""

    content_version: int
    target_kind: str
    target_ref: str
    canary: Sequence[str] = ()
    waves: Sequence[int] = (100,)  # cumulative percentages of the non-canary devices
    success_threshold: int = 90
    failure_threshold: int = 10
    device_timeout_s: int = 900


@dataclass
class RolloutCounts:
    """Devices per state, overall and per wave (wave 0 is the canary list)."""

    total: dict[str, int] = field(default_factory=dict)
    waves: dict[int, dict[str, int]] = field(default_factory=dict)


# --------------------------------------------------------------------------- selections
def _check_ids(device_ids: Sequence[str], field_name: str) -> list[str]:
    bad = [d for d in device_ids if not isinstance(d, str) or not DEVICE_ID_RE.match(d)]
    if bad:
        raise Invalid(field_name, f"{field_name}: {bad[0]!r} is not a device id "
                      "(pt- and 12 hex digits)")
    return sorted(set(device_ids))


def _known(session: Session, device_ids: Sequence[str], field_name: str) -> None:
    found = set(session.scalars(select(Device.id).where(Device.id.in_(list(device_ids)))))
    missing = [d for d in device_ids if d not in found]
    if missing:
        raise NotFound(f"{field_name}: device {missing[0]} is not registered")


def create_selection(session: Session, *, name: str, device_ids: Sequence[str],
                     actor: User | None = None) -> Selection:
    """Save a named list of devices; 409 if the name is taken."""
    ids = _check_ids(device_ids, "device_ids")
    if not ids:
        raise Invalid("device_ids", "device_ids: a selection needs at least one device")
    _known(session, ids, "device_ids")
    if session.scalar(select(Selection.id).where(Selection.name == name)) is not None:
        raise Conflict(f"a selection named {name!r} exists already; pick another name")
    selection = Selection(name=name, device_ids=json.dumps(ids),
                          created_by=actor.id if actor else None, created_ms=_now())
    session.add(selection)
    session.flush()
    audit.record(session, user=actor, action="create", entity="selection",
                 entity_id=selection.id, detail={"name": name, "devices": len(ids)})
    return selection


def selection_devices(selection: Selection) -> list[str]:
    """The device ids a selection holds."""
    return [str(d) for d in json.loads(selection.device_ids)]


def get_selection(session: Session, *, selection_id: int) -> Selection:
    """One selection; NotFound if there is none."""
    selection = session.get(Selection, selection_id)
    if selection is None:
        raise NotFound(f"selection {selection_id} does not exist")
    return selection


def list_selections(session: Session) -> list[Selection]:
    """Every saved selection, by name."""
    return list(session.scalars(select(Selection).order_by(Selection.name)))


def delete_selection(session: Session, *, selection_id: int, actor: User | None = None) -> None:
    """Forget a selection (rollouts made from it keep their devices)."""
    selection = get_selection(session, selection_id=selection_id)
    session.delete(selection)
    audit.record(session, user=actor, action="delete", entity="selection",
                 entity_id=selection_id)


# --------------------------------------------------------------------------- targets
def target_devices(session: Session, kind: str, ref: str) -> list[Device]:
    """The non-retired devices a target names, by id; NotFound/Invalid on a bad target."""
    query = select(Device).where(Device.state != DeviceState.retired).order_by(Device.id)
    if kind == "device":
        _check_ids([ref], "target_ref")
        devices = list(session.scalars(query.where(Device.id == ref)))
        if not devices:
            raise NotFound(f"device {ref} is not registered (or is retired)")
        return devices
    if kind not in ("site", "customer", "selection"):
        raise Invalid("target_kind", f"target_kind must be one of "
                      f"{', '.join(TARGET_KINDS)}, got {kind!r}")
    try:
        number = int(ref)
    except ValueError:
        number = 0
    if not 1 <= number <= 2**31 - 1:  # also keeps PostgreSQL's INTEGER from overflowing
        raise Invalid("target_ref", f"target_ref of a {kind} must be its numeric id, "
                      f"got {ref!r}")
    if kind == "selection":
        ids = selection_devices(get_selection(session, selection_id=number))
        return list(session.scalars(query.where(Device.id.in_(ids))))
    current = (select(Assignment.device_id).join(Site, Site.id == Assignment.site_id)
               .where(Assignment.end_ms.is_(None)))
    if kind == "site":
        if session.get(Site, number) is None:
            raise NotFound(f"site {number} does not exist")
        current = current.where(Assignment.site_id == number)
    else:
        if session.get(Customer, number) is None:
            raise NotFound(f"customer {number} does not exist")
        current = current.where(Site.customer_id == number)
    return list(session.scalars(query.where(Device.id.in_(current))))


def _plan_waves(plan: RolloutPlan, device_ids: list[str]) -> dict[str, int]:
    """Device id -> wave: the canary list is wave 0, then cumulative percentages of the rest."""
    waves = list(plan.waves)
    if not waves or any(not 1 <= p <= 100 for p in waves) or waves != sorted(set(waves)):
        raise Invalid("waves", "waves: strictly increasing percentages in 1..100, "
                      "e.g. [10, 50, 100]")
    if waves[-1] != 100:
        raise Invalid("waves", "waves: the last wave must be 100 (every device)")
    canary = _check_ids(list(plan.canary), "canary")
    outside = [d for d in canary if d not in device_ids]
    if outside:
        raise Invalid("canary", f"canary: device {outside[0]} is not in the rollout's target")
    rest = [d for d in device_ids if d not in canary]
    plan_of = {d: 0 for d in canary}
    done = 0
    for number, percent in enumerate(waves, start=1):
        upto = math.ceil(len(rest) * percent / 100)
        for device_id in rest[done:upto]:
            plan_of[device_id] = number
        done = max(done, upto)
    return plan_of


def create_rollout(session: Session, *, plan: RolloutPlan, packages: PackageSource,
                   actor: User | None = None, now: int | None = None) -> Rollout:
    """Create a running rollout (the engine starts its first wave at its next tick)."""
    now = _now() if now is None else now
    if not 1 <= plan.content_version <= 65_535:
        raise Invalid("content_version", "content_version must be in 1..65535")
    for name in ("success_threshold", "failure_threshold"):
        if not 0 <= getattr(plan, name) <= 100:
            raise Invalid(name, f"{name} must be a percentage in 0..100")
    if not 10 <= plan.device_timeout_s <= 7 * 24 * 3600:
        raise Invalid("device_timeout_s", "device_timeout_s must be between 10 s and 7 days")
    devices = target_devices(session, plan.target_kind, plan.target_ref)
    if not devices:
        raise Invalid("target_ref", f"{plan.target_kind} {plan.target_ref} has no devices to "
                      "roll out to")
    waves = _plan_waves(plan, [d.id for d in devices])
    displays = {d.id: display_of_board(d.board) for d in devices}
    for display in sorted(set(displays.values())):
        if packages.package(session, plan.content_version, display) is None:
            raise NotFound(f"content version {plan.content_version} has no package for "
                           f"display {display}; create or render that version first")
    rollout = Rollout(content_version=plan.content_version, target_kind=plan.target_kind,
                      target_ref=plan.target_ref, waves=json.dumps(list(plan.waves)),
                      wave_count=len(plan.waves) + 1, current_wave=-1,
                      success_threshold=plan.success_threshold,
                      failure_threshold=plan.failure_threshold,
                      device_timeout_s=plan.device_timeout_s, state=RolloutState.running,
                      created_by=actor.id if actor else None, created_ms=now, updated_ms=now)
    session.add(rollout)
    session.flush()
    session.execute(
        update(RolloutDevice)
        .where(RolloutDevice.device_id.in_(list(displays)), RolloutDevice.state.in_(UNFINISHED))
        .values(state=S.superseded, updated_ms=now))
    session.add_all(RolloutDevice(rollout_id=rollout.id, device_id=device_id, wave=wave,
                                  display=displays[device_id], state=S.pending, updated_ms=now)
                    for device_id, wave in sorted(waves.items()))
    audit.record(session, user=actor, action="create", entity="rollout", entity_id=rollout.id,
                 detail={"content_version": plan.content_version, "target":
                         f"{plan.target_kind}:{plan.target_ref}", "devices": len(waves)})
    return rollout


def get_rollout(session: Session, *, rollout_id: int) -> Rollout:
    """One rollout; NotFound if there is none."""
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"rollout {rollout_id} does not exist")
    return rollout


def list_rollouts(session: Session, *, state: RolloutState | None = None,
                  offset: int = 0, limit: int = 50) -> tuple[list[Rollout], int]:
    """Rollouts, newest first, and how many match."""
    query = select(Rollout)
    if state is not None:
        query = query.where(Rollout.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    page = session.scalars(query.order_by(Rollout.id.desc()).offset(offset).limit(limit))
    return list(page), total


def rollout_counts(session: Session, rollout_id: int) -> RolloutCounts:
    """Devices per state, overall and per wave."""
    counts = RolloutCounts()
    rows = session.execute(
        select(RolloutDevice.wave, RolloutDevice.state, func.count())
        .where(RolloutDevice.rollout_id == rollout_id)
        .group_by(RolloutDevice.wave, RolloutDevice.state))
    for wave, state, count in rows:
        name = RolloutDeviceState(state).value
        counts.total[name] = counts.total.get(name, 0) + count
        counts.waves.setdefault(wave, {})[name] = count
    return counts


def rollout_devices(session: Session, rollout_id: int) -> list[RolloutDevice]:
    """Every entry of a rollout, by wave and device."""
    return list(session.scalars(
        select(RolloutDevice).where(RolloutDevice.rollout_id == rollout_id)
        .order_by(RolloutDevice.wave, RolloutDevice.device_id)))


def _transition(session: Session, rollout_id: int, allowed: Sequence[RolloutState],
                target: RolloutState, action: str, actor: User | None) -> Rollout:
    rollout = get_rollout(session, rollout_id=rollout_id)
    # Conditional: an engine tick halting or completing it at the same moment wins cleanly.
    result = session.execute(update(Rollout).where(Rollout.id == rollout_id,
                                                   Rollout.state.in_(allowed))
                             .values(state=target, state_reason=f"{action} by user",
                                     updated_ms=_now()))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.refresh(rollout)
        raise Conflict(f"rollout {rollout_id} is {rollout.state.value}; {action} needs it "
                       f"{' or '.join(s.value for s in allowed)}")
    audit.record(session, user=actor, action=action, entity="rollout", entity_id=rollout_id)
    session.refresh(rollout)
    return rollout


def pause_rollout(session: Session, *, rollout_id: int, actor: User | None = None) -> Rollout:
    """Stop starting waves (devices already asked go on, and their reports still count)."""
    return _transition(session, rollout_id, (RolloutState.running,), RolloutState.paused,
                       "pause", actor)


def resume_rollout(session: Session, *, rollout_id: int, actor: User | None = None) -> Rollout:
    """Run a paused or halted rollout again (a halted one halts again if still failing)."""
    return _transition(session, rollout_id, (RolloutState.paused, RolloutState.halted),
                       RolloutState.running, "resume", actor)


def abort_rollout(session: Session, *, rollout_id: int, actor: User | None = None) -> Rollout:
    """Give up: the engine clears ``desired`` of every device that has not applied."""
    return _transition(session, rollout_id, LIVE, RolloutState.aborted, "abort", actor)


# --------------------------------------------------------------------------- reported
def _newest_entry(device_id: str, *columns: Any) -> Select[Any]:
    """``columns`` of the device's newest rollout entry that its reports can still change
    (not superseded by a newer rollout, not waiting for its wave, not retired)."""
    return (select(*columns).join(Rollout, Rollout.id == RolloutDevice.rollout_id)
            .where(RolloutDevice.device_id == device_id,
                   RolloutDevice.state.notin_((S.superseded, S.pending, S.retired)))
            .order_by(RolloutDevice.rollout_id.desc()).limit(1))


def desired_to_repeat(session: Session, report: Reported) -> tuple[int, str] | None:
    """``(version, display)`` of the ``desired`` a device should have but does not know of.

    A device reports after every connect.  If its newest live entry timed out and the report
    neither shows nor names that version, the retained ``desired`` never reached it (e.g.
    the broker lost its retained messages in a restart without persistence), so the caller
    publishes it again.  Only timed-out entries: right after a connect a device reports
    before the retained ``desired`` arrives, and repeating it then would be noise (or undo
    a deliberate change of ``desired`` made meanwhile).
    """
    entry = session.execute(_newest_entry(
        report.device_id, Rollout.content_version, RolloutDevice.display, RolloutDevice.state,
        Rollout.state)).first()
    if entry is None:
        return None
    version, display, state, rollout_state = entry
    if (rollout_state == RolloutState.aborted or state != S.timed_out
            or version in (report.version, report.desired)):
        return None
    return version, display


def apply_reported(session: Session, report: Reported, now: int) -> int | None:
    """Record what a device reports; return the id of the rollout entry it changed, if any.

    The device's own ``content_version`` follows the version it shows.  Its newest unfinished
    or failed entry moves to ``applied`` when it shows that rollout's version (whatever the
    entry said before: a late ``applied`` beats ``timed_out``), to ``refused`` when it refused
    that version, and from ``offline`` to ``delivered`` when it reports ``downloading``.
    """
    session.execute(update(Device).where(Device.id == report.device_id)
                    .values(content_version=report.version, last_seen_ms=now))
    entry = session.execute(_newest_entry(report.device_id, RolloutDevice,
                                          Rollout.content_version)).first()
    if entry is None:
        return None
    row, version = entry
    new_state: RolloutDeviceState | None = None
    reason: str | None = None
    if report.version == version and report.state == "applied":
        new_state = S.applied
    elif report.state == "refused" and report.desired == version:
        new_state, reason = S.refused, report.reason
    elif report.state == "downloading" and report.desired == version and row.state == S.offline:
        new_state = S.delivered
    if new_state is None or (new_state == row.state and reason == row.reason):
        return None
    values: dict[str, object] = {"state": new_state, "reason": reason, "updated_ms": now}
    if new_state == S.delivered:
        values["started_ms"] = now
    result = session.execute(update(RolloutDevice).where(
        RolloutDevice.rollout_id == row.rollout_id, RolloutDevice.device_id == row.device_id,
        RolloutDevice.state == row.state).values(**values))
    return row.rollout_id if result.rowcount == 1 else None  # type: ignore[attr-defined]
