"""The fleet's packages and the firmware's parser agree (CPython; both sides' real code).

Packages built by fleet/content (every setting, opening hours with zone transitions, both
display sizes) load with the terminal's own ``terminal.content.load``; and the terminal's
opening-hours logic, fed the fleet's ``hours`` header, matches Python's zoneinfo at every
hour of a year (DST transitions, a +5:45 zone, a negative offset).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from terminal.content import PackageError, load
from terminal.hours import is_open

from fleet.content.package import SCREENS, build_package, screen_bytes
from fleet.content.service import tz_transitions, week_intervals

WEEK = {"mon": [["08:00", "12:00"], ["13:00", "21:00"]], "sat": [["10:00", "24:00"]],
        "sun": [["00:00", "02:30"]]}
START_MS = 1767225600000  # 2026-01-01 00:00 UTC


def package(width: int, height: int, hours: dict[str, object] | None) -> bytes:
    screens = {kind: {lang: bytes([n]) * screen_bytes(width, height)
                      for n, lang in enumerate(("fi", "sv"))} for kind in SCREENS}
    settings = {"min_gap_ms": 0, "burst_count": 64, "burst_window_ms": 3_600_000,
                "burst_quiet_ms": 1, "brightness": 0, "idle": "off"}
    return build_package(65535, width, height, ["fi", "sv"], screens, show="rotate",
                         rotate_s=3600, settings=settings, hours=hours)


def hours_for(zone: str) -> dict[str, object]:
    return {"week": week_intervals(WEEK), "tz": tz_transitions(zone, START_MS),
            "outside": "dim"}


@pytest.mark.parametrize(("width", "height"), [(128, 64), (296, 128)])
def test_fleet_packages_load_on_the_terminal(tmp_path: Path, width: int, height: int) -> None:
    path = tmp_path / "content.bin"
    path.write_bytes(package(width, height, hours_for("Europe/Helsinki")))
    content = load(str(path), width, height)
    assert content.version == 65535 and content.languages == ["fi", "sv"]
    assert content.settings["idle"] == "off" and content.hours is not None
    buf = bytearray(screen_bytes(width, height))
    content.read_screen("thanks", "sv", buf)
    assert bytes(buf) == b"\x01" * len(buf)
    other = (296, 128) if width == 128 else (128, 64)
    with pytest.raises(PackageError) as refused:
        load(str(path), *other)
    assert refused.value.reason == "wrong_display"


@pytest.mark.parametrize("zone", ["Europe/Helsinki", "Asia/Kathmandu", "America/New_York"])
def test_terminal_hours_match_zoneinfo_for_a_year(zone: str) -> None:
    hours = hours_for(zone)
    tz = ZoneInfo(zone)
    days = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    for hour in range(0, 365 * 24):
        for minute in (0, 29, 59):
            utc_ms = START_MS + hour * 3_600_000 + minute * 60_000
            local = datetime.datetime.fromtimestamp(utc_ms / 1000, datetime.UTC).astimezone(tz)
            now = local.hour * 60 + local.minute
            expected = any(int(a[:2]) * 60 + int(a[3:]) <= now < int(b[:2]) * 60 + int(b[3:])
                           for a, b in WEEK.get(days[local.weekday()], []))
            assert is_open(hours, utc_ms) == expected, (zone, local.isoformat())
