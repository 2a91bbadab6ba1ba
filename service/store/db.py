"""Database engine, the declarative base every table shares, and migrations on start."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
READ_ONLY = "sdserve_read_only"
# SQLite engines -> the lock their writers take in this process (see Sessions.begin).
_WRITE_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Any fixed 64-bit number: serializes concurrent migrations of several replicas on PostgreSQL.
_PG_MIGRATION_LOCK = 7_362_001


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


def make_engine(url: str, connect_timeout_s: int = 5) -> Engine:
    """An engine for `url`; SQLite files get their folder, WAL and a busy timeout.

    A PostgreSQL server that stops answering fails a connection after `connect_timeout_s`
    (libpq's own default waits for the OS, minutes), so requests get a prompt 503.
    """
    if not url.startswith("sqlite"):
        connect_args = {"connect_timeout": connect_timeout_s} if "postgres" in url else {}
        return create_engine(
            url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=connect_args
        )
    path = url.split("///", 1)[-1]
    on_disk = bool(path) and path != ":memory:"
    if on_disk:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    _WRITE_LOCKS[engine] = WriterLock(path + ".writer-lock" if on_disk else None)

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn, _record):
        # Turn off pysqlite's deferred BEGIN so the "begin" hook below decides how to start.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        # Under WAL, NORMAL syncs at checkpoints instead of every commit: a crashed process
        # loses nothing; only an OS crash or power cut can roll back the last commits. That is
        # the embedded default; deployments that need more use PostgreSQL.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn):
        # Writers take the write lock at BEGIN: read-then-write transactions (balance checks,
        # job reservations) then serialize instead of failing with "database is locked".
        # Readers (Sessions.read) start deferred and run beside them under WAL.
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


class WriterLock:
    """Lets one SQLite writer at a time begin, in this process (a thread lock) and among the
    processes that share the file (an flock on a file beside it, e.g. two ingress replicas).
    A waiter wakes the moment the lock is free; SQLite's own busy handler instead polls with
    sleeps of 1 ms growing to 100 ms, which under load costs far more than the writes."""

    def __init__(self, path: str | None):
        self._thread_lock = threading.Lock()
        self._file = open(path, "a+b") if path else None  # noqa: SIM115 - held for the process

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._file is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._thread_lock.release()
                raise

    def __exit__(self, *_exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._thread_lock.release()


class Sessions(sessionmaker):
    """A sessionmaker whose `read()` sessions never take SQLite's write lock, and whose write
    transactions on SQLite queue on a WriterLock first."""

    def read(self) -> Session:
        engine = self.kw["bind"]
        return self(bind=engine.execution_options(**{READ_ONLY: True}))

    @contextlib.contextmanager
    def begin(self):
        lock = _WRITE_LOCKS.get(self.kw["bind"])
        with lock or contextlib.nullcontext(), super().begin() as session:
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on a bare connection, for Core statements on hot paths."""
        engine = self.kw["bind"]
        with _WRITE_LOCKS.get(engine) or contextlib.nullcontext(), engine.begin() as conn:
            yield conn


# Runs of a transaction the database rolled back to resolve a conflict, the first included
ROLLED_BACK_ATTEMPTS = 3


def rolled_back(exc: BaseException) -> bool:
    """Whether the database answered, and rolled this transaction back in favour of another
    (SQLSTATE class 40: deadlock, serialization failure): nothing of it was written."""
    orig = getattr(exc, "orig", None)
    return str(getattr(orig, "sqlstate", "") or "").startswith("40")


def retried_when_rolled_back(method):
    """Run a method that is one write transaction again when the database rolled it back."""

    @functools.wraps(method)
    def run(*args, **kwargs):
        for attempt in range(1, ROLLED_BACK_ATTEMPTS + 1):
            try:
                return method(*args, **kwargs)
            except OperationalError as exc:
                if attempt == ROLLED_BACK_ATTEMPTS or not rolled_back(exc):
                    raise

    return run


def make_sessionmaker(engine: Engine) -> Sessions:
    return Sessions(engine, expire_on_commit=False)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration; safe to call from several replicas at once."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
