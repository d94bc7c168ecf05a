"""Migrations upgrade an existing, populated database in place (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from fleet.db.migrate import upgrade


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_upgrade_from_first_schema_keeps_data(empty_url: str) -> None:
    upgrade(empty_url, "0001")
    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO customers (id, name, created_ms) VALUES (1, 'Old Oy', 1)"))
        conn.execute(text("INSERT INTO sites (id, customer_id, name, address, timezone, "
                          "created_ms) VALUES (1, 1, 'Old site', '', 'Europe/Helsinki', 1)"))
    upgrade(empty_url)
    upgrade(empty_url)  # idempotent
    with engine.connect() as conn:
        row = conn.execute(text("SELECT name, opening_hours FROM sites")).one()
        assert tuple(row) == ("Old site", "{}")
        tables = set(inspect(conn).get_table_names())
    assert {"users", "tokens", "audit_log", "votes", "assignments"} <= tables
    engine.dispose()
