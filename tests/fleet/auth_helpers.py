"""Helpers for API tests: users of each role and their bearer headers."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from fleet.db.models import Role
from fleet.services.auth import create_api_token, create_user

PASSWORD = "correct horse battery staple"


def make_user(sessions: sessionmaker[Session], role: Role, *, email: str | None = None,
              customer_id: int | None = None) -> dict[str, str]:
    """Create a user with ``role`` and return an Authorization header for it."""
    with sessions.begin() as session:
        user = create_user(session, email=email or f"{role.value}@example.org",
                           password=PASSWORD, role=role, customer_id=customer_id)
        token = create_api_token(session, user=user, name="tests")
    return {"Authorization": f"Bearer {token.secret}"}
