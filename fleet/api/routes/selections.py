"""Saved selections: named lists of devices that rollouts can target.

Staff (coordinators, ops, admins) create, read and delete them; other roles get 403.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from pydantic import BaseModel, Field

from fleet.api.deps import SessionDep, StaffUser
from fleet.api.schemas import CONFLICT, ERRORS, MAX_ID, NOT_FOUND, DeviceId, Name, registry_errors
from fleet.db.models import Selection
from fleet.rollouts import service

router = APIRouter(prefix="/selections", tags=["selections"], responses=ERRORS)

SelectionIdPath = Annotated[int, Path(ge=1, le=MAX_ID)]


class SelectionCreate(BaseModel):
    """A name and the devices it holds (registered devices only)."""

    name: Name
    device_ids: list[DeviceId] = Field(min_length=1, max_length=10_000)


class SelectionPublic(BaseModel):
    """A saved selection."""

    id: int
    name: str
    device_ids: list[str]
    created_by: int | None
    created_ms: int


def selection_public(selection: Selection) -> SelectionPublic:
    """The API form of a selection."""
    return SelectionPublic(id=selection.id, name=selection.name,
                           device_ids=service.selection_devices(selection),
                           created_by=selection.created_by, created_ms=selection.created_ms)


@router.post("", response_model=SelectionPublic, status_code=status.HTTP_201_CREATED,
             responses={**NOT_FOUND, **CONFLICT})
def post_selection(body: SelectionCreate, user: StaffUser,
                   session: SessionDep) -> SelectionPublic:
    """Save a selection (404 if a device is not registered, 409 if the name is taken)."""
    with registry_errors():
        selection = service.create_selection(session, name=body.name,
                                             device_ids=body.device_ids, actor=user)
    return selection_public(selection)


@router.get("", response_model=list[SelectionPublic])
def list_selections(_user: StaffUser, session: SessionDep) -> list[SelectionPublic]:
    """Every saved selection, by name."""
    return [selection_public(s) for s in service.list_selections(session)]


@router.get("/{selection_id}", response_model=SelectionPublic, responses=NOT_FOUND)
def get_selection(selection_id: SelectionIdPath, _user: StaffUser,
                  session: SessionDep) -> SelectionPublic:
    """One selection."""
    with registry_errors():
        return selection_public(service.get_selection(session, selection_id=selection_id))


@router.delete("/{selection_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
def delete_selection(selection_id: SelectionIdPath, user: StaffUser,
                     session: SessionDep) -> None:
    """Forget a selection; rollouts made from it keep their devices."""
    with registry_errors():
        service.delete_selection(session, selection_id=selection_id, actor=user)
