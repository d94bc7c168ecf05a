"""``palaute content`` (keygen, create, list, preview) and opening-hours time-zone tables."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from PIL import Image

from fleet.cli import main
from fleet.content import signing
from fleet.content.service import tz_transitions, week_intervals
from fleet.db.migrate import upgrade


def _ms(year: int, month: int, day: int, hour: int = 0) -> int:
    return int(datetime.datetime(year, month, day, hour, tzinfo=datetime.UTC).timestamp()
               * 1000)


def test_helsinki_transitions_at_the_exact_instants() -> None:
    start = _ms(2026, 3, 1)  # + 400 days = 2027-04-05
    assert tz_transitions("Europe/Helsinki", start) == [
        [0, 120],
        [_ms(2026, 3, 29, 1), 180],  # last Sunday of March, 01:00 UTC
        [_ms(2026, 10, 25, 1), 120],
        [_ms(2027, 3, 28, 1), 180],
    ]
    # The table reaches at least 400 days ahead and starts with the offset in force now.
    summer = tz_transitions("Europe/Helsinki", _ms(2026, 7, 1), days=30)
    assert summer == [[0, 180]]
    assert tz_transitions("Asia/Kathmandu", start) == [[0, 345]]
    assert tz_transitions("UTC", start) == [[0, 0]]


def test_week_intervals_in_minutes_from_monday() -> None:
    assert week_intervals({"sun": [["22:00", "24:00"]], "mon": [["08:00", "12:30"]]}) == [
        [0, 480, 750], [6, 1320, 1440]]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    url = f"sqlite:///{tmp_path / 'palaute.db'}"
    upgrade(url)
    monkeypatch.setenv("PALAUTE_DB_URL", url)
    monkeypatch.setenv("PALAUTE_CONTENT_KEY_FILE", str(tmp_path / "content.key"))
    return tmp_path


def test_keygen_create_list_preview(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = env / "content.key"
    assert main(["content", "keygen", "--out", str(key)]) == 0
    public = capsys.readouterr().out.strip()
    assert public == signing.public_key_hex(signing.load_key_file(key))
    assert len(public) == 64
    body = env / "body.json"
    body.write_text(json.dumps({"name": "Lobby", "languages": {
        "sv": {"question": "Hur var det?", "thanks": "Tack!"},
        "zh": {"question": "怎么样？", "thanks": "谢谢！"}}}), encoding="utf-8")
    assert main(["content", "create", "--file", str(body)]) == 0
    assert capsys.readouterr().out == "created content version 1\n"
    assert main(["content", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split("\t") == ["version", "created_utc", "languages", "name"]
    assert lines[1].split("\t")[0] == "1" and lines[1].endswith("\tsv,zh\tLobby")
    out = env / "previews"
    assert main(["content", "preview", "1", "--out", str(out), "--scale", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 8 and "content-1-296x128-thanks-zh.png" in names
    assert Image.open(out / "content-1-128x64-question-sv.png").size == (256, 128)


@pytest.mark.parametrize(("argv", "content", "needle"), [
    (["content", "create", "--file", "{dir}/missing.json"], None, "cannot read"),
    (["content", "create", "--file", "{dir}/body.json"], "{nope", "body.json: Invalid JSON"),
    (["content", "create", "--file", "{dir}/body.json"],
     '{"languages": {"fi": {"question": "Q", "thanks": "T"}}, "show": "de"}',
     "body.json: show: 'de' is neither 'rotate' nor one of the languages"),
    (["content", "create", "--file", "{dir}/body.json"],
     '{"languages": {"fi": {"question": "ሀ", "thanks": "T"}}}',
     "languages.fi.question: no font has a glyph"),
    (["content", "preview", "7", "--out", "{dir}/p"], None,
     "content version 7 does not exist; `palaute content list` shows the versions"),
    (["content", "keygen", "--out", "{dir}/content.key"], None, "never overwritten"),
])
def test_errors_are_one_line_and_exit_2(env: Path, capsys: pytest.CaptureFixture[str],
                                        argv: list[str], content: str | None,
                                        needle: str) -> None:
    signing.generate_key_file(env / "content.key")
    if content is not None:
        (env / "body.json").write_text(content, encoding="utf-8")
    assert main([arg.format(dir=env) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("palaute content: ") and err.count("\n") == 1 and needle in err


def test_list_limit_must_be_1_to_500(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("0", "-1", "x", "501"):
        with pytest.raises(SystemExit) as exit_info:
            main(["content", "list", "--limit", bad])
        assert exit_info.value.code == 2
        assert "is not a number from 1 to 500" in capsys.readouterr().err


def test_create_without_a_key_says_how_to_make_one(
        env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = env / "body.json"
    body.write_text('{"languages": {"fi": {"question": "Q", "thanks": "T"}}}')
    assert main(["content", "create", "--file", str(body)]) == 2
    assert "palaute content keygen --out FILE" in capsys.readouterr().err
