"""Run every firmware unit-test module under the real MicroPython interpreter.

The same modules are also collected by pytest directly (CPython), so each firmware test
proves the code on both interpreters: the device's and the simulator's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.services.micropython import micropython_command

ROOT = Path(__file__).resolve().parents[2]
UNIT = Path(__file__).parent / "unit"
MODULES = sorted(p.stem for p in UNIT.glob("test_*.py"))


@pytest.mark.micropython
@pytest.mark.parametrize("module", MODULES)
def test_module_passes_under_micropython(module: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(UNIT), str(ROOT / "firmware"), ".frozen"])
    env["PALAUTE_TEST_TMP"] = str(tmp_path)
    cmd = [*micropython_command(), str(Path(__file__).parent / "mp_runner.py"), module]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} failed under MicroPython:\n{output}"
    assert "SUMMARY passed=" in output and " failed=0" in output, output
