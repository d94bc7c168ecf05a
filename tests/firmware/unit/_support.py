"""Helpers for firmware unit tests that run under both MicroPython and CPython.

Only the common subset of both interpreters is used here: no pytest, no tempfile, no pathlib.
"""

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
