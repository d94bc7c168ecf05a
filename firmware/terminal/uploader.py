"""Vote upload policy: drain the flash log in batches, stop-and-wait on the fleet's ``ack``.

One batch is in flight at a time.  It stays in flash until an ``ack`` covers it; without an
ack within ``ack_timeout_s`` (or after a reconnect) the same batch is sent again, which the
fleet stores once.  Stop-and-wait keeps the protocol's contiguity claim (``after``) true and
costs nothing that matters: a terminal produces far fewer than 50 votes per round trip.

Rebasing presses made before the clock was set
----------------------------------------------
A press made while the wall clock is unknown is stored with flag bit 1 and, as ``ts_ms``, the
terminal's uptime in ms at the press (``uptime_ms``: ms since this boot's terminal started,
never wrapping).  Once ``wall_ms()`` returns a time, ``take`` rewrites such a vote's
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

from micropython import const

_UNSYNCED = const(2)  # flag bit 1: time not synced (ts_ms is the uptime at the press)
# Longest row: ", [4294967295, 281474976710655, 7, 31, 65535]" (seq u32, ts u48, ...).
_ROW_MAX = const(46)
_HEAD = b'{"votes": ['
_TAIL = b'], "after": '


def put(buf, i, data):
    """Copy the bytes ``data`` into ``buf`` at ``i``; return the index after them.  Byte by
    byte: a slice assignment would allocate a slice object."""
    for k in range(len(data)):
        buf[i + k] = data[k]
    return i + len(data)


def put_int(buf, i, n):
    """Write the non-negative int ``n`` in decimal into ``buf`` at ``i``; return the index
    after it.  No string is built (``str(n)`` would allocate one per field)."""
    p = 1
    while p * 10 <= n:
        p *= 10
    while p:
        buf[i] = 48 + n // p % 10
        p //= 10
        i += 1
    return i


def put_field(buf, i, n):
    """Write ``", "`` and the int ``n`` into ``buf`` at ``i``; return the index after."""
    buf[i] = 44  # ","
    buf[i + 1] = 32
    return put_int(buf, i + 2, n)


class Uploader:
    """Moves votes from a ``VoteLog`` to the fleet.

    ``up`` is an Event set while the MQTT link is connected; ``publish`` is
    ``async publish(topic, payload, qos)`` that raises OSError when the link fails; the
    payload it gets is a memoryview into the uploader's one payload buffer, valid until
    ``publish`` returns.  Rebasing (module docstring) needs ``wall_ms()`` (epoch ms or None
    while unknown), ``uptime_ms()`` and ``boot_seq``; without them votes are sent as stored.
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
        # The ``votes`` payload is written straight into this buffer, allocated once: a
        # batch's JSON needs no string, no list per vote and no heap block of its size
        # (that block, ~1.6 KB per batch, was what a small heap failed to find).
        self._out = bytearray(len(_HEAD) + batch_max * _ROW_MAX + len(_TAIL) + 11)
        self._out_mv = memoryview(self._out)
        self._at = 0  # bytes of the payload written so far
        self._rows = 0  # votes in it
        self._last = 0  # seq of the last vote in it
        self._wall = None  # wall_ms() while this payload is written (None: unknown)
        self._now = 0  # uptime_ms() then
        self._limit = False  # cut the batch while the clock is unknown (``take``)
        self._cut = False  # the next vote offered ends the batch
        self._take = self.take  # bound once: ``log.each`` calls it per vote

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

    def begin(self, limit):
        """Start a payload.  With ``limit`` (and the clock still unknown) ``take`` cuts the
        batch so that at most one vote of this boot that rebasing could still fix is sent
        (its ack brings the fleet's time)."""
        self._wall = self.wall_ms() if self.wall_ms is not None else None
        self._now = self.uptime_ms() if self.uptime_ms is not None else 0
        self._limit = limit and self.wall_ms is not None and self.uptime_ms is not None
        self._cut = False
        self._rows = 0
        self._at = put(self._out, 0, _HEAD)

    def take(self, seq, ts_ms, button, flags, version):
        """Append one vote to the payload (``VoteLog.each``'s callback); False: the batch
        ends before this vote.  This boot's unsynced presses are rebased onto the wall clock
        if it is known now."""
        if self._cut:
            return False
        if (self.boot_seq is not None and seq >= self.boot_seq
                and flags & _UNSYNCED != 0 and self.uptime_ms is not None):
            wall = self._wall
            if wall is not None:
                age = self._now - ts_ms
                if 0 <= age < wall:
                    ts_ms = wall - age  # flag bit 1 stays: an estimate
            elif self._limit:
                if self._rows:
                    return False  # send what comes before it first
                self._cut = True  # this one alone
        b = self._out
        i = self._at
        if self._rows:
            b[i] = 44  # ", " between rows
            b[i + 1] = 32
            i += 2
        b[i] = 91  # "["
        i = put_int(b, i + 1, seq)
        # Field by field, not a loop over a tuple: that would allocate one per vote.
        i = put_field(b, put_field(b, put_field(b, put_field(b, i, ts_ms), button), flags),
                      version)
        b[i] = 93  # "]"
        self._at = i + 1
        self._rows += 1
        self._last = seq
        return True

    def finish(self):
        """End the payload: ``after`` (every vote the terminal holds in (after, last] is in
        it, protocol v1) and the closing brace.  Returns a memoryview of the payload."""
        b = self._out
        i = put_int(b, put(b, self._at, _TAIL), self.log.acked_seq)
        b[i] = 125  # "}"
        return self._out_mv[:i + 1]

    def encode(self, batch):
        """The ``votes`` payload (protocol v1) for ``batch``, a list of vote tuples, as
        bytes; as ``run`` sends it, but without the clock-unknown cut.  For tests."""
        self.begin(False)
        for vote in batch:
            self.take(*vote)
        return bytes(self.finish())

    async def run(self):
        """Upload forever (until ``stop``)."""
        while not self._stop:
            await self.up.wait()
            self.begin(True)
            if not self.log.each(self.batch_max, self._take):
                self.new_vote.clear()
                # Re-check after clearing: a vote appended in between must not be missed.
                if self.log.pending == 0:
                    await self.new_vote.wait()
                continue
            last = self._last
            payload = self.finish()
            self.acked.clear()
            self._reconnected = False
            try:
                await self.publish(self.topic, payload, 1)
            except OSError:
                # The link went down: pause (see retry_pause_s), then wait for it to come
                # back and send again.
                await asyncio.sleep(self.retry_pause_s)
                continue
            self.sent_batches += 1
            del payload
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
