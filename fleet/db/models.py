"""SQLAlchemy 2 models.  Times that come from terminals are epoch milliseconds (BigInteger).

Customers own sites; devices are assigned to sites through ``Assignment`` rows that form a
history (start, end).  A vote is stamped at ingest with the site its device was assigned to at
the vote's own timestamp, so a device that moves keeps its old votes with the old site.
"""

from __future__ import annotations

import enum

from sqlalchemy import (
    BigInteger,
    Computed,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
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


class Role(enum.StrEnum):
    """What a user may do (docs/api.md has the full matrix)."""

    admin = "admin"  # everything, including users
    coordinator = "coordinator"  # customers, sites, assignments
    ops = "ops"  # devices, health, commands
    installer = "installer"  # register and provision devices; no reports
    customer_viewer = "customer_viewer"  # reports of its own customer's sites only


class TokenKind(enum.StrEnum):
    """Session tokens come from a password login and expire; API tokens are for integrations."""

    session = "session"
    api = "api"


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
    # {"mon": [["08:00", "20:00"]], ...} and {"2026-12-24": [["08:00", "12:00"]], ...};
    # validated by the API (fleet/api/schemas), stored as JSON text to stay portable.
    opening_hours: Mapped[str] = mapped_column(Text, default="{}")
    opening_exceptions: Mapped[str] = mapped_column(Text, default="{}")
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
    """One press.  (device_id, seq) is the idempotency key: re-sent votes are ignored.

    On PostgreSQL the two foreign keys are not in the database (migration 0006, for ingest
    speed); the ingest and the registry keep them true (docs/performance.md).
    """

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


class User(Base):
    """A person or integration that uses the API."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str] = mapped_column(String(200))
    role: Mapped[Role] = mapped_column(Enum(Role, native_enum=False, length=32))
    # Set for customer viewers: every report query is restricted to this customer's sites.
    customer_id: Mapped[int | None] = mapped_column(
        ForeignKey("customers.id", ondelete="RESTRICT"), nullable=True)
    active: Mapped[bool] = mapped_column(default=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Token(Base):
    """A bearer token; only its SHA-256 is stored, the token itself is shown once."""

    __tablename__ = "tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[TokenKind] = mapped_column(Enum(TokenKind, native_enum=False, length=16))
    name: Mapped[str] = mapped_column(String(200), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_ms: Mapped[int] = mapped_column(BigInteger)
    expires_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_used_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class AuditEntry(Base):
    """Who changed what, and when (registry, assignments, users, tokens)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"),
                                                nullable=True)
    action: Mapped[str] = mapped_column(String(64))
    entity: Mapped[str] = mapped_column(String(32))
    entity_id: Mapped[str] = mapped_column(String(64))
    detail: Mapped[str] = mapped_column(Text, default="{}")

    __table_args__ = (Index("ix_audit_entity", "entity", "entity_id"),)


class VoteRollup(Base):
    """Vote counts per site, 15-minute UTC bucket, device, content version and flag class.

    One column per button (``button_1`` … ``button_5``), so a bucket of a device is one row
    rather than one per button: reports scan four times fewer rows.  Maintained by database
    triggers on ``votes`` (migration 0003) in the same transaction as the votes themselves, so
    reports never read a count that disagrees with the votes.  ``bucket_start_ms`` is ``ts_ms``
    rounded down to 15 minutes: every UTC offset in use today (including +05:45 and +12:45) is
    a whole number of quarter hours, so local hours and days are exact unions of buckets.
    ``flag_class`` is ``flags & 5`` (bit 0 filtered, bit 2 test mode); bit 1 (time not synced)
    does not change how a vote is counted.  Votes without a site (their device was not
    assigned when they were pressed) have no rollup.  No foreign keys: the rows are derived
    from votes, which carry them, and checking them on every upsert would slow ingest down.
    See docs/reports.md.
    """

    __tablename__ = "vote_rollups"
    site_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    bucket_start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(15), primary_key=True)
    content_version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    flag_class: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    button_1: Mapped[int] = mapped_column(BigInteger, default=0)
    button_2: Mapped[int] = mapped_column(BigInteger, default=0)
    button_3: Mapped[int] = mapped_column(BigInteger, default=0)
    button_4: Mapped[int] = mapped_column(BigInteger, default=0)
    button_5: Mapped[int] = mapped_column(BigInteger, default=0)
    # The highest button with votes in the row, computed by the database.  Indexed with the
    # site, it answers "how many buttons does this site have" with one index lookup.  A stored
    # column (not an expression index) so that PostgreSQL can still update counts in place
    # (HOT) whenever the value does not change, which is almost always.
    top_button: Mapped[int] = mapped_column(SmallInteger, Computed(
        "CASE WHEN button_5 > 0 THEN 5 WHEN button_4 > 0 THEN 4 WHEN button_3 > 0 THEN 3 "
        "WHEN button_2 > 0 THEN 2 ELSE 1 END", persisted=True))

    __table_args__ = (
        Index("ix_vote_rollups_device_bucket", "device_id", "bucket_start_ms"),
        Index("ix_vote_rollups_site_top_button", "site_id", "top_button"),
        # SQLite: the primary key is the table's b-tree, so a site's time range is one
        # sequential read instead of an index scan plus a row lookup per entry.
        {"sqlite_with_rowid": False},
    )


class ContentVersion(Base):
    """What terminals ask and how they behave, immutable once created (docs/content.md).

    ``version`` is the global number 1 … 65,535 that terminals compare (never downgrade) and
    stamp on votes; the next one is the highest so far + 1.  ``body`` is the validated request
    as JSON text (texts per language, show/rotate, settings, opening hours), kept so that a
    rollback can republish it as a new version.
    """

    __tablename__ = "content_versions"
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(200), default="")
    body: Mapped[str] = mapped_column(Text)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), nullable=True)


class ContentPackage(Base):
    """The rendered, signed package of one content version for one display size."""

    __tablename__ = "content_packages"
    version: Mapped[int] = mapped_column(
        ForeignKey("content_versions.version", ondelete="CASCADE"), primary_key=True)
    display: Mapped[str] = mapped_column(String(16), primary_key=True)  # "128x64"
    data: Mapped[bytes] = mapped_column(LargeBinary)
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))  # hex
    # Which key signed it: terminals provisioned with another key refuse it (bad_signature).
    public_key: Mapped[str] = mapped_column(String(64))


class RolloutState(enum.StrEnum):
    """Where a rollout stands (docs/content.md, Rollouts)."""

    running = "running"
    paused = "paused"
    halted = "halted"  # by itself, when failures passed the failure threshold
    aborted = "aborted"
    completed = "completed"


class RolloutDeviceState(enum.StrEnum):
    """One device's state in one rollout (docs/content.md, Rollouts)."""

    pending = "pending"
    offline = "offline"
    delivered = "delivered"
    applied = "applied"
    refused = "refused"
    timed_out = "timed_out"
    superseded = "superseded"  # a newer rollout took the device over
    retired = "retired"  # the device was retired before this rollout finished with it


class Selection(Base):
    """A saved, named list of device ids to target rollouts at."""

    __tablename__ = "selections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    device_ids: Mapped[str] = mapped_column(Text, default="[]")  # JSON list, portable
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"),
                                                   nullable=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class Rollout(Base):
    """One content version sent to a target in waves (fleet/rollouts/engine.py)."""

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    content_version: Mapped[int] = mapped_column(Integer, index=True)
    target_kind: Mapped[str] = mapped_column(String(16))  # device | site | customer | selection
    target_ref: Mapped[str] = mapped_column(String(64))
    # Wave 0 is the canary list; waves 1..N take cumulative percentages of the rest.
    waves: Mapped[str] = mapped_column(Text, default="[100]")  # JSON list of percentages
    wave_count: Mapped[int] = mapped_column(Integer)
    current_wave: Mapped[int] = mapped_column(Integer, default=-1)  # -1: none started yet
    success_threshold: Mapped[int] = mapped_column(SmallInteger)  # percent of a wave applied
    failure_threshold: Mapped[int] = mapped_column(SmallInteger)  # percent refused + timed out
    device_timeout_s: Mapped[int] = mapped_column(Integer)
    state: Mapped[RolloutState] = mapped_column(
        Enum(RolloutState, native_enum=False, length=16), default=RolloutState.running,
        index=True)
    state_reason: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"),
                                                   nullable=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # Set once the engine has cleared ``desired`` of an aborted rollout's devices.
    cleared_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class RolloutDevice(Base):
    """A device's state in a rollout; ``reported`` messages are its source of truth."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"),
                                            primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="RESTRICT"),
                                           primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    display: Mapped[str] = mapped_column(String(16))
    state: Mapped[RolloutDeviceState] = mapped_column(
        Enum(RolloutDeviceState, native_enum=False, length=16),
        default=RolloutDeviceState.pending)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # When the device timeout started: its wave started while it was online, or it came back.
    started_ms: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    updated_ms: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_rollout_devices_device_state", "device_id", "state"),)

