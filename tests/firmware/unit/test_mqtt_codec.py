"""MQTT 3.1.1 wire format and session rules of ``terminal.mqtt``, byte for byte.

The broker side is played by the test through a ``BrokerStream``; expected packets are written
out by hand from the MQTT 3.1.1 specification rather than produced by the code under test.
"""

import asyncio

from _support import BrokerStream, araises, raises
from terminal.mqtt import MQTTClient, MQTTError, decode_length, encode_length

CONNACK_OK = b"\x20\x02\x00\x00"


def opener(*streams):
    """An ``open_connection`` handing out ``streams`` one connection at a time."""
    queue = list(streams)

    async def open_connection():
        s = queue.pop(0)
        return s, s

    return open_connection


async def connected(timeout_s=10, **kw):
    """A client logged in over a fresh BrokerStream; the CONNECT packet is already taken.

    ``timeout_s`` applies from then on, so a short one cannot make the login itself flaky.
    """
    s = BrokerStream(CONNACK_OK)
    kw.setdefault("keepalive_s", 0)
    c = MQTTClient("pt-1", opener(s), **kw)
    assert await c.connect() is False
    assert (await s.packet())[0] == 0x10
    c.timeout_s = timeout_s
    return c, s


def incoming(kind, topic, payload, pid=None):
    """An incoming PUBLISH (for payloads too big to spell out; small ones are literal)."""
    body = bytearray()
    body.append(len(topic) >> 8)
    body.append(len(topic) & 0xFF)
    body.extend(topic)
    if pid is not None:
        body.append(pid >> 8)
        body.append(pid & 0xFF)
    body.extend(payload)
    head = bytearray(5)
    head[0] = kind
    end = encode_length(len(body), head, 1)
    return bytes(head[:end]) + bytes(body)


class Inbox:
    """``on_message`` that records messages and how many bytes the client had sent by then."""

    def __init__(self):
        self.got = []
        self.event = asyncio.Event()
        self.stream = None
        self.fail = False

    def __call__(self, topic, payload):
        self.got.append((topic, payload, len(self.stream.unread())))
        self.event.set()
        if self.fail:
            raise ValueError("handler bug")

    async def next(self):
        await asyncio.wait_for(self.event.wait(), 2)
        self.event.clear()
        return self.got[-1]


# -- remaining length -------------------------------------------------------------------------
def test_remaining_length_edges():
    cases = [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
             (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"),
             (2097152, b"\x80\x80\x80\x01"), (268435455, b"\xff\xff\xff\x7f")]
    buf = bytearray(5)
    for n, enc in cases:
        end = encode_length(n, buf, 1)
        assert bytes(buf[1:end]) == enc, n
        assert decode_length(b"\x30" + enc, 1) == (n, 1 + len(enc)), n
    raises(ValueError, encode_length, 268435456, buf)
    raises(ValueError, encode_length, -1, buf)
    raises(ValueError, decode_length, b"\xff\xff\xff\xff\x01")  # 5 length bytes
    raises(ValueError, decode_length, b"\x80")  # truncated


# -- CONNECT / CONNACK ------------------------------------------------------------------------
def test_connect_bytes_with_auth_will_and_keepalive():
    async def main():
        s = BrokerStream(CONNACK_OK)
        c = MQTTClient("pt-1", opener(s), user="u", password="p", keepalive_s=60,
                       will=("fb/s", b"off", 1, True))
        assert await c.connect() is False
        assert c.connected
        # flags 0xee = user | password | will retain | will QoS 1 | will | clean session
        assert await s.packet() == (b"\x10\x21\x00\x04MQTT\x04\xee\x00\x3c"
                                    b"\x00\x04pt-1\x00\x04fb/s\x00\x03off\x00\x01u\x00\x01p")
        c.close()
    asyncio.run(main())


def test_connect_bytes_minimal_persistent_session_present():
    async def main():
        s = BrokerStream(b"\x20\x02\x01\x00")
        c = MQTTClient("c", opener(s), keepalive_s=300)
        assert await c.connect(clean_session=False) is True
        assert await s.packet() == b"\x10\x0d\x00\x04MQTT\x04\x00\x01\x2c\x00\x01c"
        c.close()
    asyncio.run(main())


def test_password_without_user_is_rejected():
    raises(ValueError, lambda: MQTTClient("c", opener(), password="p"))


def test_connack_refusal_raises_mqtt_error_and_closes():
    async def main():
        s = BrokerStream(b"\x20\x02\x00\x05")
        c = MQTTClient("c", opener(s))
        err = await araises(MQTTError, c.connect())
        assert err.code == 5 and isinstance(err, OSError)
        assert not c.connected and s.closed and c.last_error is err
        await asyncio.wait_for(c.wait_down(), 1)
    asyncio.run(main())


def test_connect_failures_are_oserrors():
    async def main():
        async def refused():
            raise OSError(111, "connection refused")

        async def hangs():
            await asyncio.Event().wait()

        assert (await araises(OSError, MQTTClient("c", refused).connect())).errno == 111
        err = await araises(OSError, MQTTClient("c", hangs, timeout_s=0.1).connect())
        assert err.errno == 110
        silent = BrokerStream()  # accepts the TCP connection, never answers CONNECT
        err = await araises(OSError, MQTTClient("c", opener(silent), timeout_s=0.1).connect())
        assert err.errno == 110 and silent.closed
        gone = BrokerStream()
        gone.hangup()  # EOF instead of CONNACK
        await araises(OSError, MQTTClient("c", opener(gone)).connect())
        assert gone.closed
        wrong = BrokerStream(b"\x30\x02\x00\x00")  # not a CONNACK
        assert (await araises(OSError, MQTTClient("c", opener(wrong)).connect())).errno == 71
    asyncio.run(main())


# -- outgoing PUBLISH / SUBSCRIBE -------------------------------------------------------------
def test_publish_qos0_bytes():
    async def main():
        c, s = await connected()
        await c.publish("a/b", b"hi")
        assert await s.packet() == b"\x30\x07\x00\x03a/bhi"
        await c.publish("a/b", b"", retain=True)
        assert await s.packet() == b"\x31\x05\x00\x03a/b"
        c.close()
    asyncio.run(main())


def test_publish_qos1_waits_for_puback_several_in_flight():
    async def main():
        c, s = await connected()
        t1 = asyncio.create_task(c.publish("a/b", b"hi", 1))
        assert await s.packet() == b"\x32\x09\x00\x03a/b\x00\x01hi"
        t2 = asyncio.create_task(c.publish("t", b"x", 1, True))
        assert await s.packet() == b"\x33\x06\x00\x01t\x00\x02x"
        t3 = asyncio.create_task(c.publish("t", b"y", 1))
        assert await s.packet() == b"\x32\x06\x00\x01t\x00\x03y"
        assert not (t1.done() or t2.done() or t3.done())
        s.feed(b"\x40\x02\x00\x03\x40\x02\x00\x01")  # acks out of order
        await asyncio.wait_for(t3, 2)
        await asyncio.wait_for(t1, 2)
        assert not t2.done()
        s.feed(b"\x90\x03\x00\x02\x01")  # a SUBACK with the same id is not a PUBACK
        s.feed(b"\x40\x02\x00\x02")
        await asyncio.wait_for(t2, 2)
        assert c.connected
        c.close()
    asyncio.run(main())


def test_packet_ids_wrap_and_skip_ids_in_flight():
    async def main():
        c, s = await connected()
        c._pid = 65534
        t1 = asyncio.create_task(c.publish("t", b"", 1))
        assert await s.packet() == b"\x32\x05\x00\x01t\xff\xff"
        t2 = asyncio.create_task(c.publish("t", b"", 1))
        assert await s.packet() == b"\x32\x05\x00\x01t\x00\x01"  # wrapped, never 0
        c._pid = 65535
        t3 = asyncio.create_task(c.publish("t", b"", 1))
        assert await s.packet() == b"\x32\x05\x00\x01t\x00\x02"  # 1 is still in flight
        s.feed(b"\x40\x02\xff\xff\x40\x02\x00\x01\x40\x02\x00\x02")
        for t in (t1, t2, t3):
            await asyncio.wait_for(t, 2)
        c.close()
    asyncio.run(main())


def test_puback_timeout_raises_oserror_and_ends_session():
    async def main():
        c, s = await connected(timeout_s=0.1)
        err = await araises(OSError, c.publish("t", b"v", 1))
        assert err.errno == 110
        assert not c.connected and s.closed
        await asyncio.wait_for(c.wait_down(), 1)
        assert (await araises(OSError, c.publish("t", b"v"))).errno == 107  # not connected
    asyncio.run(main())


def test_stuck_or_cancelled_send_ends_the_session():
    async def main():
        c, s = await connected(timeout_s=0.1)
        s.stall = True
        err = await araises(OSError, c.publish("t", b"v"))
        assert err.errno == 110 and not c.connected and s.closed
        c, s = await connected()
        s.stall = True
        t = asyncio.create_task(c.publish("t", b"v", 1))
        await s.packet()  # written; now waiting in drain()
        t.cancel()
        await araises(asyncio.CancelledError, t)
        # Part of the packet may still sit in the stream: the session must not go on.
        await asyncio.wait_for(c.wait_down(), 1)
        assert not c.connected and s.closed
    asyncio.run(main())


def test_subscribe_bytes_suback_and_refusal():
    async def main():
        c, s = await connected()
        t = asyncio.create_task(c.subscribe("fb/v1/d/x/ack", 1))
        assert await s.packet() == b"\x82\x12\x00\x01\x00\x0dfb/v1/d/x/ack\x01"
        s.feed(b"\x90\x03\x00\x01\x01")
        assert await asyncio.wait_for(t, 2) == 1
        t = asyncio.create_task(c.subscribe("fb/v1/d/y/#", 0))
        assert await s.packet() == b"\x82\x10\x00\x02\x00\x0bfb/v1/d/y/#\x00"
        s.feed(b"\x90\x03\x00\x02\x80")  # refused, e.g. by the ACL
        err = await araises(MQTTError, asyncio.wait_for(t, 2))
        assert err.code == 0x80
        assert c.connected  # a refused subscription is not a link failure
        c.close()
    asyncio.run(main())


def test_link_loss_fails_pending_waiters_at_once():
    async def main():
        c, s = await connected()  # timeout_s=10: the failure must not wait for it
        pub = asyncio.create_task(araises(OSError, c.publish("t", b"v", 1)))
        sub = asyncio.create_task(araises(OSError, c.subscribe("t")))
        await s.packet()
        await s.packet()
        s.hangup()
        assert (await asyncio.wait_for(pub, 1)).errno == 104
        assert (await asyncio.wait_for(sub, 1)).errno == 104
        await asyncio.wait_for(c.wait_down(), 1)
        assert not c.connected and s.closed and c.last_error.errno == 104
    asyncio.run(main())


# -- incoming PUBLISH -------------------------------------------------------------------------
def test_incoming_qos1_is_acked_after_the_callback():
    async def main():
        inbox = Inbox()
        c, s = await connected(on_message=inbox)
        inbox.stream = s
        s.feed(b"\x32\x0c\x00\x03a/b\x12\x34hello")
        assert await inbox.next() == ("a/b", b"hello", 0)  # nothing sent before the callback
        assert await s.packet() == b"\x40\x02\x12\x34"
        s.feed(b"\x3b\x0c\x00\x03a/b\x12\x34hello")  # DUP + retain: at least once, again
        assert await inbox.next() == ("a/b", b"hello", 0)
        assert await s.packet() == b"\x40\x02\x12\x34"
        s.feed(b"\x30\x07\x00\x01tqos0")  # QoS 0: delivered, not acknowledged
        assert await inbox.next() == ("t", b"qos0", 0)
        s.feed(b"\x32\x05\x00\x01t\x00\x09")  # empty payload
        assert await inbox.next() == ("t", b"", 0)
        assert await s.packet() == b"\x40\x02\x00\x09"  # the next thing sent: no QoS 0 ack
        c.close()
    asyncio.run(main())


def test_incoming_qos2_minimal_flow_delivers_once():
    async def main():
        inbox = Inbox()
        c, s = await connected(on_message=inbox)
        inbox.stream = s
        s.feed(b"\x34\x06\x00\x01t\x00\x07x")
        assert await inbox.next() == ("t", b"x", 0)
        assert await s.packet() == b"\x50\x02\x00\x07"  # PUBREC
        s.feed(b"\x3c\x06\x00\x01t\x00\x07x")  # DUP before PUBREL: not delivered again
        assert await s.packet() == b"\x50\x02\x00\x07"
        s.feed(b"\x62\x02\x00\x07")  # PUBREL
        assert await s.packet() == b"\x70\x02\x00\x07"  # PUBCOMP
        s.feed(b"\x34\x06\x00\x01t\x00\x07y")  # the id is free again: a new message
        assert await inbox.next() == ("t", b"y", 0)
        assert len(inbox.got) == 2
        c.close()
    asyncio.run(main())


def test_callback_error_does_not_drop_the_link():
    async def main():
        inbox = Inbox()
        inbox.fail = True
        c, s = await connected(on_message=inbox)
        inbox.stream = s
        s.feed(b"\x32\x06\x00\x01t\x00\x05x")
        await inbox.next()
        assert await s.packet() == b"\x40\x02\x00\x05"
        assert c.connected and c.callback_errors == 1
        c.close()
    asyncio.run(main())


def test_packet_at_the_size_limit_is_accepted():
    async def main():
        inbox = Inbox()
        c, s = await connected(on_message=inbox)  # default max_packet=16384
        inbox.stream = s
        packet = incoming(0x30, b"t", b"z" * 16381)
        assert packet[:4] == b"\x30\x80\x80\x01"  # remaining length 16384
        s.feed(packet)
        topic, payload, _ = await inbox.next()
        assert topic == "t" and len(payload) == 16381
        assert c.connected
        c.close()
    asyncio.run(main())


def test_oversize_packet_drops_the_link():
    async def main():
        c, s = await connected(max_packet=64)
        pub = asyncio.create_task(araises(OSError, c.publish("t", b"v", 1)))
        await s.packet()
        s.feed(b"\x30\x41")  # announces 65 bytes; none of them need to arrive
        await asyncio.wait_for(c.wait_down(), 1)
        assert c.last_error.errno == 90 and s.closed
        await asyncio.wait_for(pub, 1)
        c, s = await connected()
        s.feed(b"\x30\xff\xff\xff\xff\x01")  # 5 length bytes: malformed
        await asyncio.wait_for(c.wait_down(), 1)
        assert c.last_error.errno == 71
    asyncio.run(main())


# -- keepalive, disconnect, close -------------------------------------------------------------
def test_keepalive_pings_when_idle():
    async def main():
        c, s = await connected(keepalive_s=1)  # ping after 0.5 s of quiet
        assert await s.packet(timeout=3) == b"\xc0\x00"
        s.feed(b"\xd0\x00")
        assert await s.packet(timeout=3) == b"\xc0\x00"
        s.feed(b"\xd0\x00")
        assert c.connected
        c.close()
    asyncio.run(main())


def test_keepalive_without_pingresp_drops_the_link():
    async def main():
        c, s = await connected(keepalive_s=1, timeout_s=0.2)
        assert await s.packet(timeout=3) == b"\xc0\x00"
        await asyncio.wait_for(c.wait_down(), 3)
        assert c.last_error.errno == 110 and s.closed and not c.connected
    asyncio.run(main())


def test_disconnect_sends_disconnect_close_does_not():
    async def main():
        c, s = await connected()
        await c.disconnect()
        assert s.unread() == b"\xe0\x00" and s.closed and not c.connected
        await asyncio.wait_for(c.wait_down(), 1)
        assert c.last_error is None
        c, s = await connected()
        c.close()  # abort: the broker will publish the will
        assert s.unread() == b"" and s.closed and not c.connected
        await c.disconnect()  # no session: nothing to do
    asyncio.run(main())


def test_reconnect_with_the_same_client():
    async def main():
        first, second = BrokerStream(CONNACK_OK), BrokerStream(CONNACK_OK)
        c = MQTTClient("c", opener(first, second), keepalive_s=0)
        await c.connect()
        first.hangup()
        await asyncio.wait_for(c.wait_down(), 1)
        await c.connect()
        assert c.connected
        await second.packet()
        await c.publish("t", b"again")
        assert await second.packet() == b"\x30\x08\x00\x01tagain"
        c.close()
    asyncio.run(main())
