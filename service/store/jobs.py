"""Jobs: one row per accepted text-to-image request, the source of truth for `fetch`."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    bindparam,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Mapped, Session, mapped_column

from service.config import Settings
from service.pricing import PlanLimits, usd_to_micros
from service.store.db import Base, Sessions, retried_when_rolled_back
from service.store.errors import (
    ConcurrencyLimitExceeded,
    DuplicateRequest,
    IdempotencyKeyReused,
    InvalidApiKey,
)
from service.store.keys import ApiKey, KeyRecord, as_utc


class JobStatus(enum.StrEnum):
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_key_hash_status", "key_hash", "status"),
        Index("ux_jobs_key_hash_idempotency_key", "key_hash", "idempotency_key", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(36), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    model_id: Mapped[str] = mapped_column(String(128))
    samples: Mapped[int] = mapped_column(Integer)
    # what the generator is asked (GenerationParams as a dict): enough to re-dispatch the job
    params: Mapped[dict] = mapped_column(JSON)
    # the ModelsLab `meta` of the response
    meta: Mapped[dict] = mapped_column(JSON)
    # storage object names, in output order; the URLs are built from them
    output_names: Mapped[list] = mapped_column(JSON)
    generation_time: Mapped[float | None] = mapped_column(Float, nullable=True)
    message: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_status: Mapped[str] = mapped_column(String(32), default="")
    track_id: Mapped[str | None] = mapped_column(String(256), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The ingress replica running the job, refreshed while it runs: a processing job whose
    # heartbeat stopped belongs to a dead process and is taken over (see JobStore.claim_orphans).
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    # The client's Idempotency-Key header (unique per API key) and the SHA-256 of the request
    # it came with: a retry with both equal gets this job back instead of a new charge.
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    request_fingerprint: Mapped[str | None] = mapped_column(String(64), nullable=True)


@dataclass(frozen=True)
class JobRecord:
    """A detached, read-only copy of a job row."""

    id: int
    request_id: str
    key_hash: str
    status: JobStatus
    model_id: str
    samples: int
    params: dict
    meta: dict
    output_names: list[str]
    generation_time: float | None
    message: str | None
    webhook: str | None
    webhook_status: str
    track_id: str | None
    created_at: datetime
    finished_at: datetime | None
    owner: str | None = None
    attempts: int = 1
    # what settling charged, on the record `finish` returns only (prices may change meanwhile)
    charged_micros: int | None = None

    @classmethod
    def of(cls, job: Job | Any) -> JobRecord:
        """From an ORM Job or anything with its column attributes (a Core row)."""
        return cls(
            id=job.id,
            request_id=job.request_id,
            key_hash=job.key_hash,
            status=JobStatus(job.status),
            model_id=job.model_id,
            samples=job.samples,
            params=dict(job.params),
            meta={**job.meta, "id": job.id},  # the id is known only once the row exists
            output_names=list(job.output_names),
            generation_time=job.generation_time,
            message=job.message,
            webhook=job.webhook,
            webhook_status=job.webhook_status,
            track_id=job.track_id,
            created_at=job.created_at,
            finished_at=job.finished_at,
            owner=job.owner,
            attempts=job.attempts,
        )


class JobStore:
    """Creates jobs and moves them from processing to success or failed, exactly once.

    Each move pays for itself in the same transaction: creating a job reserves its cost,
    finishing settles it, failing releases it.
    """

    def __init__(
        self,
        sessions: Sessions,
        limits: PlanLimits | Settings,
        *,
        clock: Callable[[], datetime] | None = None,
    ):
        self._sessions = sessions
        self._limits = (
            limits if isinstance(limits, PlanLimits) else PlanLimits.from_settings(limits)
        )
        self._clock = clock or (lambda: datetime.now(UTC))

    @retried_when_rolled_back
    def create(
        self,
        *,
        request_id: str,
        key: KeyRecord,
        model_id: str,
        samples: int,
        params: dict,
        meta: dict,
        output_names: list[str],
        unit_price: Decimal,
        webhook: str | None = None,
        track_id: str | None = None,
        owner: str | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
    ) -> JobRecord:
        """Accept a request for `key`: check it may run and can pay for all images, then reserve.

        Raises InvalidApiKey (revoked meanwhile), ConcurrencyLimitExceeded or InsufficientCredit;
        then nothing is written. With an `idempotency_key` this key has used before, raises
        DuplicateRequest with that job (same `fingerprint`) or IdempotencyKeyReused (another),
        and writes nothing either: the key row's lock makes the look-up and the insert one step.
        """
        if samples < 1:
            raise ValueError(f"samples must be at least 1, got {samples}")
        unit_price_micros = usd_to_micros(unit_price)
        if unit_price_micros < 0:
            raise ValueError(f"unit_price must not be negative, got {unit_price}")
        now = self._clock()
        with self._sessions.write() as conn:
            # The key row's lock serializes every check-then-debit of one key (PostgreSQL);
            # SQLite's BEGIN IMMEDIATE already serializes all writers.
            row = conn.execute(_KEY_FOR_UPDATE, {"key_id": key.id}).first()
            # a key rotated since `key` was read (an ingress caches keys for seconds) has lost
            # its old value at once
            if row is None or row.revoked_at is not None or row.key_hash != key.key_hash:
                raise InvalidApiKey()
            expires_at = as_utc(row.expires_at)
            if expires_at is not None and now >= expires_at:
                raise InvalidApiKey.expired(expires_at)
            if idempotency_key is not None:
                earlier = conn.execute(
                    _JOB_BY_IDEMPOTENCY_KEY,
                    {"key_hash": row.key_hash, "idempotency_key": idempotency_key},
                ).first()
                if earlier is not None:
                    if earlier.request_fingerprint != fingerprint:
                        raise IdempotencyKeyReused()
                    raise DuplicateRequest(JobRecord.of(earlier))
            limit = self._limits.concurrency(row.plan)
            if _count_processing(conn, row.key_hash) >= limit:
                raise ConcurrencyLimitExceeded(limit)
            values = {
                "request_id": request_id,
                "key_hash": row.key_hash,
                "status": JobStatus.PROCESSING.value,
                "model_id": model_id,
                "samples": samples,
                "params": params,
                "meta": meta,
                "output_names": output_names,
                "generation_time": None,
                "message": None,
                "webhook": webhook,
                "webhook_status": "",
                "track_id": track_id,
                "created_at": now,
                "finished_at": None,
                "owner": owner,
                "heartbeat_at": now,
                "attempts": 1,
                "idempotency_key": idempotency_key,
                "request_fingerprint": fingerprint if idempotency_key is not None else None,
            }
            job_id = conn.execute(_INSERT_JOB, values).inserted_primary_key[0]
            ledger.reserve(
                conn,
                row,
                job_id=job_id,
                model_id=model_id,
                images=samples,
                unit_price_micros=unit_price_micros,
                limits=self._limits,
                now=now,
            )
            return JobRecord.of(_Values(id=job_id, **values))

    def get(self, job_id: int) -> JobRecord | None:
        with self._sessions.read() as session:
            job = session.get(Job, job_id)
            return JobRecord.of(job) if job else None

    def finish(
        self,
        job_id: int,
        *,
        generation_time: float,
        meta_updates: dict | None = None,
        owner: str | None = None,
    ) -> JobRecord | None:
        """Mark a processing job successful and settle its charge; returns the finished job,
        or None if it had already ended or, with `owner`, another replica has taken it over."""
        with self._sessions.write() as conn:
            job = conn.execute(_JOB_FOR_UPDATE, {"job_id": job_id}).first()
            if job is None or job.status != JobStatus.PROCESSING:
                return None
            if owner is not None and job.owner != owner:
                return None
            ended = {
                "status": JobStatus.SUCCESS.value,
                "generation_time": generation_time,
                "meta": {**job.meta, **(meta_updates or {})},
                "finished_at": self._clock(),
            }
            conn.execute(_END_JOB, {"job_id": job_id, **ended})
            charged = ledger.settle(conn, job_id, now=ended["finished_at"])
            finished = JobRecord.of(_Values(**{**job._asdict(), **ended}))
            return replace(finished, charged_micros=charged)

    def fail(self, job_id: int, message: str, *, owner: str | None = None) -> bool:
        """Mark a processing job failed and refund its reservation; False if it had ended or,
        with `owner`, another replica has taken it over (its own attempt may still succeed)."""
        with self._sessions.write() as conn:
            row = conn.execute(_JOB_STATUS_FOR_UPDATE, {"job_id": job_id}).first()
            if row is None or row.status != JobStatus.PROCESSING:
                return False
            if owner is not None and row.owner != owner:
                return False
            now = self._clock()
            conn.execute(
                _END_JOB,
                {
                    "job_id": job_id,
                    "status": JobStatus.FAILED.value,
                    "message": message,
                    "finished_at": now,
                },
            )
            ledger.release(conn, job_id, now=now)
            return True

    def set_webhook_status(self, job_id: int, webhook_status: str) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(webhook_status=webhook_status)
            )

    def count_processing(self, key_hash: str) -> int:
        """Requests of a key queued or running (`/api/v6/processing/request_count`)."""
        with self._sessions.read() as session:
            return _count_processing(session, key_hash)

    def processing(self) -> list[JobRecord]:
        """Every job still processing (after a restart: the orphans to re-dispatch or fail)."""
        with self._sessions.read() as session:
            jobs = session.scalars(
                select(Job).where(Job.status == JobStatus.PROCESSING.value).order_by(Job.id)
            )
            return [JobRecord.of(job) for job in jobs]

    def heartbeat(self, owner: str, job_ids: list[int]) -> list[int]:
        """Say that `owner` is still running these jobs; returns those of them it no longer
        runs by the database's account (ended elsewhere, or taken over)."""
        if not job_ids:
            return []
        with self._sessions.begin() as session:
            beaten = session.scalars(
                update(Job)
                .where(
                    Job.id.in_(job_ids),
                    Job.owner == owner,
                    Job.status == JobStatus.PROCESSING.value,
                )
                .values(heartbeat_at=self._clock())
                .returning(Job.id)
            )
            alive = set(beaten)
        return [job_id for job_id in job_ids if job_id not in alive]

    def claim_orphans(
        self, owner: str, stale_after_s: float, max_attempts: int, limit: int | None = None
    ) -> tuple[list[JobRecord], list[int]]:
        """Take over processing jobs whose owner stopped sending heartbeats, oldest first, at
        most `limit` of them.

        Each is either claimed for another attempt (returned first) or, after `max_attempts`,
        failed with its charge released (ids returned second). Safe with several replicas:
        a job is claimed by exactly one.
        """
        now = self._clock()
        cutoff = now - timedelta(seconds=stale_after_s)
        claimed: list[JobRecord] = []
        failed: list[int] = []
        with self._sessions.begin() as session:
            query = (
                select(Job)
                .where(
                    Job.status == JobStatus.PROCESSING.value,
                    or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                )
                .order_by(Job.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            found = list(session.scalars(query))
            # Releasing debits each job's key. Another replica's sweep holds other jobs (SKIP
            # LOCKED) of the same keys, maybe in the opposite order: locking the keys in one
            # order first is what keeps two sweeps (and the requests queued behind their key
            # locks) out of a deadlock.
            given_up = {job.key_hash for job in found if job.attempts >= max_attempts}
            if given_up:
                session.execute(
                    select(ApiKey.id)
                    .where(ApiKey.key_hash.in_(sorted(given_up)))
                    .order_by(ApiKey.id)
                    .with_for_update()
                )
            for job in found:
                if job.attempts >= max_attempts:
                    job.status = JobStatus.FAILED.value
                    job.message = (
                        f"Image generation failed: the server running it stopped "
                        f"{job.attempts} times"
                    )
                    job.finished_at = now
                    ledger.release(session.connection(), job.id, now=now)
                    failed.append(job.id)
                else:
                    job.owner = owner
                    job.heartbeat_at = now
                    job.attempts += 1
                    claimed.append(JobRecord.of(job))
        return claimed, failed


# The statements of the per-request writes, built once: see ledger.py on why Core.
_jobs = Job.__table__
_keys = ApiKey.__table__
_KEY_FOR_UPDATE = (
    select(
        _keys.c.id,
        _keys.c.key_hash,
        _keys.c.plan,
        _keys.c.balance_micros,
        _keys.c.revoked_at,
        _keys.c.expires_at,
    )
    .where(_keys.c.id == bindparam("key_id"))
    .with_for_update()
)
_PROCESSING_OF_KEY = (
    select(func.count())
    .select_from(_jobs)
    .where(
        _jobs.c.key_hash == bindparam("key_hash"),
        _jobs.c.status == JobStatus.PROCESSING.value,
    )
)
_INSERT_JOB = insert(_jobs)
_JOB_BY_IDEMPOTENCY_KEY = select(_jobs).where(
    _jobs.c.key_hash == bindparam("key_hash"),
    _jobs.c.idempotency_key == bindparam("idempotency_key"),
)
_JOB_FOR_UPDATE = select(_jobs).where(_jobs.c.id == bindparam("job_id")).with_for_update()
_JOB_STATUS_FOR_UPDATE = (
    select(_jobs.c.status, _jobs.c.owner).where(_jobs.c.id == bindparam("job_id")).with_for_update()
)
_END_JOB = update(_jobs).where(_jobs.c.id == bindparam("job_id"))


class _Values(SimpleNamespace):
    """Column values by attribute, as JobRecord.of reads a row."""


def _count_processing(conn: Connection | Session, key_hash: str) -> int:
    return conn.scalar(_PROCESSING_OF_KEY, {"key_hash": key_hash})


# Imported last: the ledger's table refers to Job, so it imports this module in turn.
from service.store import ledger  # noqa: E402
