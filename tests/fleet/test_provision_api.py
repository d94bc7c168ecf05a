"""``POST /devices/{id}/provision``, ``GET /devices/{id}/presence`` and retiring, against a
real Mosquitto configured by ``palaute broker-config``, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from fleet.api.app import create_app
from fleet.broker.dynsec import DynsecAccounts
from fleet.config import Settings
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Assignment, AuditEntry, Device, DeviceState, Role, RolloutDevice
from fleet.db.models import Vote as VoteRow
from fleet.rollouts import service
from fleet.rollouts.packages import StoredPackages
from fleet.rollouts.service import RolloutPlan
from fleet.services.clock import now_ms
from tests.fleet.auth_helpers import make_user
from tests.fleet.broker_helpers import login
from tests.fleet.rollout_helpers import store_content
from tests.services.common import free_port, wait_until
from tests.services.ingest import IngestProcess
from tests.services.mosquitto import CONNACK_ACCEPTED, CONNACK_NOT_AUTHORISED
from tests.services.mosquitto import DynsecMosquittoBroker as Broker
from tests.services.test_services import take

pytestmark = pytest.mark.mosquitto

V1 = "/api/v1"
DEV_A, DEV_B = "pt-00000000000a", "pt-00000000000b"


class Fleet:
    """The API in-process over a fresh database, provisioning accounts on ``broker``."""

    def __init__(self, db_url: str, settings: Settings) -> None:
        self.sessions = make_sessionmaker(make_engine(db_url))
        self.settings = settings
        self.client = TestClient(create_app(self.sessions, settings=settings))

    @cached_property
    def installer(self) -> dict[str, str]:
        return make_user(self.sessions, Role.installer)

    @cached_property
    def ops(self) -> dict[str, str]:
        return make_user(self.sessions, Role.ops)

    @cached_property
    def coordinator(self) -> dict[str, str]:
        return make_user(self.sessions, Role.coordinator)

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             **kwargs: Any) -> Any:
        return self.client.request(method, V1 + path,
                                   headers=self.installer if headers is None else headers,
                                   **kwargs)

    def provision(self, device_id: str, *, status: int = 200, **body: Any) -> Any:
        response = self.call("POST", f"/devices/{device_id}/provision", json=body)
        assert response.status_code == status, response.text
        return response.json()

    def site(self) -> int:
        customer = self.call("POST", "/customers", self.coordinator, json={"name": "Kahvila"})
        site = self.call("POST", "/sites", self.coordinator,
                         json={"customer_id": customer.json()["id"], "name": "Keskusta"})
        assert site.status_code == 201, site.text
        return int(site.json()["id"])

    def device(self, device_id: str) -> Device | None:
        with self.sessions() as session:
            return session.get(Device, device_id)

    def count(self, model: Any, *where: Any) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(model).where(*where))
                       or 0)


def fleet_settings(broker: Broker | None, **overrides: Any) -> Settings:
    if broker is None:
        return Settings(environment="test", mqtt_url="mqtt://127.0.0.1:1883",
                        broker_admin_url="", **overrides)
    return Settings(environment="test", mqtt_url=broker.ingest_url,
                    broker_admin_url=broker.admin_url, **overrides)


@pytest.fixture
def fleet(db_url: str, dynsec_mosquitto: Broker) -> Fleet:
    return Fleet(db_url, fleet_settings(dynsec_mosquitto))


def credentials(body: dict[str, Any]) -> tuple[str, str]:
    mqtt = body["config"]["mqtt"]
    return mqtt["user"], mqtt["password"]


# -- the happy path, end to end ------------------------------------------------------------


def test_provisioned_device_votes_are_stored_by_ingest(
        fleet: Fleet, dynsec_mosquitto: Broker, db_url: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    worker = IngestProcess(db_url=db_url, mqtt_url=dynsec_mosquitto.ingest_url,
                           workdir=tmp_path, worker_id="provision-ingest")
    worker.start_subscribed(dynsec_mosquitto)
    try:
        body = fleet.provision(DEV_A, board="esp32-devkitc")
        fleet.provision(DEV_B)
        assert body == {
            "device_id": DEV_A, "created": True, "rotated": False, "site_id": None,
            "config": {"mqtt": {"host": dynsec_mosquitto.host, "port": dynsec_mosquitto.port,
                                "user": DEV_A, "password": body["config"]["mqtt"]["password"]},
                       "topic_root": "fb/v1", "content_key": None}}
        device = fleet.device(DEV_A)
        assert device is not None and device.state is DeviceState.stocked
        assert device.board == "esp32-devkitc"

        terminal = login(request, dynsec_mosquitto, *credentials(body))
        now = now_ms()
        # A forged vote for B first, then A's own on the same connection: once A's is
        # stored, B's would have been too had the broker delivered it.
        forged = {"votes": [[1, now, 1, 0, 0]], "after": 0}
        terminal.publish(f"fb/v1/d/{DEV_B}/votes", json.dumps(forged).encode())
        terminal.publish(f"fb/v1/d/{DEV_A}/status",
                         json.dumps({"online": True, "fw": "0.1.0", "ts_ms": now}).encode())
        terminal.publish(f"fb/v1/d/{DEV_A}/votes", json.dumps(
            {"votes": [[1, now, 2, 0, 0], [2, now + 1, 5, 0, 0]], "after": 0}).encode())
        wait_until(lambda: fleet.count(VoteRow, VoteRow.device_id == DEV_A) == 2, 30,
                   f"the ingest to store {DEV_A}'s votes\n{worker.log_tail()}\n"
                   f"{dynsec_mosquitto.log_tail()}")
        assert fleet.count(VoteRow, VoteRow.device_id == DEV_B) == 0

        presence = fleet.call("GET", f"/devices/{DEV_A}/presence").json()
        assert presence["device_id"] == DEV_A and presence["online"] is True
        assert presence["state"] == "stocked" and presence["last_seen_ms"] is not None
        assert set(presence) == {"device_id", "state", "online", "last_seen_ms", "fw_version",
                                 "content_version"}
    finally:
        worker.stop()


def test_reprovisioning_rotates_the_password(fleet: Fleet, dynsec_mosquitto: Broker) -> None:
    first = fleet.provision(DEV_A)
    again = fleet.provision(DEV_A)
    assert (again["created"], again["rotated"]) == (False, True)
    (_, old), (_, new) = credentials(first), credentials(again)
    assert old != new
    assert dynsec_mosquitto.connack_code(DEV_A, old) == CONNACK_NOT_AUTHORISED
    assert dynsec_mosquitto.connack_code(DEV_A, new) == CONNACK_ACCEPTED
    assert fleet.count(Device) == 1
    actions = [e.action for e in _audit(fleet, DEV_A)]
    assert actions == ["register", "provision", "provision"]
    # The audit log holds what happened, never the password.
    assert not any(new in e.detail or old in e.detail for e in _audit(fleet, DEV_A))


def _audit(fleet: Fleet, device_id: str) -> list[AuditEntry]:
    with fleet.sessions() as session:
        return list(session.scalars(select(AuditEntry).where(
            AuditEntry.entity == "device", AuditEntry.entity_id == device_id)
            .order_by(AuditEntry.id)))


def test_site_is_assigned_once(fleet: Fleet) -> None:
    site = fleet.site()
    assert fleet.provision(DEV_A, site_id=site)["site_id"] == site
    assert fleet.provision(DEV_A, site_id=site)["site_id"] == site  # already there
    assert fleet.provision(DEV_A)["site_id"] == site  # no site given: stays
    device = fleet.device(DEV_A)
    assert device is not None and device.state is DeviceState.assigned
    assert fleet.count(Assignment, Assignment.device_id == DEV_A) == 1


# -- retiring ------------------------------------------------------------------------------


def test_retiring_disconnects_the_device_for_good(fleet: Fleet, dynsec_mosquitto: Broker,
                                                   request: pytest.FixtureRequest) -> None:
    user, password = credentials(fleet.provision(DEV_A))
    terminal = login(request, dynsec_mosquitto, user, password)
    response = fleet.call("POST", f"/devices/{DEV_A}/retire", fleet.ops)
    assert response.status_code == 200, response.text
    take(terminal.disconnects, "the retired device to be disconnected")
    assert dynsec_mosquitto.connack_code(user, password) == CONNACK_NOT_AUTHORISED

    refused = fleet.call("POST", f"/devices/{DEV_A}/provision", json={})
    assert refused.status_code == 409
    assert refused.json()["detail"].startswith(f"device {DEV_A} is retired; ")
    assert dynsec_mosquitto.connack_code(user, password) == CONNACK_NOT_AUTHORISED


def test_retiring_while_the_broker_is_down_changes_nothing(
        fleet: Fleet, dynsec_mosquitto: Broker) -> None:
    user, password = credentials(fleet.provision(DEV_A))
    dynsec_mosquitto.stop()
    response = fleet.call("POST", f"/devices/{DEV_A}/retire", fleet.ops)
    assert response.status_code == 503
    assert response.json()["detail"].startswith(
        "could not remove the device's MQTT account: broker at ")
    device = fleet.device(DEV_A)
    assert device is not None and device.state is DeviceState.stocked
    # Once the broker is back the retirement goes through and the account is gone.
    dynsec_mosquitto.start()
    assert fleet.call("POST", f"/devices/{DEV_A}/retire", fleet.ops).status_code == 200
    assert dynsec_mosquitto.connack_code(user, password) == CONNACK_NOT_AUTHORISED


def test_retiring_mid_rollout_takes_the_device_out_of_the_rollout(fleet: Fleet) -> None:
    site_id = fleet.site()
    fleet.provision(DEV_A, site_id=site_id)
    fleet.provision(DEV_B, site_id=site_id)
    with fleet.sessions.begin() as session:
        session.execute(update(Device).values(online=True))
        store_content(session, 4)
        rollout_id = service.create_rollout(session, plan=RolloutPlan(
            content_version=4, target_kind="site", target_ref=str(site_id)),
            packages=StoredPackages()).id
        session.execute(update(RolloutDevice).values(state="delivered", started_ms=1))
    assert fleet.call("POST", f"/devices/{DEV_A}/retire", fleet.ops).status_code == 200
    with fleet.sessions() as session:
        rows = {r.device_id: r for r in service.rollout_devices(session, rollout_id)}
    assert (rows[DEV_A].state.value, rows[DEV_A].reason) == ("retired", "desired not cleared yet")
    assert rows[DEV_A].started_ms is None
    assert rows[DEV_B].state.value == "delivered"  # the other device goes on
    a, b = fleet.device(DEV_A), fleet.device(DEV_B)
    assert a is not None and a.online is False
    assert b is not None and b.online is True
    listed = fleet.call("GET", f"/rollouts/{rollout_id}", fleet.ops)
    assert listed.status_code == 200, listed.text
    assert listed.json()["counts"] == {"retired": 1, "delivered": 1}


# -- errors: nothing half-done --------------------------------------------------------------


def test_unknown_site_is_404_and_registers_nothing(fleet: Fleet,
                                                   dynsec_mosquitto: Broker) -> None:
    response = fleet.call("POST", f"/devices/{DEV_A}/provision", json={"site_id": 999})
    assert response.status_code == 404
    assert response.json() == {"detail": "site 999 does not exist"}
    assert fleet.device(DEV_A) is None
    # No broker account was made either.
    assert DynsecAccounts(dynsec_mosquitto.admin_url).remove_device(DEV_A) is False


def test_broker_down_is_503_and_registers_nothing(fleet: Fleet,
                                                  dynsec_mosquitto: Broker) -> None:
    dynsec_mosquitto.stop()
    response = fleet.call("POST", f"/devices/{DEV_A}/provision", json={})
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert detail == (f"could not create the device's MQTT account: broker at "
                      f"{dynsec_mosquitto.host}:{dynsec_mosquitto.port} unreachable "
                      "(Connection refused)")
    assert fleet.device(DEV_A) is None
    assert fleet.count(AuditEntry) == 0


def test_unconfigured_accounts_are_503_and_retire_still_works(db_url: str) -> None:
    fleet = Fleet(db_url, fleet_settings(None))
    response = fleet.call("POST", f"/devices/{DEV_A}/provision", json={})
    assert response.status_code == 503
    assert "PALAUTE_BROKER_ADMIN_URL" in response.json()["detail"]
    assert fleet.device(DEV_A) is None
    # Without a broker admin the fleet manages no accounts: retiring is a registry change.
    assert fleet.call("POST", "/devices", fleet.ops, json={"id": DEV_A}).status_code == 201
    assert fleet.call("POST", f"/devices/{DEV_A}/retire", fleet.ops).status_code == 200


def test_unreachable_configured_broker_is_503(db_url: str) -> None:
    settings = Settings(environment="test",
                        broker_admin_url=f"mqtt://palaute-admin:x@127.0.0.1:{free_port()}",
                        broker_timeout_s=2)
    fleet = Fleet(db_url, settings)
    response = fleet.call("POST", f"/devices/{DEV_A}/provision", json={})
    assert response.status_code == 503
    assert "unreachable" in response.json()["detail"]


@pytest.mark.parametrize(("path", "body"), [
    ("/devices/pt-XYZ/provision", {}),
    ("/devices/pt-00000000000A/provision", {}),
    (f"/devices/{DEV_A}/provision", {"site_id": 0}),
    (f"/devices/{DEV_A}/provision", {"site_id": "twelve"}),
    (f"/devices/{DEV_A}/provision", {"board": "x" * 65}),
    (f"/devices/{DEV_A}/provision", {"board": "a\x00b"}),
    (f"/devices/{DEV_A}/provision", []),
])
def test_malformed_requests_are_422(fleet: Fleet, path: str, body: Any) -> None:
    response = fleet.call("POST", path, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]
    assert fleet.count(Device) == 0


# -- who may do what -----------------------------------------------------------------------


def test_installer_provisions_and_watches_but_reads_nothing(fleet: Fleet) -> None:
    fleet.provision(DEV_A)
    assert fleet.call("GET", f"/devices/{DEV_A}/presence").status_code == 200
    for path in ("/devices", f"/devices/{DEV_A}", f"/devices/{DEV_A}/votes",
                 f"/reports/devices/{DEV_A}", "/customers", "/sites"):
        response = fleet.call("GET", path)
        assert response.status_code == 403, path
        assert response.json()["detail"].startswith("role installer may not do this")
    assert fleet.call("POST", f"/devices/{DEV_A}/retire").status_code == 403


def test_roles_and_tokens(fleet: Fleet) -> None:
    assert fleet.call("POST", f"/devices/{DEV_A}/provision", {}, json={}).status_code == 401
    bad = {"Authorization": "Bearer pl_nope"}
    assert fleet.call("POST", f"/devices/{DEV_A}/provision", bad, json={}).status_code == 401
    denied = fleet.call("POST", f"/devices/{DEV_A}/provision", fleet.coordinator, json={})
    assert denied.status_code == 403
    viewer = make_user(fleet.sessions, Role.customer_viewer,
                       customer_id=fleet.call("POST", "/customers", fleet.coordinator,
                                              json={"name": "C"}).json()["id"])
    assert fleet.call("GET", f"/devices/{DEV_A}/presence", viewer).status_code == 403
    assert fleet.provision(DEV_A)["created"] is True
    assert fleet.call("POST", f"/devices/{DEV_B}/provision", fleet.ops, json={}).status_code \
        == 200
    assert fleet.call("GET", f"/devices/{DEV_A}/presence", fleet.coordinator).status_code \
        == 200


def test_presence_of_unknown_device_is_404(fleet: Fleet) -> None:
    response = fleet.call("GET", f"/devices/{DEV_A}/presence")
    assert response.status_code == 404
    assert response.json() == {"detail": f"device {DEV_A} is not registered"}
    assert fleet.call("GET", "/devices/nonsense/presence").status_code == 422


@pytest.mark.parametrize(("url", "message"), [
    ("http://palaute-admin:pw@broker:1883", "must start with mqtt://"),
    ("mqtt://broker:1883", "must name the dynamic-security admin and its password"),
    ("mqtt://palaute-admin@broker:1883", "must name the dynamic-security admin and its password"),
])
def test_malformed_broker_admin_url_is_refused_at_start(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(broker_admin_url=url)


def test_config_carries_the_content_public_key(fleet: Fleet, tmp_path: Path) -> None:
    """Terminals check content signatures with the fleet's public key: provisioning hands it
    over; without a signing key the config has none (content is then refused with no_key)."""
    from fleet.content import signing

    assert fleet.provision(DEV_A)["config"]["content_key"] is None
    key = signing.generate_key_file(tmp_path / "content.key")
    keyed = TestClient(create_app(fleet.sessions, settings=fleet.settings,
                                  content_key_file=str(tmp_path / "content.key")))
    response = keyed.post(f"{V1}/devices/{DEV_A}/provision", json={},
                          headers=fleet.installer)
    assert response.status_code == 200, response.text
    assert response.json()["config"]["content_key"] == signing.public_key_hex(key)


def test_unusable_content_key_stops_provisioning(db_url: str, dynsec_mosquitto: Broker,
                                                 tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.key"
    fleet = Fleet(db_url, fleet_settings(dynsec_mosquitto, content_key_file=str(missing)))
    body = fleet.provision(DEV_A, status=503)
    assert "palaute content keygen" in body["detail"]
    assert fleet.device(DEV_A) is None  # nothing registered, no account made
