"""``palaute demo`` runs the whole system with no external service and loses no vote."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.services.auth import login

PALAUTE = Path(sys.executable).parent / "palaute"


def test_demo_summary_shows_every_pressed_vote_stored(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(PALAUTE), "demo", "--duration", "6", "--json", "--rate", "40", "--port", "0",
         "--data-dir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["terminals"] == 20
    assert summary["votes_pressed"] > 20
    assert summary["votes_pressed"] == summary["votes_stored"]
    assert summary["votes_pending_in_flash"] == 0
    assert summary["refused"] == 0
    # The demo's rollout reached every terminal: all show the fleet's signed question now.
    assert (summary["content_version"], summary["terminals_showing_content"]) == (1, 20)
    assert "API docs: http://127.0.0.1:" in proc.stderr
    assert "127.0.0.1:0/" not in summary["api_docs"]
    # The printed login is real: it opens a session against the demo's database.
    found = re.search(r"log in as (\S+) / (\S+)", proc.stderr)
    assert found, proc.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'demo' / 'palaute.db'}")
    with make_sessionmaker(engine).begin() as session:
        assert login(session, email=found[1], password=found[2]) is not None
    engine.dispose()


def test_demo_keeps_its_data_across_runs(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [str(PALAUTE), "demo", "--duration", "3", "--json", "--terminals", "3",
             "--rate", "60", "--port", "0", "--data-dir", str(data)],
            capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # The second run reuses the database and the terminals' flash: if sequence numbers started
    # again at 1, its votes would be taken for duplicates and fewer would be stored.
    assert all(r["votes_pressed"] == r["votes_stored"] > 0 for r in runs)
