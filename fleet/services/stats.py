"""Fleet-wide totals."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet.db.models import Device
from fleet.db.models import Vote as VoteRow
from fleet.protocol.v1 import FLAG_FILTERED


@dataclass(frozen=True)
class FleetTotals:
    """Counts across the whole fleet."""

    devices: int
    devices_online: int
    votes: int
    votes_filtered: int


def fleet_totals(session: Session) -> FleetTotals:
    """Count devices, online devices, votes and abuse-filtered votes."""
    devices, online = session.execute(
        select(func.count(), func.count().filter(Device.online.is_(True)))).one()
    votes, filtered = session.execute(select(
        func.count(), func.count().filter(VoteRow.flags.op("&")(FLAG_FILTERED) != 0))).one()
    return FleetTotals(devices, online, votes, filtered)
