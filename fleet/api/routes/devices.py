"""Terminals in the registry, their latest reported state and their assignment history.

Staff (coordinators, ops, admins) read; ops and admins register, edit and retire; installers
may register (that is their job on site) but read nothing.  Moving devices between sites is
``/assignments``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet.api.deps import DeviceAccountsDep, SessionDep, StaffUser, broker_errors, require
from fleet.api.schemas import (
    CONFLICT,
    ERRORS,
    MAX_ID,
    NOT_FOUND,
    Board,
    DeviceId,
    Notes,
    Page,
    PageDep,
    Problem,
    registry_errors,
)
from fleet.db.models import Assignment, Device, DeviceState, Role, Site, User
from fleet.db.models import Vote as VoteRow
from fleet.services import provisioning, registry

router = APIRouter(prefix="/devices", tags=["devices"], responses=ERRORS)

Registrar = Annotated[User, Depends(require(Role.ops, Role.installer))]
Operator = Annotated[User, Depends(require(Role.ops))]


class DevicePublic(BaseModel):
    """A terminal as lists show it: registry fields, latest reported state, current site."""

    id: str
    board: str
    state: DeviceState
    notes: str
    created_ms: int
    online: bool
    last_seen_ms: int | None
    fw_version: str | None
    content_version: int | None
    acked_seq: int
    site_id: int | None
    since_ms: int | None


class CurrentAssignment(BaseModel):
    """Where a device stands now."""

    assignment_id: int
    site_id: int
    site_name: str
    customer_id: int
    since_ms: int


class DeviceDetail(DevicePublic):
    """One terminal with its current assignment spelled out."""

    assignment: CurrentAssignment | None


class DeviceCreate(BaseModel):
    """A terminal to add to stock; the id is ``pt-`` and 12 lowercase hex digits."""

    id: DeviceId
    board: Board = ""
    notes: Notes = ""


class DeviceUpdate(BaseModel):
    """Fields to change; omitted fields stay as they are."""

    board: Board | None = None
    notes: Notes | None = None


class AssignmentPublic(BaseModel):
    """One stay of a device at a site; ``end_ms`` is null while it lasts."""

    id: int
    device_id: str
    site_id: int
    start_ms: int
    end_ms: int | None


def assignment_public(assignment: Assignment) -> AssignmentPublic:
    """The API form of an assignment row."""
    return AssignmentPublic(id=assignment.id, device_id=assignment.device_id,
                            site_id=assignment.site_id, start_ms=assignment.start_ms,
                            end_ms=assignment.end_ms)


def device_public(device: Device, current: Assignment | None) -> DevicePublic:
    """The list form of a device and its open assignment (if any)."""
    return DevicePublic(
        id=device.id, board=device.board, state=device.state, notes=device.notes,
        created_ms=device.created_ms, online=device.online, last_seen_ms=device.last_seen_ms,
        fw_version=device.fw_version, content_version=device.content_version,
        acked_seq=device.acked_seq, site_id=current.site_id if current else None,
        since_ms=current.start_ms if current else None)


def device_detail(session: Session, device: Device) -> DeviceDetail:
    """The detail form: the list form plus the current site's name and customer."""
    current = registry.current_assignment(session, device_id=device.id)
    assignment = None
    if current is not None:
        site = session.get(Site, current.site_id)
        assert site is not None  # the foreign key guarantees it
        assignment = CurrentAssignment(assignment_id=current.id, site_id=site.id,
                                       site_name=site.name, customer_id=site.customer_id,
                                       since_ms=current.start_ms)
    return DeviceDetail(**device_public(device, current).model_dump(), assignment=assignment)


@router.get("", response_model=Page[DevicePublic])
def list_devices(_user: StaffUser, session: SessionDep, page: PageDep,
                 state: DeviceState | None = None,
                 site_id: Annotated[int | None, Query(
                     ge=1, le=MAX_ID, description="standing at this site now")] = None,
                 customer_id: Annotated[int | None, Query(
                     ge=1, le=MAX_ID, description="standing at a site of this customer now")
                 ] = None,
                 online: bool | None = None,
                 q: Annotated[str | None, Query(max_length=15, pattern=r"^[0-9a-z-]*$",
                                                description="id prefix")] = None,
                 ) -> Page[DevicePublic]:
    """List devices by id, filtered by state, current site or customer, link and id prefix."""
    rows, total = registry.list_devices(
        session, state=state, site_id=site_id, customer_id=customer_id, online=online, q=q,
        offset=page.offset, limit=page.limit)
    return Page(items=[device_public(d, a) for d, a in rows], total=total,
                offset=page.offset, limit=page.limit)


@router.post("", response_model=DeviceDetail, status_code=status.HTTP_201_CREATED,
             responses=CONFLICT)
def post_device(body: DeviceCreate, user: Registrar, session: SessionDep) -> DeviceDetail:
    """Register a terminal in stock (409 if it is already registered)."""
    with registry_errors():
        device = registry.register_device(session, device_id=body.id, board=body.board,
                                          notes=body.notes, exist_ok=False, actor=user)
    return device_detail(session, device)


@router.get("/{device_id}", response_model=DeviceDetail, responses=NOT_FOUND)
def get_device(device_id: str, _user: StaffUser, session: SessionDep) -> DeviceDetail:
    """One terminal with its current assignment and latest reported state."""
    with registry_errors():
        device = registry.get_device(session, device_id=device_id)
    return device_detail(session, device)


@router.patch("/{device_id}", response_model=DeviceDetail, responses=NOT_FOUND)
def patch_device(device_id: str, body: DeviceUpdate, user: Operator,
                 session: SessionDep) -> DeviceDetail:
    """Change a terminal's board or notes."""
    with registry_errors():
        device = registry.update_device(session, device_id=device_id, board=body.board,
                                        notes=body.notes, actor=user)
    return device_detail(session, device)


@router.post("/{device_id}/retire", response_model=DeviceDetail,
             responses={**NOT_FOUND, **CONFLICT,
                        503: {"model": Problem, "description": "the broker is unreachable"}})
def retire_device(device_id: str, user: Operator, session: SessionDep,
                  accounts: DeviceAccountsDep) -> DeviceDetail:
    """Retire a terminal for good: its assignment ends now and its votes are refused.

    Its broker account is deleted and it is disconnected; if the broker cannot be reached
    that is a 503 and nothing changes.
    """
    with registry_errors(), broker_errors("remove the device's MQTT account"):
        device = provisioning.retire_device(session, accounts=accounts, device_id=device_id,
                                            actor=user)
    return device_detail(session, device)


@router.get("/{device_id}/assignments", response_model=Page[AssignmentPublic],
            responses=NOT_FOUND)
def device_assignments(device_id: str, _user: StaffUser, session: SessionDep,
                       page: PageDep) -> Page[AssignmentPublic]:
    """The device's assignment history, newest first."""
    with registry_errors():
        rows, total = registry.device_history(session, device_id=device_id,
                                              offset=page.offset, limit=page.limit)
    return Page(items=[assignment_public(a) for a in rows], total=total, offset=page.offset,
                limit=page.limit)


class DeviceVotes(BaseModel):
    """How many votes the fleet holds from one device."""

    device_id: str
    votes: int
    last_seq: int | None


@router.get("/{device_id}/votes", response_model=DeviceVotes, responses=NOT_FOUND)
def device_votes(device_id: str, _user: StaffUser, session: SessionDep) -> DeviceVotes:
    """Count the stored votes of one device."""
    with registry_errors():
        registry.get_device(session, device_id=device_id)
    count, last = session.execute(
        select(func.count(), func.max(VoteRow.seq)).where(VoteRow.device_id == device_id)).one()
    return DeviceVotes(device_id=device_id, votes=count, last_seq=last)
