"""Make the firmware importable under CPython: ``terminal`` and the ``micropython`` shim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parent / "shims"
FIRMWARE = Path(__file__).resolve().parents[1] / "firmware"


def ensure_firmware_importable() -> None:
    """Put the firmware sources and the CPython shims on ``sys.path`` if they are missing."""
    if importlib.util.find_spec("micropython") is None:
        sys.path.insert(0, str(SHIMS))
    if importlib.util.find_spec("terminal") is None and FIRMWARE.is_dir():
        sys.path.insert(0, str(FIRMWARE))
