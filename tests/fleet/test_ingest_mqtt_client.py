"""The ingest worker's lean paho client: buffered reads, PUBLISH decoding, batched PUBACKs.

``decode_publish`` is checked against paho's own decoder on packets with and without MQTT 5
properties, and on truncated packets; ``BufferedSocket`` over a real socket pair; the client
end to end against a real Mosquitto (messages with properties published by ``mosquitto_pub``
must arrive whole through the lean path, and a batch of PUBACKs written at once must settle
every delivery, so that nothing is redelivered after a reconnect).
"""

from __future__ import annotations

import queue
import socket
import subprocess
import threading
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fleet.ingest.mqtt_client import BufferedSocket, IngestClient, decode_publish
from tests.services.common import require_binary
from tests.services.mosquitto import MosquittoBroker


def publish_packet(topic: bytes, payload: bytes, *, qos: int, mid: int, props: bytes | None
                   ) -> tuple[int, bytes]:
    """(first header byte, rest after the remaining length) of a PUBLISH; ``props`` is the
    encoded property section (its length first), None for MQTT 3.1.1."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if props is not None:
        body += props
    return 0x30 | (qos << 1) | 0x08, body + payload


@pytest.mark.parametrize("v5", [True, False])
@pytest.mark.parametrize("qos", [0, 1])
def test_decode_publish_agrees_with_paho(v5: bool, qos: int) -> None:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ContentType = "application/json"
    props.UserProperty = [("k", "v" * 40)]
    for prop_bytes in ([b"\x00", props.pack()] if v5 else [None]):  # type: ignore[no-untyped-call]
        header, packet = publish_packet(b"fb/v1/d/pt-0/votes", b'{"votes":[]}', qos=qos,
                                        mid=513, props=prop_bytes)
        ours = decode_publish(header, packet, v5)
        theirs = _packet.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5 if v5
                                        else MQTTProtocolVersion.MQTTv311)
        assert ours is not None
        assert (ours.topic, ours.payload, ours.mid, ours.qos, ours.dup, ours.retain) == (
            theirs.topic.decode(), theirs.payload, theirs.mid, theirs.qos, theirs.dup,
            theirs.retain)


def test_decode_publish_refuses_truncated_packets() -> None:
    header, packet = publish_packet(b"a/b", b"x", qos=1, mid=7, props=b"\x03\x00\x01a")
    for cut in (0, 1, 4, 6, 7, 9):
        assert decode_publish(header, packet[:cut], True) is None, cut
    # MQTT 3.1.1 forbids an empty topic.
    assert decode_publish(0x32, b"\x00\x00\x00\x01x", False) is None


def test_buffered_socket_serves_small_reads_from_one_large_read() -> None:
    left, right = socket.socketpair()
    try:
        buffered = BufferedSocket(right)
        left.sendall(b"0123456789")
        assert buffered.recv(1) == b"0"
        assert buffered.pending() == 9
        assert buffered.recv(4) == b"1234"
        assert buffered.recv(100) == b"56789"
        assert buffered.pending() == 0
        right.setblocking(False)
        with pytest.raises(BlockingIOError):
            buffered.recv(1)
        left.sendall(b"ab")
        assert buffered.recv(10) == b"ab"  # a read that fits is returned, not buffered
        left.close()
        assert buffered.recv(1) == b""  # end of stream
        assert buffered.fileno() == right.fileno()
    finally:
        right.close()


class Receiver:
    """An ``IngestClient`` (MQTT 5, manual acks) that lets the broker have ``window``
    deliveries in flight, collecting what arrives."""

    def __init__(self, broker: MosquittoBroker, window: int, *, lists: bool = False) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.list_sizes: list[int] = []
        self.subscribed = threading.Event()
        self.connects = 0
        self.disconnected = threading.Event()
        self.client = IngestClient(CallbackAPIVersion.VERSION2, client_id="lean-receiver",
                                   protocol=mqtt.MQTTv5, manual_ack=True)
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        self.client.on_message = lambda _c, _u, m: self.messages.put(m)
        if lists:
            self.client.on_deliveries = self._on_deliveries
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.disconnected.set()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = window
        self.client.connect(broker.host, broker.port, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(15), "could not subscribe"

    def _on_deliveries(self, deliveries: list[tuple[bytes, bytes, int, int]]) -> None:
        self.list_sizes.append(len(deliveries))
        for topic, payload, mid, qos in deliveries:
            message = mqtt.MQTTMessage(mid, topic)
            message.payload, message.qos = payload, qos
            self.messages.put(message)

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        self.connects += 1
        client.subscribe("lean/#", 1)

    def take(self, count: int) -> list[mqtt.MQTTMessage]:
        return [self.messages.get(timeout=30) for _ in range(count)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


WINDOW = 100


@pytest.fixture(params=[False, True], ids=["on_message", "on_deliveries"])
def receiver(mosquitto: MosquittoBroker, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    receiver = Receiver(mosquitto, WINDOW, lists=request.param)
    yield receiver
    receiver.close()


def publish(broker: MosquittoBroker, lines: list[bytes], *extra: str) -> None:
    """Publish ``lines`` to ``lean/t`` (QoS 1, MQTT 5) with the real C client."""
    subprocess.run(
        [require_binary("mosquitto_pub", "apt-get install mosquitto-clients"),
         "-h", broker.host, "-p", str(broker.port), "-u", broker.admin_user,
         "-P", broker.admin_password, "-V", "mqttv5", "-q", "1", "-t", "lean/t", "-l",
         *extra], input=b"\n".join(lines) + b"\n", check=True, timeout=30)


@pytest.mark.mosquitto
def test_messages_with_properties_arrive_whole_and_batched_acks_settle_them(
        mosquitto: MosquittoBroker, receiver: Receiver) -> None:
    assert isinstance(receiver.client.socket(), BufferedSocket)
    lines = [b'{"n":%d,"pad":"%s"}' % (n, b"x" * (n * 37 % 300)) for n in range(3 * WINDOW)]
    publish(mosquitto, lines, "-D", "publish", "user-property", "k", "v",
            "-D", "publish", "content-type", "application/json")
    # The broker keeps at most WINDOW deliveries unacknowledged: each further WINDOW
    # messages arrive only because every PUBACK of the one-write batch was taken.
    received: list[mqtt.MQTTMessage] = []
    for _ in range(3):
        window = receiver.take(WINDOW)
        received.extend(window)
        receiver.client.ack_many([m.mid for m in window])
    assert [m.payload for m in received] == lines
    assert {m.topic for m in received} == {"lean/t"} and {m.qos for m in received} == {1}
    # The lean path skipped the properties: paho's own path would have decoded them.
    assert all(getattr(m, "properties", None) is None for m in received)
    assert receiver.connects == 1 and not receiver.disconnected.is_set()
    publish(mosquitto, [b"last"])
    assert receiver.take(1)[0].payload == b"last"
    if receiver.list_sizes:
        # The broker sends a window of deliveries back to back: they come in few lists.
        assert sum(receiver.list_sizes) == 3 * WINDOW + 1
        assert max(receiver.list_sizes) > 1


def fixed_header(header: int, body: bytes) -> bytes:
    """``header``, the remaining length as a variable byte integer, then ``body``."""
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes((header,)) + bytes(encoded) + body


def test_buffered_publishes_are_handed_over_in_one_list_up_to_what_paho_must_read() -> None:
    client = IngestClient(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)
    packets = []
    for n, (qos, props) in enumerate([(1, b"\x00"), (0, b"\x00"), (1, b"\x04\x03\x00\x01a")]):
        header, body = publish_packet(b"fb/v1/d/pt-%d/votes" % n, b"x" * (n * 100), qos=qos,
                                      mid=300 + n, props=props)
        packets.append(fixed_header(header, body))
    big_header, big_body = publish_packet(b"big", b"y" * 200, qos=1, mid=9, props=b"\x00")
    big = fixed_header(big_header, big_body)  # two bytes of remaining length
    left, right = socket.socketpair()
    try:
        buffered = BufferedSocket(right)
        batches: list[list[tuple[bytes, bytes, int, int]]] = []
        # Three whole packets, then a PINGRESP (paho's to read), then a whole one.
        left.sendall(b"".join(packets) + b"\xd0\x00" + big)
        assert buffered.recv(1) == b"\x3a"  # what paho's first read takes
        buffered.consume(0)  # (put it back: the test starts at a packet boundary)
        client._deliver_buffered(buffered, batches.append)
        assert batches == [[(b"fb/v1/d/pt-0/votes", b"", 300, 1),
                            (b"fb/v1/d/pt-1/votes", b"x" * 100, 0, 0),
                            (b"fb/v1/d/pt-2/votes", b"x" * 200, 302, 1)]]
        assert buffered.recv(2) == b"\xd0\x00"  # left for paho, which reads it
        client._deliver_buffered(buffered, batches.append)
        assert batches[1] == [(b"big", b"y" * 200, 9, 1)] and not buffered.pending()
    finally:
        left.close()
        right.close()
    # A packet cut anywhere stays buffered, whole, for paho to finish reading.
    for cut in (1, 2, 3, 5, len(big) - 1):
        left, right = socket.socketpair()
        try:
            buffered = BufferedSocket(right)
            left.sendall(big[:cut])
            assert buffered.recv(0) == b""  # fills the buffer
            client._deliver_buffered(buffered, batches.append)
            assert len(batches) == 2 and buffered.pending() == cut, cut
        finally:
            left.close()
            right.close()


def test_fill_appends_to_unread_bytes_and_leaves_the_end_of_stream_to_recv() -> None:
    left, right = socket.socketpair()
    try:
        right.setblocking(False)
        buffered = BufferedSocket(right)
        assert not buffered.fill()  # nothing sent yet: no wait, nothing buffered
        left.sendall(b"abc")
        assert buffered.fill() and buffered.recv(1) == b"a"
        left.sendall(b"def")
        assert buffered.fill() and buffered.buffered() == (b"bcdef", 0)
        left.close()
        assert not buffered.fill()  # end of stream: held back while bytes are unread
        assert buffered.recv(10) == b"bcdef"
        assert buffered.recv(1) == b""
    finally:
        right.close()
