"""A customer viewer must see nothing of another customer, through any route of the API.

The test walks ``app.routes``, so a route added later is checked as soon as it exists: it
either keeps customer B's objects away from customer A's viewer, or it fails this test until
someone decides otherwise (and adds it, with a reason, to ``USER_AGNOSTIC``).

For each route, B's ids are substituted for the path parameters:

* GET with path parameters must answer 403 or 404 (a viewer may not even learn that B's ids
  exist);
* GET without path parameters (lists) may answer 200, but nothing of B may appear in the
  body, also when B's ids are given as query filters;
* every write (POST, PUT, PATCH, DELETE) must answer 403.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import update

from fleet.api.app import create_app
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import ContentVersion, Role, Rollout, User
from fleet.ingest.metrics import Metrics
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.rollouts import service as rollouts
from fleet.services import registry
from fleet.services.auth import create_api_token, create_user
from fleet.services.clock import now_ms
from fleet.services.votes import store_batches
from tests.fleet.auth_helpers import PASSWORD

# Routes whose answer cannot depend on another customer's data, and why.  Adding a route
# here is a decision: write down the reason.
USER_AGNOSTIC: dict[tuple[str, str], str] = {
    ("GET", "/api/v1/health"): "liveness of the API and its database; no data",
    ("POST", "/api/v1/auth/login"): "anonymous: exchanges the caller's own credentials",
    ("GET", "/api/v1/auth/me"): "the caller itself",
    ("GET", "/api/v1/auth/tokens"): "the caller's own tokens",
    ("POST", "/api/v1/auth/tokens"): "creates a token for the caller",
    ("DELETE", "/api/v1/auth/tokens/{token_id}"):
        "revokes the caller's own tokens; another user's token is 404 (checked below)",
    ("GET", "/metrics"): "ingest counters for Prometheus; no per-customer data",
}
# FastAPI's own documentation routes (not APIRoutes): the schema, no data.
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
WRITES = {"POST", "PUT", "PATCH", "DELETE"}

B_TEXT = ("Bravo Secret", "pt-bbbb")  # every name, address and device id of B holds one


@dataclass
class Tenants:
    client: TestClient
    viewer_a: dict[str, str]
    customer_a: int
    site_a: int
    # Path parameter name -> B's value.  A route with a parameter not named here fails the
    # test until a value is added: that is the decision it forces.
    b_ids: dict[str, str]
    b_sites: set[int]
    b_customer: int
    b_devices: set[str]
    b_token: dict[str, str]


def make_tenants(db_url: str) -> Tenants:
    sessions = make_sessionmaker(make_engine(db_url))
    now = now_ms()
    with sessions.begin() as session:
        customer_a = registry.create_customer(session, name="Alpha Tenant Oy")
        site_a = registry.create_site(session, customer_id=customer_a.id, name="Alpha Lobby",
                                      timezone="Europe/Helsinki")
        customer_b = registry.create_customer(session, name="Bravo Secret Oy")
        sites_b = [registry.create_site(session, customer_id=customer_b.id,
                                        name=f"Bravo Secret {name}",
                                        address="Bravo Secret Street 9",
                                        opening_hours={"mon": [["08:00", "20:00"]]})
                   for name in ("Lobby", "Exit")]
        registry.register_device(session, device_id="pt-aaaa00000001", board="sim")
        registry.assign_device(session, device_id="pt-aaaa00000001", site_id=site_a.id,
                               at_ms=0)
        for device_id in ("pt-bbbb00000001", "pt-bbbb00000002"):
            registry.register_device(session, device_id=device_id, board="sim")
        registry.assign_device(session, device_id="pt-bbbb00000001", site_id=sites_b[0].id,
                               at_ms=0)
        store_batches(session, [
            VoteBatch("pt-aaaa00000001", (Vote(1, now - 60_000, 1, 0, 0),)),
            VoteBatch("pt-bbbb00000001", (Vote(1, now - 60_000, 2, 0, 0),
                                          Vote(2, now - 30_000, 3, 0, 0)))],
                      received_ms=now)
        viewer_a = create_user(session, email="viewer-a@example.org", password=PASSWORD,
                               role=Role.customer_viewer, customer_id=customer_a.id)
        viewer_b = create_user(session, email="viewer-b@example.org", password=PASSWORD,
                               role=Role.customer_viewer, customer_id=customer_b.id)
        token_a = create_api_token(session, user=viewer_a, name="tests").secret
        token_b = create_api_token(session, user=viewer_b, name="tests")
        selection_b = rollouts.create_selection(session, name="Bravo Secret pilot",
                                                device_ids=["pt-bbbb00000001"])
        rollout_b = Rollout(content_version=1, target_kind="selection",
                            target_ref=str(selection_b.id), waves="[100]", wave_count=2,
                            current_wave=-1, success_threshold=90, failure_threshold=10,
                            device_timeout_s=900, state_reason="", created_ms=now,
                            updated_ms=now)
        session.add(rollout_b)
        # Content is fleet-wide; viewers may read none of it (this one names customer B).
        session.add(ContentVersion(version=1, name="Bravo Secret survey", body="{}",
                                   created_ms=now))
        session.flush()
        ids = {
            "customer_id": str(customer_b.id), "site_id": str(sites_b[0].id),
            "device_id": "pt-bbbb00000001", "token_id": str(token_b.id),
            "user_id": str(viewer_b.id), "rollout_id": str(rollout_b.id),
            "selection_id": str(selection_b.id), "version": "1",
        }
        tenants = Tenants(
            client=TestClient(create_app(sessions, metrics=Metrics())),
            viewer_a={"Authorization": f"Bearer {token_a}"}, customer_a=customer_a.id,
            site_a=site_a.id, b_ids=ids, b_sites={s.id for s in sites_b},
            b_customer=customer_b.id, b_devices={"pt-bbbb00000001", "pt-bbbb00000002"},
            b_token={"Authorization": f"Bearer {token_b.secret}"})
    return tenants


# Ids of the same kinds that exist nowhere: B's must be refused exactly like these.
GHOST_IDS = {"customer_id": "987654", "site_id": "987654", "device_id": "pt-ffffffffffff",
             "token_id": "987654", "user_id": "987654", "rollout_id": "987654",
             "selection_id": "987654", "version": "65000"}


def masked(text: str, ids: list[str]) -> str:
    """``text`` with the given ids replaced by a placeholder (longest first)."""
    for value in sorted(ids, key=len, reverse=True):
        text = text.replace(value, "<id>")
    return text


def leaks(tenants: Tenants, text: str) -> list[str]:
    """What of customer B appears in a response body (JSON or not)."""
    found = [marker for marker in B_TEXT if marker in text]
    try:
        body = json.loads(text)
    except ValueError:
        return found

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if ((key == "customer_id" and value == tenants.b_customer)
                        or (key == "site_id" and value in tenants.b_sites)
                        or (key == "device_id" and value in tenants.b_devices)):
                    found.append(f"{key}={value}")
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body)
    return found


def sample(schema: dict[str, Any]) -> str:
    """A valid value for a required query parameter, from its OpenAPI schema."""
    if "anyOf" in schema:
        return sample(next(s for s in schema["anyOf"] if s.get("type") != "null"))
    if "enum" in schema:
        return str(schema["enum"][0])
    kind, fmt = schema.get("type"), schema.get("format")
    if fmt == "date":
        return datetime.date.today().isoformat()
    if fmt == "date-time":
        return datetime.datetime.now(datetime.UTC).isoformat()
    if kind in ("integer", "number"):
        return str(schema.get("minimum", 1))
    if kind == "boolean":
        return "false"
    return "x"


def query_params(openapi: dict[str, Any], path: str, method: str
                 ) -> tuple[dict[str, str], list[str]]:
    """Required query parameters with sample values, and the names of all query params."""
    operation = openapi["paths"].get(path, {}).get(method.lower(), {})
    params = [p for p in operation.get("parameters", []) if p["in"] == "query"]
    required = {p["name"]: sample(p["schema"]) for p in params if p.get("required")}
    return required, [p["name"] for p in params]


def app_routes(client: TestClient) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, including routers included with a prefix.

    Anything that is not an API route (a mount, a plain Starlette route) other than
    FastAPI's documentation fails the test: it needs its own decision.
    """
    found: list[tuple[str, str]] = []
    for context in iter_route_contexts(client.app.routes):  # type: ignore[attr-defined]
        path = context.path or ""
        if not isinstance(context.original_route, APIRoute):
            assert path in DOCS, f"{context!r} is not an API route; decide how to check it"
            continue
        found.extend((method, path) for method in sorted(
            (context.methods or set()) - {"HEAD", "OPTIONS"}))
    return found


def test_a_customer_viewer_sees_nothing_of_another_customer(db_url: str) -> None:
    tenants = make_tenants(db_url)
    client = tenants.client
    openapi = client.get("/openapi.json").json()
    problems: list[str] = []
    checked = 0

    routes = app_routes(client)
    # The walk must cover at least what the API documents (it also sees hidden routes).
    documented = {(method.upper(), path) for path, item in openapi["paths"].items()
                  for method in item}
    assert documented <= set(routes), documented - set(routes)

    for method, path in routes:
        if (method, path) in USER_AGNOSTIC:
            continue
        names = re.findall(r"\{(\w+)(?::\w+)?\}", path)
        missing = [n for n in names if n not in tenants.b_ids]
        if missing:
            problems.append(f"{method} {path}: no customer-B value for "
                            f"{missing}; add one to make_tenants")
            continue
        url = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: tenants.b_ids[m.group(1)], path)
        required, query_names = query_params(openapi, path, method)
        checked += 1
        where = f"{method} {url}"
        if method in WRITES:
            body = {"name": "x", **{k: v for k, v in tenants.b_ids.items()}}
            response = client.request(method, url, params=required, json=body,
                                      headers=tenants.viewer_a)
            if response.status_code != 403:
                problems.append(f"{where}: write answered {response.status_code}, "
                                "expected 403")
            continue
        if names:
            response = client.get(url, params=required, headers=tenants.viewer_a)
            if response.status_code not in (403, 404):
                problems.append(f"{where}: answered {response.status_code} with B's ids, "
                                f"expected 403 or 404: {response.text[:200]}")
                continue
            # The refusal may echo the ids it was given, but must read exactly as it would
            # for ids that exist nowhere: otherwise it tells that B's ids exist.
            ghost_url = re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: GHOST_IDS[m.group(1)], path)
            ghost = client.get(ghost_url, params=required, headers=tenants.viewer_a)
            seen = masked(response.text, [tenants.b_ids[n] for n in names])
            unseen = masked(ghost.text, [GHOST_IDS[n] for n in names])
            if (response.status_code, seen) != (ghost.status_code, unseen):
                problems.append(f"{where}: refused as {response.status_code} {seen!r}, but an "
                                f"unknown id as {ghost.status_code} {unseen!r}")
            continue
        # A list: the plain call, then B's ids as every filter the route takes.
        attempts = [dict(required)] + [
            {**required, name: tenants.b_ids[name]}
            for name in query_names if name in tenants.b_ids]
        for params in attempts:
            response = client.get(url, params=params, headers=tenants.viewer_a)
            if response.status_code == 200 and (found := leaks(tenants, response.text)):
                problems.append(f"{where} {params}: shows {found}")
            elif response.status_code not in (200, 403, 404):
                problems.append(f"{where} {params}: answered {response.status_code}: "
                                f"{response.text[:200]}")

    assert not problems, "\n".join(problems)
    assert checked >= 20  # the walk really covered the API

    # The checks above are not vacuous: the viewer does see its own customer's objects.
    sites = client.get("/api/v1/sites", headers=tenants.viewer_a).json()
    assert [s["id"] for s in sites["items"]] == [tenants.site_a]
    customers = client.get("/api/v1/customers", headers=tenants.viewer_a).json()
    assert [c["id"] for c in customers["items"]] == [tenants.customer_a]
    # And B's objects are really there for B's own viewer.
    own = client.get(f"/api/v1/sites/{tenants.b_ids['site_id']}", headers=tenants.b_token)
    assert own.status_code == 200 and leaks(tenants, own.text)


def test_a_viewer_cannot_revoke_another_users_token(db_url: str) -> None:
    tenants = make_tenants(db_url)
    client = tenants.client
    refused = client.delete(f"/api/v1/auth/tokens/{tenants.b_ids['token_id']}",
                            headers=tenants.viewer_a)
    assert refused.status_code == 404
    assert client.get("/api/v1/auth/me", headers=tenants.b_token).status_code == 200
    mine = client.get("/api/v1/auth/tokens", headers=tenants.viewer_a).json()
    assert str(tenants.b_ids["token_id"]) not in {str(t["id"]) for t in mine}


def test_a_viewer_without_a_customer_sees_nothing(db_url: str) -> None:
    tenants = make_tenants(db_url)
    # create_user refuses this; a hand-edited row must not turn into "sees everything".
    sessions = tenants.client.app.state.sessions  # type: ignore[attr-defined]
    with sessions.begin() as session:
        session.execute(update(User).where(User.email == "viewer-a@example.org")
                        .values(customer_id=None))
    for path in ("/api/v1/sites", "/api/v1/customers", f"/api/v1/sites/{tenants.site_a}"):
        response = tenants.client.get(path, headers=tenants.viewer_a)
        assert response.status_code == 403, (path, response.text)
