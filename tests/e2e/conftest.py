"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.harness import Harness
from tests.services.micropython import micropython_command


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """The control server for terminals under MicroPython; every terminal it started is
    stopped afterwards."""
    harness = Harness(tmp_path / "terminals", micropython_command())
    harness.workdir.mkdir()
    yield harness
    harness.close()
