"""vote rollups maintained by triggers

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 10:00:00.000000

``vote_rollups`` holds vote counts per (site, 15-minute UTC bucket, device, content version,
flag class), one column per button.  Triggers on ``votes`` keep it in step with every INSERT,
DELETE and UPDATE in the same transaction, so the ingest code needs no change and the rollups
cannot drift.  Existing votes are backfilled here.  docs/reports.md explains the design.

The SQL is written out in full rather than imported from ``fleet.services.rollups``: a
migration must keep doing what it did when it was written, whatever the code does later.
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BUTTONS = range(1, 6)
KEY = "site_id, bucket_start_ms, device_id, content_version, flag_class"
COUNTS = ", ".join(f"button_{b}" for b in BUTTONS)
TOP_BUTTON = ("CASE WHEN button_5 > 0 THEN 5 WHEN button_4 > 0 THEN 4 WHEN button_3 > 0 "
              "THEN 3 WHEN button_2 > 0 THEN 2 ELSE 1 END")


def _key_of(v: str) -> str:
    """The rollup key of vote row ``v``.  ts_ms is never negative, so % rounds down."""
    return (f"{v}.site_id, {v}.ts_ms - {v}.ts_ms % 900000, {v}.device_id, "
            f"{v}.content_version, {v}.flags & 5")


def _key_match(r: str, d: str) -> str:
    return " AND ".join(f"{r}.{c} = {d}.{c}" for c in KEY.split(", "))


def _counted(v: str, sign: str = "") -> str:
    """Per-button counts of the vote rows ``v`` grouped by key (PostgreSQL)."""
    return ", ".join(f"{sign}(count(*) FILTER (WHERE {v}.button = {b}))" for b in BUTTONS)


ADD_EXCLUDED = ", ".join(f"button_{b} = r.button_{b} + EXCLUDED.button_{b}" for b in BUTTONS)
ALL_ZERO = " AND ".join(f"r.button_{b} = 0" for b in BUTTONS)

BACKFILL = f"""
INSERT INTO vote_rollups ({KEY}, {COUNTS})
SELECT {_key_of("v")}, {", ".join(f"sum(CASE WHEN v.button = {b} THEN 1 ELSE 0 END)"
                                  for b in BUTTONS)}
FROM votes v
WHERE v.site_id IS NOT NULL
GROUP BY {_key_of("v")}
"""

# PostgreSQL: statement-level triggers with transition tables.  Ingest inserts up to a
# thousand votes per statement; one aggregated upsert per statement costs far less than one
# per row.  Rows are upserted in key order so that two transactions touching the same rollup
# rows lock them in the same order (no deadlock between ingest workers).  Rows skipped by
# INSERT ... ON CONFLICT DO NOTHING (duplicates) are not in the transition table.
PG_FUNCTIONS = f"""
CREATE FUNCTION vote_rollups_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO vote_rollups AS r ({KEY}, {COUNTS})
    SELECT {_key_of("n")}, {_counted("n")}
    FROM new_votes n
    WHERE n.site_id IS NOT NULL
    GROUP BY {_key_of("n")}
    ORDER BY {_key_of("n")}
    ON CONFLICT ({KEY}) DO UPDATE SET {ADD_EXCLUDED};
    RETURN NULL;
END
$$;

-- DELETE and UPDATE never happen in the application; these keep manual repairs honest.
-- Net change per key and button: +1 per new row, -1 per old row; keys whose rows did not
-- change (an UPDATE of received_ms, say) cancel out and are left alone.
CREATE FUNCTION vote_rollups_on_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO vote_rollups AS r ({KEY}, {COUNTS})
    SELECT {_key_of("o")}, {_counted("o", "-")}
    FROM old_votes o
    WHERE o.site_id IS NOT NULL
    GROUP BY {_key_of("o")}
    ORDER BY {_key_of("o")}
    ON CONFLICT ({KEY}) DO UPDATE SET {ADD_EXCLUDED};
    DELETE FROM vote_rollups r USING (SELECT DISTINCT {_key_of("o")} FROM old_votes o) AS d
        ({KEY})
    WHERE {_key_match("r", "d")} AND {ALL_ZERO};
    RETURN NULL;
END
$$;

CREATE FUNCTION vote_rollups_on_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO vote_rollups AS r ({KEY}, {COUNTS})
    SELECT {KEY}, {", ".join(f"sum(button_{b})" for b in BUTTONS)}
    FROM (SELECT {_key_of("n")}, {_counted("n")} FROM new_votes n
          WHERE n.site_id IS NOT NULL GROUP BY {_key_of("n")}
          UNION ALL
          SELECT {_key_of("o")}, {_counted("o", "-")} FROM old_votes o
          WHERE o.site_id IS NOT NULL GROUP BY {_key_of("o")}) AS d ({KEY}, {COUNTS})
    GROUP BY {KEY}
    HAVING {" OR ".join(f"sum(button_{b}) <> 0" for b in BUTTONS)}
    ORDER BY {KEY}
    ON CONFLICT ({KEY}) DO UPDATE SET {ADD_EXCLUDED};
    DELETE FROM vote_rollups r USING (SELECT DISTINCT {_key_of("o")} FROM old_votes o) AS d
        ({KEY})
    WHERE {_key_match("r", "d")} AND {ALL_ZERO};
    RETURN NULL;
END
$$;
"""

# A trigger with transition tables may have only one event, hence three of them.
PG_TRIGGERS = """
CREATE TRIGGER vote_rollups_insert AFTER INSERT ON votes
    REFERENCING NEW TABLE AS new_votes
    FOR EACH STATEMENT EXECUTE FUNCTION vote_rollups_on_insert();
CREATE TRIGGER vote_rollups_delete AFTER DELETE ON votes
    REFERENCING OLD TABLE AS old_votes
    FOR EACH STATEMENT EXECUTE FUNCTION vote_rollups_on_delete();
CREATE TRIGGER vote_rollups_update AFTER UPDATE ON votes
    REFERENCING OLD TABLE AS old_votes NEW TABLE AS new_votes
    FOR EACH STATEMENT EXECUTE FUNCTION vote_rollups_on_update();
"""


def _sqlite_match(v: str) -> str:
    return (f"site_id = {v}.site_id AND bucket_start_ms = {v}.ts_ms - {v}.ts_ms % 900000 "
            f"AND device_id = {v}.device_id AND content_version = {v}.content_version "
            f"AND flag_class = {v}.flags & 5")


def _sqlite_add(v: str, where: str) -> str:
    """Upsert +1 on the button of vote ``v`` (``v.button = b`` is 1 or 0 in SQLite)."""
    return (f"INSERT INTO vote_rollups ({KEY}, {COUNTS}) "
            f"SELECT {_key_of(v)}, {', '.join(f'{v}.button = {b}' for b in BUTTONS)} "
            f"WHERE {where} "
            f"ON CONFLICT ({KEY}) DO UPDATE SET "
            + ", ".join(f"button_{b} = button_{b} + excluded.button_{b}" for b in BUTTONS))


def _sqlite_remove(v: str) -> str:
    return ("UPDATE vote_rollups SET "
            + ", ".join(f"button_{b} = button_{b} - ({v}.button = {b})" for b in BUTTONS)
            + f" WHERE {v}.site_id IS NOT NULL AND {_sqlite_match(v)}; "
            f"DELETE FROM vote_rollups WHERE {_sqlite_match(v)} AND "
            + " AND ".join(f"button_{b} = 0" for b in BUTTONS))


# SQLite has no statement-level triggers; a row-level upsert is cheap there (no network, no
# separate process).  Rows skipped by INSERT ... ON CONFLICT DO NOTHING fire no trigger.
# SQLite's upsert after a SELECT needs a WHERE clause to parse, hence the SELECT ... WHERE.
SQLITE_TRIGGERS = [
    f"""CREATE TRIGGER vote_rollups_insert AFTER INSERT ON votes WHEN NEW.site_id IS NOT NULL
BEGIN {_sqlite_add("NEW", "1")}; END""",
    f"""CREATE TRIGGER vote_rollups_delete AFTER DELETE ON votes WHEN OLD.site_id IS NOT NULL
BEGIN {_sqlite_remove("OLD")}; END""",
    f"""CREATE TRIGGER vote_rollups_update
AFTER UPDATE OF site_id, ts_ms, device_id, button, content_version, flags ON votes
BEGIN {_sqlite_remove("OLD")}; {_sqlite_add("NEW", "NEW.site_id IS NOT NULL")}; END""",
]


def upgrade() -> None:
    op.create_table(
        "vote_rollups",
        sa.Column("site_id", sa.Integer(), nullable=False),
        sa.Column("bucket_start_ms", sa.BigInteger(), nullable=False),
        sa.Column("device_id", sa.String(length=15), nullable=False),
        sa.Column("content_version", sa.BigInteger(), nullable=False),
        sa.Column("flag_class", sa.SmallInteger(), nullable=False),
        *[sa.Column(f"button_{b}", sa.BigInteger(), nullable=False, server_default="0")
          for b in BUTTONS],
        sa.Column("top_button", sa.SmallInteger(), sa.Computed(TOP_BUTTON, persisted=True),
                  nullable=False),
        sa.PrimaryKeyConstraint("site_id", "bucket_start_ms", "device_id", "content_version",
                                "flag_class"),
        sqlite_with_rowid=False,
    )
    op.create_index("ix_vote_rollups_device_bucket", "vote_rollups",
                    ["device_id", "bucket_start_ms"])
    op.create_index("ix_vote_rollups_site_top_button", "vote_rollups",
                    ["site_id", "top_button"])

    if op.get_bind().dialect.name == "postgresql":
        # Ingest may be running: hold off vote writes until the triggers exist and the
        # backfill is done, so no vote is counted twice or not at all.  Reads go on.
        op.execute("LOCK TABLE votes IN SHARE ROW EXCLUSIVE MODE")
        op.execute(PG_FUNCTIONS)
        op.execute(PG_TRIGGERS)
    else:
        # SQLite: the migration's transaction holds the database's only write lock.
        for trigger in SQLITE_TRIGGERS:
            op.execute(trigger)
    op.execute(BACKFILL)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for event in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS vote_rollups_{event} ON votes")
            op.execute(f"DROP FUNCTION IF EXISTS vote_rollups_on_{event}()")
    else:
        for event in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS vote_rollups_{event}")
    op.drop_index("ix_vote_rollups_site_top_button", table_name="vote_rollups")
    op.drop_index("ix_vote_rollups_device_bucket", table_name="vote_rollups")
    op.drop_table("vote_rollups")
