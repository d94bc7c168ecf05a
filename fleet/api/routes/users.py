"""User administration (admins only)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from fleet.api.deps import AdminUser, SessionDep
from fleet.api.schemas import MAX_LIMIT, MAX_OFFSET, RefId
from fleet.db.models import Role, User
from fleet.services import audit
from fleet.services.auth import AuthError, create_user

router = APIRouter(prefix="/users", tags=["users"])


class UserCreate(BaseModel):
    """A new user; customer viewers need ``customer_id``."""

    email: str = Field(max_length=254)
    name: str = Field(default="", max_length=200)
    password: str = Field(min_length=12, max_length=1024)
    role: Role
    customer_id: RefId | None = None


class UserPublic(BaseModel):
    """A user as the API shows it."""

    model_config = ConfigDict(from_attributes=True)
    id: int
    email: str
    name: str
    role: Role
    customer_id: int | None
    active: bool
    created_ms: int


class UserPage(BaseModel):
    """One page of users."""

    items: list[UserPublic]
    total: int


@router.post("", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def post_user(body: UserCreate, admin: AdminUser, session: SessionDep) -> UserPublic:
    """Create a user."""
    try:
        user = create_user(session, email=body.email, password=body.password, role=body.role,
                           name=body.name, customer_id=body.customer_id)
    except AuthError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    audit.record(session, user=admin, action="create_user", entity="user", entity_id=user.id,
                 detail={"email": user.email, "role": user.role.value})
    return UserPublic.model_validate(user)


@router.get("", response_model=UserPage)
def list_users(_admin: AdminUser, session: SessionDep, role: Role | None = None,
               offset: int = Query(0, ge=0, le=MAX_OFFSET),
               limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> UserPage:
    """List users, optionally of one role."""
    query = select(User)
    if role is not None:
        query = query.where(User.role == role)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(User.id).offset(offset).limit(limit))
    return UserPage(items=[UserPublic.model_validate(r) for r in rows], total=total)
