"""The content package: one binary file per content version and display size.

Layout (little-endian, docs/content.md "Content package"):

    0       4   magic ``PLC1``
    4       2   u16 content version
    6       2   u16 reserved, 0
    8       4   u32 H, length of the header
    12      H   header, UTF-8 JSON object
    12 + H  ... bitmap area: screens of ``w * h / 8`` bytes each, framebuf MONO_VLSB order

This module builds packages from bitmaps that are already rendered (fleet/content/render.py
does the drawing) and parses them back with the same checks a terminal makes, so the fleet
never hands out a package its own terminals would refuse as ``bad_package``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"PLC1"
# magic, u16 version, u16 reserved, u32 header length.
PREFIX = struct.Struct("<4sHHI")
# Terminal config ``content_max_bytes``: a package must fit the terminal's download buffer.
MAX_PACKAGE_BYTES = 65_536
MAX_VERSION = 65_535
# Display sizes the fleet renders (docs/content.md), keyed as the API and ``fetch`` name them.
DISPLAYS: dict[str, tuple[int, int]] = {"128x64": (128, 64), "296x128": (296, 128)}
# Every language has one screen of each kind; button labels are drawn into the question.
SCREENS = ("question", "thanks")
# Header keys a package may carry; anything else is a sign of a builder bug or tampering.
HEADER_KEYS = {"version", "display", "languages", "show", "rotate_s", "screens", "settings",
               "hours"}


class PackageError(ValueError):
    """A package that cannot be built or does not parse; the message says what is wrong."""


def display_key(width: int, height: int) -> str:
    """``128x64`` for a 128 x 64 display: how the API, ``fetch`` and storage name a size."""
    return f"{width}x{height}"


def parse_display(value: str) -> tuple[int, int]:
    """The (width, height) of a display name such as ``128x64``; only rendered sizes pass."""
    try:
        return DISPLAYS[value]
    except KeyError:
        raise PackageError(f"unknown display {value!r}; use one of "
                           f"{', '.join(DISPLAYS)}") from None


def screen_bytes(width: int, height: int) -> int:
    """Bytes of one MONO_VLSB screen: one bit per pixel, pages of 8 rows."""
    return width * height // 8


@dataclass(frozen=True)
class Package:
    """A parsed package: its header and each screen's bitmap per language."""

    version: int
    width: int
    height: int
    header: dict[str, Any]
    # screens["question"]["fi"] is the MONO_VLSB bitmap of the Finnish question screen.
    screens: dict[str, dict[str, bytes]]

    @property
    def languages(self) -> list[str]:
        """The languages in the order the header lists them."""
        return list(self.header["languages"])


def build_package(version: int, width: int, height: int, languages: list[str],
                  screens: dict[str, dict[str, bytes]], *, show: str, rotate_s: int,
                  settings: dict[str, Any], hours: dict[str, Any] | None) -> bytes:
    """Assemble a package from rendered screens and header fields.

    ``screens`` maps each of :data:`SCREENS` to a bitmap per language in ``languages``.  The
    bitmaps are laid out screen kind by screen kind, language by language, in that order.  The
    result is parsed back before it is returned, so every package that leaves this function
    passes :func:`parse_package`.  Raises :class:`PackageError` on bad input or when the
    package would exceed :data:`MAX_PACKAGE_BYTES`.
    """
    size = screen_bytes(width, height)
    offsets: dict[str, dict[str, int]] = {}
    area = bytearray()
    for kind in SCREENS:
        per_language = screens.get(kind, {})
        offsets[kind] = {}
        for language in languages:
            bitmap = per_language.get(language)
            if bitmap is None:
                raise PackageError(f"no {kind} screen for language {language!r}")
            if len(bitmap) != size:
                raise PackageError(f"{kind} screen for {language!r} is {len(bitmap)} bytes; "
                                   f"a {width}x{height} screen is {size}")
            offsets[kind][language] = len(area)
            area += bitmap
    header: dict[str, Any] = {
        "version": version, "display": {"w": width, "h": height}, "languages": languages,
        "show": show, "rotate_s": rotate_s, "screens": offsets, "settings": settings,
    }
    if hours is not None:
        header["hours"] = hours
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    if not 1 <= version <= MAX_VERSION:
        raise PackageError(f"content version {version} is outside 1..{MAX_VERSION}")
    package = PREFIX.pack(MAGIC, version, 0, len(header_bytes)) + header_bytes + bytes(area)
    if len(package) > MAX_PACKAGE_BYTES:
        raise PackageError(
            f"the {width}x{height} package is {len(package)} bytes, more than a terminal "
            f"accepts ({MAX_PACKAGE_BYTES}); use fewer languages")
    parse_package(package)
    return package


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PackageError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_package(data: bytes, *, version: int | None = None,
                  display: tuple[int, int] | None = None) -> Package:
    """Parse and validate a package; ``version``/``display``, when given, must match.

    Checks what a terminal checks before it swaps content in: magic, reserved field, header
    length and JSON, the version in the prefix and the header agreeing, the display size,
    every language having a question and a thanks screen, every screen inside the bitmap
    area.  Raises :class:`PackageError` naming the first problem found.
    """
    _require(len(data) <= MAX_PACKAGE_BYTES,
             f"package is {len(data)} bytes, more than {MAX_PACKAGE_BYTES}")
    _require(len(data) >= PREFIX.size, f"package is {len(data)} bytes, shorter than its prefix")
    magic, prefix_version, reserved, header_len = PREFIX.unpack_from(data)
    _require(magic == MAGIC, f"bad magic {magic!r}; expected {MAGIC!r}")
    _require(reserved == 0, f"reserved field is {reserved}, not 0")
    _require(PREFIX.size + header_len <= len(data),
             f"header length {header_len} runs past the end of the {len(data)}-byte package")
    try:
        header = json.loads(data[PREFIX.size:PREFIX.size + header_len].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackageError(f"header is not UTF-8 JSON: {exc}") from None
    _require(isinstance(header, dict), "header is not a JSON object")
    unknown = sorted(set(header) - HEADER_KEYS)
    _require(not unknown, f"unknown header keys: {', '.join(unknown)}")
    _require(header.get("version") == prefix_version,
             f"header version {header.get('version')!r} differs from prefix version "
             f"{prefix_version}")
    _require(1 <= prefix_version <= MAX_VERSION, f"content version {prefix_version} is 0")
    if version is not None:
        _require(prefix_version == version,
                 f"package is version {prefix_version}, expected {version}")

    shown = header.get("display")
    _require(isinstance(shown, dict) and _is_int(shown.get("w")) and _is_int(shown.get("h")),
             "header display must be {\"w\": int, \"h\": int}")
    width, height = shown["w"], shown["h"]
    _require((width, height) in DISPLAYS.values(), f"display {width}x{height} is not rendered")
    if display is not None:
        _require((width, height) == display,
                 f"package is for a {width}x{height} display, expected "
                 f"{display[0]}x{display[1]}")

    languages = header.get("languages")
    _require(isinstance(languages, list) and len(languages) > 0
             and all(isinstance(x, str) for x in languages)
             and len(set(languages)) == len(languages),
             "header languages must be a non-empty list of distinct strings")
    show = header.get("show")
    _require(show == "rotate" or show in languages,
             f"header show {show!r} is neither 'rotate' nor one of the languages")
    _require(_is_int(header.get("rotate_s")) and header["rotate_s"] >= 1,
             "header rotate_s must be a positive integer")
    _require(isinstance(header.get("settings"), dict), "header settings must be an object")
    _require("hours" not in header or isinstance(header["hours"], dict),
             "header hours must be an object")

    area = data[PREFIX.size + header_len:]
    size = screen_bytes(width, height)
    table = header.get("screens")
    _require(isinstance(table, dict), "header screens must be an object")
    _require(set(table) == set(SCREENS),
             f"header screens must be exactly {', '.join(SCREENS)}")
    screens: dict[str, dict[str, bytes]] = {}
    for kind in SCREENS:
        per_language = table[kind]
        _require(isinstance(per_language, dict) and set(per_language) == set(languages),
                 f"screens.{kind} must have one offset per language")
        screens[kind] = {}
        for language in languages:
            offset = per_language[language]
            _require(_is_int(offset) and offset >= 0 and offset + size <= len(area),
                     f"screens.{kind}.{language} offset {offset!r} is outside the "
                     f"{len(area)}-byte bitmap area")
            screens[kind][language] = bytes(area[offset:offset + size])
    return Package(prefix_version, width, height, header, screens)
