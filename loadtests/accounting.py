"""After a run against a database we can read: did every job end, was every failed job
refunded, and does the ledger charge exactly the images the load test saw delivered?"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from service.pricing import Plan
from service.store.db import make_engine, make_sessionmaker
from service.store.jobs import Job, JobStatus
from service.store.ledger import EntryKind, Ledger, LedgerEntry


def check_ledger(database_url: str, delivered_images: int) -> dict[str, Any]:
    """The `ledger` section of a summary; `problems` is empty when everything adds up."""
    engine = make_engine(database_url)
    try:
        sessions = make_sessionmaker(engine)
        ledger = Ledger(sessions)
        problems = list(ledger.audit())
        usage = ledger.usage()
        with sessions() as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            success_images = session.scalar(
                select(func.coalesce(func.sum(Job.samples), 0)).where(
                    Job.status == JobStatus.SUCCESS.value
                )
            )
            failed_ids = set(
                session.scalars(select(Job.id).where(Job.status == JobStatus.FAILED.value))
            )
            refunded = set(
                session.scalars(
                    select(LedgerEntry.job_id).where(
                        LedgerEntry.kind == EntryKind.RELEASE.value,
                        LedgerEntry.job_id.in_(failed_ids),
                    )
                )
            )
    finally:
        engine.dispose()

    ledger_images = sum(row.images for row in usage)
    processing = counts.get(JobStatus.PROCESSING.value, 0)
    if processing:
        problems.append(f"{processing} jobs are still processing")
    if failed_ids - refunded:
        problems.append(f"failed jobs without a refund: {sorted(failed_ids - refunded)[:20]}")
    if ledger_images != success_images:
        problems.append(
            f"ledger settles {ledger_images} images but successful jobs hold {success_images}"
        )
    if ledger_images != delivered_images:
        problems.append(
            f"ledger settles {ledger_images} images but the load test saw {delivered_images} "
            "delivered"
        )
    for row in usage:
        if row.plan is not Plan.PAY_PER_USE and row.amount_usd != Decimal(0):
            problems.append(
                f"key {row.key_name!r} on {row.plan.value} was charged {row.amount_usd} USD"
            )
    return {
        "jobs_by_status": {status: int(n) for status, n in sorted(counts.items())},
        "failed_jobs_refunded": len(refunded),
        "ledger_images": ledger_images,
        "successful_job_images": int(success_images),
        "delivered_images": delivered_images,
        "charged_usd": str(sum((row.amount_usd for row in usage), Decimal(0))),
        "usage": [row.to_dict() for row in usage],
        "problems": problems,
    }
