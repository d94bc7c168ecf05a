"""Fleet-wide totals (the demo's live line reads the same numbers)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from pydantic import BaseModel

from fleet.api.deps import SessionDep, StaffUser
from fleet.services.stats import fleet_totals

router = APIRouter(prefix="/stats", tags=["stats"])


class TotalsPublic(BaseModel):
    """Counts across the whole fleet."""

    devices: int
    devices_online: int
    votes: int
    votes_filtered: int


@router.get("", response_model=TotalsPublic)
def totals(_user: StaffUser, session: SessionDep) -> TotalsPublic:
    """Devices, online devices, stored votes and abuse-filtered votes."""
    return TotalsPublic(**asdict(fleet_totals(session)))
