"""Dependencies shared by the routers, as ``Annotated`` aliases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from fleet.broker.accounts import BrokerError, DeviceAccounts
from fleet.db.models import Role, User
from fleet.services.auth import authenticate

_bearer = HTTPBearer(auto_error=False, description="`pl_…` token from /api/v1/auth/login "
                     "or an API token")


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request; committed if the request succeeds."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session:
        yield session
        session.commit()


# scope="function": commit before the response is sent, so a failed commit is a 500 and never
# a 200 for a change that was not stored.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_current_user(
        session: SessionDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    """The user behind the request's bearer token; 401 if there is none or it is invalid."""
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "missing bearer token: log in at /api/v1/auth/login",
                            headers={"WWW-Authenticate": "Bearer"})
    user = authenticate(session, credentials.credentials)
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "invalid, expired or revoked token: log in again",
                            headers={"WWW-Authenticate": "Bearer"})
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


def require(*roles: Role) -> Callable[[User], User]:
    """A dependency that admits only ``roles`` (admins always); 403 otherwise."""
    allowed = {Role.admin, *roles}

    def check(user: CurrentUser) -> User:
        if user.role not in allowed:
            names = ", ".join(sorted(r.value for r in allowed))
            raise HTTPException(status.HTTP_403_FORBIDDEN,
                                f"role {user.role.value} may not do this (needs {names})")
        return user

    return check


AdminUser = Annotated[User, Depends(require())]
StaffUser = Annotated[User, Depends(require(Role.coordinator, Role.ops))]


def get_device_accounts(request: Request) -> DeviceAccounts | None:
    """The broker's device accounts, or None when PALAUTE_BROKER_ADMIN_URL is not set."""
    accounts: DeviceAccounts | None = request.app.state.device_accounts
    return accounts


DeviceAccountsDep = Annotated[DeviceAccounts | None, Depends(get_device_accounts)]


@contextmanager
def broker_errors(what: str) -> Iterator[None]:
    """Turn broker account errors inside the block into 503 "could not <what>: <reason>"."""
    try:
        yield
    except BrokerError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"could not {what}: {exc}") from None
