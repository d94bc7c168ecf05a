"""Rollouts of content versions: create, list, read with counts per state and per wave,
pause, resume, abort.

Coordinators (who own content) and ops (who own devices) run rollouts, as do admins; other
roles get 403.  The engine (``palaute rollout run``) does the delivering; these routes only
change what the database says should happen.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from fleet.api.deps import SessionDep, StaffUser
from fleet.api.schemas import (
    CONFLICT,
    ERRORS,
    MAX_ID,
    NOT_FOUND,
    DeviceId,
    Page,
    PageDep,
    registry_errors,
)
from fleet.db.models import Rollout, RolloutDeviceState, RolloutState
from fleet.rollouts import service
from fleet.rollouts.engine import waves_of
from fleet.rollouts.packages import StoredPackages

router = APIRouter(prefix="/rollouts", tags=["rollouts"], responses=ERRORS)

RolloutIdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
Percent = Annotated[int, Field(ge=0, le=100)]


class RolloutCreate(BaseModel):
    """A content version, a target and how carefully to proceed."""

    content_version: int = Field(ge=1, le=65_535)
    target_kind: Literal["device", "site", "customer", "selection"]
    target_ref: str = Field(min_length=1, max_length=64,
                            description="a device id, or the numeric id of the site, "
                                        "customer or selection")
    canary: list[DeviceId] = Field(default=[], max_length=100,
                                   description="devices of the target updated first (wave 0)")
    waves: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        default=[100], min_length=1, max_length=20,
        description="cumulative percentages of the other devices, ending with 100")
    success_threshold: Percent = Field(default=90, description="percent of a wave that must "
                                       "apply before the next wave starts")
    failure_threshold: Percent = Field(default=10, description="percent refused or timed "
                                       "out (of started waves) above which the rollout halts")
    device_timeout_s: int = Field(default=900, ge=10, le=7 * 24 * 3600)


class RolloutPublic(BaseModel):
    """A rollout and how many devices are in each state, overall and per wave."""

    id: int
    content_version: int
    target_kind: str
    target_ref: str
    waves: list[int]
    current_wave: int = Field(description="-1 before the first wave; wave 0 is the canary")
    success_threshold: int
    failure_threshold: int
    device_timeout_s: int
    state: RolloutState
    state_reason: str
    created_by: int | None
    created_ms: int
    updated_ms: int
    counts: dict[str, int]
    wave_counts: dict[int, dict[str, int]]


class RolloutDevicePublic(BaseModel):
    """One device's state in a rollout."""

    device_id: str
    wave: int
    display: str
    state: RolloutDeviceState
    reason: str | None
    started_ms: int | None
    updated_ms: int


def rollout_public(session: Session, rollout: Rollout) -> RolloutPublic:
    """The API form of a rollout, with its counts."""
    counts = service.rollout_counts(session, rollout.id)
    return RolloutPublic(
        id=rollout.id, content_version=rollout.content_version,
        target_kind=rollout.target_kind, target_ref=rollout.target_ref,
        waves=waves_of(rollout), current_wave=rollout.current_wave,
        success_threshold=rollout.success_threshold,
        failure_threshold=rollout.failure_threshold, device_timeout_s=rollout.device_timeout_s,
        state=rollout.state, state_reason=rollout.state_reason, created_by=rollout.created_by,
        created_ms=rollout.created_ms, updated_ms=rollout.updated_ms, counts=counts.total,
        wave_counts=counts.waves)


@router.post("", response_model=RolloutPublic, status_code=status.HTTP_201_CREATED,
             responses={**NOT_FOUND, **CONFLICT})
def post_rollout(body: RolloutCreate, user: StaffUser, session: SessionDep) -> RolloutPublic:
    """Start a rollout (404 if the target or the content's package for a display is missing;
    422 for a bad wave plan or a canary outside the target)."""
    plan = service.RolloutPlan(**body.model_dump())
    with registry_errors():
        rollout = service.create_rollout(session, plan=plan, packages=StoredPackages(),
                                         actor=user)
    return rollout_public(session, rollout)


@router.get("", response_model=Page[RolloutPublic])
def list_rollouts(_user: StaffUser, session: SessionDep, page: PageDep,
                  state: RolloutState | None = None) -> Page[RolloutPublic]:
    """Rollouts, newest first."""
    rollouts, total = service.list_rollouts(session, state=state, offset=page.offset,
                                            limit=page.limit)
    return Page(items=[rollout_public(session, r) for r in rollouts], total=total,
                offset=page.offset, limit=page.limit)


@router.get("/{rollout_id}", response_model=RolloutPublic, responses=NOT_FOUND)
def get_rollout(rollout_id: RolloutIdPath, _user: StaffUser,
                session: SessionDep) -> RolloutPublic:
    """One rollout with its counts per state and per wave."""
    with registry_errors():
        rollout = service.get_rollout(session, rollout_id=rollout_id)
    return rollout_public(session, rollout)


@router.get("/{rollout_id}/devices", response_model=list[RolloutDevicePublic],
            responses=NOT_FOUND)
def get_rollout_devices(rollout_id: RolloutIdPath, _user: StaffUser,
                        session: SessionDep) -> list[RolloutDevicePublic]:
    """Every device of a rollout with its state (and refusal reason)."""
    with registry_errors():
        service.get_rollout(session, rollout_id=rollout_id)
    return [RolloutDevicePublic(device_id=r.device_id, wave=r.wave, display=r.display,
                                state=r.state, reason=r.reason, started_ms=r.started_ms,
                                updated_ms=r.updated_ms)
            for r in service.rollout_devices(session, rollout_id)]


def _action(name: str, doc: str) -> None:
    act = getattr(service, f"{name}_rollout")

    def endpoint(rollout_id: RolloutIdPath, user: StaffUser,
                 session: SessionDep) -> RolloutPublic:
        with registry_errors():
            rollout = act(session, rollout_id=rollout_id, actor=user)
        return rollout_public(session, rollout)

    endpoint.__doc__ = doc
    endpoint.__name__ = f"{name}_rollout"
    router.post(f"/{{rollout_id}}/{name}", response_model=RolloutPublic,
                responses={**NOT_FOUND, **CONFLICT})(endpoint)


_action("pause", "Stop starting waves (409 unless running).")
_action("resume", "Run a paused or halted rollout again (409 otherwise).")
_action("abort", "Give up; the engine clears `desired` of devices that did not apply "
                 "(409 if already aborted or completed).")
