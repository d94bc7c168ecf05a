"""Login, the current user, and the caller's API tokens."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from fleet.api.deps import CurrentUser, SessionDep
from fleet.api.schemas import MAX_ID
from fleet.db.models import Role, Token, TokenKind
from fleet.services import audit
from fleet.services.auth import AuthError, create_api_token, login, revoke_token

router = APIRouter(prefix="/auth", tags=["auth"])


class LoginRequest(BaseModel):
    """Email and password of a user."""

    email: str = Field(max_length=254)
    password: str = Field(max_length=1024)


class TokenIssued(BaseModel):
    """A bearer token, shown once: store it now."""

    access_token: str
    token_type: str = "bearer"
    token_id: int
    expires_ms: int | None


class Me(BaseModel):
    """The authenticated user."""

    id: int
    email: str
    name: str
    role: Role
    customer_id: int | None


class ApiTokenCreate(BaseModel):
    """Where the token will be used, e.g. ``installer laptop 3``."""

    name: str = Field(min_length=1, max_length=200)
    ttl_days: int | None = Field(default=None, ge=1, le=3650)


class TokenPublic(BaseModel):
    """A token without its secret."""

    id: int
    kind: TokenKind
    name: str
    prefix: str
    created_ms: int
    expires_ms: int | None
    last_used_ms: int | None
    revoked_ms: int | None


@router.post("/login", response_model=TokenIssued)
def post_login(body: LoginRequest, session: SessionDep) -> TokenIssued:
    """Exchange email and password for a session token (12 hours)."""
    issued = login(session, email=body.email, password=body.password)
    if issued is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "wrong email or password")
    return TokenIssued(access_token=issued.secret, token_id=issued.id,
                       expires_ms=issued.expires_ms)


@router.get("/me", response_model=Me)
def get_me(user: CurrentUser) -> Me:
    """Who the token belongs to."""
    return Me(id=user.id, email=user.email, name=user.name, role=user.role,
              customer_id=user.customer_id)


@router.post("/tokens", response_model=TokenIssued, status_code=status.HTTP_201_CREATED)
def post_token(body: ApiTokenCreate, user: CurrentUser, session: SessionDep) -> TokenIssued:
    """Create an API token acting as the caller (same role, same restrictions)."""
    try:
        issued = create_api_token(
            session, user=user, name=body.name,
            ttl_ms=body.ttl_days * 86_400_000 if body.ttl_days else None)
    except AuthError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    audit.record(session, user=user, action="create_token", entity="token",
                 entity_id=issued.id, detail={"name": body.name})
    return TokenIssued(access_token=issued.secret, token_id=issued.id,
                       expires_ms=issued.expires_ms)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(user: CurrentUser, session: SessionDep) -> list[TokenPublic]:
    """The caller's tokens (without secrets)."""
    rows = session.scalars(select(Token).where(Token.user_id == user.id).order_by(Token.id))
    return [TokenPublic.model_validate(r, from_attributes=True) for r in rows]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_token(user: CurrentUser, session: SessionDep,
                 token_id: int = Path(ge=1, le=MAX_ID)) -> None:
    """Revoke a token at once."""
    try:
        revoke_token(session, token_id=token_id, by=user)
    except AuthError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    audit.record(session, user=user, action="revoke_token", entity="token", entity_id=token_id)
