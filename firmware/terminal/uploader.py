"""Vote upload policy: drain the flash log in batches, stop-and-wait on the fleet's ``ack``.

One batch is in flight at a time.  It stays in flash until an ``ack`` covers it; without an
ack within ``ack_timeout_s`` (or after a reconnect) the same batch is sent again, which the
fleet stores once.  Stop-and-wait keeps the protocol's contiguity claim (``after``) true and
costs nothing that matters: a terminal produces far fewer than 50 votes per round trip.
"""

import asyncio
import json


class Uploader:
    """Moves votes from a ``VoteLog`` to the fleet.

    ``up`` is an Event set while the MQTT link is connected; ``publish`` is
    ``async publish(topic, payload, qos)`` that raises OSError when the link fails.
    """

    ack_timeout_s = 15

    def __init__(self, log, up, publish, topic, *, batch_max=50, ack_timeout_s=None,
                 on_event=None):
        self.log = log
        self.up = up
        self.publish = publish
        self.topic = topic
        self.batch_max = batch_max
        if ack_timeout_s is not None:
            self.ack_timeout_s = ack_timeout_s
        self.on_event = on_event
        self.new_vote = asyncio.Event()
        self.acked = asyncio.Event()
        self.sent_batches = 0
        self.resends = 0
        self._stop = False

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

    def encode(self, batch):
        """The ``votes`` payload for ``batch`` (protocol v1)."""
        return json.dumps({"votes": [list(v) for v in batch],
                           "after": self.log.acked_seq}).encode()

    async def run(self):
        """Upload forever (until ``stop``)."""
        while not self._stop:
            await self.up.wait()
            batch = self.log.batch(self.batch_max)
            if not batch:
                self.new_vote.clear()
                # Re-check after clearing: a vote appended in between must not be missed.
                if self.log.pending == 0:
                    await self.new_vote.wait()
                continue
            last = batch[-1][0]
            self.acked.clear()
            try:
                await self.publish(self.topic, self.encode(batch), 1)
            except OSError:
                continue  # link went down; wait for it to come back and send again
            self.sent_batches += 1
            del batch
            try:
                await asyncio.wait_for(self._until_acked(last), self.ack_timeout_s)
            except asyncio.TimeoutError:
                self.resends += 1

    async def _until_acked(self, seq):
        while self.log.acked_seq < seq:
            await self.acked.wait()
            self.acked.clear()

    def stop(self):
        """Ask ``run`` to finish."""
        self._stop = True
        self.new_vote.set()
