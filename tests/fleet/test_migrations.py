"""Migrations upgrade an existing, populated database in place (SQLite and PostgreSQL)."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text

from fleet.db.migrate import upgrade


def test_upgrade_from_first_schema_keeps_data(unmigrated_db_url: str) -> None:
    upgrade(unmigrated_db_url, "0001")
    engine = create_engine(unmigrated_db_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO customers (id, name, created_ms) VALUES (1, 'Old Oy', 1)"))
        conn.execute(text("INSERT INTO sites (id, customer_id, name, address, timezone, "
                          "created_ms) VALUES (1, 1, 'Old site', '', 'Europe/Helsinki', 1)"))
    upgrade(unmigrated_db_url)
    upgrade(unmigrated_db_url)  # idempotent
    with engine.connect() as conn:
        row = conn.execute(text("SELECT name, opening_hours FROM sites")).one()
        assert tuple(row) == ("Old site", "{}")
        tables = set(inspect(conn).get_table_names())
    assert {"users", "tokens", "audit_log", "votes", "assignments"} <= tables
    engine.dispose()
