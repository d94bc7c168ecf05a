"""The terminal's button behaviour, driven through a ``SimBoard`` without any network.

Presses are stored before the visitor sees feedback, the abuse filter flags instead of
dropping, test mode is entered by holding the outer buttons, presses made before the clock
was set are rebased when sent, notable events bring a prompt health report, and no content
version can make a press fail.
"""

import asyncio
import json

from _support import raises, tempdir
from terminal.app import TEST_SCREEN, THANKS, Terminal
from terminal.board_sim import SimBoard
from terminal.clock import ticks_add, ticks_diff, ticks_ms
from terminal.config import validate
from terminal.votelog import VoteLog

DEVICE = "pt-0123456789ab"
PREFIX = "fb/v1/d/%s/" % DEVICE
WALL = 1700000000000


def config(**extra):
    raw = {"device_id": DEVICE, "board": "sim",
           "mqtt": {"host": "127.0.0.1", "port": 1, "user": DEVICE, "password": "x"}}
    raw.update(extra)
    return validate(raw)


class Rig:
    """A terminal on a simulated board whose network is cut; records every board event."""

    def __init__(self, root=None, synced=True, **extra):
        self.root = root or tempdir("app")
        self.events = []
        self.board = SimBoard(self.root, synced=synced, on_event=self.on_event)
        self.board.cut_network()  # the link only ever fails: no broker anywhere
        self.t = Terminal(self.board, config(**extra))
        self.task = None

    def on_event(self, name, data):
        # Each event with what the flash log held at that moment.
        t = getattr(self, "t", None)
        self.events.append((name, data, t.log.last_seq if t else None))

    def names(self):
        return [e[0] for e in self.events]

    def start(self):
        self.task = asyncio.create_task(self.t.run())

    async def stop(self):
        self.t.stop()
        if self.task is not None:
            await asyncio.wait_for(self.task, 2)

    def votes(self):
        return self.t.log.batch(50)

    async def until(self, predicate, timeout=2):
        start = ticks_ms()
        while not predicate():
            if ticks_diff(ticks_ms(), start) > timeout * 1000:
                raise AssertionError("timed out waiting")
            await asyncio.sleep(0.002)

    async def vote(self, n):
        """Wait for the ``n``-th vote event; return its data ``[seq, button, flags]``."""
        await self.until(lambda: len([e for e in self.events if e[0] == "vote"]) >= n)
        return [e for e in self.events if e[0] == "vote"][n - 1][1]


def test_a_press_is_in_flash_before_the_led_and_the_screen():
    async def main():
        rig = Rig()
        rig.start()
        await rig.until(lambda: "ready" in rig.names())
        del rig.events[:]
        rig.board.press(2)
        seq, button, flags = await rig.vote(1)
        assert (seq, button, flags) == (1, 2, 0)
        led = next(e for e in rig.events if e[0] == "led")
        screen = next(e for e in rig.events if e[0] == "screen")
        assert led[1] == [2, True] and led[2] == 1  # the log held seq 1 when the LED lit
        assert screen[1] == list(THANKS) and screen[2] == 1
        names = rig.names()
        assert names.index("led") < names.index("vote")
        assert names.index("screen") < names.index("vote")
        vote = rig.votes()[0]
        assert vote[0] == 1 and vote[2:] == (2, 0, 0)
        assert abs(vote[1] - rig.board.time_ms()) < 2000  # the wall-clock time of the press
        await rig.stop()
    asyncio.run(main())


def test_feedback_ends_and_the_question_comes_back():
    async def main():
        rig = Rig()
        rig.t.feedback_ms = 30
        rig.start()
        rig.board.press(3)
        await rig.vote(1)
        assert rig.board.leds[2] and rig.board.screen == list(THANKS)
        await rig.until(lambda: not rig.board.leds[2])
        assert rig.board.screen == list(rig.t.question)
        await rig.stop()
    asyncio.run(main())


def test_filtered_presses_are_recorded_with_flag_1():
    rig = Rig()
    t = rig.t
    at = ticks_ms()
    seqs = [t.record_press(1, at), t.record_press(1, ticks_add(at, 500)),
            t.record_press(4, ticks_add(at, 2500))]
    votes = rig.votes()
    assert [v[0] for v in votes] == seqs == [1, 2, 3]
    assert [v[3] for v in votes] == [0, 1, 0]
    assert [e[1][2] for e in rig.events if e[0] == "vote"] == [0, 1, 0]


def test_burst_settings_come_from_config():
    rig = Rig(burst_count=2, burst_window_ms=1000, min_gap_ms=0)
    t = rig.t
    at = ticks_ms()
    for ms in (0, 100, 200, 300):
        t.record_press(1, ticks_add(at, ms))
    assert [v[3] for v in rig.votes()] == [0, 0, 1, 1]
    t.filter.configure(min_gap_ms=5000)  # the settings feature's run-time hook
    assert t.filter.min_gap_ms == 5000


def test_test_mode_by_holding_the_outer_buttons():
    async def main():
        rig = Rig()
        t, board = rig.t, rig.board
        t.test_hold_ms = 150
        t.poll_ms = 5
        rig.start()
        board.hold(1)
        await rig.vote(1)
        board.hold(4)
        held_at = ticks_ms()
        await rig.vote(2)
        assert not t.test_mode  # not before the hold time
        await rig.until(lambda: t.test_mode)
        assert ticks_diff(ticks_ms(), held_at) >= 150
        assert board.screen == list(TEST_SCREEN)
        assert ("test_mode", True) in [e[:2] for e in rig.events]
        # The two presses that began the chord are ordinary presses.
        assert [v[3] for v in rig.votes()] == [0, 1]
        board.release(1)
        board.release(4)
        await asyncio.sleep(0.02)
        assert t.test_mode  # letting go does not leave it
        for button in (2, 2, 3):  # quicker than the minimum gap: never filtered
            board.press(button)
        await rig.vote(5)
        assert [v[3] for v in rig.votes()][2:] == [4, 4, 4]
        assert board.screen == ["TEST MODE", "Button 3"]
        # The same chord leaves test mode; its presses are test presses.
        board.hold(4)
        board.hold(1)
        await rig.until(lambda: not t.test_mode)
        assert [v[3] for v in rig.votes()][5:] == [4, 4]
        board.release(1)
        board.release(4)
        assert board.screen == list(t.question)
        board.press(2)
        assert (await rig.vote(8))[2] & 4 == 0
        await rig.stop()
    asyncio.run(main())


def test_other_holds_do_not_enter_test_mode():
    async def main():
        rig = Rig()
        t, board = rig.t, rig.board
        t.test_hold_ms = 30
        t.poll_ms = 5
        rig.start()
        board.hold(1)  # one outer button alone
        await asyncio.sleep(0.1)
        board.hold(2)  # the outer buttons and another one
        board.hold(4)
        await asyncio.sleep(0.1)
        assert not t.test_mode
        board.release(2)  # now exactly the chord
        await rig.until(lambda: t.test_mode)
        await rig.stop()
    asyncio.run(main())


def test_test_mode_ends_after_idle_time():
    async def main():
        rig = Rig()
        t = rig.t
        t.test_idle_ms = 60
        rig.start()
        t.set_test_mode(True)
        assert rig.board.screen == list(TEST_SCREEN)
        t.record_press(2, ticks_ms())
        await asyncio.sleep(0.03)
        assert t.test_mode  # the press restarted the idle time
        await rig.until(lambda: not t.test_mode)
        assert rig.board.screen == list(t.question)
        await rig.stop()
        # A press that comes after the idle time is an ordinary one even if the panel task
        # did not run in between.
        t.set_test_mode(True)
        t.record_press(1, ticks_add(ticks_ms(), t.test_idle_ms))
        assert not t.test_mode and rig.votes()[-1][3] & 4 == 0
    asyncio.run(main())


class Wire:
    """Captures what the uploader publishes."""

    def __init__(self):
        self.sent = []

    async def publish(self, topic, payload, qos):
        self.sent.append(json.loads(bytes(payload)))

    async def next(self, n):
        while len(self.sent) < n:
            await asyncio.sleep(0.002)
        return self.sent[n - 1]


def test_unsynced_presses_are_rebased_at_send_time():
    async def main():
        root = tempdir("app")
        # An earlier boot that never learnt the time: its press keeps its uptime.
        old = Rig(root, synced=False)
        old.t.record_press(1, ticks_ms())
        old_vote = old.votes()[0]
        rig = Rig(root, synced=False, min_gap_ms=0)
        t = rig.t
        assert t.boot_seq == 2
        await asyncio.sleep(0.02)
        t.record_press(2, ticks_ms())
        await asyncio.sleep(0.05)
        t.record_press(3, ticks_add(ticks_ms(), -10))  # a press seen 10 ms late
        votes = rig.votes()
        assert [v[3] for v in votes] == [2, 2, 2]
        up2, up3 = votes[1][1], votes[2][1]  # uptimes at the presses
        assert 40 <= up3 - up2 <= 1000 and up3 <= t.uptime_ms()
        wire = Wire()
        t.uploader.publish = wire.publish
        t.link.up.set()
        task = asyncio.create_task(t.uploader.run())
        # Clock unknown: the previous boot's vote goes out as stored...
        first = await wire.next(1)
        assert first["votes"] == [list(old_vote)]
        t._on_message(PREFIX + "ack", b'{"seq": 1}')
        # ...then a single vote of this boot, whose ack brings the fleet's time.
        second = await wire.next(2)
        assert second["votes"] == [list(votes[1])] and second["after"] == 1
        assert not t._synced
        t._on_message(PREFIX + "ack", json.dumps({"seq": 2, "now_ms": WALL}).encode())
        synced_up = t.uptime_ms()
        assert t._synced and ("synced" in rig.names())
        third = await wire.next(3)
        seq, ts, button, flags, cv = third["votes"][0]
        assert (seq, button, flags, cv) == (3, 3, 2, 0)  # bit 1 stays: an estimate
        expected = WALL - (synced_up - up3)
        assert abs(ts - expected) <= 20, (ts, expected)
        # encode() rebases on every (re)send; votes of earlier boots never.
        assert votes[0] == old_vote
        payload = json.loads(t.uploader.encode(votes))
        assert payload["votes"][0] == list(old_vote)
        rebased = [v[1] for v in payload["votes"][1:]]
        assert rebased[1] - rebased[0] == up3 - up2
        assert abs(rebased[1] - expected) <= 20
        t._on_message(PREFIX + "ack", json.dumps({"seq": 3, "now_ms": WALL + 100}).encode())
        t.uploader.stop()
        await asyncio.wait_for(task, 2)
        # With the clock known, new presses carry their time and no flag.
        t.record_press(4, ticks_ms())
        assert rig.votes()[-1][3] == 0 and abs(rig.votes()[-1][1] - rig.board.time_ms()) < 50
    asyncio.run(main())


def test_content_version_is_checked_when_set_so_a_press_never_fails():
    rig = Rig()
    t = rig.t
    t.content_version = 65535
    t.record_press(1, ticks_ms())
    for bad in (65536, 1 << 32, -1, True, "7", 2.0, None):
        assert "content_version" in str(raises(ValueError, setattr, t, "content_version", bad))
    assert t.content_version == 65535
    t.record_press(2, ticks_add(ticks_ms(), 5000))
    assert [v[4] for v in rig.votes()] == [65535, 65535]
    assert t.health()["content_version"] == 65535


class HealthWire:
    """Records each health report with the instant the terminal decided to send it: the
    debounce is defined from that instant (building the payload takes time under load)."""

    def __init__(self, terminal):
        self.terminal = terminal
        self.reports = []

    async def publish(self, topic, payload, qos):
        assert topic == PREFIX + "health" and qos == 0
        self.reports.append((self.terminal._health_at, json.loads(payload)))


def test_health_after_notable_events_is_debounced():
    async def main():
        rig = Rig(synced=False)
        t = rig.t
        t.health_debounce_ms = 80
        t.clock_poll_ms = 10
        wire = HealthWire(t)
        t.client.publish = wire.publish
        t.link.up.set()
        task = asyncio.create_task(t._health())
        await rig.until(lambda: len(wire.reports) == 1)  # the first report at once
        first = wire.reports[0][1]
        for key in ("dropped", "corrupt", "reconnects", "resends", "queue", "reset_cause",
                    "uptime_s", "test_mode"):
            assert key in first, key
        assert first["ts_ms"] is None and first["test_mode"] is False
        t.set_test_mode(True)
        t.set_test_mode(False)
        t.set_test_mode(True)  # three events, one report
        await rig.until(lambda: len(wire.reports) == 2)
        gap = ticks_diff(wire.reports[1][0], wire.reports[0][0])
        assert gap >= 80 and wire.reports[1][1]["test_mode"] is True
        await asyncio.sleep(0.15)
        assert len(wire.reports) == 2  # nothing new: no report (interval is 300 s)
        # The first time sync (here NTP setting the board's clock) brings a report.
        rig.board.set_time_ms(WALL)
        await rig.until(lambda: len(wire.reports) == 3)
        assert wire.reports[2][1]["ts_ms"] >= WALL
        # A vote dropped because the log is full brings one too.
        t.log = t.uploader.log = VoteLog(rig.root + "/small", segment_records=2, max_records=4)
        at = ticks_ms()
        for i in range(6):
            t.record_press(1, ticks_add(at, 3000 * i))
        assert t.log.dropped == 2
        await rig.until(lambda: len(wire.reports) == 4)
        assert wire.reports[3][1]["dropped"] == 2
        # So does the link coming (back) up.
        t._link_up()
        await rig.until(lambda: len(wire.reports) == 5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    asyncio.run(main())
