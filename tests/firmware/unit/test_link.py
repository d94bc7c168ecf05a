"""Reconnect policy of ``terminal.link``: backoff, resubscribe and birth after every connect.

The broker is an in-memory fake speaking just enough MQTT to answer the real ``MQTTClient``;
a test awaits its state changes (``until``) rather than sleeping.
"""

import asyncio

from _support import BrokerStream
from terminal.link import Link, uniform
from terminal.mqtt import MQTTClient

STATUS = "fb/v1/d/pt-1/status"
SUBS = [("fb/v1/d/pt-1/ack", 1), ("fb/v1/d/pt-1/cmd", 0)]


class Signal:
    """Something a test can wait on: ``fire()`` wakes every ``until(predicate)``."""

    def __init__(self):
        self.event = asyncio.Event()

    def fire(self):
        self.event.set()

    async def until(self, predicate, timeout=3):
        while not predicate():
            self.event.clear()
            await asyncio.wait_for(self.event.wait(), timeout)


def split(packet):
    """``(first byte, body)`` of one whole MQTT packet."""
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[0], packet[i + 1:]


class FakeBroker(Signal):
    """Accepts connections from ``open_connection``; records what each session sent.

    ``refuse`` makes the next N attempts fail like an unreachable host; ``connack`` holds
    return codes for the next CONNACKs (0 = accept); topics in ``deny`` get SUBACK 0x80.
    """

    def __init__(self):
        super().__init__()
        self.refuse = 0
        self.connack = []
        self.deny = ()
        self.attempts = 0
        self.sessions = []  # one list of ("sub", topic, qos) / ("pub", topic, payload, ...)
        self.streams = []
        self.tasks = []

    async def open_connection(self):
        self.attempts += 1
        self.fire()
        if self.refuse:
            self.refuse -= 1
            raise OSError(113, "no route to host")
        s = BrokerStream()
        self.streams.append(s)
        self.tasks.append(asyncio.create_task(self._serve(s)))
        return s, s

    def cut(self):
        """The current connection drops (broker restart, Wi-Fi loss)."""
        self.streams[-1].hangup()

    async def _serve(self, s):
        log = []
        try:
            while True:
                kind, body = split(await s.packet(timeout=30))
                if kind == 0x10:
                    rc = self.connack.pop(0) if self.connack else 0
                    if not rc:
                        self.sessions.append(log)
                    s.feed(bytes((0x20, 2, 0, rc)))
                elif kind == 0x82:
                    topic = body[4:-1].decode()
                    log.append(("sub", topic, body[-1]))
                    s.feed(b"\x90\x03" + body[:2] + (b"\x80" if topic in self.deny else b"\x01"))
                elif kind & 0xF0 == 0x30:
                    qos, n = kind >> 1 & 3, body[0] << 8 | body[1]
                    start = 2 + n + (2 if qos else 0)
                    log.append(("pub", body[2:2 + n].decode(), body[start:], qos, kind & 1))
                    if qos:
                        s.feed(b"\x40\x02" + body[2 + n:start])
                elif kind == 0xC0:
                    s.feed(b"\xd0\x00")
                elif kind == 0xE0:
                    log.append(("disconnect",))
                self.fire()
        except OSError:
            self.fire()  # the client closed the connection


class Hooks(Signal):
    """``on_up``/``on_down`` callbacks counting their calls."""

    def __init__(self):
        super().__init__()
        self.ups = self.downs = 0

    def on_up(self):
        self.ups += 1
        self.fire()

    def on_down(self):
        self.downs += 1
        self.fire()


def make(broker, hooks=None, cls=Link, **kw):
    """A Link with a real MQTTClient connected to ``broker``; backoff shrunk for tests."""
    client = MQTTClient("pt-1", broker.open_connection, keepalive_s=0, timeout_s=2)
    kw.setdefault("backoff_min_s", 0.001)
    kw.setdefault("backoff_max_s", 0.01)
    kw.setdefault("birth", (STATUS, b'{"online":true}', 1, True))
    if hooks:
        kw.update(on_up=hooks.on_up, on_down=hooks.on_down)
    return cls(client, subscriptions=SUBS, **kw)


async def finish(link, task):
    link.stop()
    await asyncio.wait_for(task, 2)  # run() returns once stopped


# -- backoff ----------------------------------------------------------------------------------
def test_backoff_grows_doubles_and_is_capped():
    link = Link(MQTTClient("c", None), random=lambda: 0.5)
    assert [link.backoff_s(k) for k in range(11)] == [
        0.5, 1, 2, 4, 8, 16, 32, 64, 128, 150, 150]  # ceilings 1, 2, 4 ... 256, then 300
    assert link.backoff_s(10000) == 150  # no huge ints for a long outage
    link = Link(MQTTClient("c", None), random=lambda: 0.5, backoff_min_s=0.5, backoff_max_s=4)
    assert [link.backoff_s(k) for k in range(6)] == [0.25, 0.5, 1, 2, 2, 2]
    assert Link.backoff_min_s == 1 and Link.backoff_max_s == 300


def test_backoff_is_jittered_within_bounds():
    script = [0.1, 0.9, 0.3, 0.0, 0.75]
    link = Link(MQTTClient("c", None), random=lambda: script.pop(0))
    delays = [link.backoff_s(k) for k in range(5)]
    assert delays == [0.1, 1.8, 1.2, 0.0, 12.0]  # full jitter: uniform(0, ceiling)
    link = Link(MQTTClient("c", None))  # the default random source
    for k in range(12):
        ceiling = min(300, 1 << k)
        for _ in range(20):
            assert 0 <= link.backoff_s(k) < ceiling
    samples = [uniform() for _ in range(200)]
    assert min(samples) >= 0 and max(samples) < 1 and len(set(samples)) > 150


class Recording(Link):
    """Records which attempt number each backoff was asked for, and never waits."""

    asked = None

    def backoff_s(self, attempt):
        if self.asked is None:
            self.asked = []
        self.asked.append(attempt)
        return 0


def test_failed_attempts_back_off_more_and_reset_after_a_stable_session():
    async def main():
        broker, hooks = FakeBroker(), Hooks()
        broker.refuse = 2  # unreachable twice,
        broker.connack = [5]  # then refused (not authorised), then accepted
        link = make(broker, hooks, cls=Recording)
        task = asyncio.create_task(link.run())
        await hooks.until(lambda: hooks.ups == 1)
        assert link.asked == [0, 1, 2] and broker.attempts == 4
        assert link.last_error.code == 5
        broker.cut()  # a session much shorter than stable_s: no reset
        await hooks.until(lambda: hooks.ups == 2)
        assert link.asked == [0, 1, 2, 3]
        link.stable_s = 0  # every session now counts as stable
        broker.cut()
        await hooks.until(lambda: hooks.ups == 3)
        assert link.asked == [0, 1, 2, 3, 0]
        await finish(link, task)
    asyncio.run(main())


# -- what happens on every connect ------------------------------------------------------------
def test_subscribes_then_publishes_birth_then_reports_up():
    async def main():
        broker, hooks = FakeBroker(), Hooks()
        link = make(broker, hooks)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.up.wait(), 3)
        assert broker.sessions == [[("sub", "fb/v1/d/pt-1/ack", 1),
                                    ("sub", "fb/v1/d/pt-1/cmd", 0),
                                    ("pub", STATUS, b'{"online":true}', 1, 1)]]
        assert hooks.ups == 1 and hooks.downs == 0 and link.reconnects == 0
        await finish(link, task)
        assert not link.up.is_set() and hooks.downs == 1
        await broker.until(lambda: broker.tasks[0].done())
        assert broker.streams[0].closed and len(broker.sessions[0]) == 3  # no DISCONNECT
    asyncio.run(main())


def test_reconnect_resubscribes_and_publishes_a_fresh_birth():
    async def main():
        broker, hooks = FakeBroker(), Hooks()
        births = []

        def birth_payload():
            births.append(1)
            return ('{"online":true,"n":%d}' % len(births)).encode()

        link = make(broker, hooks, birth=(STATUS, birth_payload, 1, True))
        task = asyncio.create_task(link.run())
        await hooks.until(lambda: hooks.ups == 1)
        broker.cut()
        await hooks.until(lambda: hooks.downs == 1)
        assert not link.up.is_set()
        await hooks.until(lambda: hooks.ups == 2)
        assert link.up.is_set() and link.reconnects == 1 and len(broker.sessions) == 2
        assert broker.sessions[1] == [("sub", "fb/v1/d/pt-1/ack", 1),
                                      ("sub", "fb/v1/d/pt-1/cmd", 0),
                                      ("pub", STATUS, b'{"online":true,"n":2}', 1, 1)]
        await link.publish("fb/v1/d/pt-1/votes", b"[]", 1)  # goes out on the new session
        assert broker.sessions[1][-1] == ("pub", "fb/v1/d/pt-1/votes", b"[]", 1, 0)
        await finish(link, task)
    asyncio.run(main())


def test_refused_subscription_is_recorded_and_the_link_stays_up():
    async def main():
        broker = FakeBroker()
        broker.deny = ("fb/v1/d/pt-1/cmd",)
        link = make(broker)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.up.wait(), 3)
        assert link.refused == ["fb/v1/d/pt-1/cmd"] and link.client.connected
        assert broker.sessions[0][-1][0] == "pub"  # the birth still went out
        await finish(link, task)
    asyncio.run(main())


def test_factory_makes_a_client_per_attempt():
    async def main():
        broker = FakeBroker()
        clients = []

        def factory():
            clients.append(MQTTClient("pt-1", broker.open_connection, keepalive_s=0))
            return clients[-1]

        link = Link(factory, subscriptions=SUBS, backoff_min_s=0.001, backoff_max_s=0.01)
        task = asyncio.create_task(link.run())
        await asyncio.wait_for(link.up.wait(), 3)
        broker.cut()
        await broker.until(lambda: len(broker.sessions) == 2 and len(broker.sessions[1]) == 2)
        await asyncio.wait_for(link.up.wait(), 3)
        assert len(clients) == 2 and link.client is clients[1] and not clients[0].connected
        await finish(link, task)
    asyncio.run(main())


def test_stop_while_backing_off_returns_promptly():
    async def main():
        broker = FakeBroker()
        broker.refuse = 1000
        link = make(broker, backoff_min_s=100, backoff_max_s=100, random=lambda: 0.5)
        task = asyncio.create_task(link.run())
        await broker.until(lambda: broker.attempts == 1)
        await finish(link, task)  # would take ~50 s if the backoff sleep were not cancelled
        assert broker.attempts == 1 and link.last_error.errno == 113
        link.stop()  # idempotent
    asyncio.run(main())
