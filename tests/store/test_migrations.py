"""Migrations build exactly the schema the models describe, and 0002 goes down and up again."""

from __future__ import annotations

import socket
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.exc import OperationalError

from service.store.db import MIGRATIONS_DIR, Base, make_engine, migrate


def test_migrated_schema_matches_the_models(db):
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        assert head == "0005" and context.get_current_revision() == head
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


def test_a_postgresql_server_that_never_answers_fails_the_connection_promptly():
    """A server that takes the TCP connection but never speaks (a hung or blackholed database):
    the connection fails after the connect timeout instead of waiting on the OS."""

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nothing ever accepts or answers
        port = silent.getsockname()[1]
        engine = make_engine(
            f"postgresql+psycopg://sdserve@127.0.0.1:{port}/x", connect_timeout_s=2
        )
        started = time.monotonic()
        with pytest.raises(OperationalError):
            engine.connect()
        assert time.monotonic() - started < 10
