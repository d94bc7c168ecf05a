"""``/api/v1/rollouts`` and ``/api/v1/selections`` on SQLite and PostgreSQL: role checks, the
counts per state and per wave, state changes, and a clear 4xx for every bad request."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from fleet.api.app import create_app
from fleet.db.models import Role, RolloutDevice, RolloutDeviceState
from fleet.protocol.v1 import Reported
from fleet.rollouts import service
from tests.fleet.auth_helpers import make_user
from tests.fleet.rollout_helpers import device_ids, make_fleet, sessions_for, store_content

IDS = device_ids(6, prefix="0000cc")


@pytest.fixture
def api(db_url: str) -> tuple[TestClient, dict[Role, dict[str, str]], int, Any]:
    sessions = sessions_for(db_url)
    with sessions.begin() as session:
        site_id = make_fleet(session, IDS)
        store_content(session, 5)
    return TestClient(create_app(sessions)), Users(sessions), site_id, sessions


class Users(dict[Role, dict[str, str]]):
    """Authorization headers per role, each user made on first use (hashing is slow)."""

    def __init__(self, sessions: Any) -> None:
        super().__init__()
        self.sessions = sessions

    def __missing__(self, role: Role) -> dict[str, str]:
        self[role] = make_user(self.sessions, role)
        return self[role]


def test_create_read_pause_resume_abort(api: tuple[TestClient, dict[Role, dict[str, str]],
                                                   int, Any]) -> None:
    client, headers, site_id, sessions = api
    body = {"content_version": 5, "target_kind": "site", "target_ref": str(site_id),
            "canary": [IDS[0]], "waves": [50, 100]}
    created = client.post("/api/v1/rollouts", json=body, headers=headers[Role.coordinator])
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert rollout["state"] == "running" and rollout["current_wave"] == -1
    assert rollout["counts"] == {"pending": 6}
    assert rollout["wave_counts"] == {"0": {"pending": 1}, "1": {"pending": 3},
                                      "2": {"pending": 2}}
    with sessions.begin() as session:  # what the engine and the ingest worker would do
        session.execute(update(RolloutDevice).where(RolloutDevice.wave == 0)
                        .values(state=RolloutDeviceState.delivered))
        service.apply_reported(session, Reported(IDS[0], 5, "applied", 5, None), 1)
    path = f"/api/v1/rollouts/{rollout['id']}"
    read = client.get(path, headers=headers[Role.ops]).json()
    assert read["counts"] == {"applied": 1, "pending": 5}
    devices = client.get(f"{path}/devices", headers=headers[Role.ops]).json()
    assert devices[0] == {"device_id": IDS[0], "wave": 0, "display": "128x64",
                          "state": "applied", "reason": None, "started_ms": None,
                          "updated_ms": 1}
    assert client.post(f"{path}/pause", headers=headers[Role.ops]).json()["state"] == "paused"
    again = client.post(f"{path}/pause", headers=headers[Role.ops])
    assert again.status_code == 409 and "is paused" in again.json()["detail"]
    assert client.post(f"{path}/resume", headers=headers[Role.admin]).json()["state"] == \
        "running"
    assert client.post(f"{path}/abort", headers=headers[Role.coordinator]).json()["state"] == \
        "aborted"
    listed = client.get("/api/v1/rollouts?state=aborted", headers=headers[Role.ops]).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == rollout["id"]


def test_roles(api: tuple[TestClient, dict[Role, dict[str, str]], int, Any]) -> None:
    client, headers, site_id, _ = api
    body = {"content_version": 5, "target_kind": "site", "target_ref": str(site_id)}
    assert client.post("/api/v1/rollouts", json=body).status_code == 401
    refused = client.post("/api/v1/rollouts", json=body, headers=headers[Role.installer])
    assert refused.status_code == 403 and "installer" in refused.json()["detail"]
    assert client.get("/api/v1/rollouts", headers=headers[Role.installer]).status_code == 403
    assert client.get("/api/v1/selections", headers=headers[Role.installer]).status_code == 403


@pytest.mark.parametrize(("change", "code", "text"), [
    ({"content_version": 77}, 404, "no package for display 128x64"),
    ({"content_version": 0}, 422, "content_version"),
    ({"target_kind": "galaxy"}, 422, "target_kind"),
    ({"target_ref": "999"}, 404, "site 999 does not exist"),
    ({"target_ref": "lobby"}, 422, "numeric id"),
    ({"target_ref": "99999999999999"}, 422, "numeric id"),
    ({"waves": [50]}, 422, "last wave must be 100"),
    ({"waves": [60, 40, 100]}, 422, "strictly increasing"),
    ({"canary": ["pt-00000000ffff"]}, 422, "not in the rollout's target"),
    ({"canary": ["nope"]}, 422, "canary"),
    ({"failure_threshold": 101}, 422, "failure_threshold"),
    ({"device_timeout_s": 1}, 422, "device_timeout_s"),
])
def test_bad_rollouts_get_4xx_with_reason(
        api: tuple[TestClient, dict[Role, dict[str, str]], int, Any],
        change: dict[str, Any], code: int, text: str) -> None:
    client, headers, site_id, _ = api
    body = {"content_version": 5, "target_kind": "site", "target_ref": str(site_id), **change}
    answer = client.post("/api/v1/rollouts", json=body, headers=headers[Role.ops])
    assert answer.status_code == code, answer.text
    assert text in answer.text


def test_unknown_rollout_is_404_and_bad_ids_422(
        api: tuple[TestClient, dict[Role, dict[str, str]], int, Any]) -> None:
    client, headers, _, _ = api
    missing = client.get("/api/v1/rollouts/42", headers=headers[Role.ops])
    assert missing.status_code == 404 and "rollout 42" in missing.json()["detail"]
    assert client.post("/api/v1/rollouts/42/abort", headers=headers[Role.ops]).status_code == 404
    assert client.get("/api/v1/rollouts/0", headers=headers[Role.ops]).status_code == 422


def test_selections(api: tuple[TestClient, dict[Role, dict[str, str]], int, Any]) -> None:
    client, headers, _, _ = api
    ops = headers[Role.ops]
    made = client.post("/api/v1/selections", json={"name": "pilot", "device_ids": IDS[:2]},
                       headers=ops)
    assert made.status_code == 201 and made.json()["device_ids"] == IDS[:2]
    selection_id = made.json()["id"]
    taken = client.post("/api/v1/selections", json={"name": "pilot", "device_ids": IDS[:1]},
                        headers=ops)
    assert taken.status_code == 409 and "exists already" in taken.json()["detail"]
    unknown = client.post("/api/v1/selections",
                          json={"name": "x", "device_ids": ["pt-0000000000ee"]}, headers=ops)
    assert unknown.status_code == 404 and "pt-0000000000ee" in unknown.json()["detail"]
    empty = client.post("/api/v1/selections", json={"name": "y", "device_ids": []}, headers=ops)
    assert empty.status_code == 422
    rollout = client.post("/api/v1/rollouts", json={
        "content_version": 5, "target_kind": "selection", "target_ref": str(selection_id)},
        headers=ops)
    assert rollout.status_code == 201 and rollout.json()["counts"] == {"pending": 2}
    assert [s["name"] for s in client.get("/api/v1/selections", headers=ops).json()] == ["pilot"]
    assert client.delete(f"/api/v1/selections/{selection_id}", headers=ops).status_code == 204
    assert client.get(f"/api/v1/selections/{selection_id}", headers=ops).status_code == 404
