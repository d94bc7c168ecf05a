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



# -- content packages (docs/content.md) -------------------------------------------------------
def package_bytes(version, header, bitmaps, magic=b"PLC1", reserved=0, header_raw=None):
    """Assemble a package from a header dict and the bitmap area, for tests of the parser.

    Deliberately able to make broken packages (magic, reserved, raw header bytes), which the
    fleet's builder (fleet/content/package.py) refuses to produce; a CPython test checks
    that packages from that builder parse with the firmware's parser.
    """
    raw = header_raw if header_raw is not None else json_bytes(header)
    return (magic + version.to_bytes(2, "little") + reserved.to_bytes(2, "little")
            + len(raw).to_bytes(4, "little") + raw + bytes(bitmaps))


def json_bytes(value):
    import json

    return json.dumps(value).encode()


def screen(width, height, fill):
    """One MONO_VLSB screen of ``width`` x ``height`` filled with byte ``fill``."""
    return bytes([fill]) * (width * height // 8)


def simple_header(version, width=128, height=64, languages=("fi", "en"), **extra):
    """A valid header whose screens are laid out question-per-language then thanks."""
    size = width * height // 8
    n = len(languages)
    header = {"version": version, "display": {"w": width, "h": height},
              "languages": list(languages), "show": "rotate", "rotate_s": 8,
              "screens": {"question": {lang: i * size for i, lang in enumerate(languages)},
                          "thanks": {lang: (n + i) * size for i, lang in enumerate(languages)}},
              "settings": {}}
    header.update(extra)
    return header


def simple_package(version, width=128, height=64, languages=("fi", "en"), **extra):
    """A valid package; question screen i is filled with byte i + 1, thanks with 0x80 + i."""
    bitmaps = b"".join(screen(width, height, i + 1) for i in range(len(languages)))
    bitmaps += b"".join(screen(width, height, 0x80 + i) for i in range(len(languages)))
    return package_bytes(version, simple_header(version, width, height, languages, **extra),
                         bitmaps)


def ed25519_keypair(seed):
    """``(public_key, sign)`` for a 32-byte ``seed``: an RFC 8032 signer built on the
    firmware's point arithmetic (tests only; checked against ``cryptography`` in CPython)."""
    from terminal import ed25519 as ed

    digest = ed.sha512(seed)
    a = int.from_bytes(digest[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    prefix = digest[32:]

    def mul(k):
        q = (0, 1, 1, 0)
        p = ed._base()
        while k:
            if k & 1:
                q = ed._add(q, p)
            p = ed._double(p)
            k >>= 1
        return q

    public = ed.encode_point(mul(a))

    def sign(message):
        r = int.from_bytes(ed.sha512(prefix + message), "little") % ed.L
        rb = ed.encode_point(mul(r))
        k = int.from_bytes(ed.sha512(rb + public + message), "little") % ed.L
        return rb + ((r + k * a) % ed.L).to_bytes(32, "little")

    return public, sign
