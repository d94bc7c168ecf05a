"""The audit log: who changed what, newest first (admins and coordinators)."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel
from sqlalchemy import func, select

from fleet.api.deps import SessionDep, require
from fleet.api.schemas import ERRORS, MAX_ID, Page, PageDep, TimeMs
from fleet.db.models import AuditEntry, Role, User

router = APIRouter(prefix="/audit", tags=["audit"], responses=ERRORS)

Auditor = Annotated[User, Depends(require(Role.coordinator))]


class AuditPublic(BaseModel):
    """One change: who (null if done by the CLI or a since-deleted user), what, when."""

    id: int
    at_ms: int
    user_id: int | None
    user_email: str | None
    action: str
    entity: str
    entity_id: str
    detail: dict[str, Any]


@router.get("", response_model=Page[AuditPublic])
def list_audit(
        _user: Auditor, session: SessionDep, page: PageDep,
        entity: Annotated[str | None, Query(max_length=32, pattern=r"^[a-z_]+$",
                                            description="customer, site, device, user, token"
                                            )] = None,
        entity_id: Annotated[str | None, Query(max_length=64, pattern=r"^[^\x00]*$")] = None,
        user_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
        action: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z_]+$")] = None,
        since_ms: Annotated[TimeMs | None, Query(description="entries at or after")] = None,
) -> Page[AuditPublic]:
    """Audit entries, newest first, filtered by entity, entity id, user, action and time."""
    # A plain filtered read, like the user list: no domain rule to keep in a service.
    query = select(AuditEntry, User.email).outerjoin(User, User.id == AuditEntry.user_id)
    if entity is not None:
        query = query.where(AuditEntry.entity == entity)
    if entity_id is not None:
        query = query.where(AuditEntry.entity_id == entity_id)
    if user_id is not None:
        query = query.where(AuditEntry.user_id == user_id)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if since_ms is not None:
        query = query.where(AuditEntry.at_ms >= since_ms)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.order_by(AuditEntry.at_ms.desc(), AuditEntry.id.desc())
                           .offset(page.offset).limit(page.limit))
    items = [AuditPublic(id=e.id, at_ms=e.at_ms, user_id=e.user_id, user_email=email,
                         action=e.action, entity=e.entity, entity_id=e.entity_id,
                         detail=json.loads(e.detail or "{}")) for e, email in rows]
    return Page(items=items, total=total, offset=page.offset, limit=page.limit)
