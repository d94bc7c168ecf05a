"""The interface between the fleet's services and whatever keeps the broker's accounts."""

from __future__ import annotations

import secrets
from typing import Protocol


class BrokerError(RuntimeError):
    """A broker account could not be changed; the message says why, in one sentence."""


class BrokerUnavailable(BrokerError):
    """The broker (or its account plugin) could not be reached or did not answer."""


class BrokerRefused(BrokerError):
    """The broker answered but refused the change (bad admin rights, plugin error)."""


class DeviceAccounts(Protocol):
    """Per-device MQTT accounts; the username is the device id."""

    def set_device(self, device_id: str, password: str) -> bool:
        """Create the device's account, or set a new password if it exists (True: it did).

        Either way the account ends up allowed only the device's own topics, and the old
        password no longer logs in.
        """
        ...

    def remove_device(self, device_id: str) -> bool:
        """Delete the device's account and disconnect it; False if there was none."""
        ...


def new_password() -> str:
    """A fresh random device password (192 bits, URL-safe, so it survives any config file)."""
    return secrets.token_urlsafe(24)
