"""config.json validation: errors name the key; a bad file never crashes the terminal."""

import json

from _support import raises, tempdir
from terminal.config import ConfigError, load, valid_device_id, validate


def good():
    return {"device_id": "pt-0123456789ab",
            "mqtt": {"host": "broker.example", "port": 1883, "user": "pt-0123456789ab",
                     "password": "s3cret"}}


def test_valid_config_gets_defaults():
    cfg = validate(good())
    assert cfg["topic_root"] == "fb/v1"
    assert cfg["buttons"] == 4
    assert cfg["batch_max"] == 50
    assert (cfg["reconnect_min_ms"], cfg["reconnect_max_s"]) == (1000, 300)


def test_device_id_rules():
    assert valid_device_id("pt-0123456789ab")
    for bad in ("pt-0123456789AB", "pt-0123456789a", "xx-0123456789ab", None, 5):
        assert not valid_device_id(bad)


def check_key(mutate, key):
    cfg = good()
    mutate(cfg)
    err = raises(ConfigError, validate, cfg)
    assert err.key == key, (err.key, key)
    assert key in str(err)


def test_each_problem_names_its_key():
    check_key(lambda c: c.update(device_id="pt-zz"), "device_id")
    check_key(lambda c: c.pop("mqtt"), "mqtt")
    check_key(lambda c: c["mqtt"].pop("host"), "mqtt.host")
    check_key(lambda c: c["mqtt"].update(port=70000), "mqtt.port")
    check_key(lambda c: c["mqtt"].update(password=None), "mqtt.password")
    check_key(lambda c: c.update(buttons=6), "buttons")
    check_key(lambda c: c.update(batch_max=51), "batch_max")
    check_key(lambda c: c.update(ack_timeout_s=-1), "ack_timeout_s")
    check_key(lambda c: c.update(reconnect_min_ms="fast"), "reconnect_min_ms")
    check_key(lambda c: c.update(reconnect_max_s=-5), "reconnect_max_s")
    check_key(lambda c: c.update(wifi={"ssid": 5, "password": "x"}), "wifi.ssid")
    assert raises(ConfigError, validate, [1, 2]).key == "config"


def test_load_reports_missing_and_corrupt_files():
    root = tempdir("cfg")
    assert "provision" in str(raises(ConfigError, load, root + "/missing.json"))
    with open(root + "/bad.json", "w") as f:
        f.write('{"device_id": "pt-0123')
    assert "not valid JSON" in str(raises(ConfigError, load, root + "/bad.json"))
    with open(root + "/ok.json", "w") as f:
        f.write(json.dumps(good()))
    assert load(root + "/ok.json")["device_id"] == "pt-0123456789ab"


def test_content_keys_are_validated():
    cfg = validate(good())
    assert cfg["content_max_bytes"] == 65536 and cfg["fetch_timeout_s"] == 10
    assert cfg.get("content_key") is None  # optional: without it updates are refused
    raw = good()
    raw["content_key"] = "AB" * 32
    assert validate(raw)["content_key"] == "ab" * 32
    check_key(lambda c: c.update(content_key="ab" * 31), "content_key")
    check_key(lambda c: c.update(content_key="zz" * 32), "content_key")
    check_key(lambda c: c.update(content_key=5), "content_key")
    check_key(lambda c: c.update(content_max_bytes=100), "content_max_bytes")
    check_key(lambda c: c.update(content_max_bytes=True), "content_max_bytes")
    check_key(lambda c: c.update(fetch_timeout_s=0), "fetch_timeout_s")
    check_key(lambda c: c.update(fetch_timeout_s="10"), "fetch_timeout_s")
    assert "keygen" in str(raises(ConfigError, validate, dict(good(), content_key="x")))
