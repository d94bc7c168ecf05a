"""Sites: places where terminals stand, with their time zone and opening hours.

Coordinators (and admins) write; ops read; a customer viewer reads only its own customer's
sites, and other sites answer 404 as if they did not exist.  The devices standing at a site
are staff-only: a device's firmware and link state are the operator's business.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel

from fleet.api.deps import SessionDep, StaffUser, require
from fleet.api.routes.devices import DevicePublic, device_public
from fleet.api.schemas import (
    CONFLICT,
    ERRORS,
    NOT_FOUND,
    Address,
    IdFilter,
    Name,
    OpeningExceptions,
    OpeningHours,
    Page,
    PageDep,
    RefId,
    SearchText,
    SiteIdPath,
    Timezone,
    registry_errors,
)
from fleet.db.models import Role, Site, User
from fleet.services import registry

router = APIRouter(prefix="/sites", tags=["sites"], responses=ERRORS)

Reader = Annotated[User, Depends(require(Role.coordinator, Role.ops, Role.customer_viewer))]
Writer = Annotated[User, Depends(require(Role.coordinator))]


class SiteCreate(BaseModel):
    """A new site of an existing customer."""

    customer_id: RefId
    name: Name
    address: Address = ""
    timezone: Timezone = "UTC"
    opening_hours: OpeningHours = {}
    opening_exceptions: OpeningExceptions = {}


class SiteUpdate(BaseModel):
    """Fields to change; omitted fields stay as they are.  The customer cannot change."""

    name: Name | None = None
    address: Address | None = None
    timezone: Timezone | None = None
    opening_hours: OpeningHours | None = None
    opening_exceptions: OpeningExceptions | None = None


class SitePublic(BaseModel):
    """A site as the API shows it."""

    id: int
    customer_id: int
    name: str
    address: str
    timezone: str
    opening_hours: dict[str, list[list[str]]]
    opening_exceptions: dict[str, list[list[str]]]
    created_ms: int


def site_public(site: Site) -> SitePublic:
    """The API form of a site (hours decoded from their stored JSON)."""
    return SitePublic(id=site.id, customer_id=site.customer_id, name=site.name,
                      address=site.address, timezone=site.timezone,
                      opening_hours=registry.opening_hours_of(site),
                      opening_exceptions=registry.opening_exceptions_of(site),
                      created_ms=site.created_ms)


@router.post("", response_model=SitePublic, status_code=status.HTTP_201_CREATED,
             responses=NOT_FOUND)
def post_site(body: SiteCreate, user: Writer, session: SessionDep) -> SitePublic:
    """Create a site (404 if the customer does not exist)."""
    with registry_errors():
        site = registry.create_site(
            session, customer_id=body.customer_id, name=body.name, address=body.address,
            timezone=body.timezone, opening_hours=body.opening_hours,
            opening_exceptions=body.opening_exceptions, actor=user)
    return site_public(site)


@router.get("", response_model=Page[SitePublic])
def list_sites(user: Reader, session: SessionDep, page: PageDep,
               customer_id: IdFilter = None, q: SearchText = None) -> Page[SitePublic]:
    """Sites by customer and name; a customer viewer sees only its own customer's."""
    with registry_errors():
        rows, total = registry.list_sites(
            session, scope=registry.customer_scope(user), customer_id=customer_id, q=q,
            offset=page.offset, limit=page.limit)
    return Page(items=[site_public(r) for r in rows], total=total, offset=page.offset,
                limit=page.limit)


@router.get("/{site_id}", response_model=SitePublic, responses=NOT_FOUND)
def get_site(site_id: SiteIdPath, user: Reader, session: SessionDep) -> SitePublic:
    """One site."""
    with registry_errors():
        site = registry.get_site(session, site_id=site_id, scope=registry.customer_scope(user))
    return site_public(site)


@router.patch("/{site_id}", response_model=SitePublic, responses=NOT_FOUND)
def patch_site(site_id: SiteIdPath, body: SiteUpdate, user: Writer,
               session: SessionDep) -> SitePublic:
    """Change a site's name, address, time zone or hours."""
    with registry_errors():
        site = registry.update_site(
            session, site_id=site_id, name=body.name, address=body.address,
            timezone=body.timezone, opening_hours=body.opening_hours,
            opening_exceptions=body.opening_exceptions, actor=user)
    return site_public(site)


@router.delete("/{site_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={**NOT_FOUND, **CONFLICT})
def delete_site(site_id: SiteIdPath, user: Writer, session: SessionDep) -> None:
    """Delete a site that never had a device (409 otherwise: its history must stay)."""
    with registry_errors():
        registry.delete_site(session, site_id=site_id, actor=user)


@router.get("/{site_id}/devices", response_model=Page[DevicePublic], responses=NOT_FOUND)
def site_devices(site_id: SiteIdPath, _user: StaffUser, session: SessionDep,
                 page: PageDep) -> Page[DevicePublic]:
    """The devices standing at the site now (open assignments), by device id."""
    with registry_errors():
        rows, total = registry.site_devices(session, site_id=site_id, offset=page.offset,
                                            limit=page.limit)
    return Page(items=[device_public(d, a) for d, a in rows], total=total,
                offset=page.offset, limit=page.limit)

