"""Models and conventions shared by the routers: bounded field types, pages, errors.

Bounds matter beyond tidiness: every value that reaches SQL must fit its column, or
PostgreSQL refuses it with an error that would surface as a 500.  Ids fit INTEGER, times fit
BIGINT, texts fit their VARCHAR and hold no NUL byte (PostgreSQL text cannot).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Depends, HTTPException, Path, Query, status
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from fleet.services import registry
from fleet.services.registry import (
    BulkConflict,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    RegistryError,
)

MAX_ID = 2**31 - 1  # INTEGER primary keys
# 9999-12-31T23:59:59.999Z: any real time fits, and so does BIGINT.
MAX_MS = 253_402_300_799_999
MAX_OFFSET = 2**31 - 1
MAX_LIMIT = 500
NO_NUL = r"^[^\x00]*$"

# --------------------------------------------------------------------------- field types

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200,
                                        pattern=NO_NUL)]
Address = Annotated[str, StringConstraints(max_length=1000, pattern=NO_NUL)]
Notes = Annotated[str, StringConstraints(max_length=2000, pattern=NO_NUL)]
Board = Annotated[str, StringConstraints(max_length=64, pattern=NO_NUL)]
DeviceId = Annotated[str, StringConstraints(pattern=r"^pt-[0-9a-f]{12}$"),
                     Field(examples=["pt-a1b2c3d4e5f6"])]
TimeMs = Annotated[int, Field(ge=0, le=MAX_MS, description="epoch milliseconds")]
Timezone = Annotated[str, StringConstraints(max_length=64),
                     AfterValidator(registry.check_timezone),
                     Field(examples=["Europe/Helsinki"])]

HHMM = Annotated[str, StringConstraints(pattern=r"^(?:(?:[01]\d|2[0-3]):[0-5]\d|24:00)$")]
Interval = Annotated[tuple[HHMM, HHMM], Field(description="[open, close], open < close")]
DayIntervals = Annotated[list[Interval], Field(max_length=registry.MAX_INTERVALS_PER_DAY)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DateKey = Annotated[str, StringConstraints(pattern=r"^\d{4}-\d{2}-\d{2}$")]


def _hours(value: dict[Weekday, list[tuple[str, str]]]) -> dict[str, list[list[str]]]:
    # The types above check shape and HH:MM; the service checks order and overlaps, so the
    # API and direct callers (CLI, demo) apply the same rules.
    return registry.check_opening_hours(value)


def _exceptions(value: dict[str, list[tuple[str, str]]]) -> dict[str, list[list[str]]]:
    return registry.check_opening_exceptions(value)


OpeningHours = Annotated[
    dict[Weekday, DayIntervals], AfterValidator(_hours),
    Field(description="Weekly hours: mon..sun, up to 4 non-overlapping [open, close] "
                      "intervals a day; a missing or empty day is closed.",
          examples=[{"mon": [["08:00", "12:00"], ["13:00", "20:00"]], "sun": []}])]
OpeningExceptions = Annotated[
    dict[DateKey, DayIntervals], AfterValidator(_exceptions),
    Field(max_length=registry.MAX_EXCEPTIONS,
          description="Dates whose hours replace the weekly ones; an empty list is closed.",
          examples=[{"2026-12-24": [["08:00", "12:00"]], "2026-12-25": []}])]

# Ids in bodies, paths and queries, bounded so that no value can overflow an INTEGER column.
RefId = Annotated[int, Field(ge=1, le=MAX_ID)]
CustomerIdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
SiteIdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
IdFilter = Annotated[int | None, Query(ge=1, le=MAX_ID)]
SearchText = Annotated[str | None, Query(max_length=100, pattern=NO_NUL,
                                         description="name contains, any case")]

# --------------------------------------------------------------------------- pages

T = TypeVar("T")


@dataclass(frozen=True)
class PageParams:
    """Which slice of a list to return."""

    offset: int
    limit: int


def page_params(offset: Annotated[int, Query(ge=0, le=MAX_OFFSET,
                                             description="items to skip")] = 0,
                limit: Annotated[int, Query(ge=1, le=MAX_LIMIT,
                                            description="items to return")] = 50,
                ) -> PageParams:
    """The ``offset``/``limit`` query parameters every list takes."""
    return PageParams(offset, limit)


PageDep = Annotated[PageParams, Depends(page_params)]


class Page(BaseModel, Generic[T]):
    """One page of a list: ``total`` counts every item that matches the filters."""

    items: list[T]
    total: int
    offset: int
    limit: int


# --------------------------------------------------------------------------- errors


class Problem(BaseModel):
    """A refused request: ``detail`` says what was wrong (and names the id or field)."""

    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, invalid or expired token"},
    403: {"model": Problem, "description": "the caller's role may not do this"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "the id names nothing the caller may see"}}
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "the request contradicts the stored state"}}


def http_error(exc: RegistryError) -> HTTPException:
    """The HTTP answer to a registry error (403, 404, 409 or 422; 400 if unclassified)."""
    if isinstance(exc, BulkConflict):
        # All-or-nothing: the body lists every device that failed, not just the first.
        return HTTPException(status.HTTP_409_CONFLICT, {
            "message": str(exc),
            "errors": [{"device_id": p.device_id, "reason": p.reason,
                        "code": "not_found" if p.not_found else "conflict"}
                       for p in exc.problems]})
    if isinstance(exc, Invalid):
        # Same shape as FastAPI's own validation errors, so clients parse one format.
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, [
            {"loc": ["body", *exc.field.split(".")], "msg": str(exc), "type": "value_error"}])
    codes: list[tuple[type[RegistryError], int]] = [
        (NotFound, status.HTTP_404_NOT_FOUND), (Conflict, status.HTTP_409_CONFLICT),
        (Forbidden, status.HTTP_403_FORBIDDEN)]
    for kind, code in codes:
        if isinstance(exc, kind):
            return HTTPException(code, str(exc))
    return HTTPException(status.HTTP_400_BAD_REQUEST, str(exc))


@contextmanager
def registry_errors() -> Iterator[None]:
    """Turn registry errors raised inside the block into HTTP errors with their reason."""
    try:
        yield
    except RegistryError as exc:
        raise http_error(exc) from None
