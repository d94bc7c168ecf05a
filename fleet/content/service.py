"""Content versions: create (render, package, sign, store), list, read, preview.

A version is rendered for every display size at creation and stored with its SHA-256 and
signature, so serving ``desired``, ``chunk`` and previews later only reads bytes; the stored
package is exactly what terminals verify.  Errors are the registry's (``Invalid`` → 422,
``NotFound`` → 404, ``Conflict`` → 409), so the API maps them like every other router.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet.content import render, signing
from fleet.content.body import ContentBody, Hours
from fleet.content.package import (
    DISPLAYS,
    MAX_VERSION,
    SCREENS,
    PackageError,
    build_package,
    parse_display,
    parse_package,
)
from fleet.db.models import ContentPackage, ContentVersion, Site, User
from fleet.services import audit
from fleet.services.clock import now_ms
from fleet.services.registry import DAYS, Conflict, Invalid, NotFound

TZ_HORIZON_DAYS = 400  # docs/content.md: transitions cover at least the next 400 days
HEADER_MAX = 4096  # firmware/terminal/content.py refuses longer headers as bad_package


def _minute(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


def week_intervals(week: Mapping[Any, Sequence[Sequence[str]]]) -> list[list[int]]:
    """``{"mon": [["08:00", "20:00"]]}`` as ``[[0, 480, 1200]]`` (weekday 0 = Monday)."""
    return [[DAYS.index(day), _minute(start), _minute(end)]
            for day in DAYS for start, end in week.get(day, [])]


def tz_transitions(zone: str, start_ms: int, days: int = TZ_HORIZON_DAYS) -> list[list[int]]:
    """``[[from_utc_ms, utc_offset_minutes], ...]`` of ``zone`` from ``start_ms`` on.

    The first entry starts at 0 with the offset in force at ``start_ms``; each change of
    offset within ``days`` adds one entry at the exact instant (to the second) it happens.
    """
    tz = ZoneInfo(zone)

    def offset(second: int) -> int:
        moment = datetime.datetime.fromtimestamp(second, datetime.UTC).astimezone(tz)
        delta = moment.utcoffset()
        return int(delta.total_seconds()) // 60 if delta is not None else 0

    step = 3600  # zones change offset at most once within an hour
    second = start_ms // 1000
    end = second + days * 86_400
    current = offset(second)
    out = [[0, current]]
    while second < end:
        following = second + step
        if offset(following) != current:
            low, high = second, following  # offset(low) == current != offset(high)
            while high - low > 1:
                middle = (low + high) // 2
                if offset(middle) == current:
                    low = middle
                else:
                    high = middle
            current = offset(high)
            out.append([high * 1000, current])
        second = following
    return out


def resolve_hours(session: Session, body: ContentBody, at_ms: int) -> dict[str, Any] | None:
    """The package header's ``hours``, copying a site's hours when asked to.

    Fills ``body.hours`` from the site for ``hours_from_site``, so the stored body says which
    hours the version was created with even if the site's change later.
    """
    if body.hours_from_site is not None:
        site = session.get(Site, body.hours_from_site)
        if site is None:
            raise Invalid("hours_from_site", f"hours_from_site: site {body.hours_from_site} "
                                             "does not exist")
        week = json.loads(site.opening_hours)
        if not any(week.values()):
            raise Invalid("hours_from_site", f"hours_from_site: site {site.id} has no opening "
                          "hours; set them on the site (PATCH /api/v1/sites/{id}) or omit "
                          "hours_from_site")
        body.hours = Hours(week=week, timezone=site.timezone)
    if body.hours is None:
        return None
    return {"week": week_intervals(body.hours.week),
            "tz": tz_transitions(body.hours.timezone, at_ms),
            "outside": body.outside}


def render_screens(body: ContentBody, width: int,
                   height: int) -> dict[str, dict[str, bytes]]:
    """Every screen of ``body`` for one display size, as MONO_VLSB bytes.

    Raises ``Invalid`` naming the language and text when one cannot be drawn.
    """
    screens: dict[str, dict[str, bytes]] = {kind: {} for kind in SCREENS}
    try:
        for code, texts in body.languages.items():
            field = f"languages.{code}"
            question = render.render_question_screen(
                texts.question, texts.labels, width, height, language=code,
                field=f"{field}.question")
            thanks = render.render_text_screen(texts.thanks, width, height, language=code,
                                               field=f"{field}.thanks")
            screens["question"][code] = render.to_mono_vlsb(question)
            screens["thanks"][code] = render.to_mono_vlsb(thanks)
    except render.RenderError as exc:
        raise Invalid(exc.field, str(exc)) from None
    return screens


def _package(version: int, body: ContentBody, display: str,
             screens: dict[str, dict[str, bytes]], hours: dict[str, Any] | None) -> bytes:
    width, height = DISPLAYS[display]
    try:
        data = build_package(version, width, height, list(body.languages), screens,
                             show=body.show, rotate_s=body.rotate_s,
                             settings=body.header_settings(), hours=hours)
    except PackageError as exc:
        raise Invalid("languages", f"languages: {display}: {exc}") from None
    header_len = int.from_bytes(data[8:12], "little")
    if header_len > HEADER_MAX:
        raise Invalid("hours", f"hours: the package header is {header_len} bytes, more than "
                               f"a terminal reads ({HEADER_MAX}); use fewer intervals")
    return data


def create_content(session: Session, body: ContentBody, *, key: Ed25519PrivateKey,
                   user: User | None) -> ContentVersion:
    """Render, package and sign ``body`` for every display size and store it as the next
    version (highest so far + 1).  Raises ``Invalid`` (422) for content that cannot be
    shown and ``Conflict`` (409) when the numbers are used up or taken concurrently."""
    created = now_ms()
    hours = resolve_hours(session, body, created)
    screens = {display: render_screens(body, *size) for display, size in DISPLAYS.items()}
    public = signing.public_key_hex(key)
    stored_body = body.model_dump_json()
    for _attempt in range(3):
        version = (session.scalar(select(func.max(ContentVersion.version))) or 0) + 1
        if version > MAX_VERSION:
            raise Conflict(f"all {MAX_VERSION} content versions are used; terminals cannot "
                           "compare higher numbers")
        row = ContentVersion(version=version, name=body.name, body=stored_body,
                             created_ms=created, created_by=user.id if user else None)
        packages = []
        for display in DISPLAYS:
            data = _package(version, body, display, screens[display], hours)
            packages.append(ContentPackage(
                version=version, display=display, data=data, size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                signature=signing.sign(key, version, data).hex(), public_key=public))
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
                session.add_all(packages)
                session.flush()
        except IntegrityError:
            continue  # another request took this number first: take the next one
        audit.record(session, user=user, action="content.create", entity="content",
                     entity_id=str(version),
                     detail={"name": body.name, "languages": list(body.languages)})
        return row
    raise Conflict("content versions were being created concurrently; retry")


def get_content(session: Session, version: int) -> ContentVersion:
    """The content version ``version``; ``NotFound`` if there is none."""
    row = session.get(ContentVersion, version)
    if row is None:
        raise NotFound(f"content version {version} does not exist")
    return row


def list_content(session: Session, offset: int, limit: int) -> tuple[list[ContentVersion], int]:
    """One page of versions, newest first, and how many there are."""
    total = session.scalar(select(func.count()).select_from(ContentVersion)) or 0
    rows = session.scalars(select(ContentVersion).order_by(ContentVersion.version.desc())
                           .offset(offset).limit(limit)).all()
    return list(rows), total


def get_package(session: Session, version: int, display: str) -> ContentPackage:
    """The stored package of ``version`` for ``display`` (``128x64``); ``NotFound`` if none.

    ``fleet/protocol/v1.py`` encodes ``desired`` and ``chunk`` messages from these rows.
    """
    try:
        parse_display(display)
    except PackageError as exc:
        raise Invalid("display", f"display: {exc}") from None
    row = session.get(ContentPackage, (version, display))
    if row is None:
        get_content(session, version)
        raise NotFound(f"content version {version} has no {display} package")
    return row


@dataclass(frozen=True)
class Preview:
    """One screen of a stored package as a PNG."""

    png: bytes
    language: str


def preview(session: Session, version: int, display: str, screen: str,
            language: str | None, scale: int = 1) -> Preview:
    """The PNG of one screen, drawn from the stored package's bitmap (what terminals show)."""
    package = get_package(session, version, display)
    parsed = parse_package(package.data)
    if screen not in SCREENS:
        raise Invalid("screen", f"screen: {screen!r} is not one of {', '.join(SCREENS)}")
    language = language or parsed.languages[0]
    if language not in parsed.languages:
        raise Invalid("lang", f"lang: content version {version} has no language "
                              f"{language!r} (it has {', '.join(parsed.languages)})")
    image = render.from_mono_vlsb(parsed.screens[screen][language], parsed.width,
                                  parsed.height)
    return Preview(render.png_bytes(image, scale), language)
