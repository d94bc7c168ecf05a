"""Drive ``terminal.mqtt``/``terminal.link`` under the real MicroPython against a broker.

Usage: micropython mqtt_probe.py MODE HOST PORT USER PASSWORD [BACKOFF_MIN_S BACKOFF_MAX_S]
(with MICROPYPATH pointing at the firmware directory).  Reports JSON lines on stdout, one
per event: ``{"e": name, ...}``.  Topics are under ``fb/v1/d/USER/``.

Modes:
- ``session``: connect with a retained will on ``status``, subscribe to ``cmd`` (QoS 1),
  report heap use, then echo every ``cmd`` message to ``echo`` with QoS 1.  The message
  ``bye`` disconnects cleanly and exits.
- ``refused``: connect and report the refusal code.
- ``link``: a ``Link`` with ``cmd`` subscribed and a retained birth on ``status``; reports
  ``up``/``down``/``msg`` events until it receives ``bye``.
"""

import asyncio
import gc
import json
import sys

# asyncio loads its submodules lazily; load them now so the heap figures below are ours alone.
_ = (asyncio.Event, asyncio.Lock, asyncio.wait_for, asyncio.open_connection)
gc.collect()
BASE = gc.mem_alloc()

# Imported after the baseline, to measure them.
from terminal.link import Link  # noqa: E402
from terminal.mqtt import MQTTClient, MQTTError  # noqa: E402

gc.collect()
IMPORTED = gc.mem_alloc()


def emit(name, **data):
    data["e"] = name
    print(json.dumps(data))


def opener(host, port):
    async def open_connection():
        return await asyncio.open_connection(host, port)

    return open_connection


async def session(client, prefix, done):
    emit("connected", session_present=await client.connect())
    granted = await client.subscribe(prefix + "cmd", 1)
    gc.collect()
    emit("ready", granted=granted, heap_import=IMPORTED - BASE, heap_session=gc.mem_alloc() - BASE)
    while True:
        _topic, payload = await done.get()
        if payload == b"bye":
            await client.disconnect()
            emit("bye")
            return
        await client.publish(prefix + "echo", payload, 1)
        emit("echoed", payload=payload.decode())


class Inbox:
    """Hands messages from the client's callback to the session coroutine."""

    def __init__(self):
        self.items = []
        self.event = asyncio.Event()

    def put(self, topic, payload):
        emit("msg", topic=topic, payload=payload.decode())
        self.items.append((topic, payload))
        self.event.set()

    async def get(self):
        while not self.items:
            self.event.clear()
            await self.event.wait()
        return self.items.pop(0)


async def main():
    mode, host, port, user, password = sys.argv[1:6]
    prefix = "fb/v1/d/%s/" % user
    inbox = Inbox()
    client = MQTTClient(user, opener(host, int(port)), user=user, password=password,
                        keepalive_s=30, will=(prefix + "status", b'{"online":false}', 1, True),
                        on_message=inbox.put, timeout_s=5)
    if mode == "session":
        await session(client, prefix, inbox)
    elif mode == "refused":
        try:
            await client.connect()
            emit("connected")
        except MQTTError as e:
            emit("refused", code=e.code)
    elif mode == "link":
        link = Link(client, subscriptions=[(prefix + "cmd", 1)],
                    birth=(prefix + "status", b'{"online":true}', 1, True),
                    on_up=lambda: emit("up", reconnects=link.reconnects),
                    on_down=lambda: emit("down", error=str(client.last_error)),
                    backoff_min_s=float(sys.argv[6]), backoff_max_s=float(sys.argv[7]))
        task = asyncio.create_task(link.run())
        while (await inbox.get())[1] != b"bye":
            pass
        link.stop()
        await task
        emit("bye")


asyncio.run(main())
