"""The fonts content is rendered with, and which characters each of them has a glyph for.

Debian packages (scripts/install-system-packages.sh; licences in docs/dependencies.md):
Noto Sans for Latin, Noto Sans Arabic for Arabic, Droid Sans Fallback for Chinese (and
Japanese and Korean).  A text is drawn with the first font whose character map covers every
character in it; a character no font has is refused, so a terminal never shows a "tofu" box.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fontTools.ttLib import TTFont

FONT_ROOT = Path("/usr/share/fonts/truetype")


@dataclass(frozen=True)
class Font:
    """One font file: its family name (for messages) and where Debian puts it."""

    name: str
    path: Path
    package: str


# In order of preference: the first that covers a text draws it.
FONTS = (
    Font("Noto Sans", FONT_ROOT / "noto" / "NotoSans-Regular.ttf", "fonts-noto-core"),
    Font("Noto Sans Arabic", FONT_ROOT / "noto" / "NotoSansArabic-Regular.ttf",
         "fonts-noto-core"),
    Font("Droid Sans Fallback", FONT_ROOT / "droid" / "DroidSansFallbackFull.ttf",
         "fonts-droid-fallback"),
)


class FontMissing(RuntimeError):
    """A font file is not installed: the message names the Debian package."""


class NoGlyph(ValueError):
    """No single font has a glyph for every character of a text."""


def _shown(characters: list[str]) -> str:
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in characters[:5])


@lru_cache(maxsize=len(FONTS))
def coverage(font: Font) -> frozenset[int]:
    """The code points ``font``'s character map gives a glyph for."""
    if not font.path.is_file():
        raise FontMissing(f"font {font.path} is missing; install the Debian package "
                          f"{font.package} (bash scripts/install-system-packages.sh)")
    with TTFont(font.path, lazy=True) as tt:
        return frozenset(tt.getBestCmap())


def needs_glyph(char: str) -> bool:
    """True for characters that draw ink (not spaces, line breaks or format characters)."""
    # Invisible format characters (ZWJ, bidi marks) are handled by shaping, not drawn.
    return not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf")


def font_for(text: str) -> Font:
    """The first font of :data:`FONTS` that covers every visible character of ``text``."""
    needed = {ord(c) for c in text if needs_glyph(c)}
    for font in FONTS:
        if needed <= coverage(font):
            return font
    covered = frozenset[int]().union(*(coverage(f) for f in FONTS))
    missing = [chr(c) for c in sorted(needed - covered)]
    if missing:
        raise NoGlyph(f"no font has a glyph for {_shown(missing)}")
    raise NoGlyph("it mixes scripts that no single font covers (Latin, Arabic, Chinese); "
                  "write it in one script")
