"""Upload policy: stop-and-wait batches, trim on ack, resend on timeout or link loss."""

import asyncio
import json

from terminal.uploader import Uploader


class FakeLog:
    """In-memory stand-in for VoteLog with the same interface the uploader uses."""

    def __init__(self, n):
        self.votes = [(s, 1000 + s, 1, 0, 0) for s in range(1, n + 1)]
        self.acked_seq = 0

    @property
    def pending(self):
        return len(self.votes)

    def each(self, max_n, take):
        taken = 0
        for vote in self.votes[:max_n]:
            if not take(*vote):
                break
            taken += 1
        return taken

    def ack(self, seq):
        self.votes = [v for v in self.votes if v[0] > seq]
        self.acked_seq = seq


class Wire:
    """Collects published payloads; can fail like a dropped link."""

    def __init__(self):
        self.sent = []
        self.fail_next = 0
        self.published = asyncio.Event()

    async def publish(self, topic, payload, qos):
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("link down")
        self.sent.append((topic, json.loads(bytes(payload)), qos))
        self.published.set()

    async def next(self):
        await asyncio.wait_for(self.published.wait(), 5)
        self.published.clear()
        return self.sent[-1]


def make(n, **kw):
    up = asyncio.Event()
    up.set()
    wire = Wire()
    log = FakeLog(n)
    return Uploader(log, up, wire.publish, "fb/v1/d/pt-0123456789ab/votes", **kw), log, wire


def test_batches_wait_for_ack_and_trim():
    async def main():
        up, log, wire = make(120, batch_max=50, ack_timeout_s=5)
        task = asyncio.create_task(up.run())
        topic, first, qos = await wire.next()
        assert qos == 1 and topic.endswith("/votes")
        assert [v[0] for v in first["votes"]] == list(range(1, 51))
        assert first["after"] == 0
        up.on_ack(50)
        _, second, _ = await wire.next()
        assert second["votes"][0][0] == 51 and second["after"] == 50
        assert len(wire.sent) == 2  # nothing more until the ack arrives
        up.on_ack(100)
        _, third, _ = await wire.next()
        assert len(third["votes"]) == 20
        up.on_ack(120)
        up.stop()
        await asyncio.wait_for(task, 5)
        assert log.pending == 0
    asyncio.run(main())


def test_resends_same_batch_after_ack_timeout():
    async def main():
        up, _, wire = make(3, ack_timeout_s=0.05)
        task = asyncio.create_task(up.run())
        _, a, _ = await wire.next()
        _, b, _ = await wire.next()  # no ack: the same votes again
        assert a == b
        assert up.resends >= 1
        up.on_ack(3)
        up.stop()
        await asyncio.wait_for(task, 5)
    asyncio.run(main())


def test_link_failure_retries_and_new_votes_wake_the_uploader():
    async def main():
        up, log, wire = make(0, ack_timeout_s=5)
        wire.fail_next = 1
        task = asyncio.create_task(up.run())
        await asyncio.sleep(0)
        log.votes.append((1, 5, 2, 0, 0))
        up.notify()
        _, payload, _ = await wire.next()  # first publish failed, second went out
        assert payload["votes"] == [[1, 5, 2, 0, 0]]
        up.on_ack(1)
        up.stop()
        await asyncio.wait_for(task, 5)
    asyncio.run(main())


def test_stale_ack_does_not_move_backwards():
    async def main():
        up, log, _ = make(5)
        up.on_ack(3)
        up.on_ack(2)
        assert log.acked_seq == 3 and log.pending == 2
    asyncio.run(main())


def test_failed_publish_while_link_looks_up_does_not_starve_other_tasks():
    # The MQTT client fails at once after its session died, before the link task has run
    # and cleared `up`: the uploader must yield instead of retrying in a tight loop.
    async def main():
        up, _, _ = make(3, ack_timeout_s=5)
        up.retry_pause_s = 0.01
        attempts = [0]

        async def failing(topic, payload, qos):
            attempts[0] += 1
            raise OSError(107)

        up.publish = failing
        ticks = [0]

        async def other_task():
            while ticks[0] < 5:
                ticks[0] += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(up.run())
        await asyncio.wait_for(other_task(), 2)  # would time out if the uploader spun
        up.stop()
        task.cancel()
        assert ticks[0] == 5
        assert 1 <= attempts[0] <= 20
    asyncio.run(main())


def test_reconnect_resends_the_batch_in_flight_without_waiting_for_the_timeout():
    async def main():
        up, _, wire = make(2, ack_timeout_s=30)
        task = asyncio.create_task(up.run())
        _, first, _ = await wire.next()
        up.link_up()  # the old session died with the ack; a new one is up
        _, again, _ = await wire.next()  # well before the 30 s ack timeout
        assert again == first
        up.on_ack(2)
        up.stop()
        await asyncio.wait_for(task, 5)
    asyncio.run(main())


def test_payload_is_byte_for_byte_what_json_dumps_writes():
    # The fleet parses the payload with a JSON parser, but byte equality with the standard
    # encoder (same separators under CPython and MicroPython) proves the hand encoder right.
    up, log, _ = make(0, batch_max=50)
    votes = [(1, 0, 1, 0, 0), (4294967295, (1 << 48) - 1, 7, 31, 65535),
             (10, 1700000000123, 3, 2, 9)] + [(100 + n, 1000 + n, 1 + n % 5, n % 8, n)
                                             for n in range(47)]
    log.acked_seq = 1234567
    for batch in (votes[:1], votes[:3], votes):
        expected = json.dumps({"votes": [list(v) for v in batch], "after": 1234567}).encode()
        assert up.encode(batch) == expected


def test_a_full_batch_of_the_widest_votes_fits_the_buffer():
    up, log, _ = make(0, batch_max=50)
    log.acked_seq = 4294967295
    widest = [(4294967295, (1 << 48) - 1, 7, 31, 65535)] * 50
    assert json.loads(up.encode(widest))["votes"][49] == list(widest[0])


def test_writing_a_vote_into_the_payload_allocates_nothing():
    import micropython

    up, _, _ = make(0, batch_max=50)
    up.begin(True)
    take = up._take
    if hasattr(micropython, "heap_lock"):  # MicroPython: prove it with the heap locked
        micropython.heap_lock()
        try:
            for n in range(50):
                take(n + 1, 1700000000123 + n, 1 + n % 5, 0, 7)
        finally:
            micropython.heap_unlock()
    else:  # CPython: the same calls, for the payload's sake
        for n in range(50):
            take(n + 1, 1700000000123 + n, 1 + n % 5, 0, 7)
    assert len(json.loads(bytes(up.finish()))["votes"]) == 50
