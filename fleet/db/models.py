"""SQLAlchemy 2 models.  Times that come from terminals are epoch milliseconds (BigInteger).

Customers own sites; devices are assigned to sites through ``Assignment`` rows that form a
history (start, end).  A vote is stamped at ingest with the site its device was assigned to at
the vote's own timestamp, so a device that moves keeps its old votes with the old site.
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    Enum,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of every Palaute table."""


class DeviceState(enum.StrEnum):
    """Lifecycle of a terminal in the registry."""

    stocked = "stocked"
    assigned = "assigned"
    retired = "retired"


class Customer(Base):
    """An organisation that owns sites and reads reports."""

    __tablename__ = "customers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Site(Base):
    """A place where terminals stand (shop exit, clinic lobby)."""

    __tablename__ = "sites"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("customers.id", ondelete="RESTRICT"),
                                             index=True)
    name: Mapped[str] = mapped_column(String(200))
    address: Mapped[str] = mapped_column(Text, default="")
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Device(Base):
    """A terminal, identified by ``pt-`` + 12 hex digits of its chip id."""

    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(15), primary_key=True)
    board: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[DeviceState] = mapped_column(
        Enum(DeviceState, native_enum=False, length=16), default=DeviceState.stocked)
    notes: Mapped[str] = mapped_column(Text, default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)
    # Highest seq S such that every vote the device holds with seq <= S is stored.
    acked_seq: Mapped[int] = mapped_column(BigInteger, default=0)
    # Latest reported state; health samples themselves go to InfluxDB.
    fw_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    content_version: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    online: Mapped[bool] = mapped_column(default=False)
    last_seen_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class Assignment(Base):
    """A device standing at a site from ``start_ms`` until ``end_ms`` (open while None)."""

    __tablename__ = "assignments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="RESTRICT"))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"), index=True)
    start_ms: Mapped[int] = mapped_column(BigInteger)
    end_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_assignments_device_start", "device_id", "start_ms"),)


class Vote(Base):
    """One press.  (device_id, seq) is the idempotency key: re-sent votes are ignored."""

    __tablename__ = "votes"
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="RESTRICT"),
                                           primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    button: Mapped[int] = mapped_column(SmallInteger)
    flags: Mapped[int] = mapped_column(SmallInteger)
    content_version: Mapped[int] = mapped_column(BigInteger)
    site_id: Mapped[int | None] = mapped_column(ForeignKey("sites.id", ondelete="RESTRICT"),
                                                nullable=True)
    received_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_votes_site_ts", "site_id", "ts_ms"),)
