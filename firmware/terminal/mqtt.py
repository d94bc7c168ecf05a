"""MQTT 3.1.1 client session for the terminal: the wire protocol and nothing else.

One ``MQTTClient`` runs one session at a time over the stream ``open_connection()`` returns
(the board binds host and port).  Reconnecting is the caller's policy (``terminal.link``).

Failures: every one is an ``OSError`` (``MQTTError`` for broker refusals).  Any error or
timeout on the link ends the session at once: the stream is closed, every waiting publish or
subscribe fails with OSError and ``wait_down()`` returns; nobody is left with a half-open
socket.  Every wait is bounded by ``timeout_s``.

Scope, chosen for a small device:
- Outgoing QoS 0 and 1.  QoS 1 is not retransmitted here (every session starts clean and the
  uploader re-sends unacknowledged votes itself), so DUP is never set.
- Incoming QoS 1 is at-least-once: a DUP redelivery reaches ``on_message`` again (handlers
  are idempotent); PUBACK goes out after the callback returns.  Incoming QoS 2 gets the
  minimal receiver flow (PUBREC; PUBCOMP on PUBREL) and is delivered once: a DUP whose packet
  id still awaits PUBREL is not delivered again.
- A packet whose remaining length exceeds ``max_packet`` drops the link (OSError EMSGSIZE)
  before its body is read: a huge retained message must not exhaust the heap.
- Keepalive: PINGREQ once either direction has been quiet for half the interval, so a dead
  link is noticed even while we only transmit; no PINGRESP within ``timeout_s`` ends it.
"""

import asyncio

from micropython import const

from terminal.clock import ticks_diff, ticks_ms

_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_PUBREC = const(0x50)
_PUBREL = const(0x62)  # PUBREL and SUBSCRIBE have reserved fixed-header flags 0b0010
_PUBCOMP = const(0x70)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)

_EPROTO = const(71)  # errno values as MicroPython numbers them on every port
_EMSGSIZE = const(90)
_ECONNRESET = const(104)
_ENOTCONN = const(107)
_ETIMEDOUT = const(110)


class MQTTError(OSError):
    """The broker refused: ``code`` is the CONNACK return code (1-5) or SUBACK's 0x80."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def encode_length(n, buf, offset=0):
    """Write remaining length ``n`` (0..268435455) into ``buf`` at ``offset``; return the end.

    7 bits per byte, least significant first, bit 7 set on all but the last of 1-4 bytes.
    """
    if not 0 <= n <= 268435455:
        raise ValueError("remaining length out of range")
    while n > 0x7F:
        buf[offset] = (n & 0x7F) | 0x80
        n >>= 7
        offset += 1
    buf[offset] = n
    return offset + 1


def decode_length(buf, offset=0):
    """Read a remaining length from ``buf`` at ``offset``; return ``(value, end)``.

    ValueError when the encoding is truncated or longer than 4 bytes.
    """
    n = shift = 0
    while shift < 28:
        if offset >= len(buf):
            raise ValueError("truncated remaining length")
        b = buf[offset]
        offset += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, offset
        shift += 7
    raise ValueError("remaining length longer than 4 bytes")


def _put_str(buf, s):
    # MQTT string: 2-byte big-endian length, then UTF-8 (``s`` may already be bytes).
    s = s.encode() if isinstance(s, str) else s
    buf.extend(bytes((len(s) >> 8, len(s) & 0xFF)))
    buf.extend(s)


def _oserror(exc):
    # Timeouts first: on CPython asyncio's is an OSError without errno, on MicroPython it is
    # no OSError at all.  Anything else that is not an OSError (EOF) means the peer went away.
    if isinstance(exc, asyncio.TimeoutError):
        return OSError(_ETIMEDOUT, "mqtt timeout")
    if isinstance(exc, OSError):
        return exc
    return OSError(_ECONNRESET, "mqtt link lost: %r" % (exc,))


async def _reap(w):
    # MicroPython's Stream.close() does nothing: the socket is only closed by wait_closed().
    try:
        await asyncio.wait_for(w.wait_closed(), 5)
    except Exception:
        pass  # the stream is being discarded; nothing is left to report


class MQTTClient:
    """An MQTT 3.1.1 client session over a stream from ``open_connection()``.

    ``open_connection`` is an async callable without arguments returning ``(reader, writer)``
    with the asyncio Stream subset.  ``will`` is ``(topic, payload, qos, retain)``.
    ``on_message(topic, payload)`` is called for every PUBLISH received.
    """

    def __init__(self, client_id, open_connection, *, user=None, password=None, keepalive_s=60,
                 will=None, on_message=None, timeout_s=10, max_packet=16384):
        if password is not None and user is None:
            raise ValueError("password needs a user")  # MQTT 3.1.1 section 3.1.2.9
        self.client_id = client_id
        self.open_connection = open_connection
        self.user = user
        self.password = password
        self.keepalive_s = keepalive_s
        self.will = will
        self.on_message = on_message
        self.timeout_s = timeout_s
        self.max_packet = max_packet
        self.last_error = None  # the OSError that ended the last session (None: closed by us)
        self.callback_errors = 0  # exceptions raised by on_message: counted, not propagated
        self._hdr = bytearray(8)  # outgoing fixed header and short fields; only under _lock
        self._rxh = bytearray(4)  # incoming remaining-length bytes
        self._writer = None
        self._lock = asyncio.Lock()
        self._connected = False
        self._tasks = []  # type: list
        self._pending = {}  # packet id -> [Event, result (None = failed), expected ack type]
        self._qos2 = set()  # incoming QoS 2 packet ids awaiting PUBREL
        self._pid = 0
        self._tx_at = self._rx_at = ticks_ms()
        self._pong = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()

    @property
    def connected(self):
        """True while a session is established (CONNACK accepted, link not failed)."""
        return self._connected

    async def wait_down(self):
        """Return once the current session has ended (at once when there is none)."""
        await self._down.wait()

    # -- session lifecycle ---------------------------------------------------------------------
    async def connect(self, clean_session=True):
        """Open the link and log in; return the broker's session-present flag.

        ``MQTTError(code)`` if the broker refuses (5 = not authorised); OSError if the link
        fails or the broker does not answer within ``timeout_s``.
        """
        self.close()  # never two sessions: drop whatever is left of the previous one
        try:
            r, w = await asyncio.wait_for(self.open_connection(), self.timeout_s)
        except Exception as e:
            raise _oserror(e) from None
        self._writer = w
        # Per-session state: a writer stuck on the old link must not block this one.
        self._lock = asyncio.Lock()
        self._pending = {}
        self._qos2 = set()
        try:
            ack = await asyncio.wait_for(  # type: bytes
                self._handshake(r, w, clean_session), self.timeout_s)
            if ack[1]:
                raise MQTTError(ack[1])
        except Exception as e:
            raise self._fail(e, w) from None
        except BaseException:  # cancelled: leave no half-open stream behind
            self._die(None)
            raise
        self._connected = True
        self.last_error = None
        self._down.clear()
        self._tx_at = self._rx_at = ticks_ms()
        self._tasks = [asyncio.create_task(self._rx(r, w))]
        if self.keepalive_s:
            self._tasks.append(asyncio.create_task(self._keepalive(w)))
        return bool(ack[0] & 1)

    async def _handshake(self, r, w, clean):
        ka = self.keepalive_s
        body = bytearray(b"\x00\x04MQTT\x04\x00")
        body.extend(bytes((ka >> 8, ka & 0xFF)))
        flags = 0x02 if clean else 0
        _put_str(body, self.client_id)
        if self.will:
            topic, payload, qos, retain = self.will
            flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
            _put_str(body, topic)
            _put_str(body, payload)
        if self.user is not None:
            flags |= 0x80
            _put_str(body, self.user)
        if self.password is not None:
            flags |= 0x40
            _put_str(body, self.password)
        body[7] = flags
        h = self._hdr
        h[0] = _CONNECT
        w.write(h[:encode_length(len(body), h, 1)])
        w.write(body)
        await w.drain()
        kind, n = await self._read_header(r)
        if kind != _CONNACK or n != 2:
            raise OSError(_EPROTO, "expected CONNACK")
        return await r.readexactly(2)

    async def disconnect(self):
        """End the session politely (DISCONNECT: the broker discards the will) and close."""
        w = self._writer
        if w is None:
            return
        if self._connected:
            try:
                await self._send(w, _DISCONNECT)
            except OSError:
                pass  # the link failed anyway; closing is all that is left to do
        self._die(None, False)
        await _reap(w)

    def close(self):
        """Abort the session without DISCONNECT, so the broker publishes the will."""
        self._die(None)

    def _die(self, err, reap=True):
        # End the session once: stop its tasks, close the stream, fail every waiter.
        w = self._writer
        if w is None:
            return
        self._writer = None
        self._connected = False
        if err is not None:
            self.last_error = err
        try:
            me = asyncio.current_task()
        except RuntimeError:
            me = None  # called outside the event loop
        for t in self._tasks:
            if t is not me:  # MicroPython refuses to cancel the running task
                t.cancel()
        self._tasks = []
        try:
            w.close()
            if reap:
                asyncio.create_task(_reap(w))  # noqa: RUF006 - fire and forget is the point
        except Exception:
            pass  # broken already, or CPython without a loop (close() closed the transport)
        pending, self._pending = self._pending, {}
        for slot in pending.values():
            slot[0].set()  # slot[1] is still None: the waiter raises OSError
        self._down.set()

    def _fail(self, exc, w):
        # ``exc`` as an OSError, after ending the session it happened on (if still current).
        err = _oserror(exc)
        if not self._stale(w):
            self._die(err)
        return err

    def _stale(self, w):
        # True once the session that ``w`` belonged to has ended (a new one may be up).
        return w is not self._writer

    # -- outgoing --------------------------------------------------------------------------------
    async def _send(self, w, kind, pid=-1, topic=None, tail=None):
        # One packet: fixed header, [packet id: not PUBLISH], [topic], [packet id: PUBLISH],
        # [tail].  Parts are written one by one, never concatenated into a payload-sized copy;
        # header slices are copies, so _hdr can be refilled while the transport still queues.
        # The lock keeps packets whole and MicroPython streams allow only one drain at a time.
        if isinstance(topic, str):
            topic = topic.encode()
        pub = kind & 0xF0 == _PUBLISH
        n = (2 if pid >= 0 else 0) + (2 + len(topic) if topic else 0) + (len(tail) if tail else 0)
        async with self._lock:
            if self._stale(w):
                raise OSError(_ENOTCONN, "mqtt session ended")
            h = self._hdr
            h[0] = kind
            i = encode_length(n, h, 1)
            if pid >= 0 and not pub:
                h[i], h[i + 1] = pid >> 8, pid & 0xFF
                i += 2
            if topic:
                h[i], h[i + 1] = len(topic) >> 8, len(topic) & 0xFF
                i += 2
            try:
                w.write(h[:i])
                if topic:
                    w.write(topic)
                if pid >= 0 and pub:
                    h[0], h[1] = pid >> 8, pid & 0xFF
                    w.write(h[:2])
                if tail:
                    w.write(tail)
                self._tx_at = ticks_ms()
                await asyncio.wait_for(w.drain(), self.timeout_s)
            except Exception as e:
                raise self._fail(e, w) from None
            except BaseException:
                # Cancelled mid-packet: MicroPython's stream may hold part of it (and would
                # resend a partly drained buffer from its start), so the session cannot go on.
                self._fail(OSError(_ECONNRESET, "send cancelled"), w)
                raise

    async def _request(self, kind, topic, tail, ack):
        # Send with a fresh packet id, then wait (bounded) for the ack; return the ack's value.
        if not self._connected:
            raise OSError(_ENOTCONN, "mqtt not connected")
        w, pending, pid = self._writer, self._pending, self._pid
        while True:
            pid = pid % 65535 + 1  # 1..65535 (0 is invalid), skipping ids still in flight
            if pid not in pending:
                break
        self._pid = pid
        slot = pending[pid] = [asyncio.Event(), None, ack]
        try:
            await self._send(w, kind, pid, topic, tail)
            try:
                await asyncio.wait_for(slot[0].wait(), self.timeout_s)
            except Exception as e:
                raise self._fail(e, w) from None  # no ack in time: the link is presumed dead
            if slot[1] is None:
                raise OSError(_ECONNRESET, "mqtt link lost")
            return slot[1]
        finally:
            pending.pop(pid, None)

    async def publish(self, topic, payload, qos=0, retain=False):
        """Publish ``payload`` to ``topic``; with QoS 1, return once PUBACK arrives.

        OSError when not connected, on link failure, or without PUBACK within ``timeout_s``
        (which also ends the session).  Several QoS 1 publishes may be in flight at once.
        """
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if isinstance(payload, str):
            payload = payload.encode()
        kind = _PUBLISH | qos << 1 | (1 if retain else 0)
        if qos:
            await self._request(kind, topic, payload, _PUBACK)
        elif not self._connected:
            raise OSError(_ENOTCONN, "mqtt not connected")
        else:
            await self._send(self._writer, kind, -1, topic, payload)

    async def subscribe(self, topic, qos=1):
        """Subscribe to ``topic``; return the granted QoS once SUBACK arrives.

        ``MQTTError(0x80)`` if the broker refuses (the session stays up); OSError on link
        failure or timeout.
        """
        granted = await self._request(_SUBSCRIBE, topic, bytes((qos,)), _SUBACK)
        if granted == 0x80:
            raise MQTTError(0x80)
        return granted

    # -- incoming --------------------------------------------------------------------------------
    async def _read_header(self, r):
        # Type byte and 1-4 length bytes.  The size limit is enforced before the body is read.
        b = await r.readexactly(2)
        h = self._rxh
        h[0] = b[1]
        i = 1
        while h[i - 1] & 0x80:
            if i == 4:
                raise OSError(_EPROTO, "malformed remaining length")
            h[i] = (await r.readexactly(1))[0]
            i += 1
        n = decode_length(h)[0]
        if n > self.max_packet:
            raise OSError(_EMSGSIZE, "mqtt packet too large: %d" % n)
        return b[0], n

    async def _rx(self, r, w):
        try:
            while True:
                kind, n = await self._read_header(r)
                self._rx_at = ticks_ms()
                if kind & 0xF0 == _PUBLISH:
                    await self._rx_publish(r, w, kind, n)
                    continue
                body = await r.readexactly(n)
                if kind == _PINGRESP:
                    self._pong.set()
                elif kind == _PUBREL and n == 2:
                    pid = body[0] << 8 | body[1]
                    self._qos2.discard(pid)
                    await self._send(w, _PUBCOMP, pid)
                elif (kind == _PUBACK and n == 2) or (kind == _SUBACK and n == 3):
                    slot = self._pending.get(body[0] << 8 | body[1])
                    if slot is not None and slot[2] == kind:  # both kinds share the id space
                        slot[1] = body[2] if kind == _SUBACK else 1
                        slot[0].set()
                # Anything else (UNSUBACK, stray acks) needs no answer and is ignored.
        except Exception as e:
            self._fail(e, w)

    async def _rx_publish(self, r, w, kind, n):
        qos = kind >> 1 & 3
        if qos == 3:
            raise OSError(_EPROTO, "PUBLISH with QoS 3")
        # Field by field, so the payload is the only payload-sized allocation.
        b = await r.readexactly(2)
        tlen = b[0] << 8 | b[1]
        topic = (await r.readexactly(tlen)).decode()
        n -= 2 + tlen
        pid = 0
        if qos:
            b = await r.readexactly(2)
            pid = b[0] << 8 | b[1]
            n -= 2
        if n < 0:
            raise OSError(_EPROTO, "malformed PUBLISH")
        payload = await r.readexactly(n)
        fresh = qos < 2 or pid not in self._qos2
        if qos == 2:
            self._qos2.add(pid)
        if fresh and self.on_message:
            try:
                self.on_message(topic, payload)
            except Exception:
                # A handler bug must not drop the link: the broker would redeliver the same
                # message after every reconnect.  The message is still acknowledged.
                self.callback_errors += 1
        del payload  # not kept alive while the ack waits for the lock
        if qos:
            await self._send(w, _PUBACK if qos == 1 else _PUBREC, pid)

    async def _keepalive(self, w):
        half = self.keepalive_s * 500  # ms
        try:
            while True:
                now = ticks_ms()
                idle = max(ticks_diff(now, self._tx_at), ticks_diff(now, self._rx_at))
                if idle < half:
                    await asyncio.sleep((half - idle) / 1000)
                    continue
                self._pong.clear()
                await self._send(w, _PINGREQ)
                await asyncio.wait_for(self._pong.wait(), self.timeout_s)
        except Exception as e:
            self._fail(e, w)
