"""The registry API (customers, sites, devices, assignments, audit) on SQLite and PostgreSQL."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fleet.api.app import create_app
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Assignment, Device, Role
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.services.clock import now_ms
from fleet.services.votes import store_batches
from tests.fleet.auth_helpers import make_user

V1 = "/api/v1"
DEV_A, DEV_B, DEV_C = "pt-00000000000a", "pt-00000000000b", "pt-00000000000c"


class Api:
    """A client over a fresh database and a bearer header for each staff role.

    Users are created on first use: each costs an Argon2 hash, and most tests need only two
    or three roles.
    """

    def __init__(self, db_url: str) -> None:
        self.sessions = make_sessionmaker(make_engine(db_url))
        self.client = TestClient(create_app(self.sessions))

    @cached_property
    def admin(self) -> dict[str, str]:
        return make_user(self.sessions, Role.admin)

    @cached_property
    def coordinator(self) -> dict[str, str]:
        return make_user(self.sessions, Role.coordinator)

    @cached_property
    def ops(self) -> dict[str, str]:
        return make_user(self.sessions, Role.ops)

    @cached_property
    def installer(self) -> dict[str, str]:
        return make_user(self.sessions, Role.installer)

    def ok(self, method: str, path: str, headers: dict[str, str], *, status: int = 200,
           **kwargs: Any) -> Any:
        """Call and assert the status; return the JSON body (None for 204)."""
        response = self.client.request(method, V1 + path, headers=headers, **kwargs)
        assert response.status_code == status, response.text
        return None if status == 204 else response.json()

    def customer(self, name: str) -> int:
        body = self.ok("POST", "/customers", self.coordinator, status=201, json={"name": name})
        return int(body["id"])

    def site(self, customer_id: int, name: str, **fields: Any) -> int:
        body = self.ok("POST", "/sites", self.coordinator, status=201,
                       json={"customer_id": customer_id, "name": name, **fields})
        return int(body["id"])

    def device(self, device_id: str, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.ok("POST", "/devices", self.ops, status=201,
                                       json={"id": device_id, **fields})
        return body


def make_api(db_url: str) -> Api:
    return Api(db_url)


def detail_of(response: Any) -> Any:
    return response.json()["detail"]


def locs(response: Any) -> list[list[Any]]:
    """The ``loc`` of every validation error in a 422 body."""
    assert response.status_code == 422, response.text
    return [error["loc"] for error in detail_of(response)]


# --------------------------------------------------------------------------- customers


def test_customer_crud_with_roles_and_conflicts(db_url: str) -> None:
    api = make_api(db_url)
    acme = api.customer("Acme Oy")
    assert api.client.post(f"{V1}/customers", json={"name": "Acme Oy"},
                           headers=api.coordinator).status_code == 409
    assert api.ok("GET", f"/customers/{acme}", api.ops)["name"] == "Acme Oy"
    for header in (api.ops, api.installer):
        refused = api.client.post(f"{V1}/customers", json={"name": "X"}, headers=header)
        assert refused.status_code == 403 and "may not" in detail_of(refused)
    assert api.client.get(f"{V1}/customers", headers=api.installer).status_code == 403

    other = api.customer("Beta Oy")
    clash = api.client.patch(f"{V1}/customers/{acme}", json={"name": "Beta Oy"},
                             headers=api.coordinator)
    assert clash.status_code == 409 and "already exists" in detail_of(clash)
    renamed = api.ok("PATCH", f"/customers/{acme}", api.admin, json={"name": "  Acme Ab  "})
    assert renamed["name"] == "Acme Ab"  # surrounding whitespace is not part of a name

    api.site(other, "Lobby")
    busy = api.client.delete(f"{V1}/customers/{other}", headers=api.coordinator)
    assert busy.status_code == 409 and "1 site(s)" in detail_of(busy)
    api.ok("DELETE", f"/customers/{acme}", api.coordinator, status=204)
    gone = api.client.get(f"{V1}/customers/{acme}", headers=api.ops)
    assert gone.status_code == 404 and detail_of(gone) == f"customer {acme} does not exist"

    assert locs(api.client.post(f"{V1}/customers", json={"name": "   "},
                                headers=api.coordinator)) == [["body", "name"]]
    assert locs(api.client.post(f"{V1}/customers", json={"name": "x" * 201},
                                headers=api.coordinator)) == [["body", "name"]]


def test_customer_with_users_cannot_be_deleted(db_url: str) -> None:
    api = make_api(db_url)
    customer = api.customer("Viewed Oy")
    make_user(api.sessions, Role.customer_viewer, customer_id=customer)
    refused = api.client.delete(f"{V1}/customers/{customer}", headers=api.admin)
    assert refused.status_code == 409 and "1 user(s)" in detail_of(refused)


def test_customer_list_is_paged_and_searchable(db_url: str) -> None:
    api = make_api(db_url)
    for name in ("Delta Oy", "Alpha Oy", "Charlie Ab", "Bravo Oy"):
        api.customer(name)
    page = api.ok("GET", "/customers", api.ops, params={"limit": 2, "offset": 1})
    assert page["total"] == 4 and page["offset"] == 1 and page["limit"] == 2
    assert [c["name"] for c in page["items"]] == ["Bravo Oy", "Charlie Ab"]
    found = api.ok("GET", "/customers", api.ops, params={"q": "OY"})
    assert [c["name"] for c in found["items"]] == ["Alpha Oy", "Bravo Oy", "Delta Oy"]
    # LIKE wildcards in q are literal characters, not patterns.
    assert api.ok("GET", "/customers", api.ops, params={"q": "%"})["total"] == 0
    assert locs(api.client.get(f"{V1}/customers", params={"limit": 501},
                               headers=api.ops)) == [["query", "limit"]]


# --------------------------------------------------------------------------- sites


def test_site_crud_and_opening_hours(db_url: str) -> None:
    api = make_api(db_url)
    customer = api.customer("Hours Oy")
    created = api.ok("POST", "/sites", api.coordinator, status=201, json={
        "customer_id": customer, "name": "Mall exit", "address": "Main st 1",
        "timezone": "Europe/Helsinki",
        "opening_hours": {"mon": [["13:00", "20:00"], ["08:00", "12:00"]], "sun": []},
        "opening_exceptions": {"2026-12-25": [], "2026-12-24": [["08:00", "12:00"]]}})
    # Intervals come back sorted; a closed day stays explicit.
    assert created["opening_hours"] == {"mon": [["08:00", "12:00"], ["13:00", "20:00"]],
                                        "sun": []}
    assert list(created["opening_exceptions"]) == ["2026-12-24", "2026-12-25"]
    site = created["id"]
    assert api.ok("GET", f"/sites/{site}", api.ops) == created

    changed = api.ok("PATCH", f"/sites/{site}", api.coordinator,
                     json={"timezone": "America/New_York",
                           "opening_hours": {"fri": [["00:00", "24:00"]]}})
    assert changed["timezone"] == "America/New_York"
    assert changed["opening_hours"] == {"fri": [["00:00", "24:00"]]}
    assert changed["name"] == "Mall exit" and changed["opening_exceptions"] == \
        created["opening_exceptions"]
    assert api.client.patch(f"{V1}/sites/{site}", json={"name": "X"},
                            headers=api.ops).status_code == 403

    listed = api.ok("GET", "/sites", api.ops, params={"customer_id": customer})
    assert listed["total"] == 1 and listed["items"][0]["id"] == site

    missing = api.client.post(f"{V1}/sites", json={"customer_id": 999, "name": "X"},
                              headers=api.coordinator)
    assert missing.status_code == 404 and detail_of(missing) == "customer 999 does not exist"
    api.ok("DELETE", f"/sites/{site}", api.coordinator, status=204)
    gone = api.client.get(f"{V1}/sites/{site}", headers=api.ops)
    assert gone.status_code == 404 and detail_of(gone) == f"site {site} does not exist"


@pytest.mark.parametrize(("fields", "field", "reason"), [
    ({"timezone": "Mars/Olympus"}, "timezone", "not an IANA time zone"),
    ({"timezone": "localtime"}, "timezone", "not an IANA time zone"),
    ({"opening_hours": {"mon": [["08:00", "12:00"], ["11:30", "14:00"]]}},
     "opening_hours", "08:00-12:00 overlaps 11:30-14:00"),
    ({"opening_hours": {"tue": [["12:00", "12:00"]]}}, "opening_hours",
     "must open before it closes"),
    ({"opening_hours": {"tue": [["18:00", "08:00"]]}}, "opening_hours",
     "must open before it closes"),
    ({"opening_hours": {"wed": [["00:00", "01:00"], ["02:00", "03:00"], ["04:00", "05:00"],
                                ["06:00", "07:00"], ["08:00", "09:00"]]}},
     "opening_hours", "at most 4"),
    ({"opening_hours": {"mon": [["8:00", "12:00"]]}}, "opening_hours", "pattern"),
    ({"opening_hours": {"mon": [["08:00", "25:00"]]}}, "opening_hours", "pattern"),
    ({"opening_hours": {"mon": [["08:00"]]}}, "opening_hours", ""),
    ({"opening_hours": {"monday": []}}, "opening_hours", "'mon'"),
    ({"opening_exceptions": {"2026-02-30": []}}, "opening_exceptions", "not a date"),
    ({"opening_exceptions": {"24.12.2026": []}}, "opening_exceptions", "pattern"),
    ({"opening_exceptions": {"2026-12-24": [["10:00", "12:00"], ["09:00", "10:30"]]}},
     "opening_exceptions", "overlaps"),
    ({"name": ""}, "name", ""),
])
def test_site_validation_errors_name_the_field(db_url: str, fields: dict[str, Any],
                                               field: str, reason: str) -> None:
    api = make_api(db_url)
    customer = api.customer("Strict Oy")
    body = {"customer_id": customer, "name": "Site", **fields}
    response = api.client.post(f"{V1}/sites", json=body, headers=api.coordinator)
    assert response.status_code == 422, response.text
    errors = detail_of(response)
    assert errors[0]["loc"][:2] == ["body", field]
    assert reason in errors[0]["msg"]
    # The same rules hold for an update.
    site = api.site(customer, "Existing")
    update_fields = {k: v for k, v in fields.items()}
    patched = api.client.patch(f"{V1}/sites/{site}", json=update_fields,
                               headers=api.coordinator)
    assert patched.status_code == 422 and detail_of(patched)[0]["loc"][:2] == ["body", field]


def test_site_with_history_cannot_be_deleted(db_url: str) -> None:
    api = make_api(db_url)
    site = api.site(api.customer("History Oy"), "Lobby")
    api.device(DEV_A)
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": site, "start_ms": 1000})
    api.ok("POST", "/assignments/unassign", api.coordinator,
           json={"device_id": DEV_A, "end_ms": 2000})
    refused = api.client.delete(f"{V1}/sites/{site}", headers=api.coordinator)
    assert refused.status_code == 409 and "1 assignment(s)" in detail_of(refused)


# --------------------------------------------------------------------------- devices


def test_device_registration_detail_and_update(db_url: str) -> None:
    api = make_api(db_url)
    for bad in ("pt-ABCDEF012345", "pt-12345", "xx-0123456789ab", "pt-0123456789abc"):
        response = api.client.post(f"{V1}/devices", json={"id": bad}, headers=api.ops)
        assert locs(response) == [["body", "id"]]
    created = api.device(DEV_A, board="esp32-devkitc", notes="box 3")
    assert created["state"] == "stocked" and created["assignment"] is None
    again = api.client.post(f"{V1}/devices", json={"id": DEV_A}, headers=api.ops)
    assert again.status_code == 409 and detail_of(again) == f"device {DEV_A} is already registered"
    # Installers register terminals on site, but read nothing.
    api.ok("POST", "/devices", api.installer, status=201, json={"id": DEV_B})
    assert api.client.get(f"{V1}/devices/{DEV_B}", headers=api.installer).status_code == 403
    assert api.client.post(f"{V1}/devices", json={"id": DEV_C},
                           headers=api.coordinator).status_code == 403

    with api.sessions.begin() as session:
        session.execute(update(Device).where(Device.id == DEV_A).values(
            online=True, last_seen_ms=12345, fw_version="1.2.0", content_version=7,
            acked_seq=42))
    site = api.site(api.customer("Detail Oy"), "Gate 12")
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": site, "start_ms": 5000})
    detail = api.ok("GET", f"/devices/{DEV_A}", api.coordinator)
    assert detail["assignment"]["site_id"] == site
    assert detail["assignment"]["site_name"] == "Gate 12"
    assert detail["assignment"]["since_ms"] == 5000
    assert (detail["online"], detail["last_seen_ms"], detail["fw_version"],
            detail["content_version"], detail["acked_seq"]) == (True, 12345, "1.2.0", 7, 42)

    patched = api.ok("PATCH", f"/devices/{DEV_A}", api.ops, json={"notes": "relabelled"})
    assert patched["notes"] == "relabelled" and patched["board"] == "esp32-devkitc"
    assert api.client.patch(f"{V1}/devices/{DEV_A}", json={"notes": "x"},
                            headers=api.coordinator).status_code == 403
    missing = api.client.get(f"{V1}/devices/pt-0000deadbeef", headers=api.ops)
    assert missing.status_code == 404 and detail_of(missing) == \
        "device pt-0000deadbeef is not registered"
    assert api.client.get(f"{V1}/devices/garbage", headers=api.ops).status_code == 404


def test_device_list_filters_and_pages(db_url: str) -> None:
    api = make_api(db_url)
    north, south = api.customer("North Oy"), api.customer("South Oy")
    north_site, south_site = api.site(north, "N1"), api.site(south, "S1")
    ids = [f"pt-00000000{n:04x}" for n in range(1, 8)]
    for device_id in ids:
        api.device(device_id)
    api.ok("POST", "/assignments/bulk", api.coordinator, status=201,
           json={"site_id": north_site, "device_ids": ids[:3], "start_ms": 10})
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": ids[3], "site_id": south_site, "start_ms": 10})
    api.ok("POST", f"/devices/{ids[6]}/retire", api.ops)
    with api.sessions.begin() as session:
        session.execute(update(Device).where(Device.id.in_(ids[1:3])).values(online=True))

    def listed(**params: Any) -> list[str]:
        page = api.ok("GET", "/devices", api.coordinator, params=params)
        assert page["total"] == len(page["items"]) or "limit" in params
        return [d["id"] for d in page["items"]]

    assert listed(site_id=north_site) == ids[:3]
    assert listed(customer_id=south) == [ids[3]]
    assert listed(state="stocked") == ids[4:6]
    assert listed(state="retired") == [ids[6]]
    assert listed(online=True) == ids[1:3]
    assert listed(online=True, site_id=north_site, q="pt-000000000003") == [ids[2]]
    assert listed(q="pt-0000000000") == ids
    assert listed(q="pt-1") == []
    page = api.ok("GET", "/devices", api.ops, params={"offset": 2, "limit": 3})
    assert page["total"] == 7 and [d["id"] for d in page["items"]] == ids[2:5]
    assert page["items"][0]["site_id"] == north_site and page["items"][0]["since_ms"] == 10
    on_site = api.ok("GET", f"/sites/{north_site}/devices", api.ops, params={"limit": 2})
    assert on_site["total"] == 3 and [d["id"] for d in on_site["items"]] == ids[:2]
    for bad in ({"q": "PT_%"}, {"limit": 0}, {"offset": -1}, {"site_id": 0},
                {"online": "maybe"}):
        assert api.client.get(f"{V1}/devices", params=bad, headers=api.ops).status_code == 422


# --------------------------------------------------------------------------- assignments


def test_assignment_history_reassign_and_unassign(db_url: str) -> None:
    api = make_api(db_url)
    customer = api.customer("Move Oy")
    first, second = api.site(customer, "First"), api.site(customer, "Second")
    api.device(DEV_A)
    assign = {"device_id": DEV_A, "site_id": first, "start_ms": 1_000}
    opened = api.ok("POST", "/assignments", api.coordinator, status=201, json=assign)
    assert opened["end_ms"] is None
    same = api.client.post(f"{V1}/assignments", json={**assign, "start_ms": 1_500},
                           headers=api.coordinator)
    assert same.status_code == 409 and "already assigned to site" in detail_of(same)
    for start in (500, 1_000):  # a move must start after the current assignment started
        early = api.client.post(f"{V1}/assignments", headers=api.coordinator,
                                json={"device_id": DEV_A, "site_id": second,
                                      "start_ms": start})
        assert early.status_code == 409
        assert detail_of(early) == (f"device {DEV_A} is assigned to site {first} since 1000; "
                                    f"a new assignment must start later (got {start})")
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": second, "start_ms": 2_000})
    history = api.ok("GET", f"/devices/{DEV_A}/assignments", api.ops)
    assert [(a["site_id"], a["start_ms"], a["end_ms"]) for a in history["items"]] == [
        (second, 2_000, None), (first, 1_000, 2_000)]
    assert api.ok("GET", f"/sites/{first}/devices", api.coordinator)["total"] == 0
    assert [d["id"] for d in api.ok("GET", f"/sites/{second}/devices",
                                    api.coordinator)["items"]] == [DEV_A]

    too_early = api.client.post(f"{V1}/assignments/unassign", headers=api.coordinator,
                                json={"device_id": DEV_A, "end_ms": 2_000})
    assert too_early.status_code == 409 and "must end after" in detail_of(too_early)
    closed = api.ok("POST", "/assignments/unassign", api.coordinator,
                    json={"device_id": DEV_A, "end_ms": 3_000})
    assert (closed["site_id"], closed["end_ms"]) == (second, 3_000)
    assert api.ok("GET", f"/devices/{DEV_A}", api.ops)["state"] == "stocked"
    twice = api.client.post(f"{V1}/assignments/unassign", headers=api.coordinator,
                            json={"device_id": DEV_A, "end_ms": 4_000})
    assert twice.status_code == 409 and "not assigned" in detail_of(twice)
    # History never overlaps: the next stay cannot begin before the last one ended.
    overlap = api.client.post(f"{V1}/assignments", headers=api.coordinator,
                              json={"device_id": DEV_A, "site_id": first, "start_ms": 2_500})
    assert overlap.status_code == 409 and "until 3000" in detail_of(overlap)
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": first, "start_ms": 3_000})
    paged = api.ok("GET", f"/devices/{DEV_A}/assignments", api.ops, params={"limit": 1})
    assert paged["total"] == 3 and paged["items"][0]["start_ms"] == 3_000

    before = now_ms()
    default = api.ok("POST", "/assignments", api.coordinator, status=201,
                     json={"device_id": DEV_A, "site_id": second})
    assert before <= default["start_ms"] <= now_ms()  # start_ms defaults to now


def test_assignment_errors_and_roles(db_url: str) -> None:
    api = make_api(db_url)
    site = api.site(api.customer("Roles Oy"), "Lobby")
    api.device(DEV_A)
    body = {"device_id": DEV_A, "site_id": site, "start_ms": 1}
    for header in (api.ops, api.installer):
        assert api.client.post(f"{V1}/assignments", json=body,
                               headers=header).status_code == 403
    unknown_site = api.client.post(f"{V1}/assignments", headers=api.coordinator,
                                   json={**body, "site_id": 4242})
    assert unknown_site.status_code == 404 and detail_of(unknown_site) == \
        "site 4242 does not exist"
    unknown_device = api.client.post(f"{V1}/assignments", headers=api.coordinator,
                                     json={**body, "device_id": DEV_C})
    assert unknown_device.status_code == 404 and DEV_C in detail_of(unknown_device)
    assert locs(api.client.post(f"{V1}/assignments", headers=api.coordinator,
                                json={**body, "start_ms": -5})) == [["body", "start_ms"]]
    assert locs(api.client.post(f"{V1}/assignments", headers=api.coordinator,
                                json={**body, "device_id": "pt-x"})) == [["body", "device_id"]]


def test_retired_devices_leave_their_site_and_cannot_be_assigned(db_url: str) -> None:
    api = make_api(db_url)
    site = api.site(api.customer("Retire Oy"), "Lobby")
    api.device(DEV_A)
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": site, "start_ms": 1_000})
    assert api.client.post(f"{V1}/devices/{DEV_A}/retire",
                           headers=api.coordinator).status_code == 403
    before = now_ms()
    retired = api.ok("POST", f"/devices/{DEV_A}/retire", api.ops)
    assert retired["state"] == "retired" and retired["assignment"] is None
    history = api.ok("GET", f"/devices/{DEV_A}/assignments", api.ops)["items"]
    assert before <= history[0]["end_ms"] <= now_ms()
    again = api.client.post(f"{V1}/devices/{DEV_A}/retire", headers=api.ops)
    assert again.status_code == 409 and "already retired" in detail_of(again)
    refused = api.client.post(f"{V1}/assignments", headers=api.coordinator,
                              json={"device_id": DEV_A, "site_id": site})
    assert refused.status_code == 409 and detail_of(refused) == \
        f"device {DEV_A} is retired; it cannot be assigned"
    with api.sessions.begin() as session:  # and ingest refuses its votes
        result = store_batches(session, [VoteBatch(DEV_A, (Vote(1, now_ms(), 1, 0, 0),))],
                               received_ms=now_ms())
    assert result.refused == {"retired_device": 1}


def test_future_assignment_blocks_retirement(db_url: str) -> None:
    api = make_api(db_url)
    site = api.site(api.customer("Future Oy"), "Lobby")
    api.device(DEV_A)
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": site, "start_ms": now_ms() + 86_400_000})
    refused = api.client.post(f"{V1}/devices/{DEV_A}/retire", headers=api.ops)
    assert refused.status_code == 409 and "in the future" in detail_of(refused)


def test_bulk_assignment_is_all_or_nothing(db_url: str) -> None:
    api = make_api(db_url)
    customer = api.customer("Bulk Oy")
    old, new = api.site(customer, "Old"), api.site(customer, "New")
    for device_id in (DEV_A, DEV_B, DEV_C):
        api.device(device_id)
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_B, "site_id": old, "start_ms": 5_000})
    api.ok("POST", f"/devices/{DEV_C}/retire", api.ops)
    unknown = "pt-0000000000ff"
    refused = api.client.post(f"{V1}/assignments/bulk", headers=api.coordinator, json={
        "site_id": new, "device_ids": [DEV_A, DEV_B, DEV_C, unknown], "start_ms": 4_000})
    assert refused.status_code == 409
    body = detail_of(refused)
    assert body["message"] == f"3 of 4 devices cannot be assigned to site {new}; nothing " \
                              "was changed"
    errors = {e["device_id"]: e for e in body["errors"]}
    assert set(errors) == {DEV_B, DEV_C, unknown}
    assert "must start later" in errors[DEV_B]["reason"]
    assert "retired" in errors[DEV_C]["reason"]
    assert errors[unknown]["code"] == "not_found" and errors[DEV_B]["code"] == "conflict"
    # Nothing changed: DEV_A (which alone was fine) is still in stock.
    assert api.ok("GET", f"/devices/{DEV_A}", api.ops)["state"] == "stocked"
    with api.sessions() as session:
        assert len(session.scalars(select(Assignment)).all()) == 1

    dupes = api.client.post(f"{V1}/assignments/bulk", headers=api.coordinator,
                            json={"site_id": new, "device_ids": [DEV_A, DEV_A]})
    assert dupes.status_code == 422 and "more than once" in detail_of(dupes)[0]["msg"]
    assert locs(api.client.post(f"{V1}/assignments/bulk", headers=api.coordinator,
                                json={"site_id": new, "device_ids": []})) == \
        [["body", "device_ids"]]
    missing_site = api.client.post(f"{V1}/assignments/bulk", headers=api.coordinator,
                                   json={"site_id": 999, "device_ids": [DEV_A]})
    assert missing_site.status_code == 404

    done = api.ok("POST", "/assignments/bulk", api.coordinator, status=201, json={
        "site_id": new, "device_ids": [DEV_B, DEV_A], "start_ms": 6_000})
    assert [a["device_id"] for a in done["assignments"]] == [DEV_B, DEV_A]
    assert [d["id"] for d in api.ok("GET", f"/sites/{new}/devices", api.ops)["items"]] == [
        DEV_A, DEV_B]
    history = api.ok("GET", f"/devices/{DEV_B}/assignments", api.ops)["items"]
    assert [(a["site_id"], a["end_ms"]) for a in history] == [(new, None), (old, 6_000)]


# --------------------------------------------------------------------------- audit


def test_every_write_is_audited(db_url: str) -> None:
    api = make_api(db_url)
    since = now_ms()
    customer = api.customer("Audit Oy")
    api.ok("PATCH", f"/customers/{customer}", api.coordinator, json={"name": "Audit Ab"})
    site = api.site(customer, "Lobby", timezone="Europe/Helsinki")
    api.ok("PATCH", f"/sites/{site}", api.coordinator, json={"timezone": "UTC"})
    spare = api.site(customer, "Spare")
    api.ok("DELETE", f"/sites/{spare}", api.coordinator, status=204)
    api.device(DEV_A)
    api.device(DEV_B)
    api.ok("PATCH", f"/devices/{DEV_A}", api.ops, json={"notes": "shelf 2"})
    api.ok("POST", "/assignments", api.coordinator, status=201,
           json={"device_id": DEV_A, "site_id": site, "start_ms": 10})
    api.ok("POST", "/assignments/bulk", api.coordinator, status=201,
           json={"site_id": site, "device_ids": [DEV_B], "start_ms": 10})
    api.ok("POST", "/assignments/unassign", api.coordinator,
           json={"device_id": DEV_B, "end_ms": 20})
    api.ok("POST", f"/devices/{DEV_A}/retire", api.ops)
    other = api.customer("Short-lived Oy")
    api.ok("DELETE", f"/customers/{other}", api.admin, status=204)
    # A refused write leaves no trace.
    api.client.post(f"{V1}/customers", json={"name": "Audit Ab"}, headers=api.coordinator)

    def entries(**params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = api.ok("GET", "/audit", api.coordinator,
                                             params={"limit": 500, **params})["items"]
        return items

    trail = [(e["entity"], e["action"]) for e in entries(since_ms=since)]
    assert list(reversed(trail)) == [
        ("customer", "create"), ("customer", "update"), ("site", "create"),
        ("site", "update"), ("site", "create"), ("site", "delete"), ("device", "register"),
        ("device", "register"), ("device", "update"), ("device", "assign"),
        ("device", "assign"), ("device", "unassign"), ("device", "retire"),
        ("customer", "create"), ("customer", "delete")]

    renamed = entries(entity="customer", entity_id=str(customer), action="update")[0]
    assert renamed["detail"] == {"before": {"name": "Audit Oy"}, "after": {"name": "Audit Ab"}}
    assert renamed["user_email"] == "coordinator@example.org"
    tz = entries(entity="site", entity_id=str(site), action="update")[0]["detail"]
    assert tz == {"before": {"timezone": "Europe/Helsinki"}, "after": {"timezone": "UTC"}}
    device_trail = entries(entity="device", entity_id=DEV_A)
    assert [e["action"] for e in device_trail] == ["retire", "assign", "update", "register"]
    assert device_trail[0]["detail"]["closed"]["site_id"] == site
    assert entries(entity="device", entity_id=DEV_B)[1]["detail"]["bulk"] is True

    ops_id = api.ok("GET", "/auth/me", api.ops)["id"]
    assert {e["action"] for e in entries(user_id=ops_id)} == {"register", "update", "retire"}
    page = api.ok("GET", "/audit", api.admin, params={"since_ms": since, "limit": 2,
                                                      "offset": 1})
    assert page["total"] == 15 and [e["action"] for e in page["items"]] == ["create", "retire"]
    assert entries(since_ms=now_ms() + 60_000) == []
    for header in (api.ops, api.installer):
        assert api.client.get(f"{V1}/audit", headers=header).status_code == 403


def test_customer_viewer_reads_only_its_own_customer(db_url: str) -> None:
    api = make_api(db_url)
    mine, theirs = api.customer("Mine Oy"), api.customer("Theirs Oy")
    my_site, their_site = api.site(mine, "My lobby"), api.site(theirs, "Their lobby")
    viewer = make_user(api.sessions, Role.customer_viewer, customer_id=mine)
    assert [c["id"] for c in api.ok("GET", "/customers", viewer)["items"]] == [mine]
    assert [s["id"] for s in api.ok("GET", "/sites", viewer)["items"]] == [my_site]
    assert api.ok("GET", "/sites", viewer, params={"customer_id": theirs})["total"] == 0
    assert api.client.get(f"{V1}/sites/{their_site}", headers=viewer).status_code == 404
    assert api.client.get(f"{V1}/customers/{theirs}", headers=viewer).status_code == 404
    assert api.client.post(f"{V1}/sites", json={"customer_id": mine, "name": "X"},
                           headers=viewer).status_code == 403
    assert api.client.get(f"{V1}/sites/{my_site}/devices", headers=viewer).status_code == 403


def test_values_the_database_cannot_hold_are_refused_not_500(db_url: str) -> None:
    # PostgreSQL refuses NUL bytes in text and integers beyond BIGINT; SQLite overflows past
    # 2**63.  Either would be a 500 if it reached SQL, so the API bounds every input.
    api = make_api(db_url)
    customer = api.customer("Bounds Oy")
    huge = 2**63
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/customers", {"json": {"name": "nul\x00name"}}),
        ("POST", "/sites", {"json": {"customer_id": customer, "name": "S",
                                     "address": "a\x00b"}}),
        ("POST", "/sites", {"json": {"customer_id": huge, "name": "S"}}),
        ("GET", "/customers", {"params": {"q": "\x00"}}),
        ("GET", "/customers", {"params": {"offset": huge}}),
        ("GET", f"/customers/{huge}", {}),
        ("GET", f"/sites/{huge}", {}),
        ("GET", "/devices", {"params": {"customer_id": huge}}),
        ("GET", "/audit", {"params": {"entity_id": "\x00"}}),
        ("GET", "/audit", {"params": {"since_ms": huge}}),
        ("POST", "/assignments", {"json": {"device_id": DEV_A, "site_id": 1,
                                           "start_ms": huge}}),
    ]
    for method, path, kwargs in cases:
        response = api.client.request(method, V1 + path, headers=api.admin, **kwargs)
        assert response.status_code == 422, (method, path, response.text)
    nul_device = api.client.get(f"{V1}/devices/pt-%00", headers=api.admin)
    assert nul_device.status_code == 404
