"""What the rollout engine needs of a content package, and each device's display size.

The content service (``fleet/content``) builds and signs the packages; the engine and the
``fetch`` handler only read them through :class:`PackageSource`, so they do not depend on how
packages are stored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db.models import ContentPackage
from fleet.pinmaps import PinMapError, _default_boards_dir, load_board

# The display every board in hardware/boards has today (SSD1306 OLED); used for devices whose
# board has no pin map (registered without a board name).
DEFAULT_DISPLAY = "128x64"


@dataclass(frozen=True, slots=True)
class SignedPackage:
    """One signed content package for one display size (docs/content.md)."""

    version: int
    display: str  # "<w>x<h>"
    data: bytes
    sha256: str  # 64 hex digits
    sig: str  # 128 hex digits, Ed25519


class PackageSource(Protocol):
    """Where signed packages come from (the content service, in production)."""

    def package(self, session: Session, version: int, display: str) -> SignedPackage | None:
        """The package of ``version`` rendered for ``display``, or None if there is none."""


class StoredPackages:
    """Packages as the content service stored them (``ContentPackage`` rows)."""

    def package(self, session: Session, version: int, display: str) -> SignedPackage | None:
        """The stored package of ``version`` for ``display``, or None."""
        row = session.execute(select(ContentPackage.data, ContentPackage.sha256,
                                     ContentPackage.signature)
                              .where(ContentPackage.version == version,
                                     ContentPackage.display == display)).first()
        if row is None:
            return None
        return SignedPackage(version, display, bytes(row.data), row.sha256, row.signature)


@functools.lru_cache(maxsize=64)
def display_of_board(board: str) -> str:
    """``"<w>x<h>"`` of the display on ``board``'s pin map; DEFAULT_DISPLAY if unknown."""
    if not board or "/" in board or board.startswith("."):
        return DEFAULT_DISPLAY
    path = _default_boards_dir() / f"{board}.json"
    try:
        pins = load_board(path)
    except (OSError, PinMapError):
        return DEFAULT_DISPLAY
    if pins.display is None:
        return DEFAULT_DISPLAY
    return f"{pins.display.width}x{pins.display.height}"
