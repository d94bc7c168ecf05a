"""Device configuration (``config.json``): load and validate at boot.

Errors name the key and say what to do, because an installer reads them on a 128x64 screen or
in the provisioning log.  A bad config never crashes the terminal: the app shows the error and
keeps retrying (safe mode).
"""

import json

from terminal.abuse import BURST_COUNT_MAX

DEFAULTS = {
    "topic_root": "fb/v1",
    "board": "esp32-devkitc",
    "buttons": 4,
    "keepalive_s": 60,
    "health_interval_s": 300,
    "ack_timeout_s": 15,
    "batch_max": 50,
    "debounce_ms": 30,
    "min_gap_ms": 2000,
    "burst_count": 8,
    "burst_window_ms": 20000,
    "burst_quiet_ms": 30000,
    # Reconnect backoff (full jitter between 0 and min * 2^n, capped); the attempt counter
    # resets once a session has stayed up reconnect_stable_s.
    "reconnect_min_ms": 1000,
    "reconnect_max_s": 300,
    "reconnect_stable_s": 60,
    # Ctrl-C off while the terminal runs; test mode (the button chord) turns it back on.
    "repl_lock": False,
    # Over-the-air content (docs/content.md): the largest package accepted and how long to
    # wait for each requested chunk.  ``content_key`` (no default) is the fleet's Ed25519
    # public key as 64 hex digits; without it every content update is refused (no_key).
    "content_max_bytes": 65536,
    "fetch_timeout_s": 10,
}
CONTENT_MAX_BYTES = 1048576  # a package must fit the flash next to the vote log
_HEX = "0123456789abcdef"


class ConfigError(ValueError):
    """A config problem; ``key`` names the offending key."""

    def __init__(self, key, message):
        super().__init__("%s: %s" % (key, message))
        self.key = key


class CredentialsRejected(OSError):
    """The Wi-Fi access point refused the config's password: retrying cannot help, so boot
    turns it into safe mode (``wifi: ...``) instead of letting the link retry forever."""


def _require(cfg, key, kind, name=None):
    value = cfg.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(name or key, "missing or not a %s" % kind.__name__)
    return value


def valid_device_id(device_id):
    """True for ``pt-`` followed by 12 lowercase hex digits."""
    if not isinstance(device_id, str) or len(device_id) != 15 or device_id[:3] != "pt-":
        return False
    return all(c in _HEX for c in device_id[3:])


def validate(raw):
    """Return a complete config dict from ``raw``; raise ConfigError on the first problem."""
    if not isinstance(raw, dict):
        raise ConfigError("config", "must be a JSON object")
    cfg = dict(DEFAULTS)
    cfg.update(raw)
    if not valid_device_id(cfg.get("device_id")):
        raise ConfigError("device_id", "must be 'pt-' and 12 lowercase hex digits")
    mqtt = _require(cfg, "mqtt", dict)
    _require(mqtt, "host", str, "mqtt.host")
    port = mqtt.get("port", 1883)
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError("mqtt.port", "must be a TCP port number")
    mqtt["port"] = port
    _require(mqtt, "user", str, "mqtt.user")
    _require(mqtt, "password", str, "mqtt.password")
    buttons = cfg["buttons"]
    if not isinstance(buttons, int) or not 2 <= buttons <= 5:
        raise ConfigError("buttons", "must be 2..5")
    for key in ("keepalive_s", "health_interval_s", "ack_timeout_s", "batch_max",
                "debounce_ms", "min_gap_ms", "burst_count", "burst_window_ms",
                "burst_quiet_ms", "reconnect_min_ms", "reconnect_max_s", "reconnect_stable_s"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(key, "must be a non-negative integer")
        if key == "burst_count" and value > BURST_COUNT_MAX:
            raise ConfigError(key, "must be 0..%d (0 switches burst suppression off)"
                              % BURST_COUNT_MAX)
    batch_max = cfg["batch_max"]
    if not isinstance(batch_max, int) or not 1 <= batch_max <= 50:
        raise ConfigError("batch_max", "must be 1..50 (protocol v1 limit)")
    max_bytes = cfg["content_max_bytes"]
    if (not isinstance(max_bytes, int) or isinstance(max_bytes, bool)
            or not 1024 <= max_bytes <= CONTENT_MAX_BYTES):
        raise ConfigError("content_max_bytes", "must be 1024..%d" % CONTENT_MAX_BYTES)
    timeout = cfg["fetch_timeout_s"]
    if not isinstance(timeout, int) or isinstance(timeout, bool) or not 1 <= timeout <= 600:
        raise ConfigError("fetch_timeout_s", "must be 1..600 seconds")
    content_key = cfg.get("content_key")
    if content_key is not None:
        if (not isinstance(content_key, str) or len(content_key) != 64
                or not all(c in _HEX for c in content_key.lower())):
            raise ConfigError("content_key", "must be 64 hex digits (the fleet's content "
                                             "public key: palaute content keygen prints it)")
        cfg["content_key"] = content_key.lower()
    wifi = cfg.get("wifi")
    if wifi is not None:
        _require(wifi, "ssid", str, "wifi.ssid")
        _require(wifi, "password", str, "wifi.password")
    _require(cfg, "repl_lock", bool)
    return cfg


def read_json(path, key, unreadable, invalid):
    """Parse the JSON file at ``path``; a missing or broken file is a ConfigError on ``key``
    whose message is ``unreadable`` or ``invalid`` (each with ``%s`` for the path)."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        raise ConfigError(key, unreadable % path) from None
    except ValueError:
        raise ConfigError(key, invalid % path) from None


def load(path):
    """Read and validate the config file at ``path``."""
    return validate(read_json(path, "config", "cannot read %s; provision the device",
                              "%s is not valid JSON; re-provision the device"))
