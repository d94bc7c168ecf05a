"""Vote upload policy: drain the flash log in batches, stop-and-wait on the fleet's ``ack``.

One batch is in flight at a time.  It stays in flash until an ``ack`` covers it; without an
ack within ``ack_timeout_s`` (or after a reconnect) the same batch is sent again, which the
fleet stores once.  Stop-and-wait keeps the protocol's contiguity claim (``after``) true and
costs nothing that matters: a terminal produces far fewer than 50 votes per round trip.

Rebasing presses made before the clock was set
----------------------------------------------
A press made while the wall clock is unknown is stored with flag bit 1 and, as ``ts_ms``, the
terminal's uptime in ms at the press (``uptime_ms``: ms since this boot's terminal started,
never wrapping).  Once ``wall_ms()`` returns a time, ``encode`` rewrites such a vote's
``ts_ms`` to ``wall_now - (uptime_now - ts_ms)`` at send time; flag bit 1 stays set, so the
fleet knows the time is an estimate.  Only votes of *this* boot can be rebased: an uptime
from an earlier boot means nothing now.  Seqs never repeat, so this boot's votes are exactly
those with ``seq >= boot_seq`` (the log's ``last_seq + 1`` when the terminal started); older
votes with flag bit 1 are sent unchanged.  While the clock is still unknown the uploader
sends at most one vote of this boot per message (votes of earlier boots go out in full
batches), so that the fleet's ``ack``, whose ``now_ms`` sets the clock, arrives before the
rest are sent: at most one vote per boot reaches the fleet with an uptime instead of a time.
"""

import asyncio
import json

from micropython import const

_UNSYNCED = const(2)  # flag bit 1: time not synced (ts_ms is the uptime at the press)


class Uploader:
    """Moves votes from a ``VoteLog`` to the fleet.

    ``up`` is an Event set while the MQTT link is connected; ``publish`` is
    ``async publish(topic, payload, qos)`` that raises OSError when the link fails.
    Rebasing (module docstring) needs ``wall_ms()`` (epoch ms or None while unknown),
    ``uptime_ms()`` and ``boot_seq``; without them votes are sent as stored.
    """

    ack_timeout_s = 15
    # Pause after a failed publish.  The MQTT client fails at once when its session just died,
    # but the link clears ``up`` only when its own task next runs: without a pause this loop
    # would retry without ever yielding and starve every other task (watchdog included).
    retry_pause_s = 0.1

    def __init__(self, log, up, publish, topic, *, batch_max=50, ack_timeout_s=None,
                 on_event=None, wall_ms=None, uptime_ms=None, boot_seq=None):
        self.log = log
        self.up = up
        self.publish = publish
        self.topic = topic
        self.batch_max = batch_max
        if ack_timeout_s is not None:
            self.ack_timeout_s = ack_timeout_s
        self.on_event = on_event
        self.wall_ms = wall_ms
        self.uptime_ms = uptime_ms
        self.boot_seq = boot_seq
        self.new_vote = asyncio.Event()
        self.acked = asyncio.Event()
        self.sent_batches = 0
        self.resends = 0
        self._stop = False
        self._reconnected = False

    def notify(self):
        """Wake the uploader: a vote was appended."""
        self.new_vote.set()

    def on_ack(self, seq):
        """Handle an ``ack`` from the fleet: drop everything up to ``seq`` from flash."""
        if seq > self.log.acked_seq:
            self.log.ack(seq)
            if self.on_event:
                self.on_event("acked", seq)
        self.acked.set()

    def _rebasable(self, vote):
        """True for a vote of this boot stored with its uptime instead of a time."""
        return (self.boot_seq is not None and vote[0] >= self.boot_seq
                and vote[3] & _UNSYNCED != 0)

    def limit(self, batch):
        """``batch`` cut so that, while the clock is unknown, at most one vote of this boot
        that rebasing could still fix is sent (its ack brings the fleet's time)."""
        if self.wall_ms is None or self.uptime_ms is None or self.wall_ms() is not None:
            return batch
        for i in range(len(batch)):
            if self._rebasable(batch[i]):
                return batch[:i] if i else batch[:1]
        return batch

    def encode(self, batch):
        """The ``votes`` payload for ``batch`` (protocol v1), this boot's unsynced presses
        rebased onto the wall clock if it is known now."""
        rows = [list(v) for v in batch]
        wall = self.wall_ms() if self.wall_ms is not None else None
        if wall is not None and self.uptime_ms is not None:
            up = self.uptime_ms()
            for row in rows:
                if self._rebasable(row):
                    age = up - row[1]
                    if 0 <= age < wall:
                        row[1] = wall - age  # flag bit 1 stays: an estimate
        return json.dumps({"votes": rows, "after": self.log.acked_seq}).encode()

    async def run(self):
        """Upload forever (until ``stop``)."""
        while not self._stop:
            await self.up.wait()
            batch = self.limit(self.log.batch(self.batch_max))
            if not batch:
                self.new_vote.clear()
                # Re-check after clearing: a vote appended in between must not be missed.
                if self.log.pending == 0:
                    await self.new_vote.wait()
                continue
            last = batch[-1][0]
            self.acked.clear()
            self._reconnected = False
            try:
                await self.publish(self.topic, self.encode(batch), 1)
            except OSError:
                # The link went down: pause (see retry_pause_s), then wait for it to come
                # back and send again.
                await asyncio.sleep(self.retry_pause_s)
                continue
            self.sent_batches += 1
            del batch
            try:
                await asyncio.wait_for(self._until_acked(last), self.ack_timeout_s)
            except asyncio.TimeoutError:
                self.resends += 1

    async def _until_acked(self, seq):
        while self.log.acked_seq < seq and not self._reconnected:
            await self.acked.wait()
            self.acked.clear()

    def link_up(self):
        """The link (re)connected: an ack for the batch in flight may have been lost with the
        old session, so stop waiting for it and send the batch again at once."""
        self._reconnected = True
        self.acked.set()

    def stop(self):
        """Ask ``run`` to finish."""
        self._stop = True
        self.new_vote.set()
