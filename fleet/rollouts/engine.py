"""The rollout engine: one idempotent ``tick`` moves every live rollout forward.

A tick, per rollout, in its own transaction:

1. entries ``offline`` whose device is online again become ``delivered`` (their timeout starts
   now; the retained ``desired`` already reached them); ``delivered`` entries whose device went
   offline become ``offline`` (the timeout stops);
2. ``delivered`` entries older than the device timeout become ``timed_out``;
3. a running rollout whose refused + timed-out entries pass the failure threshold (percent of
   the entries of started waves, canary included) halts;
4. a running rollout whose current wave reached the success threshold (applied / wave size)
   starts the next wave: its entries become ``delivered`` (device online) or ``offline``, and
   ``desired`` is published, retained, for each; after the last wave it completes;
5. an aborted rollout clears ``desired`` (empty retained message) of every entry that had it
   and did not apply, once, except on devices a newer rollout has since sent its own;
6. retired devices (registry.retire_device marks their unfinished entries ``retired``, which
   no count includes) get their ``desired`` cleared, once.

Safe when several processes tick at once: every change is a conditional ``UPDATE`` (state as
it was read) and only the process whose update matched publishes.  ``desired`` is published
and acknowledged by the broker *before* the commit: a crash in between leaves the database
as it was, and the next tick publishes the same retained message again (harmless).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from fleet.db.models import Device, Rollout, RolloutDevice, RolloutDeviceState, RolloutState
from fleet.protocol.v1 import MAX_CHUNK, Topics, encode_desired
from fleet.rollouts.packages import PackageSource
from fleet.services.registry import RETIRED_NOT_CLEARED

log = logging.getLogger("palaute.rollouts")
S = RolloutDeviceState
# Entries whose outcome no longer counts for their rollout.
UNCOUNTED = (S.superseded, S.retired)
# A newer rollout's entry in one of these states means that rollout published its own
# ``desired`` to the device, so an older rollout must not clear it.
SENT = (S.offline, S.delivered, S.applied, S.refused, S.timed_out)
# ``RolloutDevice.reason`` of a retired entry once the engine cleared the device's
# ``desired`` (before: registry.RETIRED_NOT_CLEARED).
RETIRED_CLEARED = "desired cleared"


class Publisher(Protocol):
    """Publishes MQTT messages and returns once the broker has them all (QoS 1)."""

    def publish_all(self, messages: Sequence[tuple[str, bytes]], *, retain: bool) -> None:
        """Publish ``(topic, payload)`` pairs; raise on failure (the tick's transaction is
        then rolled back)."""


@dataclass
class TickResult:
    """What one tick did, for logs and tests."""

    ticked: list[int] = field(default_factory=list)  # rollouts looked at
    waves_started: list[tuple[int, int]] = field(default_factory=list)  # (rollout, wave)
    halted: list[int] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    timed_out: int = 0
    published: int = 0
    cleared: int = 0


class RolloutEngine:
    """Moves rollouts forward; see the module docstring."""

    def __init__(self, sessions: sessionmaker[Session], packages: PackageSource,
                 publish: Publisher, *, topics: Topics | None = None) -> None:
        """``publish`` must block until the broker acknowledged the message."""
        self.sessions = sessions
        self.packages = packages
        self.publish = publish
        self.topics = topics or Topics()

    def tick(self, now: int) -> TickResult:
        """Advance every live rollout once; ``now`` is epoch ms (tests pass their own)."""
        result = TickResult()
        with self.sessions() as session:
            # A completed rollout still follows devices that have not answered yet: a
            # delivered one's timeout, an offline one once it is online again.  Offline
            # devices that stay away cost nothing: the rollout is not ticked for them.
            waiting = select(RolloutDevice.rollout_id).where(
                RolloutDevice.rollout_id == Rollout.id,
                (RolloutDevice.state == S.delivered)
                | ((RolloutDevice.state == S.offline) & RolloutDevice.device_id.in_(
                    select(Device.id).where(Device.online.is_(True))))).exists()
            ids = list(session.scalars(select(Rollout.id).where(
                Rollout.state.in_((RolloutState.running, RolloutState.paused,
                                   RolloutState.halted))
                | ((Rollout.state == RolloutState.completed) & waiting)
                | ((Rollout.state == RolloutState.aborted) & Rollout.cleared_ms.is_(None)))
                .order_by(Rollout.id)))
        result.ticked.extend(ids)
        for rollout_id in ids:
            with self.sessions.begin() as session:
                self._tick_one(session, rollout_id, now, result)
        with self.sessions.begin() as session:
            self._clear_retired(session, now, result)
        return result

    def _clear_retired(self, session: Session, now: int, result: TickResult) -> None:
        """Publish an empty retained ``desired`` to devices retired mid-rollout, once."""
        not_cleared = (RolloutDevice.state == S.retired,
                       RolloutDevice.reason == RETIRED_NOT_CLEARED)
        devices = sorted(set(session.scalars(select(RolloutDevice.device_id)
                                             .where(*not_cleared))))
        if not devices:
            return
        # Two processes may both get here; clearing twice is harmless (same empty message).
        session.execute(update(RolloutDevice).where(
            *not_cleared, RolloutDevice.device_id.in_(devices))
            .values(reason=RETIRED_CLEARED, updated_ms=now))
        self.publish.publish_all([(self.topics.device(d, "desired"), b"") for d in devices],
                                 retain=True)
        result.cleared += len(devices)
        log.info("cleared desired of %d retired devices", len(devices))

    # -- one rollout -----------------------------------------------------------------------
    def _tick_one(self, session: Session, rollout_id: int, now: int,
                  result: TickResult) -> None:
        rollout = session.get(Rollout, rollout_id)
        if rollout is None:
            return
        if rollout.state == RolloutState.aborted:
            self._clear(session, rollout, now, result)
            return
        self._follow_presence(session, rollout, now, result)
        if rollout.state != RolloutState.running:
            return
        counts = self._counts(session, rollout.id, rollout.current_wave)
        started = sum(counts.values())
        failed = counts.get(S.refused, 0) + counts.get(S.timed_out, 0)
        if started and failed * 100 > rollout.failure_threshold * started:
            reason = (f"{failed} of {started} devices refused or timed out, above the "
                      f"failure threshold of {rollout.failure_threshold}%")
            if self._set_state(session, rollout, RolloutState.halted, reason, now):
                log.warning("rollout %d halted: %s", rollout.id, reason)
                result.halted.append(rollout.id)
            return
        self._advance(session, rollout, now, result)

    def _follow_presence(self, session: Session, rollout: Rollout, now: int,
                         result: TickResult) -> None:
        online = select(Device.id).where(Device.online.is_(True))
        offline = select(Device.id).where(Device.online.is_(False))
        where = RolloutDevice.rollout_id == rollout.id
        session.execute(update(RolloutDevice).where(
            where, RolloutDevice.state == S.offline, RolloutDevice.device_id.in_(online))
            .values(state=S.delivered, started_ms=now, updated_ms=now))
        session.execute(update(RolloutDevice).where(
            where, RolloutDevice.state == S.delivered, RolloutDevice.device_id.in_(offline))
            .values(state=S.offline, started_ms=None, updated_ms=now))
        timed_out = session.execute(update(RolloutDevice).where(
            where, RolloutDevice.state == S.delivered,
            RolloutDevice.started_ms <= now - rollout.device_timeout_s * 1000)
            .values(state=S.timed_out, updated_ms=now))
        result.timed_out += timed_out.rowcount  # type: ignore[attr-defined]

    def _counts(self, session: Session, rollout_id: int, upto_wave: int,
                wave: int | None = None) -> dict[RolloutDeviceState, int]:
        query = (select(RolloutDevice.state, func.count())
                 .where(RolloutDevice.rollout_id == rollout_id,
                        RolloutDevice.state.notin_(UNCOUNTED))
                 .group_by(RolloutDevice.state))
        query = (query.where(RolloutDevice.wave == wave) if wave is not None
                 else query.where(RolloutDevice.wave <= upto_wave))
        return {RolloutDeviceState(state): count for state, count in session.execute(query)}

    def _set_state(self, session: Session, rollout: Rollout, state: RolloutState, reason: str,
                   now: int) -> bool:
        changed = session.execute(update(Rollout).where(
            Rollout.id == rollout.id, Rollout.state == RolloutState.running,
            Rollout.current_wave == rollout.current_wave)
            .values(state=state, state_reason=reason, updated_ms=now))
        return bool(changed.rowcount == 1)  # type: ignore[attr-defined]

    def _advance(self, session: Session, rollout: Rollout, now: int,
                 result: TickResult) -> None:
        current = rollout.current_wave
        while True:
            if current >= 0:
                counts = self._counts(session, rollout.id, current, wave=current)
                size = sum(counts.values())
                if size and counts.get(S.applied, 0) * 100 < rollout.success_threshold * size:
                    return  # the current wave has not succeeded yet
            following = current + 1
            if following >= rollout.wave_count:
                if self._set_state(session, rollout, RolloutState.completed,
                                   "every wave reached the success threshold", now):
                    result.completed.append(rollout.id)
                return
            size = session.scalar(select(func.count()).where(
                RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave == following,
                RolloutDevice.state.notin_(UNCOUNTED))) or 0
            if size:
                self._start_wave(session, rollout, following, now, result)
                return
            current = following  # an empty wave (no canary, all superseded/retired) passes

    def _start_wave(self, session: Session, rollout: Rollout, wave: int, now: int,
                    result: TickResult) -> None:
        won = session.execute(update(Rollout).where(
            Rollout.id == rollout.id, Rollout.state == RolloutState.running,
            Rollout.current_wave == rollout.current_wave)
            .values(current_wave=wave, updated_ms=now))
        if won.rowcount != 1:  # type: ignore[attr-defined]
            return  # another process started it, or a user paused it meanwhile
        # Set-based: the won update above holds the rollout's row lock until commit, so no
        # other tick changes these entries meanwhile.
        pending = (RolloutDevice.rollout_id == rollout.id, RolloutDevice.wave <= wave,
                   RolloutDevice.state == S.pending)
        rows = session.execute(select(RolloutDevice.device_id, RolloutDevice.display)
                               .where(*pending).order_by(RolloutDevice.device_id)).all()
        payloads: dict[str, bytes] = {}
        for display in sorted({display for _, display in rows}):
            package = self.packages.package(session, rollout.content_version, display)
            if package is None:
                raise LookupError(f"content version {rollout.content_version} lost its "
                                  f"{display} package")
            payloads[display] = encode_desired(package.version, len(package.data),
                                               package.sha256, package.sig, MAX_CHUNK)
        session.execute(update(RolloutDevice).where(
            *pending, RolloutDevice.device_id.in_(select(Device.id).where(Device.online)))
            .values(state=S.delivered, started_ms=now, updated_ms=now))
        session.execute(update(RolloutDevice).where(*pending)
                        .values(state=S.offline, started_ms=None, updated_ms=now))
        self.publish.publish_all([(self.topics.device(device_id, "desired"), payloads[display])
                                  for device_id, display in rows], retain=True)
        result.published += len(rows)
        result.waves_started.append((rollout.id, wave))
        log.info("rollout %d: wave %d started (%d devices)", rollout.id, wave, len(rows))

    def _clear(self, session: Session, rollout: Rollout, now: int, result: TickResult) -> None:
        won = session.execute(update(Rollout).where(
            Rollout.id == rollout.id, Rollout.cleared_ms.is_(None)).values(cleared_ms=now))
        if won.rowcount != 1:  # type: ignore[attr-defined]
            return
        asked = (RolloutDevice.rollout_id == rollout.id,
                 RolloutDevice.state.in_((S.offline, S.delivered, S.timed_out, S.refused)))
        # A refused entry is never superseded, so a newer rollout may already own the
        # device's ``desired``.  Lock the newer entries first: a wave of a newer rollout
        # starting at this moment then either finishes (and is seen below) or waits for
        # this commit and publishes after our empty message.
        newer = aliased(RolloutDevice)
        session.execute(select(newer.rollout_id, newer.device_id).where(
            newer.rollout_id > rollout.id,
            newer.device_id.in_(select(RolloutDevice.device_id).where(*asked)))
            .with_for_update())
        taken_over = select(newer.device_id).where(
            newer.device_id == RolloutDevice.device_id, newer.rollout_id > rollout.id,
            newer.state.in_(SENT)).exists()
        devices = list(session.scalars(select(RolloutDevice.device_id)
                                       .where(*asked, ~taken_over)
                                       .order_by(RolloutDevice.device_id)))
        self.publish.publish_all([(self.topics.device(d, "desired"), b"") for d in devices],
                                 retain=True)
        result.cleared += len(devices)


def waves_of(rollout: Rollout) -> list[int]:
    """The wave percentages a rollout was created with."""
    return [int(p) for p in json.loads(rollout.waves)]
