"""Device accounts kept by Mosquitto's dynamic-security plugin, driven over MQTT.

The plugin takes JSON commands on ``$CONTROL/dynamic-security/v1`` from an account allowed
to publish there and answers on ``.../response``.  Each call here opens one short connection
as that admin account, sends one batch of commands, waits for the answer and disconnects; it
is bounded by ``timeout`` seconds from connect to answer.  Provisioning is rare (minutes per
board), so a connection per call costs nothing and leaves no state to go stale.

A device gets a client (username = device id) and a role of its own, ``device-<id>``, whose
ACLs allow only ``{root}/d/<id>/#``.  Mosquitto 2.0's plugin has no ``%u`` patterns, so a
shared role cannot express "own topics only".
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.broker.accounts import BrokerRefused, BrokerUnavailable
from fleet.broker.acl import CONTROL_TOPIC, RESPONSE_TOPIC, device_acls, device_role
from fleet.mqtt_url import parse_mqtt_url

Command = dict[str, Any]

# Error texts of the plugin (mosquitto 2.0.11) that mean "already as wanted".
_EXISTS = "already exists"
_NOT_FOUND = "not found"
_LOGIN = "the admin login"


class DynsecAccounts:
    """:class:`~fleet.broker.accounts.DeviceAccounts` on Mosquitto's dynamic-security plugin."""

    def __init__(self, admin_url: str, *, topic_root: str = "fb/v1",
                 timeout: float = 5.0) -> None:
        self.target = parse_mqtt_url(admin_url)
        if not self.target.username:
            raise ValueError("the broker admin URL needs a username and password "
                             "(mqtt://palaute-admin:PASSWORD@host:port)")
        self.topic_root = topic_root
        self.timeout = timeout

    @property
    def where(self) -> str:
        """``host:port`` of the broker, for messages."""
        return f"{self.target.host}:{self.target.port}"

    # -- DeviceAccounts ----------------------------------------------------------------------

    def set_device(self, device_id: str, password: str) -> bool:
        """Create the device's client and role, or set a new password (True if it existed)."""
        role = device_role(device_id)
        acls = device_acls(device_id, self.topic_root)
        # modifyRole replaces the ACLs of a role that already existed (made with another
        # topic root, or edited by hand), so the account always ends up exactly as intended.
        *_role, created_client = self.execute([
            {"command": "createRole", "rolename": role, "acls": acls},
            {"command": "modifyRole", "rolename": role, "acls": acls},
            {"command": "createClient", "username": device_id, "password": password,
             "roles": [{"rolename": role}]},
        ], tolerate=(_EXISTS,))
        if "error" not in created_client:
            return False
        # The client existed: one modifyClient sets the new password and resets its roles to
        # exactly its own (addClientRole answers "Internal error" for a role already held).
        self.execute([{"command": "modifyClient", "username": device_id, "password": password,
                       "roles": [{"rolename": role}]}])
        return True

    def remove_device(self, device_id: str) -> bool:
        """Delete the device's client (the plugin disconnects it) and its role."""
        role = device_role(device_id)
        client, _role = self.execute([
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": role},
        ], tolerate=(_NOT_FOUND,))
        return "error" not in client

    # -- the control topic -------------------------------------------------------------------

    def execute(self, commands: Sequence[Command], *,
                tolerate: Sequence[str] = ()) -> list[Command]:
        """Send ``commands`` as one batch and return the plugin's answer to each, in order.

        An answer with an ``error`` raises :class:`BrokerRefused`, unless the error text
        contains one of ``tolerate`` (such answers are returned for the caller to inspect).
        """
        tagged = [{**c, "correlationData": secrets.token_hex(8)} for c in commands]
        answers = self._roundtrip(tagged)
        for command, answer in zip(tagged, answers, strict=True):
            error = answer.get("error")
            if error and not any(t in str(error).lower() for t in tolerate):
                raise BrokerRefused(f"the broker at {self.where} refused {command['command']}: "
                                    f"{error}")
        return answers

    def _roundtrip(self, commands: list[Command]) -> list[Command]:
        wanted = {c["correlationData"] for c in commands}
        got: dict[str, Command] = {}
        state: dict[str, Any] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=f"palaute-dynsec-{secrets.token_hex(4)}",
                             protocol=mqtt.MQTTv311)
        client.username_pw_set(self.target.username, self.target.password)
        # Bounds the TCP connect too (a host that drops packets would otherwise hang it).
        client.connect_timeout = self.timeout

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            state["connack"] = reason

        def on_subscribe(_c: mqtt.Client, _u: Any, _m: int, reasons: list[Any],
                         _p: Any) -> None:
            state["suback"] = reasons

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                body = json.loads(msg.payload)
                responses = body.get("responses", []) if isinstance(body, dict) else []
            except ValueError:
                return
            for response in responses:
                if isinstance(response, dict) and response.get("correlationData") in wanted:
                    got[response["correlationData"]] = response

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        deadline = time.monotonic() + self.timeout
        try:
            client.connect(self.target.host, self.target.port,
                           keepalive=max(10, int(self.timeout) * 2))
        except OSError as exc:
            raise BrokerUnavailable(
                f"broker at {self.where} unreachable ({exc.strerror or exc})") from None
        try:
            self._pump(client, deadline, lambda: "connack" in state, _LOGIN)
            if state["connack"].is_failure:
                raise BrokerRefused(
                    f"the broker at {self.where} refused the admin login of "
                    f"{self.target.username!r} ({state['connack']}); check "
                    "PALAUTE_BROKER_ADMIN_URL against the broker's dynamic-security.json")
            client.subscribe(RESPONSE_TOPIC, qos=1)
            self._pump(client, deadline, lambda: "suback" in state,
                       "the subscription to its control responses")
            if any(r.is_failure for r in state["suback"]):
                raise BrokerRefused(
                    f"the broker at {self.where} does not let {self.target.username!r} read "
                    f"{RESPONSE_TOPIC}; it is not the dynamic-security admin account")
            client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
            self._pump(client, deadline, lambda: wanted <= got.keys(), "the account commands",
                       hint="; is its dynamic-security plugin loaded?")
        finally:
            client.disconnect()
        return [got[c["correlationData"]] for c in commands]

    def _pump(self, client: mqtt.Client, deadline: float, done: Callable[[], bool],
              what: str, hint: str = "") -> None:
        """Run the client's network loop until ``done()`` or the deadline."""
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerUnavailable(f"broker at {self.where} did not answer {what} "
                                        f"within {self.timeout:g}s{hint}")
            rc = client.loop(timeout=min(remaining, 0.5))
            if rc != mqtt.MQTT_ERR_SUCCESS and not done():
                reason = mqtt.error_string(rc)
                if not client.is_connected() and what == _LOGIN:
                    # Lost before any answer: the TCP connection itself failed.
                    raise BrokerUnavailable(f"broker at {self.where} unreachable ({reason})")
                raise BrokerUnavailable(f"broker at {self.where} closed the connection while "
                                        f"waiting for {what} ({reason})")
