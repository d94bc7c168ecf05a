"""Helpers for firmware unit tests that run under both MicroPython and CPython.

Only the common subset of both interpreters is used here: no pytest, no tempfile, no pathlib.
"""

import asyncio
import os

_counter = [0]


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def tempdir(prefix="t"):
    """Create and return a fresh, empty directory under ``$PALAUTE_TEST_TMP`` (or /tmp)."""
    base = os.getenv("PALAUTE_TEST_TMP") or "/tmp"
    seed = int.from_bytes(os.urandom(4), "little")
    while True:
        _counter[0] += 1
        path = "%s/%s-%08x-%d" % (base, prefix, seed, _counter[0])
        if not _exists(path):
            os.mkdir(path)
            return path


def raises(exc_type, fn, *args):
    """Call ``fn(*args)`` and return the exception; fail if ``exc_type`` was not raised."""
    try:
        fn(*args)
    except exc_type as exc:
        return exc
    raise AssertionError("%s not raised" % exc_type.__name__)


async def araises(exc_type, awaitable):
    """Await ``awaitable`` and return the exception; fail if ``exc_type`` was not raised."""
    try:
        await awaitable
    except exc_type as exc:
        return exc
    raise AssertionError("%s not raised" % exc_type.__name__)


class MemoryStream:
    """An in-memory duplex stream with the asyncio Stream subset the firmware uses.

    ``feed`` queues bytes to be read; everything written is collected in ``written``.
    Reading past the fed data raises ``OSError`` (as a dropped link does on the device)
    unless ``block`` is set, in which case the read waits for more data.
    """

    def __init__(self, data=b""):
        self.incoming = bytearray(data)
        self.written = bytearray()
        self.closed = False

    def feed(self, data):
        self.incoming.extend(data)

    async def readexactly(self, n):
        if len(self.incoming) < n:
            raise OSError("stream exhausted")
        chunk = bytes(self.incoming[:n])
        self.incoming = self.incoming[n:]
        return chunk

    async def read(self, n=-1):
        if not self.incoming:
            return b""
        if n < 0:
            n = len(self.incoming)
        chunk = bytes(self.incoming[:n])
        self.incoming = self.incoming[n:]
        return chunk

    def write(self, data):
        if self.closed:
            raise OSError("closed")
        self.written.extend(data)

    async def drain(self):
        if self.closed:
            raise OSError("closed")

    def close(self):
        self.closed = True

    async def wait_closed(self):
        pass


class BrokerStream(MemoryStream):
    """A ``MemoryStream`` whose far end is a test playing the broker.

    Reads wait until enough bytes are fed (like a live socket), end with ``EOFError`` after
    ``hangup()`` (the broker closed the connection) and with ``OSError`` once the client
    closed the stream.  ``packet()`` awaits the next whole MQTT packet the client wrote.
    """

    def __init__(self, data=b""):
        super().__init__(data)
        self.eof = False
        self.stall = False  # True: drain() never returns, like a send buffer that stays full
        self.taken = 0  # bytes of ``written`` already returned by take()/packet()
        self._fed = asyncio.Event()
        self._wrote = asyncio.Event()

    def feed(self, data):
        super().feed(data)
        self._fed.set()

    def hangup(self):
        """The broker closes the connection: pending and later reads raise EOFError."""
        self.eof = True
        self._fed.set()

    async def readexactly(self, n):
        while len(self.incoming) < n:
            if self.closed:
                raise OSError("stream closed")
            if self.eof:
                raise EOFError
            self._fed.clear()
            await self._fed.wait()
        return await super().readexactly(n)

    def write(self, data):
        super().write(data)
        self._wrote.set()

    async def drain(self):
        await super().drain()
        if self.stall:
            await asyncio.Event().wait()

    def close(self):
        self.closed = True
        self._fed.set()
        self._wrote.set()

    async def take(self, n, timeout=2):
        """Wait (at most ``timeout`` s) for ``n`` more written bytes and return them.

        Raises OSError if the client closes the stream before writing them.
        """
        while len(self.written) - self.taken < n:
            if self.closed:
                raise OSError("stream closed")
            self._wrote.clear()
            await asyncio.wait_for(self._wrote.wait(), timeout)
        chunk = bytes(self.written[self.taken:self.taken + n])
        self.taken += n
        return chunk

    async def packet(self, timeout=2):
        """Wait for the next complete MQTT packet written by the client; return its bytes."""
        head = await self.take(2, timeout)
        length, shift, last = head[1] & 0x7F, 7, head[1]
        while last & 0x80:
            last = (await self.take(1, timeout))[0]
            head += bytes((last,))
            length |= (last & 0x7F) << shift
            shift += 7
        return head + await self.take(length, timeout)

    def unread(self):
        """Written bytes not yet taken by the test."""
        return bytes(self.written[self.taken:])

