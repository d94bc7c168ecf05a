"""The terminal application: one task per concern, hardware passed in as ``board``.

Tasks: buttons (press → flash → visitor feedback), the MQTT link, the vote uploader and health
reports.  A press never waits for the network: it is appended to the flash log and then
acknowledged to the visitor; uploading is the uploader's job.
"""

import asyncio
import json

from terminal import FW_VERSION
from terminal.clock import ticks_diff, ticks_ms
from terminal.link import Link
from terminal.mqtt import MQTTClient
from terminal.uploader import Uploader
from terminal.votelog import VoteLog

FLAG_FILTERED = 1
FLAG_TIME_UNSYNCED = 2
THANKS = ("Kiitos!", "Thank you!")
DEFAULT_QUESTION = ("How was your visit?",)


class Terminal:
    """A feedback terminal running on ``board`` with validated ``config``."""

    def __init__(self, board, config):
        self.board = board
        self.config = config
        self.device_id = config["device_id"]
        self.prefix = "%s/d/%s/" % (config["topic_root"], self.device_id)
        self.content_version = 0
        self.log = VoteLog(board.storage("votes"))
        mqtt = config["mqtt"]
        self.client = MQTTClient(
            self.device_id, board.open_connection, user=mqtt["user"],
            password=mqtt["password"], keepalive_s=config["keepalive_s"],
            will=(self.prefix + "status", b'{"online":false}', 1, True),
            on_message=self._on_message)
        self.link = Link(
            self.client,
            subscriptions=[(self.prefix + "ack", 1), (self.prefix + "desired", 1),
                           (self.prefix + "cmd", 1)],
            birth=(self.prefix + "status", self._status_payload, 1, True),
            on_up=lambda: board.emit("link", True),
            on_down=lambda: board.emit("link", False))
        self.uploader = Uploader(
            self.log, self.link.up, self.client.publish, self.prefix + "votes",
            batch_max=config["batch_max"], ack_timeout_s=config["ack_timeout_s"],
            on_event=board.emit)
        self._last_counted = None
        self._boot_ticks = ticks_ms()
        self._tasks = []

    def _status_payload(self):
        return json.dumps({"online": True, "fw": FW_VERSION,
                           "ts_ms": self.board.time_ms()}).encode()

    # -- messages from the fleet ------------------------------------------------------------
    def _on_message(self, topic, payload):
        leaf = topic[len(self.prefix):] if topic.startswith(self.prefix) else ""
        if leaf != "ack":
            return  # desired/cmd are handled by later features
        try:
            data = json.loads(payload)
            seq = data["seq"]
            now = data.get("now_ms")
        except (ValueError, KeyError, TypeError):
            self.board.emit("bad_ack", None)
            return
        if isinstance(now, int) and now > 0:
            self.board.set_time_ms(now)  # the fleet's clock corrects drift on every ack
        if isinstance(seq, int):
            self.uploader.on_ack(seq)

    # -- buttons ----------------------------------------------------------------------------
    def record_press(self, button, at_ticks):
        """Store one press in flash, then acknowledge it to the visitor; returns the seq."""
        flags = 0
        gap = self.config["min_gap_ms"]
        if self._last_counted is not None and ticks_diff(at_ticks, self._last_counted) < gap:
            flags |= FLAG_FILTERED  # kept, flagged: reports show raw and filtered counts
        else:
            self._last_counted = at_ticks
        now = self.board.time_ms()
        if now is None:
            flags |= FLAG_TIME_UNSYNCED
            now = at_ticks
        seq = self.log.append(now, button, flags, self.content_version)
        # Only now, with the vote in flash, does the visitor see the thank-you.
        self.board.set_led(button, True)
        self.board.show(THANKS)
        self.board.emit("vote", [seq, button, flags])
        self.uploader.notify()
        return seq

    async def _buttons(self):
        while True:
            button, at = await self.board.next_press()
            self.record_press(button, at)

    # -- health -----------------------------------------------------------------------------
    def health(self):
        """The health payload (protocol v1)."""
        uptime_s = ticks_diff(ticks_ms(), self._boot_ticks) // 1000
        return {
            "ts_ms": self.board.time_ms(), "uptime_s": uptime_s,
            "heap_free": self.board.heap_free(), "rssi": self.board.rssi(),
            "battery_mv": self.board.battery_mv(), "queue": self.log.pending,
            "fw": FW_VERSION, "content_version": self.content_version,
            "reset_cause": self.board.reset_cause, "reconnects": self.link.reconnects,
            "dropped": self.log.dropped, "resends": self.uploader.resends,
        }

    async def _health(self):
        while True:
            await self.link.up.wait()
            try:
                await self.client.publish(self.prefix + "health",
                                          json.dumps(self.health()).encode(), 0)
            except OSError:
                pass  # link down; the next report goes out after reconnect
            await asyncio.sleep(self.config["health_interval_s"])

    # -- lifecycle --------------------------------------------------------------------------
    async def run(self):
        """Run every task until ``stop`` is called."""
        self.board.show(DEFAULT_QUESTION)
        self._tasks = [asyncio.create_task(c) for c in
                       (self.link.run(), self.uploader.run(), self._buttons(), self._health())]
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
