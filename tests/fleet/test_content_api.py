"""/api/v1/content on SQLite and PostgreSQL: create, list, get, preview, package; roles; 4xx."""

from __future__ import annotations

import copy
import io
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fleet.api.app import create_app
from fleet.content import signing
from fleet.content.package import parse_package
from fleet.content.render import from_mono_vlsb
from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.models import Role
from tests.fleet.auth_helpers import make_user

V1 = "/api/v1"
BODY: dict[str, Any] = {
    "name": "Spring survey",
    "languages": {
        "fi": {"question": "Miten onnistuimme?", "thanks": "Kiitos!",
               "labels": ["Huono", "Ok", "Hyvä"]},
        "ar": {"question": "كيف كانت زيارتك؟", "thanks": "شكرا لك!",
               "labels": ["سيء", "جيد", "ممتاز"]},
        "zh": {"question": "您满意吗？", "thanks": "谢谢！"},
    },
    "buttons": 3,
    "show": "rotate",
    "rotate_s": 6,
    "settings": {"min_gap_ms": 1500, "burst_count": 10, "brightness": 128, "idle": "dim"},
    "hours": {"week": {"mon": [["08:00", "20:00"]], "sat": [["10:00", "14:00"]]},
              "timezone": "Europe/Helsinki"},
    "outside": "off",
}


class Api:
    """A client over a fresh database, with a signing key, and users created on first use."""

    def __init__(self, db_url: str, key_file: Path | str) -> None:
        self.sessions = make_sessionmaker(make_engine(db_url))
        self.client = TestClient(create_app(self.sessions, content_key_file=str(key_file)))

    @cached_property
    def coordinator(self) -> dict[str, str]:
        return make_user(self.sessions, Role.coordinator)

    @cached_property
    def admin(self) -> dict[str, str]:
        return make_user(self.sessions, Role.admin)

    def call(self, method: str, path: str, headers: dict[str, str], status: int,
             **kwargs: Any) -> Any:
        response = self.client.request(method, V1 + path, headers=headers, **kwargs)
        assert response.status_code == status, response.text
        return response

    def create(self, body: dict[str, Any], status: int = 201) -> Any:
        return self.call("POST", "/content", self.coordinator, status, json=body).json()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "content.key"
    signing.generate_key_file(path)
    return path


@pytest.fixture
def api(db_url: str, key_file: Path) -> Api:
    return Api(db_url, key_file)


def test_create_list_get_and_download_signed_packages(api: Api, key_file: Path) -> None:
    created = api.create(BODY)
    assert created["version"] == 1 and created["name"] == "Spring survey"
    assert [p["display"] for p in created["packages"]] == ["128x64", "296x128"]
    public = signing.public_key_hex(signing.load_key_file(key_file))
    for info in created["packages"]:
        response = api.call("GET", "/content/1/package", api.coordinator, 200,
                            params={"display": info["display"]})
        data = response.content
        assert len(data) == info["size"] and info["public_key"] == public
        assert response.headers["x-content-sha256"] == info["sha256"]
        assert signing.verify(public, 1, data, bytes.fromhex(info["signature"]))
        package = parse_package(data, version=1)
        header = package.header
        assert f"{package.width}x{package.height}" == info["display"]
        assert header["languages"] == ["fi", "ar", "zh"] and header["show"] == "rotate"
        assert header["rotate_s"] == 6
        assert header["settings"] == {"min_gap_ms": 1500, "burst_count": 10,
                                      "brightness": 128, "idle": "dim"}
        assert header["hours"]["week"] == [[0, 480, 1200], [5, 600, 840]]
        assert header["hours"]["outside"] == "off"
        # Helsinki changes offset twice a year: 400 days hold at least two transitions.
        tz = header["hours"]["tz"]
        assert tz[0][0] == 0 and tz[0][1] in (120, 180) and len(tz) >= 3
        assert {offset for _, offset in tz} == {120, 180}
    second = api.create({**BODY, "name": "Second"})
    assert second["version"] == 2
    listed = api.call("GET", "/content", api.coordinator, 200, params={"limit": 1}).json()
    assert listed["total"] == 2 and [c["version"] for c in listed["items"]] == [2]
    got = api.call("GET", "/content/1", api.coordinator, 200).json()
    assert got["body"]["languages"]["ar"]["labels"] == ["سيء", "جيد", "ممتاز"]
    assert got == created


def test_preview_is_the_stored_bitmap_as_png(api: Api) -> None:
    api.create(BODY)
    package = parse_package(api.call("GET", "/content/1/package", api.coordinator, 200,
                                     params={"display": "296x128"}).content)
    for screen in ("question", "thanks"):
        for lang in ("fi", "ar", "zh"):
            response = api.call("GET", "/content/1/preview.png", api.coordinator, 200,
                                params={"display": "296x128", "screen": screen, "lang": lang})
            assert response.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(response.content)).convert("1")
            expected = from_mono_vlsb(package.screens[screen][lang], 296, 128)
            assert image.size == (296, 128) and image.tobytes() == expected.tobytes()
    default = api.call("GET", "/content/1/preview.png", api.coordinator, 200,
                       params={"scale": 4})
    assert default.headers["content-language"] == "fi"
    assert Image.open(io.BytesIO(default.content)).size == (512, 256)


def test_roles(api: Api) -> None:
    api.create(BODY)
    ops = make_user(api.sessions, Role.ops)
    installer = make_user(api.sessions, Role.installer)
    customer = api.call("POST", "/customers", api.coordinator, 201,
                        json={"name": "Viewer Oy"}).json()["id"]
    viewer = make_user(api.sessions, Role.customer_viewer, customer_id=customer)
    reads = ("/content", "/content/1", "/content/1/preview.png", "/content/1/package")
    for reader in (ops, api.coordinator, api.admin):
        for path in reads:
            api.call("GET", path, reader, 200)
    for user in (ops, installer, viewer):
        detail = api.call("POST", "/content", user, 403, json=BODY).json()["detail"]
        assert "may not do this" in detail
    # Neither a customer viewer nor an installer token reads content: a version may carry
    # any customer's questions, and an installer only registers and provisions terminals.
    for path in reads:
        for outsider in (viewer, installer):
            detail = api.call("GET", path, outsider, 403).json()["detail"]
            assert detail.endswith("may not do this (needs admin, coordinator, ops)")
        api.call("GET", path, {}, 401)
    assert api.call("POST", "/content", api.admin, 201, json=BODY).json()["version"] == 2


def _body(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(BODY)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = body
        for part in path:
            target = target[part]
        if value is None:
            del target[last]
        else:
            target[last] = value
    return body


@pytest.mark.parametrize(("body", "needle"), [
    (_body(show="de"), "neither 'rotate' nor one of the languages"),
    (_body(buttons=4), "languages.fi.labels: 3 labels for 4 buttons"),
    (_body(buttons=None), "set `buttons`"),
    (_body(languages={}), "at least 1 item"),
    (_body(languages__fi__question=""), "at least 1 character"),
    (_body(languages__FI={"question": "q", "thanks": "t"}), "should match pattern"),
    (_body(settings__brightness=256), "less than or equal to 255"),
    (_body(settings__burst_count=65), "less than or equal to 64"),
    (_body(settings__idle="sleep"), "'on', 'dim' or 'off'"),
    (_body(settings__colour=1), "Extra inputs are not permitted"),
    (_body(rotate_s=1), "greater than or equal to 2"),
    (_body(hours__timezone="Mars/Olympus"), "not an IANA time zone"),
    (_body(hours__week={"mon": [["20:00", "08:00"]]}), "hours.week.mon"),
    (_body(hours_from_site=1), "either hours or hours_from_site"),
    (_body(outside="on"), "'dim' or 'off'"),
    (_body(languages__fi__question="ሀሁ ሂ"),
     "languages.fi.question: no font has a glyph for 'ሀ' (U+1200)"),
    (_body(languages__fi__thanks="Kiitos مرحبا"), "languages.fi.thanks: it mixes scripts"),
    (_body(languages__fi__thanks="Kiitos\u0007"), "should match pattern"),
    (_body(languages__fi__labels=["a\nb", "Ok", "Hyvä"]), "should match pattern"),
    (_body(languages__fi__thanks="\u200b\u200f"), "languages.fi.thanks: has no visible"),
    (_body(languages__fi__question=" ".join(["Palautteenantaja"] * 12)),
     "languages.fi.question: does not fit a 128x64 display above the labels even at 10 px"),
    (_body(languages__fi__labels=["Huono", "Kohtalainen", "Hyvä"]),
     "languages.fi.labels.1: label 'Kohtalainen' does not fit"),
    (_body(languages={code: {"question": "Q?", "thanks": "T"}
                      for code in ("fi", "sv", "en", "de", "fr", "es", "it")},
           buttons=None, show="rotate"),
     "languages: 296x128: the 296x128 package is"),
])
def test_bad_bodies_are_refused_with_a_reason(api: Api, body: dict[str, Any],
                                              needle: str) -> None:
    response = api.client.post(V1 + "/content", headers=api.coordinator, json=body)
    assert response.status_code == 422, response.text
    assert needle in response.text
    assert api.call("GET", "/content", api.coordinator, 200).json()["total"] == 0


def test_hours_copied_from_a_site(api: Api) -> None:
    customer = api.call("POST", "/customers", api.coordinator, 201,
                        json={"name": "Kathmandu Oy"}).json()["id"]
    site = api.call("POST", "/sites", api.coordinator, 201, json={
        "customer_id": customer, "name": "Thamel", "timezone": "Asia/Kathmandu",
        "opening_hours": {"sun": [["09:00", "17:30"]]}}).json()["id"]
    bare = api.call("POST", "/sites", api.coordinator, 201, json={
        "customer_id": customer, "name": "No hours"}).json()["id"]
    created = api.create(_body(hours=None, hours_from_site=site))
    assert created["body"]["hours"] == {"week": {"sun": [["09:00", "17:30"]]},
                                        "timezone": "Asia/Kathmandu"}
    header = parse_package(api.call("GET", "/content/1/package", api.coordinator,
                                    200).content).header
    assert header["hours"] == {"week": [[6, 540, 1050]], "tz": [[0, 345]], "outside": "off"}
    missing = api.create(_body(hours=None, hours_from_site=999), status=422)
    assert "site 999 does not exist" in str(missing)
    empty = api.create(_body(hours=None, hours_from_site=bare), status=422)
    assert f"site {bare} has no opening hours" in str(empty)


def test_unknown_versions_and_bad_queries(api: Api) -> None:
    api.create(_body(hours=None))
    assert "content version 9 does not exist" in api.call(
        "GET", "/content/9", api.coordinator, 404).text
    api.call("GET", "/content/9/preview.png", api.coordinator, 404)
    api.call("GET", "/content/9/package", api.coordinator, 404)
    api.call("GET", "/content/0", api.coordinator, 422)
    api.call("GET", "/content/65536", api.coordinator, 422)
    api.call("GET", "/content/x", api.coordinator, 422)
    api.call("GET", "/content/1/package", api.coordinator, 422, params={"display": "64x32"})
    api.call("GET", "/content/1/preview.png", api.coordinator, 422,
             params={"screen": "labels"})
    api.call("GET", "/content/1/preview.png", api.coordinator, 422, params={"scale": 9})
    text = api.call("GET", "/content/1/preview.png", api.coordinator, 422,
                    params={"lang": "de"}).text
    assert "has no language 'de' (it has fi, ar, zh)" in text and '"query"' in text
    api.call("GET", "/content", api.coordinator, 422, params={"limit": 0})
    api.call("POST", "/content", {**api.coordinator, "Content-Type": "application/json"}, 422,
             content=b"{not json")
    api.call("PATCH", "/content/1", api.coordinator, 405, json={"name": "x"})
    api.call("DELETE", "/content/1", api.coordinator, 405)


def test_without_a_usable_key_creation_is_unavailable(api: Api, tmp_path: Path) -> None:
    open_key = tmp_path / "open.key"
    open_key.write_bytes(bytes(32))
    open_key.chmod(0o644)
    for key_file, needle in (("", "PALAUTE_CONTENT_KEY_FILE is not set"),
                             (str(tmp_path / "none.key"), "does not exist"),
                             (str(open_key), "chmod 600")):
        api.client.app.state.content_key_file = key_file  # type: ignore[attr-defined]
        response = api.client.post(V1 + "/content", headers=api.coordinator, json=BODY)
        assert response.status_code == 503 and needle in response.text
    assert api.call("GET", "/content", api.coordinator, 200).json()["total"] == 0


def test_concurrent_creations_get_distinct_versions(db_url: str) -> None:
    """Two creations that both read the same highest version: the second one's insert fails
    on the primary key, and it takes the next number instead of failing or duplicating."""
    import threading

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from sqlalchemy import event

    from fleet.content import service
    from fleet.content.body import ContentBody

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    barrier = threading.Barrier(2, timeout=30)
    reads = {"n": 0}
    lock = threading.Lock()

    def hold_first_two_reads(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "max(content_versions.version)" in statement:
            with lock:
                reads["n"] += 1
                first_two = reads["n"] <= 2
            if first_two:
                barrier.wait()  # both have read the same maximum before either inserts

    event.listen(engine, "after_cursor_execute", hold_first_two_reads)
    key = Ed25519PrivateKey.generate()
    results: list[int] = []
    errors: list[BaseException] = []

    def create(name: str) -> None:
        try:
            with sessions() as session:
                body = ContentBody.model_validate(_body(name=name, hours=None))
                results.append(service.create_content(session, body, key=key,
                                                      user=None).version)
                session.commit()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(f"c{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    engine.dispose()
    assert not errors, errors
    assert sorted(results) == [1, 2]
    assert reads["n"] >= 3  # the loser read the maximum again
