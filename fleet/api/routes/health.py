"""Liveness of the API and its database."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import text

from fleet.api.deps import SessionDep

router = APIRouter(prefix="/health", tags=["health"])


class HealthPublic(BaseModel):
    """The API is up and can reach its database."""

    status: str
    database: str


@router.get("", response_model=HealthPublic)
def health(session: SessionDep) -> HealthPublic:
    """Report whether the API can query its database."""
    session.execute(text("SELECT 1"))
    return HealthPublic(status="ok", database=session.get_bind().dialect.name)
