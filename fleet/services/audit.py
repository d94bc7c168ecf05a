"""The audit log: who changed what, and when."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from fleet.db.models import AuditEntry, User
from fleet.services.clock import now_ms


def record(session: Session, *, user: User | None, action: str, entity: str,
           entity_id: str | int, detail: dict[str, Any] | None = None) -> AuditEntry:
    """Append one entry in the caller's transaction (so it commits with the change)."""
    entry = AuditEntry(at_ms=now_ms(), user_id=user.id if user else None, action=action,
                       entity=entity, entity_id=str(entity_id),
                       detail=json.dumps(detail or {}, sort_keys=True, default=str))
    session.add(entry)
    return entry
