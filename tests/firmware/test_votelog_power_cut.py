"""Power cuts against the vote log under the real MicroPython: no acknowledged vote is lost.

``mp_scripts/votelog_writer.py`` appends votes and prints each seq once ``append`` has
returned (the visitor has been thanked).  The test SIGKILLs it after a random number of
output lines, over and over, and then checks that every printed vote is still in the log
(pending, or at or below the fleet's acknowledged watermark), with the right content, and
that seqs only ever increased across all runs.  SIGKILL stops the process between any two
instructions, like a power cut stops the CPU; the data the process handed to the kernel
survives, as a committed littlefs file does on the device.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from terminal.votelog import VoteLog

from tests.firmware.power_cut import run_and_kill
from tests.services.micropython import micropython_command

ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).parent / "mp_scripts" / "votelog_writer.py"
RUNS = 80  # every run ends in a kill
SEGMENT_RECORDS = 8  # as in the writer


def vote_for(seq: int) -> tuple[int, int, int, int]:
    """The writer's ``vote_for``: the content stored with ``seq``."""
    return 1700000000000 + seq * 7, 1 + seq % 5, 1 if seq % 3 == 0 else 0, seq & 0xFFFF


@pytest.mark.micropython
@pytest.mark.timeout(120)
def test_no_acknowledged_vote_is_lost_across_power_cuts(tmp_path: Path) -> None:
    log_dir = tmp_path / "votes"
    env = dict(os.environ)
    env["MICROPYPATH"] = os.pathsep.join([str(ROOT / "firmware"), ".frozen"])
    cmd = [*micropython_command(), str(WRITER), str(log_dir), "1000000"]
    rng = random.Random(20240611)
    appended: list[int] = []  # every "A seq" line, in order, across all runs
    acked = 0
    kills_mid_append = 0
    for _ in range(RUNS):
        pick = rng.random()
        # Sometimes during start-up and recovery, sometimes during the first append,
        # mostly somewhere in the append/ack loop.
        lines_before_kill = 0 if pick < 0.1 else 1 if pick < 0.2 else rng.randint(2, 250)
        lines = run_and_kill(cmd, env, lines_before_kill)
        for line in lines:
            kind, *values = line.split()
            numbers = [int(v) for v in values]
            if kind == "R":
                last_seq, acked_seq, _pending = numbers
                # A reboot never goes back: not below a thanked vote nor below an ack.
                assert last_seq >= (appended[-1] if appended else 0)
                assert acked_seq >= acked
            elif kind == "A":
                assert not appended or numbers[0] > appended[-1], "seq repeated or went back"
                appended.append(numbers[0])
            else:
                assert kind == "K"
                acked = max(acked, numbers[0])
        kills_mid_append += any(line.startswith("A") for line in lines)
    assert len(appended) > 1000 and kills_mid_append >= 50

    log = VoteLog(str(log_dir), segment_records=SEGMENT_RECORDS)  # reopens, under CPython
    assert log.corrupt == 0
    assert log.acked_seq >= acked and log.last_seq >= appended[-1]
    held = log.batch(10**6)
    assert len(held) == log.pending
    seqs = [vote[0] for vote in held]
    assert seqs == sorted(set(seqs)) and all(s > log.acked_seq for s in seqs)
    for vote in held:
        assert vote[1:] == vote_for(vote[0])
    missing = [s for s in appended if s > log.acked_seq and s not in set(seqs)]
    assert not missing, f"acknowledged votes lost: {missing[:10]}"
