"""API keys: random secrets shown once, stored only as their SHA-256, each on a plan."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Protocol

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Integer,
    String,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.pricing import MAX_MICROS, MAX_USD, Plan, format_usd, micros_to_usd, usd_to_micros
from service.store.db import Base, Sessions
from service.store.errors import InvalidApiKey, KeyNameTaken, KeyNotFound, StoreError

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-"
MAX_NAME_LENGTH = 128
_KEY_NUMBER = re.compile(r"[0-9]{1,10}")  # ASCII digits only
MAX_KEY_ID = 2**31 - 1  # the id column is a 32-bit INTEGER on PostgreSQL


class KeyValueTaken(StoreError):
    """A configured key's value is already the key of another name (seeding refuses it)."""

    def __init__(self, name: str, holder: str):
        super().__init__(
            f"the value configured for the key named {name!r} is already the key named "
            f"{holder!r}; configure another value"
        )
        self.name = name
        self.holder = holder


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("balance_micros >= 0", name="balance_non_negative"),
        CheckConstraint("plan IN ('free', 'pay_per_use', 'premium')", name="plan_known"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    plan: Mapped[str] = mapped_column(String(16))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # prepaid balance of a pay_per_use key; always equals the sum of its ledger amounts
    balance_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # a key stops working at this instant, like a revocation decided in advance; None: never
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class KeyRow(Protocol):
    """What billing reads of a key row: an ApiKey, or a Core row of its columns."""

    id: int
    plan: str
    balance_micros: int


@dataclass(frozen=True)
class KeyRecord:
    """A detached, read-only copy of a key row (never holds the plaintext key)."""

    id: int
    name: str
    plan: Plan
    admin: bool
    key_hash: str
    balance_micros: int
    revoked: bool
    expires_at: datetime | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def balance(self) -> Decimal:
        """Prepaid balance in USD (0 for free and premium keys)."""
        return micros_to_usd(self.balance_micros)

    @classmethod
    def of(cls, row: ApiKey) -> KeyRecord:
        return cls(
            id=row.id,
            name=row.name,
            plan=Plan(row.plan),
            admin=bool(row.admin),
            key_hash=row.key_hash,
            balance_micros=int(row.balance_micros),
            revoked=row.revoked_at is not None,
            expires_at=as_utc(row.expires_at),
        )


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for timezone-aware columns; they were stored as UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def generate_key() -> str:
    """A new secret: `sk-` and 32 random bytes, URL-safe base64."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(plaintext: str) -> str:
    """SHA-256 hex of a key: what the database stores and jobs refer to."""
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


def find_key(session: Session, name_or_id: str | int, *, lock: bool = False) -> ApiKey | None:
    """The key row with this id (int) or name (str), optionally locked FOR UPDATE. A name of
    ASCII digits that no key has is taken as an id (`keys revoke 3` with `keys list`'s ID 3);
    a key whose name it is always wins."""
    if isinstance(name_or_id, int):
        return _by_id(session, name_or_id, lock)
    row = _select_one(session, ApiKey.name == name_or_id, lock)
    if row is None and _KEY_NUMBER.fullmatch(name_or_id):
        row = _by_id(session, int(name_or_id), lock)
    return row


def _by_id(session: Session, key_id: int, lock: bool) -> ApiKey | None:
    if not 1 <= key_id <= MAX_KEY_ID:  # no such id, and more than the column's type holds
        return None
    return _select_one(session, ApiKey.id == key_id, lock)


def _by_name(session: Session, name: str, *, lock: bool = False) -> ApiKey | None:
    """The key row with exactly this name (no fallback to the id)."""
    return _select_one(session, ApiKey.name == name, lock)


def _select_one(session: Session, where, lock: bool) -> ApiKey | None:
    query = select(ApiKey).where(where)
    return session.scalar(query.with_for_update() if lock else query)


class KeyStore:
    """Creates, seeds, authenticates, revokes and tops up API keys."""

    def __init__(self, sessions: Sessions, *, clock: Callable[[], datetime] | None = None):
        self._sessions = sessions
        self._clock = clock or (lambda: datetime.now(UTC))

    def create(
        self,
        name: str,
        plan: Plan | str,
        balance: Decimal = Decimal(0),
        admin: bool = False,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key; returns its plaintext (show it once, it is not stored) and its record."""
        plaintext = generate_key()
        try:
            with self._sessions.begin() as session:
                if _by_name(session, name) is not None:
                    raise KeyNameTaken(name)
                row = self._insert(session, plaintext, name, plan, balance, admin)
                if expires_at is not None:
                    row.expires_at = self._future(expires_at)
                return plaintext, KeyRecord.of(row)
        except IntegrityError:
            raise KeyNameTaken(name) from None

    def ensure(
        self,
        plaintext: str,
        name: str,
        plan: Plan | str,
        balance: Decimal = Decimal(0),
        admin: bool = False,
    ) -> KeyRecord:
        """Seed a configured key (the demo key, the admin key) under `name`, or rotate it.

        No key named `name`: one is created with `balance`. The key holds `plaintext` already:
        it is returned untouched, revoked or not (a revocation stands while the configuration
        still holds the revoked value). It holds another value: the key is rotated to this one
        in place: the old value stops working at once, a revoked key works again with the new
        value, and its id, plan, balance and ledger stay (a rotation is not a new account).

        Safe from several replicas at once: the row is changed under its lock, in one
        transaction, and replicas starting with the same value all end with it; the key's jobs
        move with it. Raises KeyValueTaken when `plaintext` is already the key of another name,
        KeyNameTaken when `name` is a key seeding did not make (another plan or admin flag).
        """
        key_hash = hash_key(plaintext)
        for attempt in range(2):
            try:
                with self._sessions.begin() as session:
                    row = _by_name(session, name, lock=True)
                    if row is not None and row.key_hash == key_hash:
                        return KeyRecord.of(row)
                    holder = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
                    if holder is not None and holder.name == name:
                        # another replica created it after this transaction's first look
                        return KeyRecord.of(holder)
                    if holder is not None:
                        raise KeyValueTaken(name, holder.name)
                    if row is None:
                        row = self._insert(session, plaintext, name, plan, balance, admin)
                        return KeyRecord.of(row)
                    if Plan(row.plan) is not Plan(plan) or bool(row.admin) is not admin:
                        # not a key seeding made (one `sdserve keys create` made under this
                        # name): its holder keeps it, and the configured value is not seeded
                        raise KeyNameTaken(name)
                    was_revoked = row.revoked_at is not None
                    _move_jobs(session, row.key_hash, key_hash)
                    row.key_hash = key_hash
                    row.revoked_at = None
                    session.flush()
                    rotated = KeyRecord.of(row)
            except IntegrityError:
                # another replica inserted the same name (or value) meanwhile: look again
                if attempt:
                    raise
                continue
            log.warning(
                "the configured value of the key named %r (id %d) changed: rotated it%s; the "
                "previous value no longer works",
                name,
                rotated.id,
                ", and lifted its revocation" if was_revoked else "",
            )
            return rotated
        raise AssertionError("unreachable")

    def authenticate(self, plaintext: str | None) -> KeyRecord | None:
        """The live key for this plaintext; None when missing, unknown or revoked. Raises
        InvalidApiKey saying when for an expired key."""
        if not plaintext:
            return None
        key_hash = hash_key(plaintext)
        with self._sessions.read() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
            if row is None or not hmac.compare_digest(row.key_hash, key_hash):
                return None
            record = KeyRecord.of(row)
            if record.revoked:
                return None
            if record.expired(self._clock()):
                raise InvalidApiKey.expired(record.expires_at)
            return record

    def set_expiry(self, name_or_id: str | int, expires_at: datetime | None) -> KeyRecord:
        """Make a key stop working at `expires_at` (in the future), or never (None)."""
        with self._sessions.begin() as session:
            row = find_key(session, name_or_id, lock=True)
            if row is None:
                raise KeyNotFound(name_or_id)
            row.expires_at = None if expires_at is None else self._future(expires_at)
            return KeyRecord.of(row)

    def _future(self, moment: datetime) -> datetime:
        if moment.tzinfo is None:
            raise ValueError("an expiry time must carry its time zone")
        try:
            moment = moment.astimezone(UTC)
        except OverflowError:  # 9999-12-31T23:00-05:00 is in the year 10000 in UTC
            raise ValueError(
                f"an expiry time must be in the future and before {datetime.max:%Y-%m-%d} UTC, "
                f"got {moment.isoformat()}"
            ) from None
        if moment <= self._clock():
            raise ValueError(f"an expiry time must be in the future, got {moment.isoformat()}")
        return moment

    def revoke(self, name_or_id: str | int) -> KeyRecord:
        """Stop a key at once (its next request and any job it has not yet created fail)."""
        with self._sessions.begin() as session:
            row = find_key(session, name_or_id, lock=True)
            if row is None:
                raise KeyNotFound(name_or_id)
            if row.revoked_at is None:
                row.revoked_at = self._clock()
            return KeyRecord.of(row)

    def topup(self, name_or_id: str | int, amount: Decimal) -> KeyRecord:
        """Add `amount` USD to a pay-per-use key's balance, with its ledger row."""
        micros = usd_to_micros(amount)
        if micros <= 0:
            raise ValueError(f"a top-up must be positive, got {amount} USD")
        with self._sessions.begin() as session:
            row = find_key(session, name_or_id, lock=True)
            if row is None:
                raise KeyNotFound(name_or_id)
            self._post_topup(session, row, micros)
            return KeyRecord.of(row)

    def get(self, key_id: int) -> KeyRecord | None:
        with self._sessions.read() as session:
            row = session.get(ApiKey, key_id)
            return KeyRecord.of(row) if row else None

    def by_hash(self, key_hash: str) -> KeyRecord | None:
        """The key a job was accepted for (jobs keep the key's hash, never the key)."""
        with self._sessions.read() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))
            return KeyRecord.of(row) if row else None

    def find(self, name_or_id: str | int) -> KeyRecord | None:
        """The key with this id (int) or name (str), revoked or not."""
        with self._sessions.read() as session:
            row = find_key(session, name_or_id)
            return KeyRecord.of(row) if row else None

    def list(self) -> list[KeyRecord]:
        with self._sessions.read() as session:
            return [
                KeyRecord.of(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.id))
            ]

    def _insert(
        self,
        session: Session,
        plaintext: str,
        name: str,
        plan: Plan | str,
        balance: Decimal,
        admin: bool,
    ) -> ApiKey:
        plan = Plan(plan)
        if not name or len(name) > MAX_NAME_LENGTH or name != name.strip():
            raise ValueError(
                f"a key name must be 1 to {MAX_NAME_LENGTH} characters, no edge spaces"
            )
        micros = usd_to_micros(balance)
        if micros < 0:
            raise ValueError(f"a balance must not be negative, got {balance} USD")
        row = ApiKey(
            name=name,
            key_hash=hash_key(plaintext),
            plan=plan.value,
            admin=admin,
            balance_micros=0,
            created_at=self._clock(),
        )
        session.add(row)
        session.flush()
        if micros:
            self._post_topup(session, row, micros)
        return row

    def _post_topup(self, session: Session, row: ApiKey, micros: int) -> None:
        # Imported here: the ledger module builds on this one.
        from service.store.ledger import post_topup

        if Plan(row.plan) is not Plan.PAY_PER_USE:
            raise ValueError(
                f"key {row.name!r} is on the {row.plan} plan; only pay_per_use keys hold a balance"
            )
        balance = int(row.balance_micros) + micros
        if balance > MAX_MICROS:
            raise ValueError(
                f"a top-up of {format_usd(micros_to_usd(micros))} USD would bring key "
                f"{row.name!r}'s balance to {format_usd(micros_to_usd(balance))} USD; a balance "
                f"is at most {format_usd(MAX_USD)} USD"
            )
        post_topup(session, row, micros, now=self._clock())


def _move_jobs(session: Session, old_hash: str, new_hash: str) -> None:
    """A rotated key keeps its jobs: fetching them, their idempotency keys, the concurrency
    count and the take-over of orphans all find a job's key by its hash."""
    from service.store.jobs import Job

    session.execute(update(Job).where(Job.key_hash == old_hash).values(key_hash=new_hash))
