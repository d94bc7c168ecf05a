"""Moving devices between sites: assign, bulk assign, unassign (coordinators and admins).

Assignments form a history that never overlaps: a new one starts after the current one
started (which it closes at its own start), and never before the last one ended.  The
history is read at ``GET /devices/{id}/assignments``; a site's current devices at
``GET /sites/{id}/devices``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, Field

from fleet.api.deps import SessionDep, require
from fleet.api.routes.devices import AssignmentPublic, assignment_public
from fleet.api.schemas import (
    CONFLICT,
    ERRORS,
    MAX_LIMIT,
    NOT_FOUND,
    DeviceId,
    RefId,
    TimeMs,
    registry_errors,
)
from fleet.db.models import Role, User
from fleet.services import registry

router = APIRouter(prefix="/assignments", tags=["assignments"], responses=ERRORS)

Coordinator = Annotated[User, Depends(require(Role.coordinator))]


class AssignmentCreate(BaseModel):
    """Put a device at a site from ``start_ms`` (default: now), closing its current stay."""

    device_id: DeviceId
    site_id: RefId
    start_ms: TimeMs | None = None


class BulkAssignmentCreate(BaseModel):
    """Put several devices at one site from ``start_ms`` (default: now), all or none."""

    site_id: RefId
    device_ids: list[DeviceId] = Field(min_length=1, max_length=MAX_LIMIT)
    start_ms: TimeMs | None = None


class BulkAssignmentPublic(BaseModel):
    """The assignments a bulk request opened, in the order the devices were given."""

    site_id: int
    assignments: list[AssignmentPublic]


class Unassignment(BaseModel):
    """End a device's current stay at ``end_ms`` (default: now); it goes back to stock."""

    device_id: DeviceId
    end_ms: TimeMs | None = None


@router.post("", response_model=AssignmentPublic, status_code=status.HTTP_201_CREATED,
             responses={**NOT_FOUND, **CONFLICT})
def post_assignment(body: AssignmentCreate, user: Coordinator,
                    session: SessionDep) -> AssignmentPublic:
    """Assign (or reassign) a device; 409 if it is retired or the start is not after the
    current assignment's start."""
    with registry_errors():
        assignment = registry.assign_device(session, device_id=body.device_id,
                                            site_id=body.site_id, at_ms=body.start_ms,
                                            actor=user)
    return assignment_public(assignment)


@router.post("/bulk", response_model=BulkAssignmentPublic,
             status_code=status.HTTP_201_CREATED, responses={
                 **NOT_FOUND,
                 409: {"description": "nothing was changed; `detail.errors` lists every device "
                                      "that cannot be assigned and why"}})
def post_bulk_assignment(body: BulkAssignmentCreate, user: Coordinator,
                         session: SessionDep) -> BulkAssignmentPublic:
    """Assign many devices to one site at once; if any fails, none is assigned."""
    with registry_errors():
        assignments = registry.assign_devices(session, site_id=body.site_id,
                                              device_ids=body.device_ids,
                                              at_ms=body.start_ms, actor=user)
    return BulkAssignmentPublic(site_id=body.site_id,
                                assignments=[assignment_public(a) for a in assignments])


@router.post("/unassign", response_model=AssignmentPublic,
             responses={**NOT_FOUND, **CONFLICT})
def post_unassignment(body: Unassignment, user: Coordinator,
                      session: SessionDep) -> AssignmentPublic:
    """End a device's current assignment; returns the closed assignment."""
    with registry_errors():
        assignment = registry.unassign_device(session, device_id=body.device_id,
                                              at_ms=body.end_ms, actor=user)
    return assignment_public(assignment)
