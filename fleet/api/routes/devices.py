"""Terminals in the registry and their latest reported state."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, ConfigDict
from sqlalchemy import func, select

from fleet.api.deps import SessionDep, StaffUser
from fleet.db.models import Device, DeviceState
from fleet.db.models import Vote as VoteRow

router = APIRouter(prefix="/devices", tags=["devices"])


class DevicePublic(BaseModel):
    """A terminal as the API shows it."""

    model_config = ConfigDict(from_attributes=True)
    id: str
    board: str
    state: DeviceState
    online: bool
    last_seen_ms: int | None
    fw_version: str | None
    content_version: int | None
    acked_seq: int


class DevicePage(BaseModel):
    """One page of devices."""

    items: list[DevicePublic]
    total: int
    offset: int
    limit: int


@router.get("", response_model=DevicePage)
def list_devices(_user: StaffUser, session: SessionDep, state: DeviceState | None = None,
                 offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)
                 ) -> DevicePage:
    """List devices, optionally only those in ``state``, ordered by id."""
    query = select(Device)
    if state is not None:
        query = query.where(Device.state == state)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Device.id).offset(offset).limit(limit)).all()
    return DevicePage(items=[DevicePublic.model_validate(r) for r in rows], total=total,
                      offset=offset, limit=limit)


class DeviceVotes(BaseModel):
    """How many votes the fleet holds from one device."""

    device_id: str
    votes: int
    last_seq: int | None


@router.get("/{device_id}/votes", response_model=DeviceVotes)
def device_votes(device_id: str, _user: StaffUser, session: SessionDep) -> DeviceVotes:
    """Count the stored votes of one device."""
    if session.get(Device, device_id) is None:
        raise HTTPException(404, f"device {device_id} is not registered")
    count, last = session.execute(
        select(func.count(), func.max(VoteRow.seq)).where(VoteRow.device_id == device_id)).one()
    return DeviceVotes(device_id=device_id, votes=count, last_seq=last)
