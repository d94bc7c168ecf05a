"""The terminal with content: question and thank-you bitmaps, language rotation, settings,
display state and opening hours, and the version every vote carries.  Runs under CPython
and MicroPython (where the SimBoard's framebuffer is a real framebuf)."""

import asyncio
import json
import os

from _support import screen, simple_package, tempdir
from terminal.clock import ticks_add, ticks_ms
from terminal.content import load
from test_app import Rig

MONDAY_2024_UTC = 1704067200000


def installed(package):
    """A terminal root whose flash already holds ``package`` as content.bin."""
    root = tempdir("appc")
    os.mkdir(root + "/content")
    with open(root + "/content/content.bin", "wb") as f:
        f.write(package)
    return root


def test_boot_shows_the_question_bitmap_and_votes_carry_its_version():
    async def main():
        rig = Rig(installed(simple_package(7, languages=("fi", "sv", "en"), show="sv")))
        rig.t.feedback_ms = 30
        assert rig.t.content_version == 7 and rig.t.health()["content_version"] == 7
        assert json.loads(rig.t._status_payload())["content_version"] == 7
        rig.start()
        await rig.until(lambda: "ready" in rig.names())
        assert rig.board.screen == ["question:sv:v7"]
        assert bytes(rig.board.framebuffer) == screen(128, 64, 2)  # sv is screen 2
        rig.board.press(1)
        await rig.vote(1)
        assert rig.board.screen == ["thanks:sv:v7"]
        assert bytes(rig.board.framebuffer) == screen(128, 64, 0x81)
        await rig.until(lambda: not rig.board.leds[0])
        assert rig.board.screen == ["question:sv:v7"]
        assert [v[4] for v in rig.votes()] == [7]
        await rig.stop()

    asyncio.run(main())


def test_new_content_at_run_time_changes_screen_and_vote_version():
    async def main():
        rig = Rig()
        rig.start()
        await rig.until(lambda: "ready" in rig.names())
        assert rig.board.screen == list(rig.t.question)  # no content: the built-in text
        rig.t.record_press(1, ticks_ms())
        path = tempdir("pkg") + "/c.bin"
        with open(path, "wb") as f:
            f.write(simple_package(12, languages=("en",), show="en"))
        rig.t.apply_content(load(path, 128, 64))
        rig.t.record_press(2, ticks_add(ticks_ms(), 5000))
        assert [v[4] for v in rig.votes()] == [0, 12]
        await rig.until(lambda: rig.board.screen == ["question:en:v12"], timeout=5)
        await rig.stop()

    asyncio.run(main())


def test_languages_rotate_every_rotate_s():
    async def main():
        rig = Rig(installed(simple_package(3, rotate_s=1)))
        rig.start()
        await rig.until(lambda: rig.board.screen == ["question:fi:v3"])
        await rig.until(lambda: rig.board.screen == ["question:en:v3"], timeout=3)
        assert bytes(rig.board.framebuffer) == screen(128, 64, 2)
        await rig.until(lambda: rig.board.screen == ["question:fi:v3"], timeout=3)
        await rig.stop()

    asyncio.run(main())


def test_settings_tune_the_filter_and_the_idle_display():
    async def main():
        package = simple_package(4, settings={"min_gap_ms": 0, "brightness": 90,
                                              "idle": "dim"})
        rig = Rig(installed(package), min_gap_ms=5000, burst_count=3)
        rig.t.feedback_ms = 30
        assert rig.t.filter.min_gap_ms == 0  # from the package
        assert rig.t.filter.burst_count == 3  # absent in the package: the config's
        rig.start()
        await rig.until(lambda: rig.board.display_mode == "dim")
        assert rig.board.brightness == 90
        del rig.events[:]
        rig.board.press(1)
        await rig.vote(1)
        await rig.until(lambda: not rig.board.leds[0])
        await rig.until(lambda: rig.board.display_mode == "dim")
        assert ("display_state", ["on", 90]) in [(e[0], e[1]) for e in rig.events]
        await rig.stop()

    asyncio.run(main())


def test_outside_opening_hours_the_display_is_off_but_presses_count():
    async def main():
        # Open only Monday 00:00-00:01 local (UTC+0); the board's clock says Monday 12:00.
        hours = {"week": [[0, 0, 1]], "tz": [[0, 0]], "outside": "off"}
        rig = Rig(installed(simple_package(5, hours=hours)))
        rig.board.set_time_ms(MONDAY_2024_UTC + 12 * 3600000)
        rig.t.feedback_ms = 30
        rig.start()
        await rig.until(lambda: rig.board.display_mode == "off")
        rig.board.press(2)
        await rig.vote(1)
        assert [v[4] for v in rig.votes()] == [5]
        await rig.until(lambda: not rig.board.leds[1])
        await rig.until(lambda: rig.board.display_mode == "off")
        rig.t.set_test_mode(True)  # an installer checking the buttons sees the screen
        assert rig.board.display_mode == "on"
        rig.t.set_test_mode(False)
        assert rig.board.display_mode == "off"
        rig.board.set_time_ms(MONDAY_2024_UTC + 30000)  # inside the open minute
        assert rig.t.display_state() == ("on", 255)
        await rig.stop()

    asyncio.run(main())


def test_broken_content_bin_falls_back_to_the_built_in_question():
    root = installed(simple_package(5)[:100])
    rig = Rig(root)
    assert rig.t.content_version == 0 and rig.t.content is None
    assert "content_error" in rig.names()
    assert rig.t.updater.reported()["state"] == "refused"
    assert rig.t.updater.reported()["reason"] == "bad_package"
