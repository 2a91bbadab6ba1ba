"""A real database per test, on SQLite and on PostgreSQL: the same suite runs on both.

SQLite: a copy of a file migrated once per session. PostgreSQL: a throwaway database created
on the local server for the session (tables emptied between tests) and dropped at the end.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

from service.pricing import Plan, PlanLimits
from service.store.db import make_engine, make_sessionmaker, migrate
from service.store.jobs import JobStore
from service.store.keys import KeyStore
from service.store.ledger import Ledger
from tests.postgres import postgres_database, postgres_url

# The server's maintenance database; the tests create and drop their own next to it.
TABLES = ("ledger_entries", "jobs", "api_keys")
LIMITS = PlanLimits(
    max_concurrent={Plan.FREE: 5, Plan.PAY_PER_USE: 10, Plan.PREMIUM: 15},
    free_images_per_month=25,
)


@dataclass
class Clock:
    """A settable UTC clock for the stores, so month boundaries can be crossed in a test."""

    now: datetime = field(default_factory=lambda: datetime(2026, 3, 15, 12, 0, tzinfo=UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta) -> None:
        self.now += timedelta(**delta)


@dataclass
class Db:
    dialect: str
    engine: Engine
    sessions: sessionmaker
    clock: Clock

    def keys(self) -> KeyStore:
        return KeyStore(self.sessions, clock=self.clock)

    def jobs(self, limits: PlanLimits = LIMITS) -> JobStore:
        return JobStore(self.sessions, limits, clock=self.clock)

    def ledger(self) -> Ledger:
        return Ledger(self.sessions)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "sdserve.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    engine.dispose()  # the last connection to close checkpoints the WAL into the file
    assert not path.with_name(path.name + "-wal").exists()
    return path


@pytest.fixture(scope="session")
def postgres_engine():
    with postgres_database("t") as (name, _admin):
        engine = make_engine(postgres_url(name))
        try:
            migrate(engine)
            yield engine
        finally:
            engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path) -> Db:
    if request.param == "sqlite":
        path = tmp_path / "sdserve.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        engine = make_engine(f"sqlite:///{path}")
    else:
        engine = request.getfixturevalue("postgres_engine")
        with engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield Db(request.param, engine, make_sessionmaker(engine), Clock())
    if request.param == "sqlite":
        engine.dispose()


def submit_job(jobs: JobStore, key, samples: int = 1, price: Decimal = Decimal("0.0047"), **extra):
    """Accept a job of `samples` images for `key` (what text2img does), through `jobs`."""
    return jobs.create(
        request_id=str(uuid.uuid4()),
        key=key,
        model_id="stable-diffu",
        samples=samples,
        params={"prompt": "a fox"},
        meta={"prompt": "a fox"},
        output_names=[f"x-{i}.png" for i in range(samples)],
        unit_price=price,
        **extra,
    )
