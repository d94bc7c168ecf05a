"""The two fleet API calls provisioning makes, with one-line errors an installer can act on.

``POST /api/v1/devices/{id}/provision`` registers the board (or re-provisions it: identity
kept, MQTT credential rotated) and returns the fleet-owned part of its ``config.json``;
``GET /api/v1/devices/{id}/presence`` tells whether the fleet has seen it online.

Plain ``urllib``: the installer's laptop needs no HTTP library beyond the standard one.  The
installer token goes in the ``Authorization`` header only; no message here ever contains it
or the device's MQTT password.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from installer.raw_repl import InstallerError

HTTP_TIMEOUT_S = 15.0
"""Bound on one API call (the provision call waits for the broker to create the account)."""


class FleetError(InstallerError):
    """The fleet API could not be reached or refused the request."""


class FleetUnreachable(FleetError):
    """No fleet API answers at the URL."""


class TokenRejected(FleetError):
    """The installer token is missing, wrong, expired or lacks the installer role."""


class DeviceRetired(FleetError):
    """The board's device id is retired in the fleet: it must not come back silently."""


@dataclass(frozen=True)
class Provisioned:
    """What the fleet answered to a provision call."""

    device_id: str
    created: bool
    rotated: bool
    site_id: int | None
    config: dict[str, Any]
    """The fleet-owned keys of config.json (``mqtt`` with the new password, ``topic_root``)."""


@dataclass(frozen=True)
class Presence:
    """Whether and when the fleet last heard from a device."""

    online: bool
    last_seen_ms: int | None
    fw_version: str | None


def _detail(body: bytes) -> str:
    """The ``detail`` of a FastAPI error body, as one line (validation lists included)."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError):
        return body[:120].decode(errors="replace").strip() or "no details"
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict):
                where = ".".join(str(p) for p in item.get("loc", []))
                parts.append(f"{where}: {item.get('msg', '')}".strip(": "))
        return "; ".join(parts) or "invalid request"
    return " ".join(str(detail).split()) if detail else "no details"


class FleetClient:
    """Calls the fleet API at ``url`` (``http://fleet.example:8000``) with ``token``."""

    def __init__(self, url: str, token: str, *, timeout: float = HTTP_TIMEOUT_S) -> None:
        if not url.startswith(("http://", "https://")):
            raise FleetError(f"fleet URL {url!r} must start with http:// or https://; "
                             "set --fleet or PALAUTE_FLEET_URL")
        if not token:
            raise TokenRejected("no installer token: pass --token or set "
                                "PALAUTE_INSTALLER_TOKEN (an admin issues one with "
                                "`palaute admin create-token`)")
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def __repr__(self) -> str:  # never show the token, even in a traceback's locals
        return f"FleetClient({self.url!r})"

    def _call(self, method: str, path: str, body: dict[str, Any] | None,
              device_id: str) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self._token}", "Accept": "application/json",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc.code, _detail(exc.read()), device_id) from None
        except OSError as exc:  # URLError, refused, timed out: all OSErrors
            reason = getattr(exc, "reason", exc)
            raise FleetUnreachable(f"fleet unreachable at {self.url} ({reason}): check "
                                   "--fleet / PALAUTE_FLEET_URL, the network, and that the "
                                   "fleet API is running") from None
        except ValueError:
            raise FleetError(f"the fleet at {self.url} answered something that is not "
                             "JSON: is --fleet the fleet API's address?") from None

    def _http_error(self, code: int, detail: str, device_id: str) -> FleetError:
        if code in (401, 403):
            return TokenRejected(f"the fleet rejected the installer token (HTTP {code}: "
                                 f"{detail}): check --token / PALAUTE_INSTALLER_TOKEN; it "
                                 "must be an installer's token")
        if code == 409 and detail.startswith(f"device {device_id} is retired"):
            return DeviceRetired(f"device {device_id} is retired in the fleet ({detail}): "
                                 "a retired terminal is not provisioned again; set this "
                                 "board aside and tell the fleet admin")
        if code == 409:
            # Any other conflict (an assignment that cannot be made, say) is not a reason to
            # discard the board: the fleet's detail says what to put right.
            return FleetError(f"the fleet refused to provision device {device_id} (HTTP 409: "
                              f"{detail}): ask the fleet coordinator to put this right, "
                              "then run again")
        if code == 404:
            return FleetError(f"the fleet answered 404 ({detail}): check --site")
        if code == 503:
            return FleetError(f"the fleet could not make the device's broker account "
                              f"({detail}): check that the broker runs and the fleet's "
                              "broker settings (docs/deployment.md)")
        return FleetError(f"the fleet refused the request (HTTP {code}: {detail})")

    def provision(self, device_id: str, board: str, site_id: int | None) -> Provisioned:
        """Register (or re-provision) ``device_id``; returns its fleet-owned config."""
        data = self._call("POST", f"/api/v1/devices/{quote(device_id)}/provision",
                          {"board": board, "site_id": site_id}, device_id)
        try:
            config = data["config"]
            mqtt = config["mqtt"]
            if not isinstance(mqtt, dict) or not isinstance(config, dict):
                raise TypeError("config.mqtt is not an object")
            return Provisioned(device_id=str(data["device_id"]), created=bool(data["created"]),
                               rotated=bool(data["rotated"]), site_id=data.get("site_id"),
                               config=config)
        except (KeyError, TypeError) as exc:
            raise FleetError(f"the fleet's provision answer lacks {exc}: is the fleet API "
                             "up to date?") from None

    def presence(self, device_id: str) -> Presence:
        """The fleet's view of ``device_id`` now."""
        data = self._call("GET", f"/api/v1/devices/{quote(device_id)}/presence", None,
                          device_id)
        try:
            return Presence(online=bool(data["online"]), last_seen_ms=data.get("last_seen_ms"),
                            fw_version=data.get("fw_version"))
        except (KeyError, TypeError) as exc:
            raise FleetError(f"the fleet's presence answer lacks {exc}: is the fleet API "
                             "up to date?") from None
