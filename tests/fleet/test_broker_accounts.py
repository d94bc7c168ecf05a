"""Device accounts on a real Mosquitto configured by ``palaute broker-config``.

What Mosquitto 2.0.11 with the dynamic-security plugin really does, asserted here:

* a device may subscribe only below ``fb/v1/d/<its id>/``; a subscription to ``#`` or to
  another device's topics gets SUBACK 0x80 (failure) — unlike the ACL file, the plugin
  checks subscriptions;
* a device may publish only its own uplinks (votes, health, status, reported, fetch,
  cmd/result); a publish to another device's topic, or to one of its own downlinks (a
  retained ``desired`` of its own making, say), is PUBACKed (3.1.1 cannot refuse), dropped
  and not retained;
* deleting a client disconnects it at once, and so does changing its password;
* the ACL check sees shared subscriptions with their ``$share/<group>/`` prefix, so the
  ingest account is granted exactly its own group.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from fleet.broker.accounts import BrokerRefused, BrokerUnavailable, new_password
from fleet.broker.config_files import dynsec_state, hash_password, mosquitto_conf
from fleet.broker.dynsec import DynsecAccounts
from fleet.cli import main
from fleet.mqtt_url import parse_mqtt_url
from tests.fleet.broker_helpers import WatchedClient, login
from tests.services.common import free_port
from tests.services.mosquitto import CONNACK_ACCEPTED, CONNACK_NOT_AUTHORISED, MosquittoBroker
from tests.services.mosquitto import DynsecMosquittoBroker as Broker
from tests.services.test_services import SUBACK_FAILURE, take

pytestmark = pytest.mark.mosquitto

DEV_A, DEV_B = "pt-00000000000a", "pt-00000000000b"


def accounts_of(broker: Broker, timeout: float = 5.0) -> DynsecAccounts:
    return DynsecAccounts(broker.admin_url, timeout=timeout)


def ingest_login(request: pytest.FixtureRequest, broker: Broker) -> WatchedClient:
    ingest = parse_mqtt_url(broker.ingest_url)
    assert ingest.username and ingest.password
    return login(request, broker, ingest.username, ingest.password)


# -- palaute broker-config ----------------------------------------------------------------


def test_generated_files_are_private_and_hold_no_plain_password(
        dynsec_mosquitto: Broker) -> None:
    directory = dynsec_mosquitto.generated_dir
    conf = (directory / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf
    assert "mosquitto_dynamic_security.so" in conf
    assert "persistence true" in conf
    for name in ("palaute-broker.env", "dynamic-security.json"):
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
    secrets = [dynsec_mosquitto.admin_password,
               parse_mqtt_url(dynsec_mosquitto.ingest_url).password]
    for name in ("mosquitto.conf", "dynamic-security.json"):
        text = (directory / name).read_text()
        assert not any(s and s in text for s in secrets), f"a password in clear in {name}"


def test_generated_accounts_log_in_and_nobody_else(dynsec_mosquitto: Broker) -> None:
    # Logging in proves the PBKDF2-SHA512 hashes are what the plugin expects.
    ingest = parse_mqtt_url(dynsec_mosquitto.ingest_url)
    assert ingest.username == "palaute-ingest"
    assert dynsec_mosquitto.connack_code(ingest.username, ingest.password) == CONNACK_ACCEPTED
    assert dynsec_mosquitto.connack_code("palaute-admin", dynsec_mosquitto.admin_password) \
        == CONNACK_ACCEPTED
    assert dynsec_mosquitto.connack_code(None, None) == CONNACK_NOT_AUTHORISED
    assert dynsec_mosquitto.connack_code("palaute-admin", "guess") == CONNACK_NOT_AUTHORISED


def test_hash_matches_pbkdf2_sha512_reference() -> None:
    # Fixed input, so a change of algorithm, encoding or field names is caught here as well
    # as by the broker refusing the logins above.
    fields = hash_password("secret", salt=b"0123456789ab", iterations=101)
    assert fields["salt"] == "MDEyMzQ1Njc4OWFi"
    assert fields["iterations"] == 101
    assert len(fields["password"]) == 88  # base64 of 64 bytes


def test_broker_config_refuses_to_overwrite(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker-config", "--out", str(tmp_path), "--listen", "127.0.0.1:1883"]) == 0
    out = capsys.readouterr().out
    env = (tmp_path / "palaute-broker.env").read_text()
    password = parse_mqtt_url(env.split("PALAUTE_MQTT_URL=")[1].split()[0]).password
    assert password and password not in out, "the command printed a secret"
    before = (tmp_path / "dynamic-security.json").read_text()
    assert main(["broker-config", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--force" in err and len(err.splitlines()) == 1
    assert (tmp_path / "dynamic-security.json").read_text() == before


def test_shipped_examples_match_what_the_command_writes() -> None:
    # docs/deploy/ must stay true: same directives, same roles and ACLs, no secrets.
    deploy = Path(__file__).parents[2] / "docs" / "deploy"
    example = json.loads((deploy / "dynamic-security.example.json").read_text())
    state = dynsec_state(admin_password="a", ingest_password="b", topic_root="fb/v1",
                         shared_group="palaute-ingest")
    for client in (*example["clients"], *state["clients"]):
        assert client.pop("password") and client.pop("salt")
    assert example == state

    def directives(text: str) -> list[str]:
        return [line for line in text.splitlines() if line and not line.startswith("#")]
    conf = mosquitto_conf(directory=Path("/var/lib/palaute-broker"), host="0.0.0.0", port=1883,
                          plugin="/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")
    assert directives((deploy / "mosquitto.conf").read_text()) == directives(conf)


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "nowhere"], "expected HOST:PORT"),
    (["--listen", "0.0.0.0:70000"], "expected HOST:PORT"),
    (["--plugin", "/nonexistent/dynsec.so"], "no such file"),
])
def test_broker_config_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     args: list[str], message: str) -> None:
    assert main(["broker-config", "--out", str(tmp_path / "conf"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "conf").exists()


# -- device accounts ----------------------------------------------------------------------


def test_device_uses_its_own_topics_and_no_others(dynsec_mosquitto: Broker,
                                                  request: pytest.FixtureRequest) -> None:
    accounts = accounts_of(dynsec_mosquitto)
    password = new_password()
    assert accounts.set_device(DEV_A, password) is False  # created
    accounts.set_device(DEV_B, new_password())
    fleet = ingest_login(request, dynsec_mosquitto)
    assert [r.value for r in fleet.subscribe("$share/palaute-ingest/fb/v1/d/+/votes")] == [1]
    device = login(request, dynsec_mosquitto, DEV_A, password)

    # Subscriptions outside its subtree are refused outright by the plugin.
    codes = device.subscribe("#", f"fb/v1/d/{DEV_B}/#", "fb/v1/d/+/ack", f"fb/v1/d/{DEV_A}/#")
    assert [r.value for r in codes] == [SUBACK_FAILURE, SUBACK_FAILURE, SUBACK_FAILURE, 1]

    # Publishing as another device is acknowledged but never delivered; the device's own
    # message, sent after it on the same connection, is.
    device.publish(f"fb/v1/d/{DEV_B}/votes", b"forged")
    device.publish(f"fb/v1/d/{DEV_A}/votes", b"own")
    assert fleet.receive_until(b"own") == [(f"fb/v1/d/{DEV_A}/votes", b"own")]

    # It receives what the fleet sends to it (after the echo of its own vote, as it
    # subscribed to its whole subtree; the forged one never reaches it either).
    fleet.publish(f"fb/v1/d/{DEV_A}/ack", b"ack")
    assert device.receive_until(b"ack") == [(f"fb/v1/d/{DEV_A}/votes", b"own"),
                                            (f"fb/v1/d/{DEV_A}/ack", b"ack")]


def publish_retained(client: WatchedClient, topic: str, payload: bytes) -> None:
    """Publish retained at QoS 1 and wait for the PUBACK (3.1.1 PUBACKs refused ones too)."""
    info = client.client.publish(topic, payload, qos=1, retain=True)
    info.wait_for_publish(timeout=10)
    assert info.is_published(), f"no PUBACK for {topic}"


def test_device_sends_only_its_uplinks_and_cannot_mask_the_fleets_desired(
        dynsec_mosquitto: Broker, request: pytest.FixtureRequest) -> None:
    password = new_password()
    accounts_of(dynsec_mosquitto).set_device(DEV_A, password)
    own = f"fb/v1/d/{DEV_A}/"
    uplinks = ("votes", "health", "status", "reported", "fetch", "cmd/result")
    fleet = ingest_login(request, dynsec_mosquitto)
    codes = fleet.subscribe(*(f"fb/v1/d/+/{leaf}" for leaf in uplinks))
    assert [r.value for r in codes] == [1] * len(uplinks)
    publish_retained(fleet, own + "desired", b"fleet's desired")

    device = login(request, dynsec_mosquitto, DEV_A, password)
    assert [r.value for r in device.subscribe(own + "#")] == [1]
    assert device.receive_until(b"fleet's desired") == [(own + "desired", b"fleet's desired")]
    # Its own downlinks, retained: acknowledged (3.1.1 cannot refuse) and dropped.
    for leaf in ("desired", "ack", "chunk", "cmd"):
        publish_retained(device, own + leaf, b"forged " + leaf.encode())
    for leaf in uplinks:
        device.publish(own + leaf, leaf.encode())
    sent = [(own + leaf, leaf.encode()) for leaf in uplinks]
    # The fleet gets every uplink; the device's own subscription sees only their echoes (a
    # forgery, sent before them on the same connection, would have come first).
    assert fleet.receive_until(b"cmd/result") == sent
    assert device.receive_until(b"cmd/result") == sent

    # Nothing forged was retained: a new session gets the fleet's desired and no retained
    # ack, chunk or cmd (retained messages arrive before anything published later).
    again = login(request, dynsec_mosquitto, DEV_A, password)
    assert [r.value for r in again.subscribe(own + "#")] == [1]
    fleet.publish(own + "ack", b"end")
    assert again.receive_until(b"end") == [(own + "desired", b"fleet's desired"),
                                           (own + "ack", b"end")]


def test_ingest_account_may_not_act_as_a_device_or_join_other_groups(
        dynsec_mosquitto: Broker, request: pytest.FixtureRequest) -> None:
    fleet = ingest_login(request, dynsec_mosquitto)
    codes = fleet.subscribe("$share/palaute-ingest/fb/v1/d/+/status", "fb/v1/d/+/fetch",
                            "$share/other/fb/v1/d/+/votes", "fb/v1/d/+/ack", "#",
                            "$CONTROL/dynamic-security/#")
    assert [r.value for r in codes] == [1, 1] + [SUBACK_FAILURE] * 4


def test_rotation_refuses_the_old_password_and_disconnects(
        dynsec_mosquitto: Broker, request: pytest.FixtureRequest) -> None:
    accounts = accounts_of(dynsec_mosquitto)
    old, new = new_password(), new_password()
    accounts.set_device(DEV_A, old)
    device = login(request, dynsec_mosquitto, DEV_A, old)
    assert accounts.set_device(DEV_A, new) is True  # rotated
    take(device.disconnects, "the device to be disconnected by the password change")
    assert dynsec_mosquitto.connack_code(DEV_A, old) == CONNACK_NOT_AUTHORISED
    assert dynsec_mosquitto.connack_code(DEV_A, new) == CONNACK_ACCEPTED
    # Still confined to its own topics after the rotation.
    again = login(request, dynsec_mosquitto, DEV_A, new)
    assert [r.value for r in again.subscribe("#", f"fb/v1/d/{DEV_A}/#")] == [SUBACK_FAILURE, 1]


def test_reprovisioning_rewrites_the_role(dynsec_mosquitto: Broker,
                                         request: pytest.FixtureRequest) -> None:
    # An account made under another topic root is put right by the next set_device.
    password = new_password()
    DynsecAccounts(dynsec_mosquitto.admin_url, topic_root="old/v0").set_device(DEV_A, password)
    accounts_of(dynsec_mosquitto).set_device(DEV_A, password)
    device = login(request, dynsec_mosquitto, DEV_A, password)
    codes = device.subscribe(f"old/v0/d/{DEV_A}/#", f"fb/v1/d/{DEV_A}/#")
    assert [r.value for r in codes] == [SUBACK_FAILURE, 1]


def test_removal_disconnects_and_locks_out(dynsec_mosquitto: Broker,
                                           request: pytest.FixtureRequest) -> None:
    accounts = accounts_of(dynsec_mosquitto)
    password = new_password()
    accounts.set_device(DEV_A, password)
    device = login(request, dynsec_mosquitto, DEV_A, password)
    assert accounts.remove_device(DEV_A) is True
    take(device.disconnects, "the device to be disconnected by the account's removal")
    assert dynsec_mosquitto.connack_code(DEV_A, password) == CONNACK_NOT_AUTHORISED
    assert accounts.remove_device(DEV_A) is False
    # A removed device can be given an account again (a fresh one).
    assert accounts.set_device(DEV_A, password) is False


def test_accounts_survive_a_broker_restart(dynsec_mosquitto: Broker) -> None:
    password = new_password()
    accounts_of(dynsec_mosquitto).set_device(DEV_A, password)
    dynsec_mosquitto.restart()
    assert dynsec_mosquitto.connack_code(DEV_A, password) == CONNACK_ACCEPTED


# -- admin errors --------------------------------------------------------------------------


def test_unreachable_broker_is_a_clear_error() -> None:
    accounts = DynsecAccounts(f"mqtt://palaute-admin:x@127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(BrokerUnavailable, match=r"broker at 127\.0\.0\.1:\d+ unreachable "
                                                r"\(Connection refused\)"):
        accounts.set_device(DEV_A, "pw")


def test_silent_peer_times_out_clearly() -> None:
    # Something listens on the port but never speaks MQTT (a hung broker, a wrong service).
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        accounts = DynsecAccounts(f"mqtt://palaute-admin:x@127.0.0.1:{port}", timeout=1)
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=rf"broker at 127\.0\.0\.1:{port} did not "
                                                    r"answer the admin login within 1s"):
            accounts.set_device(DEV_A, "pw")
        assert time.monotonic() - started < 5


def test_wrong_admin_password_is_a_clear_error(dynsec_mosquitto: Broker) -> None:
    accounts = DynsecAccounts(
        f"mqtt://palaute-admin:wrong@{dynsec_mosquitto.host}:{dynsec_mosquitto.port}")
    with pytest.raises(BrokerRefused, match=r"refused the admin login of 'palaute-admin'.*"
                                            r"PALAUTE_BROKER_ADMIN_URL"):
        accounts.set_device(DEV_A, "pw")


def test_non_admin_account_is_a_clear_error(dynsec_mosquitto: Broker) -> None:
    accounts = DynsecAccounts(dynsec_mosquitto.ingest_url)
    with pytest.raises(BrokerRefused, match="not the dynamic-security admin account"):
        accounts.set_device(DEV_A, "pw")


def test_broker_without_the_plugin_times_out_clearly(mosquitto: MosquittoBroker) -> None:
    # The password-file broker accepts the admin, but nothing answers on $CONTROL.
    accounts = DynsecAccounts(
        mosquitto.url_for(mosquitto.admin_user, mosquitto.admin_password), timeout=1)
    with pytest.raises(BrokerUnavailable, match=r"did not answer the account commands within "
                                                r"1s; is its dynamic-security plugin loaded\?"):
        accounts.set_device(DEV_A, "pw")


def test_device_ids_cannot_widen_an_acl() -> None:
    accounts = DynsecAccounts("mqtt://palaute-admin:x@127.0.0.1:1")
    for bad in ("pt-+", "pt-#", "#", "pt-00000000000A"):
        with pytest.raises(ValueError, match="12 lowercase hex"):
            accounts.set_device(bad, "pw")
