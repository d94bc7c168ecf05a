"""Content package parser, the store on flash (atomic swap, stale tmp, boot fallback) and
opening hours.  Runs under CPython and MicroPython."""

import os

from _support import (
    package_bytes,
    raises,
    screen,
    simple_header,
    simple_package,
    tempdir,
)
from terminal.content import ContentStore, PackageError, load
from terminal.hours import is_open, local_week_minute, offset_minutes

MONDAY_2024_UTC = 1704067200000  # 2024-01-01 00:00 UTC, a Monday
HOUR = 3600000


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def reason_of(data, width=128, height=64):
    path = tempdir("pkg") + "/p.bin"
    write(path, data)
    return raises(PackageError, load, path, width, height).reason


def test_good_package_parses_and_screens_read_back():
    path = tempdir("pkg") + "/p.bin"
    write(path, simple_package(7, languages=("fi", "sv", "en")))
    content = load(path, 128, 64)
    assert content.version == 7
    assert content.languages == ["fi", "sv", "en"]
    buf = bytearray(1024)
    content.read_screen("question", "sv", buf)
    assert bytes(buf) == screen(128, 64, 2)
    content.read_screen("thanks", "en", buf)
    assert bytes(buf) == screen(128, 64, 0x82)


def test_every_malformed_package_is_bad_package():
    good = simple_header(3)
    bitmaps = b"\x00" * 4096
    assert reason_of(package_bytes(3, good, bitmaps, magic=b"PLC2")) == "bad_package"
    assert reason_of(package_bytes(3, good, bitmaps, reserved=1)) == "bad_package"
    assert reason_of(package_bytes(4, good, bitmaps)) == "bad_package"  # version mismatch
    assert reason_of(package_bytes(3, good, bitmaps, header_raw=b"{not json")) == "bad_package"
    assert reason_of(package_bytes(3, good, bitmaps, header_raw=b"[1, 2]")) == "bad_package"
    assert reason_of(package_bytes(3, good, bitmaps[:3000])) == "bad_package"  # screen cut
    assert reason_of(b"PLC1\x03\x00") == "bad_package"  # truncated prefix
    whole = package_bytes(3, good, bitmaps)
    assert reason_of(whole[:40]) == "bad_package"  # header cut short
    bad = [
        {"screens": {"question": {"fi": 0, "en": 1024}, "thanks": {"fi": 2048}}},
        {"screens": {"question": {"fi": 0, "en": 3073}, "thanks": {"fi": 0, "en": 0}}},
        {"screens": {"question": {"fi": -1, "en": 0}, "thanks": {"fi": 0, "en": 0}}},
        {"languages": []},
        {"show": "de"},
        {"rotate_s": 0},
        {"settings": {"brightness": 300}},
        {"settings": {"idle": "blink"}},
        {"settings": {"colour": 1}},
        {"hours": {"week": [[7, 0, 60]], "tz": [[0, 0]], "outside": "dim"}},
        {"hours": {"week": [[0, 600, 60]], "tz": [[0, 0]], "outside": "dim"}},
        {"hours": {"week": [], "tz": [], "outside": "dim"}},
        {"hours": {"week": [], "tz": [[5, 0], [5, 60]], "outside": "dim"}},
        {"hours": {"week": [], "tz": [[0, 0]], "outside": "on"}},
    ]
    for change in bad:
        header = simple_header(3)
        header.update(change)
        assert reason_of(package_bytes(3, header, bitmaps)) == "bad_package", change


def test_other_display_size_is_wrong_display():
    assert reason_of(simple_package(5, 296, 128)) == "wrong_display"
    assert load_ok(simple_package(5, 296, 128), 296, 128).version == 5


def load_ok(data, width, height):
    path = tempdir("pkg") + "/p.bin"
    write(path, data)
    return load(path, width, height)


def test_store_boot_deletes_stale_tmp_and_loads_bin():
    root = tempdir("store")
    write(root + "/content.tmp", b"half a download")
    write(root + "/content.bin", simple_package(9))
    store = ContentStore(root, 128, 64)
    assert store.boot() is not None
    assert store.version == 9 and store.boot_error is None
    assert store.stale_tmp and not exists(root + "/content.tmp")


def test_store_without_content_shows_the_default():
    store = ContentStore(tempdir("store"), 128, 64)
    assert store.boot() is None
    assert store.version == 0 and store.boot_error is None


def test_unreadable_bin_falls_back_and_reports():
    root = tempdir("store")
    write(root + "/content.bin", simple_package(9)[:30])
    store = ContentStore(root, 128, 64)
    assert store.boot() is None
    assert store.version == 0
    assert store.boot_error.startswith("bad_package")
    root = tempdir("store")
    write(root + "/content.bin", simple_package(9, 296, 128))
    store = ContentStore(root, 128, 64)
    store.boot()
    assert store.version == 0 and store.boot_error.startswith("wrong_display")


def test_commit_swaps_atomically_and_refuses_a_bad_tmp():
    root = tempdir("store")
    write(root + "/content.bin", simple_package(2))
    store = ContentStore(root, 128, 64)
    store.boot()
    write(root + "/content.tmp", simple_package(3)[:-1])  # one byte short: screen cut
    assert raises(PackageError, store.commit).reason == "bad_package"
    assert store.version == 2 and load(root + "/content.bin", 128, 64).version == 2
    # A package whose own version is not the one that was signed never becomes current.
    write(root + "/content.tmp", simple_package(4))
    error = raises(PackageError, store.commit, 3)
    assert error.reason == "bad_package" and "says version 4" in str(error)
    assert store.version == 2 and load(root + "/content.bin", 128, 64).version == 2
    write(root + "/content.tmp", simple_package(3))
    assert store.commit(3).version == 3
    assert store.version == 3 and not exists(root + "/content.tmp")
    assert load(root + "/content.bin", 128, 64).version == 3


def test_hours_weekday_and_offsets():
    tz = [[0, 120], [MONDAY_2024_UTC + 10 * HOUR, 180]]
    assert offset_minutes(tz, MONDAY_2024_UTC) == 120
    assert offset_minutes(tz, MONDAY_2024_UTC + 10 * HOUR) == 180
    assert offset_minutes([[MONDAY_2024_UTC, 60]], 0) == 60  # before the first: the first
    assert local_week_minute([[0, 0]], MONDAY_2024_UTC) == (0, 0)
    assert local_week_minute([[0, 0]], MONDAY_2024_UTC - 60000) == (6, 1439)  # Sunday
    assert local_week_minute([[0, 345]], MONDAY_2024_UTC) == (0, 345)  # +5:45
    assert local_week_minute([[0, -300]], MONDAY_2024_UTC) == (6, 1140)  # -5:00: Sunday


def test_is_open_follows_local_time_and_transitions():
    # Open Monday 08:00-21:00 local; UTC+2 until 10:00 UTC, then UTC+3.
    hours = {"week": [[0, 480, 1260]], "tz": [[0, 120], [MONDAY_2024_UTC + 10 * HOUR, 180]],
             "outside": "dim"}
    assert not is_open(hours, MONDAY_2024_UTC + 5 * HOUR + 59 * 60000)  # 07:59 local
    assert is_open(hours, MONDAY_2024_UTC + 6 * HOUR)  # 08:00 local
    assert is_open(hours, MONDAY_2024_UTC + 17 * HOUR + 59 * 60000)  # 20:59 at +3
    assert not is_open(hours, MONDAY_2024_UTC + 18 * HOUR)  # 21:00 at +3 (19:00 UTC +2)
    assert not is_open(hours, MONDAY_2024_UTC + 24 * HOUR + 7 * HOUR)  # Tuesday: closed
    assert is_open(None, MONDAY_2024_UTC)  # no hours: always open
    assert is_open(hours, None)  # clock unknown: open
