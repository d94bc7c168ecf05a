"""Content versions: what terminals ask, rendered and signed (docs/content.md).

Coordinators (and admins) create versions; coordinators and ops read them, their previews
and packages.  Customer viewers and installers have no access: content is fleet-wide, and a
version may hold another customer's questions (an installer token only registers and
provisions terminals; the terminal fetches its content over MQTT, not through the API).
Versions are immutable: there is no update or delete; rolling back means creating the old
content again as a new version.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel

from fleet.api.deps import SessionDep, require
from fleet.api.schemas import CONFLICT, ERRORS, NOT_FOUND, Page, PageDep, Problem, registry_errors
from fleet.content import service, signing
from fleet.content.body import ContentBody
from fleet.content.package import DISPLAYS, MAX_VERSION
from fleet.db.models import ContentVersion, Role, User
from fleet.services.registry import Invalid

router = APIRouter(prefix="/content", tags=["content"], responses=ERRORS)

Reader = Annotated[User, Depends(require(Role.coordinator, Role.ops))]
Writer = Annotated[User, Depends(require(Role.coordinator))]
VersionPath = Annotated[int, Path(ge=1, le=MAX_VERSION, description="content version")]
Display = Literal["128x64", "296x128"]
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "the fleet has no usable content signing key"}}


def signing_key(request: Request) -> Ed25519PrivateKey:
    """The fleet's content key (``PALAUTE_CONTENT_KEY_FILE``); 503 when it is unusable."""
    try:
        return signing.load_configured_key(getattr(request.app.state, "content_key_file", ""))
    except signing.ContentKeyError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


class PackageInfo(BaseModel):
    """One display size's signed package."""

    display: str
    size: int
    sha256: str
    signature: str
    public_key: str


class ContentPublic(BaseModel):
    """A content version as stored."""

    version: int
    name: str
    created_ms: int
    created_by: int | None
    body: dict[str, Any]
    packages: list[PackageInfo]


def content_public(session: SessionDep, row: ContentVersion) -> ContentPublic:
    """The API view of a version, with its packages' digests (not their bytes)."""
    packages = [service.get_package(session, row.version, display) for display in DISPLAYS]
    return ContentPublic(
        version=row.version, name=row.name, created_ms=row.created_ms,
        created_by=row.created_by, body=json.loads(row.body),
        packages=[PackageInfo(display=p.display, size=p.size, sha256=p.sha256,
                              signature=p.signature, public_key=p.public_key)
                  for p in packages])


@router.post("", status_code=status.HTTP_201_CREATED,
             responses={**CONFLICT, **UNAVAILABLE})
def create_content(body: ContentBody, session: SessionDep, user: Writer,
                   key: Annotated[Ed25519PrivateKey, Depends(signing_key)]) -> ContentPublic:
    """Render, package and sign a new content version (422 names a text that cannot be
    shown: which language, which text, why)."""
    with registry_errors():
        row = service.create_content(session, body, key=key, user=user)
        return content_public(session, row)


@router.get("")
def list_content(session: SessionDep, _user: Reader, page: PageDep) -> Page[ContentPublic]:
    """Content versions, newest first."""
    rows, total = service.list_content(session, page.offset, page.limit)
    with registry_errors():
        items = [content_public(session, row) for row in rows]
    return Page(items=items, total=total, offset=page.offset, limit=page.limit)


@router.get("/{version}", responses=NOT_FOUND)
def get_content(version: VersionPath, session: SessionDep, _user: Reader) -> ContentPublic:
    """One content version."""
    with registry_errors():
        return content_public(session, service.get_content(session, version))


@router.get("/{version}/preview.png", responses={
    **NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "the screen as PNG"}},
    response_class=Response)
def preview(version: VersionPath, session: SessionDep, _user: Reader,
            display: Display = "128x64",
            screen: Literal["question", "thanks"] = "question",
            lang: Annotated[str | None, Query(max_length=16,
                                              description="default: the first language")] = None,
            scale: Annotated[int, Query(ge=1, le=8, description="pixel size")] = 1,
            ) -> Response:
    """One screen as the terminal shows it, drawn from the stored package's bitmap."""
    with registry_errors():
        try:
            shown = service.preview(session, version, display, screen, lang, scale)
        except Invalid as exc:  # a query parameter, not a body field
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, [
                {"loc": ["query", exc.field], "msg": str(exc), "type": "value_error"}]) from None
    return Response(shown.png, media_type="image/png",
                    headers={"Content-Language": shown.language})


@router.get("/{version}/package", responses={
    **NOT_FOUND,
    200: {"content": {"application/octet-stream": {}}, "description": "the package bytes"}},
    response_class=Response)
def package(version: VersionPath, session: SessionDep, _user: Reader,
            display: Display = "128x64") -> Response:
    """The signed package bytes; its SHA-256 and signature are in the headers."""
    with registry_errors():
        stored = service.get_package(session, version, display)
    return Response(stored.data, media_type="application/octet-stream", headers={
        "X-Content-Sha256": stored.sha256, "X-Content-Signature": stored.signature,
        "Content-Disposition": f'attachment; filename="content-{version}-{display}.bin"'})
