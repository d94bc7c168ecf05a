"""Migration 0006: the votes table loses its foreign keys on PostgreSQL, keeps them on SQLite,
and gets them back on downgrade; what they guarded stays guarded by the registry and ingest."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

from fleet.db.engine import make_engine, make_sessionmaker
from fleet.db.migrate import alembic_config, upgrade
from fleet.protocol.v1 import Vote, VoteBatch
from fleet.services import registry
from fleet.services.registry import Conflict
from fleet.services.votes import store_batches


def vote_foreign_keys(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {fk["referred_table"] for fk in inspect(conn).get_foreign_keys("votes")}
    finally:
        engine.dispose()


def test_votes_foreign_keys_by_engine_and_downgrade(unmigrated_db_url: str) -> None:
    upgrade(unmigrated_db_url, "0005")
    assert vote_foreign_keys(unmigrated_db_url) == {"devices", "sites"}
    upgrade(unmigrated_db_url, "0006")
    postgres = unmigrated_db_url.startswith("postgresql")
    assert vote_foreign_keys(unmigrated_db_url) == (set() if postgres else {"devices", "sites"})
    command.downgrade(alembic_config(unmigrated_db_url), "0005")
    assert vote_foreign_keys(unmigrated_db_url) == {"devices", "sites"}


def test_what_the_foreign_keys_guarded_is_still_guarded(db_url: str) -> None:
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        customer = registry.create_customer(session, name="Keys Oy")
        site = registry.create_site(session, customer_id=customer.id, name="Hall")
        registry.register_device(session, device_id="pt-0000000006aa")
        registry.assign_device(session, device_id="pt-0000000006aa", site_id=site.id, at_ms=0)
        result = store_batches(session, [
            VoteBatch("pt-0000000006aa", (Vote(1, 10**12 + 5, 1, 0, 1),)),
            VoteBatch("pt-0000000006ff", (Vote(1, 10**12 + 5, 1, 0, 1),))], received_ms=1)
    # Votes of a device that is not registered are refused, never stored.
    assert result.stored == 1 and result.refused == {"unknown_device": 1}
    # A site that had a device cannot be deleted, so no vote can point at a missing site.
    with sessions.begin() as session, pytest.raises(Conflict, match="assignment"):
        registry.delete_site(session, site_id=site.id)
