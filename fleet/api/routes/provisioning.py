"""Provisioning terminals: the fleet half of ``palaute provision``.

``POST /devices/{id}/provision`` registers a terminal (if new), assigns it to a site (if
asked) and gives it a broker account of its own with a fresh password, returned once in the
fleet-owned part of its config.json.  ``GET /devices/{id}/presence`` is what the installer
polls to see the terminal come online.  Installers may call both, and read nothing else.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request, status
from pydantic import BaseModel

from fleet.api.deps import DeviceAccountsDep, SessionDep, broker_errors, require
from fleet.api.schemas import CONFLICT, ERRORS, NOT_FOUND, Board, Problem, RefId, registry_errors
from fleet.config import Settings
from fleet.content import signing
from fleet.db.models import DeviceState, Role, User
from fleet.services import provisioning, registry

router = APIRouter(prefix="/devices", tags=["provisioning"], responses=ERRORS)

Provisioner = Annotated[User, Depends(require(Role.ops, Role.installer))]
Watcher = Annotated[User, Depends(require(Role.coordinator, Role.ops, Role.installer))]
DeviceIdPath = Annotated[str, Path(pattern=r"^pt-[0-9a-f]{12}$",
                                   examples=["pt-a1b2c3d4e5f6"])]

UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "device accounts are not configured, or the broker "
                                           "could not make the account"}}


class ProvisionRequest(BaseModel):
    """What the installer knows about the board; both fields are optional."""

    board: Board = ""
    site_id: RefId | None = None


class MqttConfig(BaseModel):
    """Where the device connects and as whom."""

    host: str
    port: int
    user: str
    password: str


class DeviceConfig(BaseModel):
    """The fleet-owned keys of the device's config.json."""

    mqtt: MqttConfig
    topic_root: str
    # The fleet's content-signing public key (64 hex digits); absent when the fleet has no
    # signing key, and then the terminal refuses content updates with ``no_key``.
    content_key: str | None = None


class ProvisionResult(BaseModel):
    """The outcome; ``config.mqtt.password`` is shown this once and stored nowhere else."""

    device_id: str
    created: bool
    rotated: bool
    site_id: int | None
    config: DeviceConfig


class Presence(BaseModel):
    """A device's latest reported state, as the ingest last saw it."""

    device_id: str
    state: DeviceState
    online: bool
    last_seen_ms: int | None
    fw_version: str | None
    content_version: int | None


def _content_public_key(key_file: str) -> str | None:
    """The public half of the content-signing key, checked before anything changes: a key
    file that is configured but unusable must stop provisioning, not yield terminals that
    refuse every content update."""
    if not key_file:
        return None
    try:
        return signing.public_key_hex(signing.load_configured_key(key_file))
    except signing.ContentKeyError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


@router.post("/{device_id}/provision", response_model=ProvisionResult,
             responses={**NOT_FOUND, **CONFLICT, **UNAVAILABLE})
def provision(device_id: DeviceIdPath, body: ProvisionRequest, user: Provisioner,
              session: SessionDep, accounts: DeviceAccountsDep,
              request: Request) -> ProvisionResult:
    """Register (if new), assign (if ``site_id`` differs) and (re)create the broker account.

    Re-provisioning rotates the password: the old one stops working at once.  On any error
    nothing is changed.
    """
    if accounts is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            "device accounts are not configured on this fleet: set "
                            "PALAUTE_BROKER_ADMIN_URL (see docs/deployment.md) and restart it")
    settings: Settings = request.app.state.settings
    content_key = _content_public_key(request.app.state.content_key_file)
    with registry_errors(), broker_errors("create the device's MQTT account"):
        result = provisioning.provision_device(
            session, accounts=accounts, device_id=device_id, board=body.board,
            site_id=body.site_id, actor=user)
    config = provisioning.device_config(settings, device_id, result.password,
                                        content_key=content_key)
    return ProvisionResult(device_id=device_id, created=result.created, rotated=result.rotated,
                           site_id=result.site_id, config=DeviceConfig.model_validate(config))


@router.get("/{device_id}/presence", response_model=Presence, responses=NOT_FOUND)
def presence(device_id: DeviceIdPath, _user: Watcher, session: SessionDep) -> Presence:
    """Whether the device is online now and what it last reported."""
    with registry_errors():
        device = registry.get_device(session, device_id=device_id)
    return Presence(device_id=device.id, state=device.state, online=device.online,
                    last_seen_ms=device.last_seen_ms, fw_version=device.fw_version,
                    content_version=device.content_version)
