"""``palaute rollout ...`` on SQLite and PostgreSQL: create, status with counts per state and
per wave, pause/resume/abort, and one-line errors with a non-zero exit."""

from __future__ import annotations

import pytest

from fleet.cli import main
from tests.fleet.rollout_helpers import device_ids, make_fleet, sessions_for, store_content

IDS = device_ids(4, prefix="0000dd")


def test_rollout_commands(db_url: str, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    sessions = sessions_for(db_url)
    with sessions.begin() as session:
        site_id = make_fleet(session, IDS)
        store_content(session, 6)
    monkeypatch.setenv("PALAUTE_DB_URL", db_url)
    assert main(["rollout", "create", "--version", "6", "--site", str(site_id),
                 "--canary", IDS[0], "--waves", "50,100", "--timeout", "60"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"rollout 1: content version 6 to site {site_id}, running"
    assert out[1].startswith("waves: canary, then 50%, 100%; current wave none yet")
    assert out[2].split() == ["wave", "pending", "offline", "delivered", "applied", "refused",
                              "timed_out", "superseded", "retired", "total"]
    assert out[3].split() == ["0", "1", "0", "0", "0", "0", "0", "0", "0", "1"]
    assert out[4].split() == ["1", "2", "0", "0", "0", "0", "0", "0", "0", "2"]
    assert out[6].split() == ["all", "4", "0", "0", "0", "0", "0", "0", "0", "4"]
    assert main(["rollout", "pause", "1"]) == 0
    assert capsys.readouterr().out == "rollout 1 is paused\n"
    assert main(["rollout", "pause", "1"]) == 2
    assert "rollout 1 is paused; pause needs it running" in capsys.readouterr().err
    assert main(["rollout", "status", "1"]) == 0
    assert "paused (pause by user)" in capsys.readouterr().out
    assert main(["rollout", "abort", "1"]) == 0
    assert main(["rollout", "status", "7"]) == 2
    assert capsys.readouterr().err.strip().endswith("rollout 7 does not exist")
    assert main(["rollout", "create", "--version", "9", "--site", str(site_id)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no package for display 128x64" in err
    with pytest.raises(SystemExit):
        main(["rollout", "create", "--version", "6", "--site", "1", "--waves", "ten"])
    assert "not a list of percentages" in capsys.readouterr().err
