"""Users, login, tokens and roles over the real API and database."""

from __future__ import annotations

import io

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fleet.api.app import create_app
from fleet.cli import main
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import AuditEntry, Role, Token
from fleet.services import registry
from fleet.services.auth import login
from tests.fleet.auth_helpers import PASSWORD, make_user


def setup(db_url: str) -> tuple[TestClient, dict[str, str], int]:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        customer_id = registry.create_customer(session, name="Auth Oy").id
    admin = make_user(sessions, Role.admin)
    return TestClient(create_app(sessions)), admin, customer_id


def test_login_issues_a_session_token_and_refuses_bad_credentials(db_url: str) -> None:
    client, _, _ = setup(db_url)
    good = client.post("/api/v1/auth/login",
                       json={"email": "ADMIN@example.org", "password": PASSWORD})
    assert good.status_code == 200 and good.json()["access_token"].startswith("pl_")
    token = good.json()["access_token"]
    me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["role"] == "admin"
    for body in ({"email": "admin@example.org", "password": "wrong password!"},
                 {"email": "nobody@example.org", "password": PASSWORD}):
        refused = client.post("/api/v1/auth/login", json=body)
        assert refused.status_code == 401
        assert refused.json()["detail"] == "wrong email or password"


def test_missing_invalid_and_revoked_tokens_get_401(db_url: str) -> None:
    client, admin, _ = setup(db_url)
    assert client.get("/api/v1/auth/me").status_code == 401
    assert "log in" in client.get("/api/v1/auth/me").json()["detail"]
    bad = client.get("/api/v1/auth/me", headers={"Authorization": "Bearer pl_forged"})
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    issued = client.post("/api/v1/auth/tokens", json={"name": "laptop"}, headers=admin).json()
    header = {"Authorization": f"Bearer {issued['access_token']}"}
    assert client.get("/api/v1/auth/me", headers=header).status_code == 200
    listed = client.get("/api/v1/auth/tokens", headers=admin).json()
    assert "laptop" in [t["name"] for t in listed]
    assert all("access_token" not in t and "token_hash" not in t for t in listed)
    assert client.delete(f"/api/v1/auth/tokens/{issued['token_id']}",
                         headers=admin).status_code == 204
    assert client.get("/api/v1/auth/me", headers=header).status_code == 401


def test_expired_session_token_is_refused(db_url: str) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    make_user(sessions, Role.ops)
    with sessions.begin() as session:
        issued = login(session, email="ops@example.org", password=PASSWORD, ttl_ms=-1)
    assert issued is not None
    client = TestClient(create_app(sessions))
    assert client.get("/api/v1/auth/me", headers={
        "Authorization": f"Bearer {issued.secret}"}).status_code == 401


def test_roles_are_enforced(db_url: str) -> None:
    client, admin, customer_id = setup(db_url)
    sessions = client.app.state.sessions  # type: ignore[attr-defined]
    viewer = make_user(sessions, Role.customer_viewer, customer_id=customer_id)
    installer = make_user(sessions, Role.installer)
    ops = make_user(sessions, Role.ops)
    for header in (viewer, installer):
        forbidden = client.get("/api/v1/devices", headers=header)
        assert forbidden.status_code == 403 and "may not" in forbidden.json()["detail"]
        assert client.get("/api/v1/users", headers=header).status_code == 403
    assert client.get("/api/v1/devices", headers=ops).status_code == 200
    assert client.get("/api/v1/users", headers=ops).status_code == 403
    assert client.get("/api/v1/users", headers=admin).json()["total"] == 4


def test_admin_creates_users_with_clear_errors_and_an_audit_trail(db_url: str) -> None:
    client, admin, customer_id = setup(db_url)
    body = {"email": "coord@example.org", "password": "a long enough password",
            "role": "coordinator"}
    created = client.post("/api/v1/users", json=body, headers=admin)
    assert created.status_code == 201 and "password" not in created.json()
    again = client.post("/api/v1/users", json=body, headers=admin)
    assert again.status_code == 422 and "already exists" in again.json()["detail"]
    viewer = {"email": "v@example.org", "password": "a long enough password",
              "role": "customer_viewer"}
    missing = client.post("/api/v1/users", json=viewer, headers=admin)
    assert missing.status_code == 422 and "need a customer" in missing.json()["detail"]
    ok = client.post("/api/v1/users", json={**viewer, "customer_id": customer_id},
                     headers=admin)
    assert ok.status_code == 201
    short = client.post("/api/v1/users", json={**body, "email": "x@example.org",
                                               "password": "short"}, headers=admin)
    assert short.status_code == 422
    with client.app.state.sessions() as session:  # type: ignore[attr-defined]
        actions = session.scalars(select(AuditEntry.action)).all()
    assert actions.count("create_user") == 2


def test_cli_bootstraps_the_first_admin(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PALAUTE_DB_URL", db_url)
    assert main(["admin", "create-user", "--email", "first@example.org", "--role",
                 "admin"]) == 0
    password = capsys.readouterr().out.split("password (shown once): ")[1].strip()
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        assert login(session, email="first@example.org", password=password) is not None
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["admin", "create-user", "--email", "second@example.org", "--role", "ops",
                 "--password-stdin"]) == 2
    assert "at least 12" in capsys.readouterr().err
    assert main(["admin", "create-token", "--email", "first@example.org", "--name",
                 "ci"]) == 0
    assert capsys.readouterr().out.startswith("pl_")
    assert main(["admin", "create-token", "--email", "ghost@example.org", "--name",
                 "x"]) == 2
    with sessions() as session:
        assert len(session.scalars(select(Token)).all()) == 2  # the login and the API token
