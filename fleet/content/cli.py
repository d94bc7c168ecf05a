"""``palaute content ...``: make the signing key, create, list and preview content versions.

``create``, ``list`` and ``preview`` work straight on the database (``PALAUTE_DB_URL``), like
``palaute report``.  Every error is one line on standard error saying what to do, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


def _fail(message: str) -> int:
    print(f"palaute content: {message}", file=sys.stderr)
    return 2


@contextmanager
def _session(db_url: str) -> Iterator[Session]:
    """A session on ``PALAUTE_DB_URL`` whose engine is closed afterwards."""
    from fleet.db.engine import make_engine, make_sessionmaker

    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a new signing key (0600) and print its public key for terminals' config."""
    from fleet.content import signing

    try:
        key = signing.generate_key_file(args.out)
    except signing.ContentKeyError as exc:
        return _fail(str(exc))
    print(signing.public_key_hex(key))
    print(f"wrote {args.out} (mode 0600); set PALAUTE_CONTENT_KEY_FILE={args.out} and put the "
          "public key above in each terminal's config.json as content_key", file=sys.stderr)
    return 0


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where + ': ' if where else ''}{message}{more}"


def cmd_create(args: argparse.Namespace) -> int:
    """Create a content version from a JSON body file (the API's POST body)."""
    from fleet.cli import _settings
    from fleet.content import service, signing
    from fleet.content.body import ContentBody
    from fleet.services.registry import RegistryError

    try:
        raw = args.file.read_text(encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror}")
    try:
        body = ContentBody.model_validate_json(raw)
    except ValidationError as exc:
        return _fail(f"{args.file}: {_validation_message(exc)}")
    settings = _settings()
    try:
        key = signing.load_configured_key(settings.content_key_file)
    except signing.ContentKeyError as exc:
        return _fail(str(exc))
    with _session(settings.db_url) as session:
        try:
            row = service.create_content(session, body, key=key, user=None)
        except RegistryError as exc:
            return _fail(f"{args.file}: {exc}")
        session.commit()
        print(f"created content version {row.version}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """Print content versions, newest first."""
    from fleet.cli import _settings
    from fleet.content import service

    with _session(_settings().db_url) as session:
        rows, total = service.list_content(session, 0, args.limit)
    print("version\tcreated_utc\tlanguages\tname")
    for row in rows:
        languages = ",".join(json.loads(row.body)["languages"])
        print(f"{row.version}\t{_utc(row.created_ms)}\t{languages}\t{row.name}")
    if total > len(rows):
        print(f"({total - len(rows)} older versions not shown; --limit N)", file=sys.stderr)
    return 0


def _limit(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 500:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number from 1 to 500")
    return number


def _utc(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def cmd_preview(args: argparse.Namespace) -> int:
    """Write every screen of a version as PNG files into a directory."""
    from fleet.cli import _settings
    from fleet.content import service
    from fleet.content.package import DISPLAYS, SCREENS
    from fleet.services.registry import RegistryError

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create {args.out}: {exc.strerror}")
    written = 0
    with _session(_settings().db_url) as session:
        try:
            languages = json.loads(service.get_content(session, args.version).body)
        except RegistryError as exc:
            return _fail(f"{exc}; `palaute content list` shows the versions")
        for display in DISPLAYS:
            for screen in SCREENS:
                for language in languages["languages"]:
                    shown = service.preview(session, args.version, display, screen,
                                            language, args.scale)
                    name = f"content-{args.version}-{display}-{screen}-{language}.png"
                    (args.out / name).write_bytes(shown.png)
                    written += 1
    print(f"wrote {written} PNG files to {args.out}")
    return 0


def add_content_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``content`` to the ``palaute`` command's sub-commands."""
    content = subparsers.add_parser(
        "content", help="content versions: signing key, create, list, preview",
        description="Questions, languages and settings that terminals show (docs/content.md).")
    sub = content.add_subparsers(dest="content_command", required=True)
    keygen = sub.add_parser("keygen", help="make the content signing key; prints the public key")
    keygen.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="where to write the 32-byte private seed (never overwritten)")
    keygen.set_defaults(func=cmd_keygen)
    create = sub.add_parser("create", help="create a version from a JSON body "
                                           "(PALAUTE_DB_URL, PALAUTE_CONTENT_KEY_FILE)")
    create.add_argument("--file", type=Path, required=True, metavar="BODY.json")
    create.set_defaults(func=cmd_create)
    listing = sub.add_parser("list", help="list versions, newest first")
    listing.add_argument("--limit", type=_limit, default=50, help="1..500 (default 50)")
    listing.set_defaults(func=cmd_list)
    preview = sub.add_parser("preview", help="write every screen of a version as PNG")
    preview.add_argument("version", type=int)
    preview.add_argument("--out", type=Path, required=True, metavar="DIR")
    preview.add_argument("--scale", type=int, choices=range(1, 9), default=1,
                         help="pixel size in the PNG (default 1)")
    preview.set_defaults(func=cmd_preview)
    return content
