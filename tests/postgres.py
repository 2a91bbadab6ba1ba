"""A throwaway database on the local PostgreSQL server, for the suites that run against it."""

from __future__ import annotations

import contextlib
import os
import secrets

POSTGRES_ADMIN = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def postgres_database(tag: str):
    """Create a database on the local server; yields (name, admin URL), then drops it. Skips the
    test when no server answers."""
    import psycopg
    import pytest

    name = f"sdserve_{tag}_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN}: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, POSTGRES_ADMIN
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_url(name: str, host: str | None = None, port: int | None = None) -> str:
    """The SQLAlchemy URL of database `name` on the admin URL's server (or host:port)."""
    url = POSTGRES_ADMIN.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0]
    if host is not None:
        userinfo = url.split("//", 1)[1].split("@", 1)[0]
        url = f"postgresql+psycopg://{userinfo}@{host}:{port}"
    return f"{url}/{name}"
