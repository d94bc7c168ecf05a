"""The terminal application: one task per concern, hardware passed in as ``board``.

Tasks: buttons (press → flash → visitor feedback), the button panel (feedback timeout, the
test-mode chord), the MQTT link, the vote uploader and health reports.  A press never waits
for the network: it is appended to the flash log and then acknowledged to the visitor;
uploading is the uploader's job.

Content (docs/content.md): the question and thank-you screens come from the verified package
in flash when there is one (``terminal.content``; updates arrive through
``terminal.updater``), else the built-in text.  The package's settings tune the abuse filter
and the display; its opening hours dim or switch off the display outside them (presses are
still recorded).  Every vote carries the content version on screen at the press.

Test mode: holding the two outer buttons (1 and N) together for ``test_hold_ms`` enters it,
doing so again (after letting go) leaves it, and so does ``test_idle_ms`` without a press.
In test mode every press is stored with flag bit 2, never filtered, and the screen shows
"TEST MODE" and the button pressed.  The two presses that begin the chord are ordinary
presses (a press is never delayed or taken back): the first counts, the second is usually
within the minimum gap and filtered.
"""

import asyncio
import json

from terminal import FW_VERSION
from terminal.abuse import SETTINGS as FILTER_SETTINGS
from terminal.abuse import AbuseFilter
from terminal.clock import ticks_diff, ticks_ms
from terminal.content import ContentStore
from terminal.hours import is_open
from terminal.link import Link
from terminal.mqtt import MQTTClient
from terminal.updater import Updater, parse_key
from terminal.uploader import Uploader
from terminal.votelog import VoteLog

FLAG_FILTERED = 1
FLAG_TIME_UNSYNCED = 2
FLAG_TEST_MODE = 4
CONTENT_VERSION_MAX = 0xFFFF  # u16 in the vote log
THANKS = ("Kiitos!", "Thank you!")
DEFAULT_QUESTION = ("How was your visit?",)
TEST_SCREEN = ("TEST MODE", "Press a button")


async def _wait(event, ms):
    """Wait for ``event`` at most ``ms`` milliseconds."""
    try:
        await asyncio.wait_for(event.wait(), ms / 1000)
    except asyncio.TimeoutError:
        pass


class Terminal:
    """A feedback terminal running on ``board`` with validated ``config``.

    Timings are class attributes so tests can shorten them per instance.
    """

    test_hold_ms = 5000  # hold buttons 1 and N this long to enter or leave test mode
    test_idle_ms = 600000  # test mode ends after this long without a press
    poll_ms = 50  # how often held buttons are read while any is down
    feedback_ms = 3000  # LED and thank-you screen after a press
    health_debounce_ms = 10000  # at most one event-triggered health report per this
    clock_poll_ms = 5000  # how often the health task looks for the first clock sync
    housekeeping_ms = 60000  # the health task wakes at least this often (uptime, clock)
    hours_check_ms = 60000  # opening hours are checked at least this often

    def __init__(self, board, config):
        self.board = board
        self.config = config
        self.device_id = config["device_id"]
        self.prefix = "%s/d/%s/" % (config["topic_root"], self.device_id)
        self._content_version = 0
        self.question = DEFAULT_QUESTION
        self._up_ms = 0  # uptime, accumulated so that the ticks wrapping never shows
        self._up_ticks = ticks_ms()
        settings = {}
        for key in FILTER_SETTINGS:
            if key in config:
                settings[key] = config[key]
        self._filter_base = settings  # the configured values content settings override
        self.filter = AbuseFilter(**settings)
        self.log = VoteLog(board.storage("votes"))
        self.store = ContentStore(board.storage("content"), board.display_width,
                                  board.display_height)
        self.store.boot()  # deletes a stale content.tmp, loads content.bin if usable
        if self.store.boot_error is not None:
            board.emit("content_error", self.store.boot_error)
        self.content = None  # the Content shown; None: the built-in question
        self._screen = None  # one preallocated screen buffer, once there is content
        self._lang = 0  # index into content.languages of the language on screen
        self._display = None  # (mode, brightness) last set on the board
        self.boot_seq = self.log.last_seq + 1  # seqs of this boot's presses start here
        mqtt = config["mqtt"]
        self.client = MQTTClient(
            self.device_id, board.open_connection, user=mqtt["user"],
            password=mqtt["password"], keepalive_s=config["keepalive_s"],
            will=(self.prefix + "status", b'{"online":false}', 1, True),
            on_message=self._on_message)
        self.link = Link(
            self.client,
            subscriptions=[(self.prefix + "ack", 1), (self.prefix + "desired", 1),
                           (self.prefix + "chunk", 1), (self.prefix + "cmd", 1)],
            birth=(self.prefix + "status", self._status_payload, 1, True),
            on_up=self._link_up,
            on_down=lambda: board.emit("link", False),
            backoff_min_s=config["reconnect_min_ms"] / 1000,
            backoff_max_s=config["reconnect_max_s"],
            stable_s=config["reconnect_stable_s"])
        self.uploader = Uploader(
            self.log, self.link.up, self.client.publish, self.prefix + "votes",
            batch_max=config["batch_max"], ack_timeout_s=config["ack_timeout_s"],
            on_event=board.emit, wall_ms=board.time_ms, uptime_ms=self.uptime_ms,
            boot_seq=self.boot_seq)
        key = config.get("content_key")
        self.updater = Updater(
            self.store, self.client.publish, self.link.up, self.prefix,
            key=parse_key(key) if key else None, max_bytes=config["content_max_bytes"],
            fetch_timeout_s=config["fetch_timeout_s"], on_applied=self.apply_content,
            emit=board.emit, wall_ms=board.time_ms)
        self._content_wake = asyncio.Event()
        self.test_mode = False
        self._activity = self._up_ticks  # ticks of the last press (test-mode idle timeout)
        self._touched = asyncio.Event()  # a press or a mode change: wakes the panel task
        self._lit = 0  # LEDs lit as feedback (bit n-1 = button n)
        self._feedback_at = self._up_ticks
        self._feedback_on = False
        self._chord_since = self._up_ticks
        self._chord_on = False
        self._chord_armed = True
        self._synced = board.time_ms() is not None
        self._notable = False  # an event asks for a prompt health report
        self._health_at = self._up_ticks
        self._health_sent = False
        self._health_wake = asyncio.Event()
        self._tasks = []
        if self.store.current is not None:
            self.apply_content(self.store.current)

    # -- content version ----------------------------------------------------------------------
    @property
    def content_version(self):
        """The content (question) version on screen, stored with every press."""
        return self._content_version

    @content_version.setter
    def content_version(self, value):
        # Checked here, when content changes, so that a press can never fail on it: the log
        # stores a u16 (the fleet does not create content versions above 65535).
        if (not isinstance(value, int) or isinstance(value, bool)
                or not 0 <= value <= CONTENT_VERSION_MAX):
            raise ValueError("content_version: must be 0..%d" % CONTENT_VERSION_MAX)
        self._content_version = value

    # -- time ---------------------------------------------------------------------------------
    def uptime_ms(self):
        """Milliseconds since this terminal started; does not wrap like ``ticks_ms``.

        Correct as long as it is called at least every 2**29 ms (the health task wakes every
        ``housekeeping_ms``).
        """
        now = ticks_ms()
        self._up_ms += ticks_diff(now, self._up_ticks)
        self._up_ticks = now
        return self._up_ms

    def _check_clock(self):
        """Notice the first time the wall clock becomes known (NTP or the fleet's ack)."""
        if not self._synced:
            now = self.board.time_ms()
            if now is not None:
                self._synced = True
                self.board.emit("synced", now)
                self.notify_health()

    def _status_payload(self):
        return json.dumps({"online": True, "fw": FW_VERSION,
                           "content_version": self._content_version,
                           "ts_ms": self.board.time_ms()}).encode()

    # -- messages from the fleet ------------------------------------------------------------
    def _on_message(self, topic, payload):
        leaf = topic[len(self.prefix):] if topic.startswith(self.prefix) else ""
        if leaf == "chunk":
            self.updater.on_chunk(payload)
            return
        if leaf == "desired":
            self.updater.on_desired(payload)
            return
        if leaf != "ack":
            return  # cmd is handled by a later feature
        try:
            data = json.loads(payload)
            seq = data["seq"]
            now = data.get("now_ms")
        except (ValueError, KeyError, TypeError, AttributeError):
            self.board.emit("bad_ack", None)
            return
        if isinstance(now, int) and not isinstance(now, bool) and now > 0:
            self.board.set_time_ms(now)  # the fleet's clock corrects drift on every ack
            self._check_clock()
        if isinstance(seq, int):
            self.uploader.on_ack(seq)

    def _link_up(self):
        self.board.emit("link", True)
        self.uploader.link_up()  # re-send what was in flight when the old session died
        self.updater.link_up()  # report content state again, re-ask a chunk in flight
        self.notify_health()

    # -- buttons ----------------------------------------------------------------------------
    def record_press(self, button, at_ticks):
        """Store one press in flash, then acknowledge it to the visitor; returns the seq."""
        if self.test_mode and ticks_diff(at_ticks, self._activity) >= self.test_idle_ms:
            self.set_test_mode(False)  # idle too long; the panel task may not have run yet
        if self.test_mode:
            flags = FLAG_TEST_MODE  # never filtered, and not shown to the filter
        elif self.filter.check(at_ticks):
            flags = 0
        else:
            flags = FLAG_FILTERED  # kept, flagged: reports show raw and filtered counts
        age = ticks_diff(ticks_ms(), at_ticks)  # debounce and queueing since the press
        if age < 0:
            age = 0
        now = self.board.time_ms()
        if now is None:
            flags |= FLAG_TIME_UNSYNCED
            ts = self.uptime_ms() - age  # rebased by the uploader once the clock is known
            if ts < 0:
                ts = 0
        else:
            ts = now - age
            self._check_clock()
        dropped = self.log.dropped
        seq = self.log.append(ts, button, flags, self._content_version)
        # Only now, with the vote in flash, does the visitor see the thank-you.
        self._activity = at_ticks
        self.board.set_led(button, True)
        self._lit |= 1 << (button - 1)
        self._feedback_at = ticks_ms()
        self._feedback_on = True
        self._update_display()
        if self.test_mode:
            self.board.show(("TEST MODE", "Button %d" % button))
        elif not self._blit("thanks"):
            self.board.show(THANKS)
        self.board.emit("vote", [seq, button, flags])
        if self.log.dropped != dropped:
            self.notify_health()  # the log was full: a segment was dropped
        self.uploader.notify()
        self._touched.set()
        return seq

    async def _buttons(self):
        while True:
            button, at = await self.board.next_press()
            self.record_press(button, at)

    def set_test_mode(self, on):
        """Enter (True) or leave (False) test mode."""
        on = bool(on)
        if on == self.test_mode:
            return
        self.test_mode = on
        self._activity = ticks_ms()
        self._update_display()  # test mode always lights the display
        self._show_idle()
        self.board.emit("test_mode", on)
        self.notify_health()
        self._touched.set()

    def _show_idle(self):
        if self.test_mode:
            self.board.show(TEST_SCREEN)
        elif not self._blit("question"):
            self.board.show(self.question)

    # -- content ------------------------------------------------------------------------------
    def apply_content(self, content):
        """Make ``content`` (a verified ``terminal.content.Content``) the one shown."""
        self.content = content
        self.content_version = content.version
        settings = dict(self._filter_base)
        for key in FILTER_SETTINGS:
            if key in content.settings:
                settings[key] = content.settings[key]
        self.filter.configure(**settings)
        size = self.board.display_width * self.board.display_height // 8
        if self._screen is None or len(self._screen) != size:
            self._screen = bytearray(size)
        self._lang = 0
        if content.show != "rotate":
            self._lang = content.languages.index(content.show)
        self.board.emit("content", content.version)
        self.notify_health()
        self._content_wake.set()
        if not self._feedback_on:
            self._show_idle()
        self._update_display()

    def language(self):
        """The language code on screen, or None with the built-in question."""
        return self.content.languages[self._lang] if self.content is not None else None

    def _blit(self, kind):
        """Show screen ``kind`` of the content in the current language; False if none."""
        content = self.content
        if content is None:
            return False
        lang = content.languages[self._lang]
        try:
            content.read_screen(kind, lang, self._screen)
        except (OSError, KeyError):
            self.board.emit("content_error", "cannot read %s/%s" % (kind, lang))
            return False
        self.board.blit(self._screen, "%s:%s:v%d" % (kind, lang, content.version))
        return True

    def display_state(self):
        """``(mode, brightness)`` the display should have now: on during feedback; outside
        opening hours the package's ``outside``; else its ``idle`` setting."""
        content = self.content
        if content is None:
            return ("on", 255)
        brightness = content.settings.get("brightness", 255)
        if self._feedback_on or self.test_mode:
            return ("on", brightness)
        if not is_open(content.hours, self.board.time_ms()):
            return (content.hours["outside"], brightness)
        return (content.settings.get("idle", "on"), brightness)

    def _update_display(self):
        state = self.display_state()
        if state != self._display:
            self._display = state
            self.board.set_display(state[0], state[1])

    async def _content_screens(self):
        """Rotate languages every ``rotate_s`` and follow opening hours."""
        wake = self._content_wake
        rotated = ticks_ms()
        while True:
            wake.clear()
            content = self.content
            wait = self.hours_check_ms
            rotating = (content is not None and content.show == "rotate"
                        and len(content.languages) > 1)
            if rotating and content is not None:
                left = content.rotate_s * 1000 - ticks_diff(ticks_ms(), rotated)
                if left < wait:
                    wait = left if left > 0 else 1
            await _wait(wake, wait)
            if wake.is_set():
                rotated = ticks_ms()  # new content: start the rotation over
                continue
            self._update_display()
            if (rotating and self.content is content and content is not None
                    and ticks_diff(ticks_ms(), rotated) >= content.rotate_s * 1000):
                rotated = ticks_ms()
                self._lang = (self._lang + 1) % len(content.languages)
                if not self._feedback_on and not self.test_mode:
                    self._show_idle()

    def _end_feedback(self):
        self._feedback_on = False
        self._update_display()
        lit = self._lit
        self._lit = 0
        button = 1
        while lit:
            if lit & 1:
                self.board.set_led(button, False)
            lit >>= 1
            button += 1
        self._show_idle()

    async def _panel(self):
        """Feedback timeout, the test-mode chord (buttons 1 and N held) and its idle timeout."""
        held = getattr(self.board, "held", None)
        chord = 1 | 1 << (self.board.buttons - 1)
        touched = self._touched
        while True:
            touched.clear()
            now = ticks_ms()
            if self._feedback_on and ticks_diff(now, self._feedback_at) >= self.feedback_ms:
                self._end_feedback()
            if self.test_mode and ticks_diff(now, self._activity) >= self.test_idle_ms:
                self.set_test_mode(False)
            mask = held() if held is not None else 0
            if mask == chord:
                if not self._chord_on:
                    self._chord_on = True
                    self._chord_since = now
                elif (self._chord_armed
                      and ticks_diff(now, self._chord_since) >= self.test_hold_ms):
                    self._chord_armed = False  # let go before the chord can toggle again
                    self.set_test_mode(not self.test_mode)
                    touched.clear()
            else:
                self._chord_on = False
                self._chord_armed = True
            wait = self.poll_ms if mask else -1
            if self._feedback_on:
                left = self.feedback_ms - ticks_diff(now, self._feedback_at)
                if wait < 0 or left < wait:
                    wait = left
            if self.test_mode:
                left = self.test_idle_ms - ticks_diff(now, self._activity)
                if wait < 0 or left < wait:
                    wait = left
            if wait < 0:
                await touched.wait()
            else:
                await _wait(touched, wait if wait > 0 else 1)

    # -- health -----------------------------------------------------------------------------
    def health(self):
        """The health payload (protocol v1)."""
        return {
            "ts_ms": self.board.time_ms(), "uptime_s": self.uptime_ms() // 1000,
            "heap_free": self.board.heap_free(), "rssi": self.board.rssi(),
            "battery_mv": self.board.battery_mv(), "queue": self.log.pending,
            "fw": FW_VERSION, "content_version": self._content_version,
            "reset_cause": self.board.reset_cause, "reconnects": self.link.reconnects,
            "dropped": self.log.dropped, "corrupt": self.log.corrupt,
            "resends": self.uploader.resends, "test_mode": self.test_mode,
        }

    def notify_health(self):
        """Ask for a prompt health report (sent at most once per ``health_debounce_ms``)."""
        self._notable = True
        self._health_wake.set()

    def _health_due_ms(self):
        """Milliseconds until the next health report is due; <= 0: now."""
        if not self._health_sent:
            return 0
        since = ticks_diff(ticks_ms(), self._health_at)
        due = self.config["health_interval_s"] * 1000 - since
        if self._notable:
            soon = self.health_debounce_ms - since
            if soon < due:
                due = soon
        return due

    async def _health(self):
        wake = self._health_wake
        while True:
            wake.clear()
            self.uptime_ms()  # keep the uptime accumulating across ticks wrap-arounds
            self._check_clock()
            due = self._health_due_ms()
            if due <= 0 and self.link.up.is_set():
                self._notable = False
                self._health_at = ticks_ms()
                self._health_sent = True
                try:
                    await self.client.publish(self.prefix + "health",
                                              json.dumps(self.health()).encode(), 0)
                except OSError:
                    pass  # link down; reconnecting asks for a report again
                continue
            wait = self.clock_poll_ms if not self._synced else self.housekeeping_ms
            if 0 < due < wait:
                wait = due
            await _wait(wake, wait)  # link up, an event, or time

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self):
        """Run every task until ``stop`` is called."""
        self._show_idle()
        self._update_display()
        self._tasks = [asyncio.create_task(c) for c in
                       (self.link.run(), self.uploader.run(), self._buttons(), self._panel(),
                        self._health(), self.updater.run(), self._content_screens())]
        self.board.emit("ready", self.log.last_seq)
        try:
            await asyncio.gather(*self._tasks)
        except asyncio.CancelledError:
            pass

    def stop(self):
        """Cancel every task (clean shutdown, e.g. in the simulator)."""
        self.uploader.stop()
        self.link.stop()
        for task in self._tasks:
            task.cancel()
