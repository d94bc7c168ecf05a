"""MQTT test clients for the broker-account tests: accepted logins that report disconnects."""

from __future__ import annotations

import queue
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.services.mosquitto import MosquittoBroker
from tests.services.test_services import Client


class WatchedClient(Client):
    """A test client that also reports being disconnected."""

    def __init__(self, broker: MosquittoBroker, username: str | None, password: str | None,
                 **options: Any) -> None:
        super().__init__(broker, username, password, **options)
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.client.on_disconnect = self._on_disconnect

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any,
                       reason: ReasonCode, _properties: Properties | None) -> None:
        self.disconnects.put(reason)


def login(request: pytest.FixtureRequest, broker: MosquittoBroker, username: str,
          password: str) -> WatchedClient:
    """A client the broker accepted, closed when the test ends (even if it fails)."""
    client = WatchedClient(broker, username, password)
    request.addfinalizer(client.close)
    _flags, reason = client.connect()
    assert not reason.is_failure, f"{username} was refused: {reason}"
    return client

