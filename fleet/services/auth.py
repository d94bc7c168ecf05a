"""Users, password login and bearer tokens.

Passwords are hashed with Argon2id.  Tokens are 43 random URL-safe characters behind a
``pl_`` prefix; only their SHA-256 is stored, so a database leak reveals no usable token.
Session tokens (from a password login) expire; API tokens live until revoked.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db.models import Customer, Role, Token, TokenKind, User
from fleet.services.clock import now_ms

TOKEN_PREFIX = "pl_"
SESSION_TTL_MS = 12 * 3600 * 1000
MIN_PASSWORD = 12
_hasher = PasswordHasher()
# Verified against when the email is unknown, so a login takes as long either way and does
# not reveal which accounts exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AuthError(ValueError):
    """A user or token change that cannot be made; the message says why."""


@dataclass(frozen=True)
class IssuedToken:
    """A freshly created token: ``secret`` is shown once and never stored."""

    id: int
    secret: str
    expires_ms: int | None


def hash_token(secret: str) -> str:
    """The stored form of a bearer token."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_user(session: Session, *, email: str, password: str, role: Role, name: str = "",
                customer_id: int | None = None) -> User:
    """Add a user; customer viewers must name their customer, others must not."""
    email = email.strip().lower()
    if "@" not in email:
        raise AuthError(f"{email!r} is not an email address")
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"password must be at least {MIN_PASSWORD} characters")
    if (role is Role.customer_viewer) != (customer_id is not None):
        raise AuthError("customer viewers need a customer; other roles must not have one")
    if customer_id is not None and session.get(Customer, customer_id) is None:
        raise AuthError(f"customer {customer_id} does not exist")
    if session.scalar(select(User).where(User.email == email)) is not None:
        raise AuthError(f"a user with email {email} already exists")
    user = User(email=email, name=name, password_hash=_hasher.hash(password), role=role,
                customer_id=customer_id, active=True, created_ms=now_ms())
    session.add(user)
    session.flush()
    return user


def _issue(session: Session, user: User, kind: TokenKind, name: str,
           ttl_ms: int | None) -> IssuedToken:
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    created = now_ms()
    expires = created + ttl_ms if ttl_ms is not None else None
    token = Token(user_id=user.id, kind=kind, name=name, token_hash=hash_token(secret),
                  prefix=secret[:8], created_ms=created, expires_ms=expires)
    session.add(token)
    session.flush()
    return IssuedToken(token.id, secret, expires)


def login(session: Session, *, email: str, password: str,
          ttl_ms: int = SESSION_TTL_MS) -> IssuedToken | None:
    """A session token for valid credentials of an active user, else None."""
    user = session.scalar(select(User).where(User.email == email.strip().lower()))
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    return _issue(session, user, TokenKind.session, "login", ttl_ms)


def create_api_token(session: Session, *, user: User, name: str,
                     ttl_ms: int | None = None) -> IssuedToken:
    """A long-lived token for an integration or an installer laptop."""
    if not name.strip():
        raise AuthError("an API token needs a name saying where it is used")
    return _issue(session, user, TokenKind.api, name.strip(), ttl_ms)


def authenticate(session: Session, secret: str) -> User | None:
    """The active user a bearer token belongs to, or None if it is unknown/expired/revoked."""
    if not secret.startswith(TOKEN_PREFIX):
        return None
    token = session.scalar(select(Token).where(Token.token_hash == hash_token(secret)))
    now = now_ms()
    if token is None or token.revoked_ms is not None:
        return None
    if token.expires_ms is not None and token.expires_ms <= now:
        return None
    user = session.get(User, token.user_id)
    if user is None or not user.active:
        return None
    # Record use at most once a minute: a write per request would serialise readers.
    if token.last_used_ms is None or now - token.last_used_ms > 60_000:
        token.last_used_ms = now
    return user


def revoke_token(session: Session, *, token_id: int, by: User) -> Token:
    """Revoke a token; users revoke their own, admins anyone's."""
    token = session.get(Token, token_id)
    if token is None or (token.user_id != by.id and by.role is not Role.admin):
        raise AuthError(f"token {token_id} does not exist")
    if token.revoked_ms is None:
        token.revoked_ms = now_ms()
    return token
