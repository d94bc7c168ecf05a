"""votes: drop the foreign keys to devices and sites (PostgreSQL)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 12:00:00.000000

Each foreign-key check locks the referenced ``devices`` and ``sites`` row once per inserted
vote; on PostgreSQL that was more than half of the server time per vote at 50 votes per
message (docs/performance.md: 43,000 → 56,000 to 70,000 votes/s without them, same run).

What the constraints guarded is guaranteed elsewhere (docs/performance.md, "Foreign keys on
votes"): the ingest stores votes only of devices it has just read from ``devices`` in the
same transaction, devices are never deleted (only retired), and a vote's ``site_id`` is taken
from the device's assignment history, whose own foreign key to ``sites`` (RESTRICT) keeps a
site with assignments from being deleted.

SQLite keeps its constraints: dropping one there means rebuilding ``votes``, which would also
drop the rollup triggers of 0003, and SQLite is the small single-worker deployment.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# PostgreSQL's names for the unnamed constraints that 0001 created.
CONSTRAINTS = (("votes_device_id_fkey", "devices", "device_id"),
               ("votes_site_id_fkey", "sites", "site_id"))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, _table, _column in CONSTRAINTS:
        op.execute(f"ALTER TABLE votes DROP CONSTRAINT IF EXISTS {name}")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, table, column in CONSTRAINTS:
        op.create_foreign_key(name, "votes", table, [column], ["id"], ondelete="RESTRICT")
