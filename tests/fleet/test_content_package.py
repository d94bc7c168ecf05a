"""Content packages (fleet/content/package.py) and their Ed25519 signatures (signing.py)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, inspect

from fleet.content import signing
from fleet.content.package import (
    MAX_PACKAGE_BYTES,
    PREFIX,
    PackageError,
    build_package,
    parse_package,
    screen_bytes,
)
from fleet.db.migrate import upgrade

W, H = 128, 64
SIZE = screen_bytes(W, H)
SETTINGS = {"min_gap_ms": 2000, "brightness": 200, "idle": "dim"}
HOURS = {"week": [[0, 480, 1260]], "tz": [[0, 120]], "outside": "dim"}


def _screens(languages: list[str]) -> dict[str, dict[str, bytes]]:
    # Every screen distinct, so a wrong offset shows up as a wrong bitmap.
    return {kind: {lang: bytes([(k * 16 + i) & 0xFF]) * SIZE for i, lang in enumerate(languages)}
            for k, kind in enumerate(("question", "thanks"))}


def _package(version: int = 7, languages: list[str] | None = None) -> bytes:
    languages = languages or ["fi", "sv", "en"]
    return build_package(version, W, H, languages, _screens(languages), show="rotate",
                         rotate_s=8, settings=SETTINGS, hours=HOURS)


def _with_header(package: bytes, change: dict[str, object]) -> bytes:
    """The package with header keys replaced (and the header length fixed up)."""
    _, version, _, length = PREFIX.unpack_from(package)
    header = json.loads(package[PREFIX.size:PREFIX.size + length])
    header.update(change)
    new = json.dumps(header).encode()
    return PREFIX.pack(b"PLC1", version, 0, len(new)) + new + package[PREFIX.size + length:]


def test_round_trip_keeps_header_and_every_screen() -> None:
    package = _package()
    assert package[:4] == b"PLC1"
    assert struct.unpack_from("<HH", package, 4) == (7, 0)
    parsed = parse_package(package, version=7, display=(W, H))
    assert parsed.languages == ["fi", "sv", "en"]
    assert parsed.header["settings"] == SETTINGS and parsed.header["hours"] == HOURS
    assert parsed.header["screens"]["question"] == {"fi": 0, "sv": SIZE, "en": 2 * SIZE}
    assert parsed.screens == _screens(["fi", "sv", "en"])


def test_hours_absent_means_no_hours_key() -> None:
    package = build_package(3, W, H, ["en"], _screens(["en"]), show="en", rotate_s=8,
                            settings={}, hours=None)
    assert "hours" not in parse_package(package).header


@pytest.mark.parametrize(("tamper", "message"), [
    (lambda p: b"PLC2" + p[4:], "bad magic"),
    (lambda p: p[:6] + b"\x01\x00" + p[8:], "reserved field"),
    (lambda p: p[:4] + struct.pack("<H", 8) + p[6:], "differs from prefix version"),
    (lambda p: p[:8] + struct.pack("<I", 10**6) + p[12:], "runs past the end"),
    (lambda p: p[:-1], "outside the"),
    (lambda p: p[:12] + b"\xff" + p[13:], "not UTF-8 JSON"),
    (lambda p: p[:12] + b"[" + p[13:], "not UTF-8 JSON"),
    (lambda p: p[:5], "shorter than its prefix"),
    (lambda p: p + bytes(MAX_PACKAGE_BYTES), "more than 65536"),
    (lambda p: _with_header(p, {"display": {"w": 64, "h": 32}}), "not rendered"),
    (lambda p: _with_header(p, {"show": "de"}), "neither 'rotate'"),
    (lambda p: _with_header(p, {"languages": ["fi", "fi"]}), "distinct"),
    (lambda p: _with_header(p, {"extra": 1}), "unknown header keys: extra"),
    (lambda p: _with_header(p, {"rotate_s": 0}), "rotate_s"),
    (lambda p: _with_header(p, {"screens": {"question": {"fi": 0, "sv": 0, "en": 0}}}),
     "exactly question, thanks"),
    (lambda p: _with_header(p, {"screens": {"question": {"fi": 0, "sv": 0, "en": -1},
                                            "thanks": {"fi": 0, "sv": 0, "en": 0}}}),
     "screens.question.en offset -1"),
])
def test_tampered_packages_are_refused_with_a_reason(tamper, message) -> None:
    with pytest.raises(PackageError, match=message):
        parse_package(tamper(_package()))


def test_expected_version_and_display_must_match() -> None:
    with pytest.raises(PackageError, match="expected 8"):
        parse_package(_package(7), version=8)
    with pytest.raises(PackageError, match="expected 296x128"):
        parse_package(_package(), display=(296, 128))


def test_build_refuses_bad_input() -> None:
    with pytest.raises(PackageError, match="no thanks screen for language 'fi'"):
        build_package(1, W, H, ["fi"], {"question": {"fi": bytes(SIZE)}}, show="fi",
                      rotate_s=8, settings={}, hours=None)
    with pytest.raises(PackageError, match="is 10 bytes"):
        build_package(1, W, H, ["fi"], {"question": {"fi": bytes(10)}, "thanks": {}},
                      show="fi", rotate_s=8, settings={}, hours=None)
    with pytest.raises(PackageError, match=r"outside 1\.\.65535"):
        _package(version=65536)
    # 296x128 screens are 4,736 bytes: seven languages need 66,304 bytes of bitmaps.
    many = [f"l{i}" for i in range(7)]
    big = {kind: {lang: bytes(screen_bytes(296, 128)) for lang in many}
           for kind in ("question", "thanks")}
    with pytest.raises(PackageError, match="more than a terminal accepts"):
        build_package(1, 296, 128, many, big, show="rotate", rotate_s=8, settings={},
                      hours=None)


def test_signed_message_is_54_bytes_as_documented() -> None:
    package = _package()
    message = signing.signed_message(7, package)
    assert len(message) == 54
    assert message == (b"palaute-content\x00" + struct.pack("<HI", 7, len(package))
                       + hashlib.sha256(package).digest())


def test_sign_and_verify_detect_tampering_and_wrong_key() -> None:
    key = Ed25519PrivateKey.generate()
    public = signing.public_key_hex(key)
    package = _package()
    signature = signing.sign(key, 7, package)
    assert len(signature) == 64
    assert signing.verify(public, 7, package, signature)
    flipped = bytearray(package)
    flipped[-1] ^= 1
    assert not signing.verify(public, 7, bytes(flipped), signature)
    assert not signing.verify(public, 8, package, signature)  # replayed as another version
    assert not signing.verify(public, 7, package + b"\0", signature)
    other = signing.public_key_hex(Ed25519PrivateKey.generate())
    assert not signing.verify(other, 7, package, signature)
    assert not signing.verify("zz" * 32, 7, package, signature)


def test_key_file_is_private_loadable_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "content.key"
    key = signing.generate_key_file(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert path.read_bytes() == key.private_bytes_raw()
    loaded = signing.load_configured_key(str(path))
    assert signing.public_key_hex(loaded) == signing.public_key_hex(key)
    with pytest.raises(signing.ContentKeyError, match="never overwritten"):
        signing.generate_key_file(path)
    assert path.read_bytes() == key.private_bytes_raw()


def test_bad_key_files_are_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(signing.ContentKeyError, match="PALAUTE_CONTENT_KEY_FILE is not set"):
        signing.load_configured_key("")
    with pytest.raises(signing.ContentKeyError, match="palaute content keygen"):
        signing.load_key_file(tmp_path / "missing.key")
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31)
    short.chmod(0o600)
    with pytest.raises(signing.ContentKeyError, match="31 bytes"):
        signing.load_key_file(short)
    open_key = tmp_path / "open.key"
    open_key.write_bytes(b"x" * 32)
    open_key.chmod(0o644)
    with pytest.raises(signing.ContentKeyError, match="chmod 600"):
        signing.load_key_file(open_key)


def test_migration_0004_creates_the_content_tables(unmigrated_db_url: str) -> None:
    upgrade(unmigrated_db_url, "0004")
    engine = create_engine(unmigrated_db_url)
    with engine.connect() as conn:
        inspector = inspect(conn)
        assert {c["name"] for c in inspector.get_columns("content_packages")} == {
            "version", "display", "data", "size", "sha256", "signature", "public_key"}
        assert inspector.get_pk_constraint("content_versions")["constrained_columns"] == [
            "version"]
    engine.dispose()


def test_the_terminal_accepts_what_the_fleet_creates(tmp_path: Path) -> None:
    """Interop: a version created by the fleet service, loaded by the firmware's own parser
    and verified by the firmware's own Ed25519 (firmware/terminal, run here under CPython)."""
    from terminal import content as terminal_content
    from terminal import download as terminal_download
    from terminal import ed25519 as terminal_ed25519

    from fleet.content import service
    from fleet.content.body import ContentBody
    from fleet.db.engine import make_engine, make_sessionmaker

    url = f"sqlite:///{tmp_path / 'palaute.db'}"
    upgrade(url)
    engine = make_engine(url)
    key = Ed25519PrivateKey.generate()
    body = ContentBody.model_validate({
        "languages": {"fi": {"question": "Miten meni?", "thanks": "Kiitos!",
                             "labels": ["Huono", "Hyvä"]},
                      "ar": {"question": "كيف كانت زيارتك؟", "thanks": "شكرا!"}},
        "buttons": 2, "show": "ar", "settings": {"brightness": 10, "idle": "off"},
        "hours": {"week": {"mon": [["08:00", "16:00"]]}, "timezone": "Europe/Stockholm"}})
    with make_sessionmaker(engine)() as session:
        version = service.create_content(session, body, key=key, user=None).version
        session.commit()
        packages = {d: service.get_package(session, version, d) for d in ("128x64", "296x128")}
    engine.dispose()
    public = bytes.fromhex(signing.public_key_hex(key))
    for display, stored in packages.items():
        width, height = (int(n) for n in display.split("x"))
        path = tmp_path / f"content-{display}.bin"
        path.write_bytes(stored.data)
        loaded = terminal_content.load(str(path), width, height)
        assert loaded.version == version and loaded.languages == ["fi", "ar"]
        assert loaded.show == "ar" and loaded.hours["outside"] == "dim"
        buf = bytearray(width * height // 8)
        loaded.read_screen("question", "ar", buf)
        assert bytes(buf) == parse_package(stored.data).screens["question"]["ar"]
        digest = hashlib.sha256(stored.data).digest()
        message = terminal_download.signed_message(version, stored.size, digest)
        assert message == signing.signed_message(version, stored.data)
        signature = bytes.fromhex(stored.signature)
        assert terminal_ed25519.verify(public, message, signature)
        assert not terminal_ed25519.verify(public, message, signature[:-1] + b"\0")
        other = (128, 64) if display == "296x128" else (296, 128)
        with pytest.raises(terminal_content.PackageError, match="wrong_display"):
            terminal_content.load(str(path), *other)
