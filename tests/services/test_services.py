"""The service fixtures against the real programs: Mosquitto, PostgreSQL, VictoriaMetrics.

Every wait is on a queue or event with a timeout.  "Nothing was delivered" is proven with a
marker message sent afterwards on the same path: MQTT delivers one publisher's messages to a
subscriber in order, so once the marker has arrived, anything sent before it would have too.
"""

from __future__ import annotations

import os
import pwd
import queue
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write.point import Point
from influxdb_client.client.write_api import SYNCHRONOUS
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.services.common import require_binary
from tests.services.mosquitto import MosquittoBroker
from tests.services.postgres import SERVER_OS_USER, PostgresServer
from tests.services.victoria import VictoriaMetrics

TIMEOUT = 10.0
DEVICE = "pt-0123456789ab"
OTHER_DEVICE = "pt-ffffffffffff"
# MQTT 3.1.1 SUBACK "failure" return code, and CONNACK "not authorised" as paho 2.x reports it.
SUBACK_FAILURE = 0x80
NOT_AUTHORIZED = 135


def take(source: queue.Queue[Any], what: str, timeout: float = TIMEOUT) -> Any:
    """The next item from ``source``; fail the test with ``what`` if none arrives in time."""
    try:
        return source.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Client:
    """A paho-mqtt 2.x client (MQTT 3.1.1) whose callbacks feed queues the test waits on."""

    def __init__(self, broker: MosquittoBroker, username: str | None, password: str | None,
                 *, client_id: str | None = None, clean_session: bool = True) -> None:
        self.broker = broker
        self.connacks: queue.Queue[tuple[mqtt.ConnectFlags, ReasonCode]] = queue.Queue()
        self.subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
            clean_session=clean_session, reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _client, _userdata, message: self.messages.put(message)

    def _on_connect(self, _client: mqtt.Client, _userdata: Any, flags: mqtt.ConnectFlags,
                    reason: ReasonCode, _properties: Properties | None) -> None:
        self.connacks.put((flags, reason))

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int,
                      reasons: list[ReasonCode], _properties: Properties | None) -> None:
        self.subacks.put(reasons)

    def connect(self) -> tuple[mqtt.ConnectFlags, ReasonCode]:
        """Connect and return the CONNACK (flags, reason), whether accepted or refused."""
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        result: tuple[mqtt.ConnectFlags, ReasonCode] = take(self.connacks, "CONNACK")
        return result

    def subscribe(self, *topics: str) -> list[ReasonCode]:
        """Subscribe to ``topics`` (QoS 1) in one SUBSCRIBE and return the SUBACK codes."""
        self.client.subscribe([(topic, 1) for topic in topics])
        reasons: list[ReasonCode] = take(self.subacks, "SUBACK")
        return reasons

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=TIMEOUT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def receive_until(self, payload: bytes) -> list[tuple[str, bytes]]:
        """Every (topic, payload) received up to and including the first ``payload``."""
        received = []
        while True:
            message: mqtt.MQTTMessage = take(self.messages, f"message {payload!r}")
            received.append((message.topic, bytes(message.payload)))
            if message.payload == payload:
                return received

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Collects the test's clients and closes them even when the test fails."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


def connected(clients: list[Client], broker: MosquittoBroker, username: str | None,
              password: str | None, **options: Any) -> Client:
    """A client that has been accepted by the broker."""
    client = Client(broker, username, password, **options)
    clients.append(client)
    _flags, reason = client.connect()
    assert not reason.is_failure, f"{username} was refused: {reason}"
    return client


# -- Mosquitto ------------------------------------------------------------------------------

@pytest.mark.mosquitto
def test_admin_can_publish_subscribe_and_read_sys(
        mosquitto: MosquittoBroker, clients: list[Client]) -> None:
    admin = connected(clients, mosquitto, mosquitto.admin_user, mosquitto.admin_password)
    assert [r.value for r in admin.subscribe("fb/v1/d/+/votes", "$SYS/broker/version")] == [1, 1]
    # $SYS/broker/version is retained: it arrives right after the SUBACK.
    version: mqtt.MQTTMessage = take(admin.messages, "$SYS/broker/version")
    assert version.topic == "$SYS/broker/version"
    assert version.payload.startswith(b"mosquitto version ")

    admin.publish(f"fb/v1/d/{DEVICE}/votes", b"hello")
    assert admin.receive_until(b"hello") == [(f"fb/v1/d/{DEVICE}/votes", b"hello")]
    assert mosquitto.url == f"mqtt://127.0.0.1:{mosquitto.port}"
    assert mosquitto.url_for("a b", "p@ss") == f"mqtt://a%20b:p%40ss@127.0.0.1:{mosquitto.port}"


@pytest.mark.mosquitto
def test_wrong_password_and_anonymous_clients_are_refused(
        mosquitto: MosquittoBroker, clients: list[Client]) -> None:
    for username, password in [(mosquitto.admin_user, "wrong"), ("nobody", "x"), (None, None)]:
        client = Client(mosquitto, username, password)
        clients.append(client)
        _flags, reason = client.connect()
        assert reason.is_failure and reason.value == NOT_AUTHORIZED, (username, reason)


@pytest.mark.mosquitto
def test_a_device_only_reaches_its_own_topics(
        mosquitto: MosquittoBroker, clients: list[Client]) -> None:
    admin = connected(clients, mosquitto, mosquitto.admin_user, mosquitto.admin_password)
    admin.subscribe("fb/v1/d/#")
    # Added while the broker runs: add_user() returns once the broker uses the new files.
    mosquitto.add_user(DEVICE, "device-secret")
    device = connected(clients, mosquitto, DEVICE, "device-secret")

    own, other, everything = device.subscribe(
        f"fb/v1/d/{DEVICE}/#", f"fb/v1/d/{OTHER_DEVICE}/#", "#")
    assert own.value == 1
    # Mosquitto 2.0's acl_file does not check subscriptions: it grants them (a plugin could
    # answer 0x80 instead) and filters each message on delivery.  Either way, what matters is
    # checked below: nothing of another device is delivered.
    assert other.value in (1, SUBACK_FAILURE)
    assert everything.value in (1, SUBACK_FAILURE)

    # Another device's traffic never reaches this device.
    admin.publish(f"fb/v1/d/{OTHER_DEVICE}/votes", b"foreign")
    admin.publish(f"fb/v1/d/{DEVICE}/cmd", b"marker-1")
    received = device.receive_until(b"marker-1")
    assert {topic for topic, _payload in received} == {f"fb/v1/d/{DEVICE}/cmd"}

    # Publishing as another device is PUBACKed (MQTT 3.1.1 cannot refuse) but dropped.
    device.publish(f"fb/v1/d/{OTHER_DEVICE}/votes", b"forged")
    device.publish(f"fb/v1/d/{DEVICE}/votes", b"marker-2")
    seen_by_admin = admin.receive_until(b"marker-2")
    assert (f"fb/v1/d/{OTHER_DEVICE}/votes", b"forged") not in seen_by_admin
    assert seen_by_admin[-1] == (f"fb/v1/d/{DEVICE}/votes", b"marker-2")


@pytest.mark.mosquitto
def test_queued_qos1_message_survives_a_restart_but_not_a_kill(
        mosquitto: MosquittoBroker, clients: list[Client]) -> None:
    admin, password = mosquitto.admin_user, mosquitto.admin_password
    subscriber = connected(clients, mosquitto, admin, password,
                           client_id="persistent-subscriber", clean_session=False)
    subscriber.subscribe("fb/v1/d/+/votes")
    subscriber.close()
    publisher = connected(clients, mosquitto, admin, password)
    publisher.publish(f"fb/v1/d/{DEVICE}/votes", b"queued while offline")
    publisher.close()

    mosquitto.restart()

    # Only the session is restored: the test does not subscribe again.
    subscriber = Client(mosquitto, admin, password, client_id="persistent-subscriber",
                        clean_session=False)
    clients.append(subscriber)
    flags, reason = subscriber.connect()
    assert not reason.is_failure and flags.session_present
    message: mqtt.MQTTMessage = take(subscriber.messages, "the queued message")
    assert (message.topic, message.payload, message.qos) == (
        f"fb/v1/d/{DEVICE}/votes", b"queued while offline", 1)
    subscriber.close()

    # A crash loses what was never saved (autosave_interval 0): a session created since the
    # last clean shutdown is gone after kill() and start().
    crashed = connected(clients, mosquitto, admin, password,
                        client_id="subscribed-before-crash", clean_session=False)
    crashed.subscribe("fb/v1/d/+/votes")
    crashed.close()
    mosquitto.kill()
    assert not mosquitto.running
    mosquitto.start()
    crashed = Client(mosquitto, admin, password, client_id="subscribed-before-crash",
                     clean_session=False)
    clients.append(crashed)
    flags, reason = crashed.connect()
    assert not reason.is_failure and not flags.session_present


# -- PostgreSQL -----------------------------------------------------------------------------

@pytest.mark.postgres
@pytest.mark.parametrize("round_", [1, 2])
def test_postgres_url_is_a_fresh_database_per_test(postgres_url: str, round_: int) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == \
                postgres_url.rsplit("/", 1)[1]
            assert sa.inspect(conn).get_table_names() == []
            # Would fail in the second round if both rounds shared a database.
            conn.execute(sa.text("CREATE TABLE marker (round integer)"))
            conn.execute(sa.text("INSERT INTO marker VALUES (:r)"), {"r": round_})
            assert conn.execute(sa.text("SELECT round FROM marker")).scalar_one() == round_
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_postgres_server_runs_on_loopback_and_never_as_root(
        postgres_server: PostgresServer) -> None:
    with postgres_server.connect() as conn:
        settings: dict[str, str] = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('listen_addresses', 'fsync', 'port')").fetchall())
    assert settings == {"listen_addresses": "127.0.0.1", "fsync": "off",
                        "port": str(postgres_server.port)}
    assert postgres_server.pid is not None
    server_uid = Path(f"/proc/{postgres_server.pid}").stat().st_uid
    if os.geteuid() == 0:
        assert server_uid == pwd.getpwnam(SERVER_OS_USER).pw_uid
    else:
        assert server_uid == os.geteuid()


# -- VictoriaMetrics ------------------------------------------------------------------------

@pytest.mark.victoria
def test_influxdb_client_writes_become_queryable(victoria: VictoriaMetrics) -> None:
    device = f"pt-{uuid.uuid4().hex[:12]}"
    point = (Point("health").tag("device", device)
             .field("heap_free", 1234).field("rssi", -61.5).field("charging", True))
    with InfluxDBClient(url=victoria.url, token="x", org="o") as client:
        client.write_api(write_options=SYNCHRONOUS).write(bucket="palaute", record=point)

    # One series per field, "{measurement}_{field}"; tags become labels; no "db" label.
    result = victoria.query(f'{{__name__=~"health_.*", device="{device}"}}', expect=3)
    assert sorted((r["metric"]["__name__"], r["value"][1]) for r in result) == [
        ("health_charging", "1"), ("health_heap_free", "1234"), ("health_rssi", "-61.5")]
    assert all(set(r["metric"]) == {"__name__", "device"} for r in result)

    [series] = victoria.export(f'health_heap_free{{device="{device}"}}')
    assert series["values"] == [1234]
    assert len(series["timestamps"]) == 1


# -- missing binaries -----------------------------------------------------------------------

def test_a_missing_binary_fails_under_ci_and_skips_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no-such-broker is not installed: apt"):
        require_binary("no-such-broker", "apt-get install it")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no-such-broker is not installed"):
        require_binary("no-such-broker", "apt-get install it")
