"""Keeps the terminal's MQTT session up forever: the reconnect policy, apart from the protocol.

- Reconnect with exponential backoff and full jitter: before attempt ``k`` (0-based, counting
  consecutive failures) wait ``uniform(0, min(backoff_max_s, backoff_min_s * 2**k))``.  Jitter
  spreads a fleet reconnecting after a broker restart.  The count only restarts once a session
  stayed up for ``stable_s``, so a broker that accepts and then drops us at once (ACL change,
  duplicate client id) still sees the delay grow instead of a tight loop.
- ``clean_session=True`` by default.  A persistent session would make the broker queue QoS 1
  messages while we are away, but it buys the terminal nothing: unacknowledged votes stay in
  flash and are re-sent by the uploader, acks are idempotent, subscriptions are re-made after
  every connect anyway, and a stale queue replayed into a just-booted device costs RAM.
- After every connect: re-subscribe everything, then publish the retained ``birth`` status
  (it replaces the retained will).  Only then is ``up`` set, so nothing is published before
  the replies to it (acks) can be received.  A subscription the broker refuses (ACL) cannot be
  healed by reconnecting: it is recorded in ``refused`` and the session stays up.
"""

import asyncio
from random import getrandbits

from terminal.clock import ticks_diff, ticks_ms
from terminal.mqtt import MQTTError


def uniform():
    """A random float in [0, 1) from ``getrandbits`` (all MicroPython ports have it)."""
    return getrandbits(24) / 16777216


class Link:
    """Owns an ``MQTTClient`` (or a zero-argument factory making one per connection attempt)
    and keeps it connected until ``stop()``.

    ``subscriptions`` is a list of ``(topic, qos)``; ``birth`` is ``(topic, payload, qos,
    retain)`` where ``payload`` may be a callable returning bytes (evaluated at each connect);
    ``on_up()``/``on_down()`` are plain callbacks; ``random()`` returns a float in [0, 1).
    """

    backoff_min_s = 1
    backoff_max_s = 300
    stable_s = 60

    def __init__(self, client, *, subscriptions=(), birth=None, on_up=None, on_down=None,
                 random=uniform, clean_session=True, backoff_min_s=None, backoff_max_s=None,
                 stable_s=None):
        self._factory = None if hasattr(client, "connect") else client
        self.client = None if self._factory else client
        self.subscriptions = list(subscriptions)
        self.birth = birth
        self.on_up = on_up
        self.on_down = on_down
        self.random = random
        self.clean_session = clean_session
        if backoff_min_s is not None:
            self.backoff_min_s = backoff_min_s
        if backoff_max_s is not None:
            self.backoff_max_s = backoff_max_s
        if stable_s is not None:
            self.stable_s = stable_s
        self.up = asyncio.Event()  # set while connected, subscribed and born
        self.reconnects = 0  # sessions established after the first one
        self.failures = 0  # consecutive attempts that did not lead to a stable session
        self.refused = []  # topics the broker refused to subscribe us to
        self.last_error = None  # the OSError that ended the last attempt or session
        self._sessions = 0
        self._up_at = ticks_ms()
        self._stopped = False
        self._task = None

    def backoff_s(self, attempt):
        """Seconds to wait before reconnect attempt ``attempt`` (0 = first after a loss)."""
        ceiling = min(self.backoff_max_s, self.backoff_min_s * (1 << min(attempt, 30)))
        return ceiling * self.random()

    async def run(self):
        """Keep the link up until ``stop()``; returns once stopped."""
        self._task = asyncio.create_task(self._loop())
        try:
            await self._task
        except asyncio.CancelledError:
            if not self._stopped:
                raise  # our caller was cancelled, not us stopped
        finally:
            if not self._task.done():
                self._task.cancel()

    async def _loop(self):
        while not self._stopped:
            try:
                await self._session()
            except OSError as e:  # refused (MQTTError), unreachable, or the session broke
                self.last_error = e
            up_ms = self._went_down()
            if self._stopped:
                break
            if up_ms is not None and up_ms >= self.stable_s * 1000:
                self.failures = 0
            delay = self.backoff_s(self.failures)
            self.failures += 1
            await asyncio.sleep(delay)

    async def _session(self):
        if self._factory:
            self.client = self._factory()
        c = self.client
        assert c is not None  # for the type checker: set in __init__ or just above
        try:
            await c.connect(self.clean_session)
            for topic, qos in self.subscriptions:
                try:
                    await c.subscribe(topic, qos)
                except MQTTError:
                    if topic not in self.refused:
                        self.refused.append(topic)
            if self.birth:
                topic, payload, qos, retain = self.birth
                await c.publish(topic, payload() if callable(payload) else payload, qos, retain)
        except OSError:
            c.close()  # a half-set-up session is no session: subscriptions or birth missing
            raise
        if self._sessions:
            self.reconnects += 1
        self._sessions += 1
        self._up_at = ticks_ms()
        self.up.set()
        self._notify(self.on_up)
        await c.wait_down()
        self.last_error = c.last_error

    def _went_down(self):
        # Clear ``up`` and tell on_down if the session had been up; return how long (ms).
        if not self.up.is_set():
            return None
        self.up.clear()
        self._notify(self.on_down)
        return ticks_diff(ticks_ms(), self._up_at)

    def _notify(self, callback):
        if callback:
            try:
                callback()
            except Exception:
                pass  # a display/LED hook failing must not stop the link from reconnecting

    async def publish(self, topic, payload, qos=0, retain=False):
        """Publish through the current client; OSError while the link is down."""
        if self.client is None:
            raise OSError(107, "mqtt not connected")
        await self.client.publish(topic, payload, qos, retain)

    def stop(self):
        """Stop reconnecting and drop the session (without DISCONNECT: the will fires)."""
        self._stopped = True
        task = self._task
        try:
            me = asyncio.current_task()
        except RuntimeError:
            me = None
        if task is not None and task is not me and not task.done():
            task.cancel()
        if self.client is not None:
            self.client.close()
        self._went_down()

    deinit = stop
