"""Schemathesis over the API's own OpenAPI schema: no request, however odd, gets a 5xx.

Every operation is called in-process (ASGI) with generated parameters and bodies, as an admin
so that requests get past the role checks into the code that could break.  A bounded number
of examples keeps this under a minute; SQLite is enough here (PostgreSQL-only limits such as
column lengths are covered by the bounds in ``fleet/api/schemas.py`` and the database tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from fleet.api.app import create_app
from fleet.broker.dynsec import DynsecAccounts
from fleet.content import signing
from fleet.db.engine import make_engine
from fleet.db.migrate import upgrade
from fleet.db.models import Role, User
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.rollouts import service as rollouts
from fleet.services import registry
from fleet.services.auth import create_api_token, create_user
from fleet.services.votes import store_batches
from tests.fleet.auth_helpers import PASSWORD
from tests.fleet.rollout_helpers import store_content
from tests.services.mosquitto import DynsecMosquittoBroker

MAX_EXAMPLES = 15


# The app and its schema exist at import time (schemathesis makes one test per operation
# while pytest collects); the database does not.  The session factory is bound to a fresh
# SQLite file by the fixture below, before any request is made.  (schemathesis'
# ``from_fixture`` would avoid this, but it does not work with pytest 9's node ids.)
SESSIONS: sessionmaker[Session] = sessionmaker(expire_on_commit=False)
APP = create_app(SESSIONS)
ADMIN_EMAIL = "fuzz-admin@example.org"

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture
def fuzz_db(tmp_path: Path, dynsec_mosquitto: DynsecMosquittoBroker) -> Iterator[None]:
    """A migrated SQLite database with a little of everything, so small ids hit real rows.

    Device accounts go to a real Mosquitto, so provisioning and retiring run their whole
    path (without one, provisioning answers its documented 503).
    """
    APP.state.device_accounts = DynsecAccounts(dynsec_mosquitto.admin_url)
    url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    upgrade(url)
    engine = make_engine(url)
    SESSIONS.configure(bind=engine)
    # A real signing key, so that fuzzed content reaches rendering instead of a 503.
    signing.generate_key_file(tmp_path / "content.key")
    APP.state.content_key_file = str(tmp_path / "content.key")
    with SESSIONS.begin() as session:
        for name in ("Fuzz Oy", "Other Oy"):
            customer = registry.create_customer(session, name=name)
            site = registry.create_site(session, customer_id=customer.id, name="Lobby",
                                        opening_hours={"mon": [["08:00", "20:00"]]})
        for n in range(1, 4):
            device_id = f"pt-{n:012x}"
            registry.register_device(session, device_id=device_id, board="sim")
            registry.assign_device(session, device_id=device_id, site_id=site.id, at_ms=0)
        store_batches(session, [VoteBatch("pt-000000000001", (Vote(1, 1_000, 1, 0, 0),))],
                      received_ms=2_000)
        create_user(session, email=ADMIN_EMAIL, password=PASSWORD, role=Role.admin)
        # Content version 1 and a selection, so generated rollouts can be created and changed.
        store_content(session, 1)
        rollouts.create_selection(session, name="fuzz", device_ids=["pt-000000000001"])
    yield
    SESSIONS.configure(bind=None)
    APP.state.device_accounts = None
    engine.dispose()


def admin_headers() -> dict[str, str]:
    """A fresh admin token for each request: the fuzzer may well revoke the one it had."""
    with SESSIONS.begin() as session:
        admin = session.scalars(select(User).where(User.email == ADMIN_EMAIL)).one()
        token = create_api_token(session, user=admin, name="fuzz")
    return {"Authorization": f"Bearer {token.secret}"}


@pytest.mark.usefixtures("fuzz_db")
@schema.parametrize()
# derandomize: the same examples on every run, so the suite never fails by chance; run with
# a different seed (or without it) locally to explore further.
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case: Any) -> None:
    case.call_and_validate(headers=admin_headers(), checks=[not_a_server_error])


@pytest.mark.usefixtures("fuzz_db")
@pytest.mark.parametrize(("method", "url"), [
    ("GET", f"/api/v1/users?offset={2**63}"),
    ("DELETE", f"/api/v1/auth/tokens/{2**63}"),
    ("GET", f"/api/v1/reports/sites/{2**63}?from=2026-01-01&to=2026-01-02"),
])
def test_ids_beyond_the_database_range_are_refused_not_crashed(method: str, url: str) -> None:
    # Found by the fuzzer: 2**63 overflows SQLite INTEGER / PostgreSQL BIGINT.
    client = TestClient(APP, raise_server_exceptions=False)
    assert client.request(method, url, headers=admin_headers()).status_code == 422
