"""Parsing of ``mqtt://user:password@host:port`` URLs used in settings."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class MqttTarget:
    """Where a broker is and how to log in."""

    host: str
    port: int
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> MqttTarget:
    """Split an ``mqtt://`` URL; raise ValueError naming the problem."""
    parts = urlsplit(url)
    if parts.scheme != "mqtt":
        raise ValueError(f"MQTT URL {url!r} must start with mqtt:// (mqtts is not supported yet)")
    if not parts.hostname:
        raise ValueError(f"MQTT URL {url!r} has no host")
    return MqttTarget(
        host=parts.hostname,
        port=parts.port or 1883,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
