"""The firmware MQTT client under the real MicroPython against a real Mosquitto.

Each test starts ``mp_scripts/mqtt_probe.py`` as a ``micropython`` process (the firmware
directory on MICROPYPATH), watches its JSON event lines and plays the fleet side with
paho-mqtt as the broker's admin user.  Every wait is on an event with a timeout.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.services.micropython import micropython_command
from tests.services.mosquitto import MosquittoBroker

pytestmark = [pytest.mark.mosquitto, pytest.mark.micropython]

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).parent / "mp_scripts" / "mqtt_probe.py"
TIMEOUT = 15.0


class Probe:
    """A MicroPython process running the probe script; its events arrive on a queue."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, MICROPYPATH=os.pathsep.join([str(ROOT / "firmware"), ".frozen"]))
        self.proc = subprocess.Popen(
            [*micropython_command(), str(PROBE), *args], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line.rstrip())
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)  # the process ended

    def expect(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next event called ``name`` (earlier ones are skipped); fail on exit/timeout."""
        while True:
            try:
                event = self.events.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no {name!r} event within {timeout}s:\n" + "\n".join(self.output))
            if event is None:
                pytest.fail(f"probe exited before {name!r}:\n" + "\n".join(self.output))
            if event["e"] == name:
                return event

    def kill(self) -> None:
        """SIGKILL: no DISCONNECT reaches the broker."""
        self.proc.kill()
        self.proc.wait(timeout=TIMEOUT)


class Fleet:
    """The fleet side: a paho client logged in as the broker's admin, collecting messages."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id="fleet-" + uuid.uuid4().hex[:8])
        self.client.username_pw_set(broker.admin_user, broker.admin_password)
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic, 1)
        assert subscribed.wait(TIMEOUT), "fleet subscription not acknowledged"

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(TIMEOUT)

    def expect(self, topic: str, timeout: float = TIMEOUT) -> paho.MQTTMessage:
        """The next message on ``topic`` (others are skipped)."""
        while True:
            try:
                msg = self.messages.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no message on {topic} within {timeout}s")
            if msg.topic == topic:
                return msg

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    started: list[Probe] = []
    yield started
    for probe in started:
        if probe.proc.poll() is None:
            probe.kill()


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    started: list[Fleet] = []
    yield started
    for fleet in started:
        fleet.close()


def device(mosquitto: MosquittoBroker, name: str) -> tuple[str, str, str]:
    """Register a device user; return (user, password, topic prefix)."""
    user = f"pt-{name}-{uuid.uuid4().hex[:6]}"
    password = uuid.uuid4().hex
    mosquitto.add_user(user, password)
    return user, password, f"fb/v1/d/{user}/"


def test_connect_subscribe_publish_receive(mosquitto: MosquittoBroker, probes: list[Probe],
                                           fleets: list[Fleet]) -> None:
    user, password, prefix = device(mosquitto, "echo")
    fleet = Fleet(mosquitto, prefix + "#")
    fleets.append(fleet)
    probe = Probe("session", mosquitto.host, str(mosquitto.port), user, password)
    probes.append(probe)
    assert probe.expect("connected")["session_present"] is False
    ready = probe.expect("ready")
    assert ready["granted"] == 1
    # A connected, subscribed session (client, stream, tasks, probe glue) stays small; ~5 KB
    # measured with MicroPython 1.29.  Module code is not counted: on a device it is frozen.
    assert ready["heap_session"] - ready["heap_import"] < 8192, ready
    fleet.publish(prefix + "cmd", b"hello")
    assert probe.expect("msg") == {"e": "msg", "topic": prefix + "cmd", "payload": "hello"}
    probe.expect("echoed")  # returned only after the broker's PUBACK
    echo = fleet.expect(prefix + "echo")
    assert echo.payload == b"hello" and echo.qos == 1
    fleet.publish(prefix + "cmd", b"bye")
    probe.expect("bye")
    assert probe.proc.wait(timeout=TIMEOUT) == 0


def test_will_is_published_when_the_device_dies(mosquitto: MosquittoBroker,
                                                probes: list[Probe],
                                                fleets: list[Fleet]) -> None:
    user, password, prefix = device(mosquitto, "will")
    fleet = Fleet(mosquitto, prefix + "status")
    fleets.append(fleet)
    probe = Probe("session", mosquitto.host, str(mosquitto.port), user, password)
    probes.append(probe)
    probe.expect("ready")
    probe.kill()
    assert fleet.expect(prefix + "status").payload == b'{"online":false}'
    late = Fleet(mosquitto, prefix + "status")  # the will was retained
    fleets.append(late)
    msg = late.expect(prefix + "status")
    assert msg.payload == b'{"online":false}' and msg.retain


def test_wrong_password_is_refused_with_code_5(mosquitto: MosquittoBroker,
                                               probes: list[Probe]) -> None:
    user, _password, _prefix = device(mosquitto, "auth")
    probe = Probe("refused", mosquitto.host, str(mosquitto.port), user, "wrong-password")
    probes.append(probe)
    assert probe.expect("refused")["code"] == 5
    assert probe.proc.wait(timeout=TIMEOUT) == 0


def test_link_reconnects_and_resubscribes_after_broker_restart(
        mosquitto: MosquittoBroker, probes: list[Probe], fleets: list[Fleet]) -> None:
    user, password, prefix = device(mosquitto, "link")
    probe = Probe("link", mosquitto.host, str(mosquitto.port), user, password, "0.05", "0.5")
    probes.append(probe)
    assert probe.expect("up")["reconnects"] == 0
    mosquitto.restart()
    probe.expect("down")
    assert probe.expect("up")["reconnects"] == 1
    fleet = Fleet(mosquitto, prefix + "status")  # a fresh session on the new broker process
    fleets.append(fleet)
    assert fleet.expect(prefix + "status").payload == b'{"online":true}'  # birth, retained
    fleet.publish(prefix + "cmd", b"after-restart")
    assert probe.expect("msg")["payload"] == "after-restart"  # subscription was re-made
    fleet.publish(prefix + "cmd", b"bye")
    probe.expect("bye")
    assert probe.proc.wait(timeout=TIMEOUT) == 0
