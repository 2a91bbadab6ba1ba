"""Migrations build exactly the schema the models describe, and 0002 goes down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from service.store.db import MIGRATIONS_DIR, Base, make_engine, migrate


def test_migrated_schema_matches_the_models(db):
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        assert head == "0003" and context.get_current_revision() == head
        assert compare_metadata(context, Base.metadata) == []


def test_0002_downgrades_and_upgrades(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sdserve.db'}")
    migrate(engine)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0001")
    assert set(inspect(engine).get_table_names()) == {"alembic_version", "jobs"}
    migrate(engine)
    assert {"api_keys", "ledger_entries"} <= set(inspect(engine).get_table_names())
    engine.dispose()
