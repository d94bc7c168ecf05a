"""Alembic environment: runs migrations online against the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from fleet.db.engine import make_engine
from fleet.db.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations() -> None:
    """Apply pending migrations in one transaction per migration."""
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set in the Alembic config")
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline migrations are not supported; run against a database")
run_migrations()
_ = pool  # imported for Alembic's autogenerate templates that reference it
