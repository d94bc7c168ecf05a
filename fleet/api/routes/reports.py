"""Vote reports per site, device and customer, as JSON or CSV (docs/reports.md).

Who may read what is decided in the service's queries, not only here: a customer viewer's
requests carry its customer id down to the SQL that picks the sites, so a site, device or
customer outside it is simply not found (404).  Installers get 403.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field

from fleet.api.deps import SessionDep, require
from fleet.db.models import Role, User
from fleet.services.reports import (
    By,
    Granularity,
    Report,
    ReportError,
    ReportNotFound,
    ReportQuery,
    customer_report,
    device_report,
    report_to_csv,
    report_to_dict,
    site_report,
)

router = APIRouter(prefix="/reports", tags=["reports"])

ReportUser = Annotated[User, Depends(require(Role.coordinator, Role.ops, Role.customer_viewer))]
Format = Literal["json", "csv"]
# Site and customer ids are INTEGER columns: a larger number cannot exist, and 2**63 would
# overflow the database driver (a 500) instead of being a plain validation error.
SiteId = Annotated[int, Path(ge=1, le=2**31 - 1)]
CustomerId = Annotated[int, Path(ge=1, le=2**31 - 1)]
DeviceId = Annotated[str, Path(min_length=1, max_length=64)]


class BucketPublic(BaseModel):
    """Counts of one local period; ``counts[0]`` is button 1 (the most positive)."""

    start: str
    fold: int
    counts: list[int]
    total: int
    happy_index: float | None
    csat: float | None


class SeriesPublic(BaseModel):
    """The buckets of one group; ``key`` is null unless the report is split with ``by``."""

    key: dict[str, int | str] | None
    totals: BucketPublic
    buckets: list[BucketPublic]


class ReportSitePublic(BaseModel):
    """A site in the report and the number of buttons its metrics used."""

    id: int
    name: str
    customer_id: int
    timezone: str
    buttons: int


class ReportPublic(BaseModel):
    """A vote report."""

    scope: Literal["site", "device", "customer"]
    id: str
    name: str
    from_: date = Field(alias="from")
    to: date
    granularity: Granularity
    filtered: bool
    include_test: bool
    opening_hours_only: bool
    by: By | None
    buttons: int
    sites: list[ReportSitePublic]
    series: list[SeriesPublic]
    generated_at: str

    # "from" is a Python keyword: the field is from_, the JSON key "from".
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)


def report_query(
        start: Annotated[date, Query(alias="from", description="first local date, YYYY-MM-DD")],
        to: Annotated[date, Query(description="last local date (inclusive), YYYY-MM-DD")],
        granularity: Granularity = "day",
        filtered: Annotated[bool, Query(
            description="leave out votes the terminal's abuse rule flagged (flag bit 0)")] = True,
        include_test: Annotated[bool, Query(
            description="count test-mode votes (flag bit 2) too")] = False,
        opening_hours_only: Annotated[bool, Query(
            description="count only votes pressed during the site's opening hours")] = False,
        by: Annotated[By | None, Query(description="one series per value of this")] = None,
        buttons: Annotated[int | None, Query(
            ge=2, le=5, description="buttons per site (default: the highest one recorded)")
        ] = None,
) -> ReportQuery:
    """The report options shared by every report endpoint."""
    return ReportQuery(start=start, end=to, granularity=granularity, filtered=filtered,
                       include_test=include_test, opening_hours_only=opening_hours_only,
                       by=by, buttons=buttons)


QueryDep = Annotated[ReportQuery, Depends(report_query)]
FormatDep = Annotated[Format, Query(alias="format", description="json or csv")]

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/csv": {}}, "description": "the report (JSON, or CSV if asked)"},
    403: {"description": "this role may not read reports"},
    404: {"description": "not found, or not visible to this user"},
    422: {"description": "bad range or options"},
}


def _visible_customer(user: User) -> int | None:
    """The customer a user is confined to; None for staff, who see everything."""
    if user.role is not Role.customer_viewer:
        return None
    if user.customer_id is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "this customer viewer has no customer; ask an admin to set one")
    return user.customer_id


def _respond(make: Any, fmt: Format, filename: str) -> ReportPublic | Response:
    try:
        report: Report = make()
    except ReportNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except ReportError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if fmt == "csv":
        return Response(report_to_csv(report), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="{filename}"'})
    return ReportPublic.model_validate(report_to_dict(report))


def _filename(kind: str, ident: str, query: ReportQuery) -> str:
    return f"palaute-{kind}-{ident}-{query.start}-{query.end}-{query.granularity}.csv"


@router.get("/sites/{site_id}", response_model=ReportPublic, responses=_RESPONSES)
def get_site_report(site_id: SiteId, user: ReportUser, session: SessionDep, query: QueryDep,
                    fmt: FormatDep = "json") -> ReportPublic | Response:
    """Votes of one site per button and local period, with Happy Index and CSAT."""
    customer = _visible_customer(user)
    return _respond(lambda: site_report(session, site_id, query, customer_id=customer), fmt,
                    _filename("site", str(site_id), query))


@router.get("/devices/{device_id}", response_model=ReportPublic, responses=_RESPONSES)
def get_device_report(device_id: DeviceId, user: ReportUser, session: SessionDep, query: QueryDep,
                      fmt: FormatDep = "json") -> ReportPublic | Response:
    """Votes of one device, each bucketed in the time zone of the site it stood at."""
    customer = _visible_customer(user)
    return _respond(lambda: device_report(session, device_id, query, customer_id=customer),
                    fmt, _filename("device", device_id, query))


@router.get("/customers/{customer_id}", response_model=ReportPublic, responses=_RESPONSES)
def get_customer_report(customer_id: CustomerId, user: ReportUser, session: SessionDep,
                        query: QueryDep, fmt: FormatDep = "json") -> ReportPublic | Response:
    """Votes of every site of a customer; each site is bucketed in its own time zone."""
    customer = _visible_customer(user)
    return _respond(lambda: customer_report(session, customer_id, query,
                                            customer_id=customer),
                    fmt, _filename("customer", str(customer_id), query))
