"""Power cuts while content is replaced, under the real MicroPython: old or new, never broken.

``mp_scripts/content_swapper.py`` writes package after package to ``content.tmp`` and
renames each over ``content.bin``.  The test SIGKILLs it after a random number of output
lines (so kills land while writing, between the last write and the rename, and after it),
then checks that ``content.bin`` parses with the firmware's own parser and holds the last
version committed or the one being written, and that the next boot deletes the stale
``content.tmp`` and shows that same version.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from terminal.content import load

from tests.firmware.power_cut import run_and_kill
from tests.services.micropython import micropython_command

ROOT = Path(__file__).resolve().parents[2]
SWAPPER = Path(__file__).parent / "mp_scripts" / "content_swapper.py"
RUNS = 40


@pytest.mark.micropython
def test_power_cut_leaves_old_or_new_content(tmp_path: Path) -> None:
    rng = random.Random(7)
    env = dict(os.environ, MICROPYPATH=os.pathsep.join(
        [str(ROOT / "firmware"), str(Path(__file__).parent / "unit"), ".frozen"]))
    cmd = [*micropython_command(), str(SWAPPER), str(tmp_path)]
    committed = 0  # the last version whose "A" line was seen
    expected_boot: int | None = 0
    kills_with_tmp = 0
    tmp_left = False
    for _ in range(RUNS):
        lines = run_and_kill(cmd, env, rng.randint(1, 40))
        boot = lines[0].split()
        assert boot[0] == "B", lines[:2]
        assert boot[3] == "None", f"content.bin unreadable at boot: {lines[0]}"
        assert int(boot[1]) == expected_boot, (boot, expected_boot)
        assert boot[2] == ("1" if tmp_left else "0"), (boot, tmp_left)  # stale tmp deleted
        writing = None
        for line in lines[1:]:
            kind, version = line.split()[:2]
            if kind == "A":
                committed = int(version)
            else:
                writing = int(version)
        tmp_left = (tmp_path / "content.tmp").exists()
        kills_with_tmp += tmp_left
        if committed == 0 and not (tmp_path / "content.bin").exists():
            expected_boot = 0
            continue
        shown = load(str(tmp_path / "content.bin"), 128, 64).version  # never broken
        assert shown in (committed, writing), (shown, committed, writing)
        committed = shown
        expected_boot = shown
    assert committed > 5  # the runs did replace content many times
    assert kills_with_tmp > 5  # and many kills left a half-written content.tmp
