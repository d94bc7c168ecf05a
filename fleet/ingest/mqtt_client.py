"""The ingest worker's paho client, with buffered socket reads.

paho reads each packet with several small ``recv`` calls (the first header byte, each byte of
the remaining length, then the body): at one vote per message, a third of the network
thread's time went into those system calls (docs/performance.md).  ``BufferedSocket`` serves
them from one 64 KiB read instead.  paho already supports sockets that hold data of their own
(TLS sockets do): it asks ``pending()`` before waiting in ``select`` and reads without waiting
while it is non-zero, so buffered bytes are never stranded.

With ``IngestClient.on_deliveries`` set, every complete QoS 0/1 PUBLISH already in that buffer
is then decoded in one pass and handed over as one list of ``Delivery`` tuples, instead of one
trip per packet through paho's read loop (a ``select``, the keepalive bookkeeping and several
dictionary updates each) and one ``MQTTMessage`` object per message.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike

READ_SIZE = 65536
# Socket reads per ``loop_read`` while they bring only PUBLISH packets (then paho's loop gets
# its turn: writes, keepalive).
READS_PER_LOOP = 8
# (topic, payload, packet identifier, QoS) of one received PUBLISH.
Delivery = tuple[bytes, bytes, int, int]
_PUBACK = 0x40
_PUBACK_HEAD = bytes((_PUBACK, 2))


class BufferedSocket:
    """A connected socket whose ``recv`` is served from a buffer filled by large reads."""

    def __init__(self, sock: SocketLike) -> None:
        """Wrap the connected ``sock``; everything but reads goes straight to it."""
        self._sock = sock
        self._buffer = b""
        self._pos = 0
        # What a ``fill`` met instead of data, reported by the next ``recv`` as the socket
        # would have: end of stream (b"") or the error.
        self._end: bytes | OSError | None = None

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes: buffered ones first, else one large read (which may raise
        ``BlockingIOError`` or return ``b""`` at end of stream, as ``socket.recv`` does)."""
        if self._pos >= len(self._buffer):
            met, self._end = self._end, None
            if isinstance(met, OSError):
                raise met
            if met is not None:
                return met
            data = self._sock.recv(READ_SIZE)
            if len(data) <= size:
                self._buffer, self._pos = b"", 0
                return data
            self._buffer, self._pos = data, 0
        end = self._pos + size
        chunk = self._buffer[self._pos:end]
        self._pos = min(end, len(self._buffer))
        return chunk

    def fill(self) -> bool:
        """Append one read of the socket to the unread bytes; False if it brought nothing
        (no data yet, or an end or error that the next ``recv`` reports)."""
        if self._end is not None:
            return False
        try:
            data = self._sock.recv(READ_SIZE)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False
        except OSError as exc:
            self._end = exc
            return False
        if not data:
            self._end = b""
            return False
        self._buffer = self._buffer[self._pos:] + data if self._pos < len(self._buffer) else data
        self._pos = 0
        return True

    def buffered(self) -> tuple[bytes, int]:
        """The buffer and the position of its first unread byte (see ``consume``)."""
        return self._buffer, self._pos

    def consume(self, pos: int) -> None:
        """Mark the buffer read up to ``pos`` (bytes taken by the caller from ``buffered``)."""
        self._pos = pos

    def pending(self) -> int:
        """Bytes readable without touching the socket (paho skips ``select`` while > 0)."""
        inner = getattr(self._sock, "pending", None)
        return len(self._buffer) - self._pos + (inner() if inner is not None else 0)

    def send(self, buffer: bytes | bytearray) -> int:
        """Send as the socket does."""
        return self._sock.send(buffer)

    def close(self) -> None:
        """Close the socket and drop what was buffered from it."""
        self._buffer, self._pos = b"", 0
        self._sock.close()

    def fileno(self) -> int:
        """The socket's descriptor (for ``select``)."""
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        """As ``socket.setblocking``."""
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        # Anything else paho or a callback may use (setsockopt, getpeername...).
        return getattr(self._sock, name)


class IngestClient(mqtt.Client):
    """``paho.mqtt.client.Client`` with a leaner receive path for the ingest worker.

    Three hooks into paho-mqtt 2.x internals (pinned ``< 3`` in pyproject.toml; the ingest
    tests exercise both on every run): connections read through a ``BufferedSocket``, and
    QoS 0/1 PUBLISH packets under manual acknowledgement are decoded without building the
    MQTT 5 ``Properties`` object paho makes for every message (a third of the network
    thread's time at one vote per message; the worker reads no property) and handed straight
    to ``on_message`` (the worker registers no per-topic callbacks for paho to match); and
    ``ack_many`` queues the PUBACKs of a committed batch as one write.  With
    ``on_deliveries`` set, those messages go to it instead of ``on_message``, as lists of
    ``Delivery`` tuples: every complete one in the read buffer at once (see ``loop_read``).
    Anything else takes paho's own path.
    """

    _filtered = False  # set once a per-topic callback exists: paho's path matches those
    # Called in the network thread with every batch of QoS 0/1 deliveries (manual acks only).
    on_deliveries: Callable[[list[Delivery]], None] | None = None

    def message_callback_add(self, sub: str, callback: Any) -> None:
        """As paho's; afterwards messages take paho's own path, which honours it."""
        self._filtered = True
        super().message_callback_add(sub, callback)

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge QoS 1 deliveries ``mids`` (manual acks) with one write.

        ``Client.ack`` queues one 4-byte PUBACK per message and wakes the network thread with
        a system call each time.  Here the PUBACKs are packed into one buffer and queued as a
        single outgoing packet, which paho writes like any other (partial writes included) and
        drops with the rest of its queue if the connection is lost, as it would the separate
        ones (the broker then redelivers those messages).
        """
        if not mids:
            return
        # PUBACK: 0x40, remaining length 2, packet identifier; the reason code may be left out
        # when it is "success" (MQTT 5), and MQTT 3.1.1 has none.
        packet = b"".join(_PUBACK_HEAD + mid.to_bytes(2, "big") for mid in mids)
        self._packet_queue(_PUBACK, packet, 0, 0)

    def _create_socket(self) -> SocketLike:
        # Every connection and reconnection is opened here.
        return BufferedSocket(super()._create_socket())

    def _lean(self) -> bool:
        return self._manual_ack and not self._filtered

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """As paho's, after handing over every complete QoS 0/1 PUBLISH already buffered."""
        sock = self._sock
        if (type(sock) is BufferedSocket and self.on_deliveries is not None
                and self._in_packet["command"] == 0 and self._lean()):
            # Read and hand over while the socket brings whole PUBLISH packets; paho's
            # one-packet-per-loop path costs a select and several calls per message.
            for _ in range(READS_PER_LOOP):
                if not self._deliver_buffered(sock, self.on_deliveries) or not sock.fill():
                    break
        # Then paho reads one packet its own way: one it must see (not a QoS 0/1 PUBLISH),
        # an incomplete one, or the first of the next read from the socket.
        return super().loop_read(max_packets)

    def _deliver_buffered(self, sock: BufferedSocket,
                          deliver: Callable[[list[Delivery]], None]) -> bool:
        """Hand over the complete QoS 0/1 PUBLISH packets at the start of the buffer; True
        if only an incomplete one (or nothing) is left: reading the socket may bring more."""
        buffer, pos = sock.buffered()
        size = len(buffer)
        v5 = self._protocol == mqtt.MQTTv5
        batch: list[Delivery] = []
        stop = False
        while pos < size:
            header = buffer[pos]
            if header & 0xF0 != 0x30 or header & 0x06 > 0x02:
                stop = True
                break  # not a PUBLISH at QoS 0 or 1
            # The remaining length, a variable byte integer of at most four bytes.
            length, shift, at = 0, 0, pos + 1
            while at < size and shift <= 21:
                byte = buffer[at]
                at += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
            else:
                # Incomplete, or (shift past 21) malformed: paho reads it and decides.
                stop = shift > 21
                break
            end = at + length
            if end > size:
                break
            fields = decode_fields(header, buffer, at, end, v5)
            if fields is None:
                stop = True
                break  # malformed: paho's path reads it again and drops the connection
            topic, mid, start = fields
            batch.append((topic, buffer[start:end], mid, (header & 0x06) >> 1))
            pos = end
        if batch:
            sock.consume(pos)
            with self._msgtime_mutex:
                self._last_bytes_received = mqtt.time_func()
            with self._in_callback_mutex:
                deliver(batch)
        return not stop

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if qos > 1 or not self._lean():
            return super()._handle_publish()
        packet = self._in_packet["packet"]
        fields = decode_fields(header, packet, 0, len(packet), self._protocol == mqtt.MQTTv5)
        if fields is None:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL  # paho drops the connection
        topic, mid, start = fields
        deliver = self.on_deliveries
        if deliver is not None:
            with self._in_callback_mutex:
                deliver([(topic, bytes(packet[start:]), mid, qos)])
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        on_message = self.on_message
        if on_message is not None:
            message = mqtt.MQTTMessage(mid=mid, topic=topic)
            message.qos = qos
            message.dup = bool(header & 0x08)
            message.retain = bool(header & 0x01)
            message.payload = bytes(packet[start:])
            with self._in_callback_mutex:
                on_message(self, self._userdata, message)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def decode_fields(header: int, data: bytes | bytearray, start: int, end: int, v5: bool
                  ) -> tuple[bytes, int, int] | None:
    """(topic, packet identifier, payload offset) of the PUBLISH whose variable header and
    payload are ``data[start:end]``, or None if it is malformed.  MQTT 5 properties are
    skipped, not decoded."""
    try:
        at = start + 2 + (data[start] << 8 | data[start + 1])
        topic = bytes(data[start + 2:at])
        mid = 0
        if header & 0x06:
            mid = data[at] << 8 | data[at + 1]
            at += 2
        if v5:
            # Property length: a variable byte integer (at most four bytes).
            length, shift = 0, 0
            while True:
                byte = data[at]
                at += 1
                length |= (byte & 0x7F) << shift
                if byte < 0x80 or shift == 21:
                    break
                shift += 7
            at += length
    except IndexError:
        return None
    if at > end or (not v5 and not topic):
        return None
    return topic, mid, at


def decode_publish(header: int, packet: bytes | bytearray, v5: bool) -> mqtt.MQTTMessage | None:
    """The message in a PUBLISH packet (``packet``: what follows the fixed header), or None
    if it is malformed.  MQTT 5 properties are skipped, not decoded."""
    fields = decode_fields(header, packet, 0, len(packet), v5)
    if fields is None:
        return None
    topic, mid, start = fields
    message = mqtt.MQTTMessage(mid=mid, topic=topic)
    message.qos = (header & 0x06) >> 1
    message.dup = bool(header & 0x08)
    message.retain = bool(header & 0x01)
    message.payload = bytes(packet[start:])
    return message
