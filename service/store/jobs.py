"""Jobs: one row per accepted text-to-image request, the source of truth for `fetch`."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, func, select, update
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from service.store.db import Base


class JobStatus(enum.StrEnum):
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"


class Job(Base):
    __tablename__ = "jobs"

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

    @classmethod
    def of(cls, job: Job) -> JobRecord:
        return cls(
            id=job.id,
            request_id=job.request_id,
            key_hash=job.key_hash,
            status=JobStatus(job.status),
            model_id=job.model_id,
            samples=job.samples,
            params=dict(job.params),
            meta=dict(job.meta),
            output_names=list(job.output_names),
            generation_time=job.generation_time,
            message=job.message,
            webhook=job.webhook,
            webhook_status=job.webhook_status,
            track_id=job.track_id,
            created_at=job.created_at,
            finished_at=job.finished_at,
        )


class JobStore:
    """Creates jobs and moves them from processing to success or failed, exactly once."""

    def __init__(self, sessions: sessionmaker):
        self._sessions = sessions

    def create(
        self,
        *,
        request_id: str,
        key_hash: str,
        model_id: str,
        samples: int,
        params: dict,
        meta: dict,
        output_names: list[str],
        webhook: str | None = None,
        track_id: str | None = None,
    ) -> JobRecord:
        with self._sessions.begin() as session:
            job = Job(
                request_id=request_id,
                key_hash=key_hash,
                status=JobStatus.PROCESSING.value,
                model_id=model_id,
                samples=samples,
                params=params,
                meta=meta,
                output_names=output_names,
                webhook=webhook,
                webhook_status="",
                track_id=track_id,
                created_at=datetime.now(UTC),
            )
            session.add(job)
            session.flush()
            meta_with_id = {**meta, "id": job.id}
            job.meta = meta_with_id
            session.flush()
            return JobRecord.of(job)

    def get(self, job_id: int) -> JobRecord | None:
        with self._sessions() as session:
            job = session.get(Job, job_id)
            return JobRecord.of(job) if job else None

    def finish(
        self, job_id: int, *, generation_time: float, meta_updates: dict | None = None
    ) -> bool:
        """Mark a processing job successful; False if it had already ended."""
        with self._sessions.begin() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.status != JobStatus.PROCESSING:
                return False
            job.status = JobStatus.SUCCESS.value
            job.generation_time = generation_time
            job.meta = {**job.meta, **(meta_updates or {})}
            job.finished_at = datetime.now(UTC)
            return True

    def fail(self, job_id: int, message: str) -> bool:
        """Mark a processing job failed; False if it had already ended."""
        with self._sessions.begin() as session:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.PROCESSING.value)
                .values(status=JobStatus.FAILED.value, message=message, finished_at=datetime.now(UTC))
            )
            return result.rowcount == 1

    def set_webhook_status(self, job_id: int, webhook_status: str) -> None:
        with self._sessions.begin() as session:
            session.execute(
                update(Job).where(Job.id == job_id).values(webhook_status=webhook_status)
            )

    def count_processing(self, key_hash: str) -> int:
        with self._sessions() as session:
            return session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.key_hash == key_hash, Job.status == JobStatus.PROCESSING.value)
            )

    def processing(self) -> list[JobRecord]:
        """Every job still processing (after a restart: the orphans to re-dispatch or fail)."""
        with self._sessions() as session:
            jobs = session.scalars(
                select(Job).where(Job.status == JobStatus.PROCESSING.value).order_by(Job.id)
            )
            return [JobRecord.of(job) for job in jobs]
