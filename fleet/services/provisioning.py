"""Provisioning a terminal: registry entry, site, and its own broker account, all or nothing.

The database changes are made in the caller's session first and the broker account last;
the caller commits only if everything succeeded.  So a broker error leaves the registry as
it was.  The reverse (the account was changed, then the commit failed) leaves an account
whose password nobody knows, for a device that is not registered: harmless, and the next
provisioning of that board rotates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.broker.accounts import DeviceAccounts, new_password
from fleet.config import Settings
from fleet.db.models import Device, DeviceState, User
from fleet.mqtt_url import parse_mqtt_url
from fleet.services import audit, registry
from fleet.services.registry import Conflict


@dataclass(frozen=True)
class Provisioned:
    """The outcome of provisioning one device; ``password`` is its new broker password."""

    device: Device
    created: bool
    rotated: bool
    site_id: int | None
    password: str


def device_broker_address(settings: Settings) -> tuple[str, int]:
    """Host and port devices are told to use: ``device_mqtt_*``, else those of ``mqtt_url``."""
    target = parse_mqtt_url(settings.mqtt_url)
    return settings.device_mqtt_host or target.host, settings.device_mqtt_port or target.port


def device_config(settings: Settings, device_id: str, password: str, *,
                  content_key: str | None = None) -> dict[str, Any]:
    """The fleet-owned part of a device's config.json (keys as firmware/terminal/config.py
    reads them); the installer adds wifi, board and device_id.  ``content_key`` is the
    public key the terminal checks content signatures with."""
    host, port = device_broker_address(settings)
    config: dict[str, Any] = {
        "mqtt": {"host": host, "port": port, "user": device_id, "password": password},
        "topic_root": settings.topic_root}
    if content_key:
        config["content_key"] = content_key
    return config


def provision_device(session: Session, *, accounts: DeviceAccounts, device_id: str,
                     board: str = "", site_id: int | None = None,
                     actor: User | None = None) -> Provisioned:
    """Register (if new), assign to ``site_id`` (if given and not there yet), set a fresh
    broker password.

    Raises :class:`~fleet.services.registry.RegistryError` (malformed id, unknown site,
    retired device) before touching the broker, and
    :class:`~fleet.broker.accounts.BrokerError` if the account cannot be made; in both cases
    the caller must not commit.
    """
    registry.check_device_id(device_id)
    device = session.scalar(select(Device).where(Device.id == device_id).with_for_update())
    created = device is None
    if device is None:
        device = registry.register_device(session, device_id=device_id, board=board,
                                          exist_ok=False, actor=actor)
    elif device.state is DeviceState.retired:
        raise Conflict(f"device {device_id} is retired; a retired terminal is never given "
                       "credentials again: use another board, or ask an admin if it was "
                       "retired by mistake")
    elif board and board != device.board:
        registry.update_device(session, device_id=device_id, board=board, actor=actor)
    if site_id is not None:
        registry.get_site(session, site_id=site_id)
        current = registry.current_assignment(session, device_id=device_id)
        if current is None or current.site_id != site_id:
            registry.assign_device(session, device_id=device_id, site_id=site_id, actor=actor)
    current = registry.current_assignment(session, device_id=device_id)
    session.flush()
    password = new_password()
    rotated = accounts.set_device(device_id, password)
    # The audit entry never holds the password.
    audit.record(session, user=actor, action="provision", entity="device",
                 entity_id=device_id, detail={"created": created, "rotated": rotated,
                                              "board": device.board})
    return Provisioned(device=device, created=created, rotated=rotated,
                       site_id=current.site_id if current else None, password=password)


def retire_device(session: Session, *, accounts: DeviceAccounts | None, device_id: str,
                  actor: User | None = None) -> Device:
    """Retire the device in the registry, then delete its broker account (disconnecting it).

    Without ``accounts`` (no broker admin configured) only the registry changes.  A broker
    error propagates and the caller must not commit: the device stays in service rather than
    being retired while still able to connect.
    """
    device = registry.retire_device(session, device_id=device_id, actor=actor)
    if accounts is not None:
        existed = accounts.remove_device(device_id)
        audit.record(session, user=actor, action="revoke_credentials", entity="device",
                     entity_id=device_id, detail={"had_account": existed})
    return device
