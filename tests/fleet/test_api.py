"""The fleet API over a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fleet.api.app import create_app
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Role
from fleet.ingest.metrics import Metrics
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.services import registry
from fleet.services.votes import store_batches
from tests.fleet.auth_helpers import make_user


def client_with_data(db_url: str, metrics: Metrics | None = None) -> TestClient:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="API Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Lobby")
        for device_id in ("pt-000000000001", "pt-000000000002"):
            registry.register_device(session, device_id=device_id, board="sim")
        registry.assign_device(session, device_id="pt-000000000001", site_id=site.id, at_ms=0)
        store_batches(session, [VoteBatch("pt-000000000001", (
            Vote(1, 10, 1, 0, 0), Vote(2, 20, 2, 1, 0)))], received_ms=30)
    client = TestClient(create_app(sessions, metrics=metrics))
    client.headers.update(make_user(sessions, Role.ops))
    return client


def test_health_reports_the_database(db_url: str) -> None:
    response = client_with_data(db_url).get("/api/v1/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["database"] in ("sqlite", "postgresql")


def test_devices_are_paged_and_filtered(db_url: str) -> None:
    client = client_with_data(db_url)
    page = client.get("/api/v1/devices", params={"limit": 1}).json()
    assert page["total"] == 2 and [d["id"] for d in page["items"]] == ["pt-000000000001"]
    assert page["items"][0]["acked_seq"] == 2
    stocked = client.get("/api/v1/devices", params={"state": "stocked"}).json()
    assert [d["id"] for d in stocked["items"]] == ["pt-000000000002"]


def test_bad_requests_get_4xx_with_a_reason(db_url: str) -> None:
    client = client_with_data(db_url)
    missing = client.get("/api/v1/devices/pt-00000000dead/votes")
    assert missing.status_code == 404 and "not registered" in missing.json()["detail"]
    bad_state = client.get("/api/v1/devices", params={"state": "lost"})
    assert bad_state.status_code == 422
    assert bad_state.json()["detail"][0]["loc"] == ["query", "state"]
    assert client.get("/api/v1/devices", params={"limit": 0}).status_code == 422


def test_stats_and_device_votes(db_url: str) -> None:
    client = client_with_data(db_url)
    assert client.get("/api/v1/stats").json() == {
        "devices": 2, "devices_online": 0, "votes": 2, "votes_filtered": 1}
    assert client.get("/api/v1/devices/pt-000000000001/votes").json() == {
        "device_id": "pt-000000000001", "votes": 2, "last_seq": 2}


def test_metrics_endpoint_only_when_a_worker_is_attached(db_url: str) -> None:
    assert client_with_data(db_url).get("/metrics").status_code == 404
    metrics = Metrics()
    metrics.describe("palaute_ingest_refused_total", "refused")
    metrics.inc("palaute_ingest_refused_total", 3, reason="bad_json")
    sessions = make_sessionmaker(make_engine(db_url))
    text = TestClient(create_app(sessions, metrics=metrics)).get("/metrics").text
    assert 'palaute_ingest_refused_total{reason="bad_json"} 3' in text
    assert "# TYPE palaute_ingest_refused_total counter" in text
