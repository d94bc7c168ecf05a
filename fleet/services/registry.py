"""Customers, sites, devices and the assignment history that ties devices to sites."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet.db.models import Assignment, Customer, Device, DeviceState, Site
from fleet.protocol.v1 import DEVICE_ID_RE
from fleet.services.clock import now_ms


class RegistryError(ValueError):
    """A registry change that cannot be made; the message says why and what to do."""


def create_customer(session: Session, *, name: str) -> Customer:
    """Add a customer; names are unique."""
    if session.scalar(select(Customer).where(Customer.name == name)) is not None:
        raise RegistryError(f"customer {name!r} already exists")
    customer = Customer(name=name, created_ms=now_ms())
    session.add(customer)
    session.flush()
    return customer


def create_site(session: Session, *, customer_id: int, name: str, timezone: str = "UTC",
                address: str = "") -> Site:
    """Add a site to an existing customer."""
    if session.get(Customer, customer_id) is None:
        raise RegistryError(f"customer {customer_id} does not exist")
    site = Site(customer_id=customer_id, name=name, timezone=timezone, address=address,
                created_ms=now_ms())
    session.add(site)
    session.flush()
    return site


def register_device(session: Session, *, device_id: str, board: str = "") -> Device:
    """Add a terminal to stock, or return it unchanged if it is already registered."""
    if not DEVICE_ID_RE.match(device_id):
        raise RegistryError(f"device id {device_id!r} must be 'pt-' and 12 lowercase hex digits")
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id, board=board, state=DeviceState.stocked,
                        created_ms=now_ms(), acked_seq=0, online=False, notes="")
        session.add(device)
        session.flush()
    return device


def assign_device(session: Session, *, device_id: str, site_id: int,
                  at_ms: int | None = None) -> Assignment:
    """Move a device to a site from ``at_ms`` on, closing its current assignment there."""
    device = session.get(Device, device_id)
    if device is None:
        raise RegistryError(f"device {device_id} is not registered")
    if device.state is DeviceState.retired:
        raise RegistryError(f"device {device_id} is retired; it cannot be assigned")
    if session.get(Site, site_id) is None:
        raise RegistryError(f"site {site_id} does not exist")
    start = now_ms() if at_ms is None else at_ms
    current = session.scalar(select(Assignment).where(
        Assignment.device_id == device_id, Assignment.end_ms.is_(None)))
    if current is not None:
        if start <= current.start_ms:
            raise RegistryError(
                f"device {device_id} is assigned since {current.start_ms}; a new assignment "
                f"must start later (got {start})")
        current.end_ms = start
    assignment = Assignment(device_id=device_id, site_id=site_id, start_ms=start, end_ms=None)
    session.add(assignment)
    device.state = DeviceState.assigned
    session.flush()
    return assignment
