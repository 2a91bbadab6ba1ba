"""The usage ledger: one row per charge, refund and top-up, the record billing trusts.

`amount_micros` is each row's signed effect on the key's balance: a top-up adds, a reserve
takes the job's cost, a release gives it back, a settle moves nothing (it makes the reserve
final and counts the images as delivered). So `api_keys.balance_micros` always equals the sum
of the key's amounts; every function here changes both in the caller's transaction.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, Session, aliased, mapped_column

from service.pricing import Plan, PlanLimits, format_usd, micros_to_usd
from service.store.db import Base, Sessions
from service.store.errors import InsufficientCredit, KeyNotFound
from service.store.jobs import Job, JobStatus
from service.store.keys import ApiKey, KeyRow, find_key


class EntryKind(enum.StrEnum):
    RESERVE = "reserve"
    SETTLE = "settle"
    RELEASE = "release"
    TOPUP = "topup"


_OUTCOMES = text("kind IN ('settle', 'release')")
_RESERVES = text("kind = 'reserve'")


class LedgerEntry(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("kind IN ('reserve', 'settle', 'release', 'topup')", name="kind_known"),
        CheckConstraint("images >= 0 AND unit_price_micros >= 0", name="counts_non_negative"),
        Index("ix_ledger_entries_key_id_created_at", "key_id", "created_at"),
        # Exactly once, enforced by the database too: one reserve per job, and one outcome
        # (settle or release, never both) per job.
        Index(
            "uq_ledger_entries_job_reserve",
            "job_id",
            unique=True,
            postgresql_where=_RESERVES,
            sqlite_where=_RESERVES,
        ),
        Index(
            "uq_ledger_entries_job_outcome",
            "job_id",
            unique=True,
            postgresql_where=_OUTCOMES,
            sqlite_where=_OUTCOMES,
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    job_id: Mapped[int | None] = mapped_column(ForeignKey(Job.id), nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    images: Mapped[int] = mapped_column(Integer, default=0)
    # what the key pays per image: the list price on pay_per_use, 0 on free and premium
    unit_price_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


@dataclass(frozen=True)
class EntryRecord:
    """A detached copy of a ledger row."""

    id: int
    key_id: int
    job_id: int | None
    model_id: str | None
    kind: EntryKind
    images: int
    unit_price_micros: int
    amount_micros: int
    created_at: datetime

    @classmethod
    def of(cls, row: LedgerEntry) -> EntryRecord:
        return cls(
            id=row.id,
            key_id=row.key_id,
            job_id=row.job_id,
            model_id=row.model_id,
            kind=EntryKind(row.kind),
            images=row.images,
            unit_price_micros=int(row.unit_price_micros),
            amount_micros=int(row.amount_micros),
            created_at=_as_utc_datetime(row.created_at),
        )


@dataclass(frozen=True)
class UsageRow:
    """Delivered (settled) images and what they cost, per key and model."""

    key_id: int
    key_name: str
    plan: Plan
    model_id: str
    images: int
    amount_usd: Decimal

    def to_dict(self) -> dict:
        """JSON-ready; the amount is a string so it stays exact."""
        return {
            "key_id": self.key_id,
            "key": self.key_name,
            "plan": self.plan.value,
            "model_id": self.model_id,
            "images": self.images,
            "amount_usd": format_usd(self.amount_usd),
        }


def post_topup(session: Session, key: ApiKey, micros: int, *, now: datetime) -> None:
    """Credit a key (locked by the caller) and record it."""
    key.balance_micros = int(key.balance_micros) + micros
    session.add(
        LedgerEntry(
            key_id=key.id,
            kind=EntryKind.TOPUP.value,
            images=0,
            unit_price_micros=0,
            amount_micros=micros,
            created_at=now,
        )
    )
    session.flush()


# The per-request writes below are Core statements on the caller's connection: they run twice
# per image request, and the ORM's unit of work cost several times the SQL itself.
_entries = LedgerEntry.__table__
_keys = ApiKey.__table__

_INSERT_ENTRY = insert(_entries)
_DEBIT = (
    update(_keys)
    .where(_keys.c.id == bindparam("key_id"))
    .values(balance_micros=_keys.c.balance_micros - bindparam("amount"))
)
_RESERVATION = select(
    _entries.c.key_id,
    _entries.c.model_id,
    _entries.c.images,
    _entries.c.unit_price_micros,
    _entries.c.amount_micros,
).where(_entries.c.job_id == bindparam("job_id"), _entries.c.kind == EntryKind.RESERVE.value)
# settle: the reserve row copied as the job's outcome, amount 0, in one statement
_SETTLE = (
    insert(_entries)
    .from_select(
        [
            "key_id",
            "job_id",
            "model_id",
            "kind",
            "images",
            "unit_price_micros",
            "amount_micros",
            "created_at",
        ],
        select(
            _entries.c.key_id,
            _entries.c.job_id,
            _entries.c.model_id,
            literal(EntryKind.SETTLE.value, String),
            _entries.c.images,
            _entries.c.unit_price_micros,
            literal(0, BigInteger),
            bindparam("now", type_=DateTime(timezone=True)),
        ).where(
            _entries.c.job_id == bindparam("job_id"), _entries.c.kind == EntryKind.RESERVE.value
        ),
    )
    .returning(_entries.c.images, _entries.c.unit_price_micros)
)


def reserve(
    conn: Connection,
    key: KeyRow,
    *,
    job_id: int,
    model_id: str,
    images: int,
    unit_price_micros: int,
    limits: PlanLimits,
    now: datetime,
) -> int:
    """Hold the cost of all `images` of a job and return it; InsufficientCredit if it is not
    covered in full.

    The caller must hold the key row's lock so that checks and debits of one key serialize.
    """
    plan = Plan(key.plan)
    unit = unit_price_micros if plan.charges_per_image else 0
    cost = unit * images
    if plan is Plan.PAY_PER_USE and cost > key.balance_micros:
        raise InsufficientCredit(
            f"Insufficient credits: this request costs {format_usd(micros_to_usd(cost))} USD, "
            f"your balance is {format_usd(micros_to_usd(int(key.balance_micros)))} USD"
        )
    if plan is Plan.FREE:
        allowance = limits.free_images_per_month
        used = free_images_used(conn, key.id, since=PlanLimits.month_start(now))
        if used >= allowance:
            raise InsufficientCredit(
                f"Your free monthly allowance of {allowance} images is used up"
            )
        if used + images > allowance:
            raise InsufficientCredit(
                f"This request needs {images} images but only {allowance - used} of your "
                f"free monthly allowance of {allowance} images are left"
            )
    if cost:
        conn.execute(_DEBIT, {"key_id": key.id, "amount": cost})
    conn.execute(
        _INSERT_ENTRY,
        {
            "key_id": key.id,
            "job_id": job_id,
            "model_id": model_id,
            "kind": EntryKind.RESERVE.value,
            "images": images,
            "unit_price_micros": unit,
            "amount_micros": -cost,
            "created_at": now,
        },
    )
    return cost


def settle(conn: Connection, job_id: int, *, now: datetime) -> int | None:
    """Make a job's reservation final (its images were delivered) and return what it charged,
    at the unit price it was reserved at; None if it had no reservation."""
    settled = conn.execute(_SETTLE, {"job_id": job_id, "now": now}).first()
    return None if settled is None else int(settled.images) * int(settled.unit_price_micros)


def release(conn: Connection, job_id: int, *, now: datetime) -> bool:
    """Give a failed job's reservation back to its key; False if it had none."""
    held = conn.execute(_RESERVATION, {"job_id": job_id}).first()
    if held is None:
        return False
    refund = -int(held.amount_micros)
    if refund:
        conn.execute(_DEBIT, {"key_id": held.key_id, "amount": -refund})
    conn.execute(
        _INSERT_ENTRY,
        {
            "key_id": held.key_id,
            "job_id": job_id,
            "model_id": held.model_id,
            "kind": EntryKind.RELEASE.value,
            "images": held.images,
            "unit_price_micros": held.unit_price_micros,
            "amount_micros": refund,
            "created_at": now,
        },
    )
    return True


def free_images_used(conn: Connection | Session, key_id: int, *, since: datetime) -> int:
    """Images reserved since `since` by a key and not released (in flight or delivered)."""
    released = _entries.alias("released")
    query = select(func.coalesce(func.sum(_entries.c.images), 0)).where(
        _entries.c.key_id == key_id,
        _entries.c.kind == EntryKind.RESERVE.value,
        _entries.c.created_at >= since,
        ~exists().where(
            released.c.job_id == _entries.c.job_id, released.c.kind == EntryKind.RELEASE.value
        ),
    )
    return int(conn.scalar(query))


class Ledger:
    """Read side of the ledger: usage reports, a key's entries and a consistency audit."""

    def __init__(self, sessions: Sessions):
        self._sessions = sessions

    def usage(
        self, key: str | int | None = None, since: date | datetime | None = None
    ) -> list[UsageRow]:
        """Delivered images and their price per key and model (for `sdserve usage` and admins).

        `key` is a key's name or id; `since` a UTC date or time (settled on or after it).
        """
        amount = func.sum(LedgerEntry.images * LedgerEntry.unit_price_micros)
        query = (
            select(
                ApiKey.id,
                ApiKey.name,
                ApiKey.plan,
                LedgerEntry.model_id,
                func.sum(LedgerEntry.images),
                amount,
            )
            .join(ApiKey, ApiKey.id == LedgerEntry.key_id)
            .where(LedgerEntry.kind == EntryKind.SETTLE.value)
            .group_by(ApiKey.id, ApiKey.name, ApiKey.plan, LedgerEntry.model_id)
            .order_by(ApiKey.name, LedgerEntry.model_id)
        )
        if since is not None:
            query = query.where(LedgerEntry.created_at >= _as_utc_datetime(since))
        with self._sessions.read() as session:
            if key is not None:
                row = find_key(session, key)
                if row is None:
                    raise KeyNotFound(key)
                query = query.where(LedgerEntry.key_id == row.id)
            return [
                UsageRow(
                    key_id=key_id,
                    key_name=name,
                    plan=Plan(plan),
                    model_id=model_id,
                    images=int(images),
                    amount_usd=micros_to_usd(int(micros)),
                )
                for key_id, name, plan, model_id, images, micros in session.execute(query)
            ]

    def entries(self, key_id: int | None = None, job_id: int | None = None) -> list[EntryRecord]:
        """Ledger rows, oldest first, optionally of one key or one job."""
        query = select(LedgerEntry).order_by(LedgerEntry.id)
        if key_id is not None:
            query = query.where(LedgerEntry.key_id == key_id)
        if job_id is not None:
            query = query.where(LedgerEntry.job_id == job_id)
        with self._sessions.read() as session:
            return [EntryRecord.of(row) for row in session.scalars(query)]

    def settled_charge(self, job_id: int) -> int:
        """Micro-dollars a delivered job was charged (0 if it was not settled)."""
        query = select(LedgerEntry.images * LedgerEntry.unit_price_micros).where(
            LedgerEntry.job_id == job_id, LedgerEntry.kind == EntryKind.SETTLE.value
        )
        with self._sessions.read() as session:
            return int(session.scalar(query) or 0)

    def free_images_used(self, key_id: int, now: datetime | None = None) -> int:
        """Images of the free allowance a key has used in the calendar month (UTC) of `now`."""
        since = PlanLimits.month_start(now or datetime.now(UTC))
        with self._sessions.read() as session:
            return free_images_used(session, key_id, since=since)

    def audit(self) -> list[str]:
        """Inconsistencies, for operators and tests: empty when every balance matches its rows."""
        problems = []
        sums = (
            select(LedgerEntry.key_id, func.coalesce(func.sum(LedgerEntry.amount_micros), 0))
            .group_by(LedgerEntry.key_id)
            .subquery()
        )
        query = select(ApiKey.name, ApiKey.balance_micros, sums.c[1]).outerjoin(
            sums, sums.c.key_id == ApiKey.id
        )
        outcome = aliased(LedgerEntry)
        unresolved = (
            select(LedgerEntry.job_id)
            .where(LedgerEntry.kind == EntryKind.RESERVE.value)
            .outerjoin(
                outcome,
                and_(
                    outcome.job_id == LedgerEntry.job_id,
                    outcome.kind.in_([EntryKind.SETTLE.value, EntryKind.RELEASE.value]),
                ),
            )
            .where(outcome.id.is_(None))
        )
        with self._sessions.read() as session:
            for name, balance, total in session.execute(query):
                if int(balance) != int(total or 0):
                    problems.append(f"key {name!r}: balance {balance} != ledger sum {total}")
                if int(balance) < 0:
                    problems.append(f"key {name!r}: negative balance {balance}")
            open_jobs = set(session.scalars(unresolved))
            if open_jobs:
                problems.extend(_ended_without_outcome(session, open_jobs))
        return problems


def _ended_without_outcome(session: Session, job_ids: Iterable[int]) -> list[str]:
    ended = session.scalars(
        select(Job.id).where(Job.id.in_(list(job_ids)), Job.status != JobStatus.PROCESSING.value)
    )
    return [f"job {job_id} ended but was neither settled nor released" for job_id in ended]


def _as_utc_datetime(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


def usage_document(rows: list[UsageRow]) -> dict:
    """The JSON shape of a usage report (the CLI's --json and the admin endpoint)."""
    return {
        "usage": [row.to_dict() for row in rows],
        "total_images": sum(row.images for row in rows),
        "total_amount_usd": format_usd(sum((row.amount_usd for row in rows), Decimal(0))),
    }
