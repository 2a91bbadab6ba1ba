"""The ledger through JobStore: reserve on accept, settle on delivery, release on failure."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError

from service.pricing import Plan, PlanLimits
from service.store.errors import ConcurrencyLimitExceeded, InsufficientCredit, InvalidApiKey
from service.store.jobs import JobStatus
from service.store.keys import ApiKey
from service.store.ledger import EntryKind, LedgerEntry, UsageRow, usage_document

PRICE = Decimal("0.0047")


def submit(db, key, samples=1, model_id="stable-diffu", price=PRICE, jobs=None):
    return (jobs or db.jobs()).create(
        request_id=str(uuid.uuid4()),
        key=key,
        model_id=model_id,
        samples=samples,
        params={"prompt": "a fox"},
        meta={"prompt": "a fox"},
        output_names=[f"x-{i}.png" for i in range(samples)],
        unit_price=price,
    )


def test_reserve_settle_release_arithmetic(db):
    keys, jobs, ledger = db.keys(), db.jobs(), db.ledger()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("0.1"))

    delivered = submit(db, key, samples=3)
    assert delivered.status is JobStatus.PROCESSING and delivered.meta["id"] == delivered.id
    assert delivered.key_hash == key.key_hash
    assert keys.get(key.id).balance == Decimal("0.0859")
    failed = submit(db, key, samples=2, model_id="other", price=Decimal("0.01"))
    assert keys.get(key.id).balance == Decimal("0.0659")

    assert jobs.finish(delivered.id, generation_time=1.5, meta_updates={"seed": 7})
    assert jobs.fail(failed.id, "out of memory")
    assert keys.get(key.id).balance == Decimal("0.0859")
    assert jobs.get(delivered.id).meta["seed"] == 7
    assert jobs.get(failed.id).status is JobStatus.FAILED

    rows = [
        (e.kind, e.job_id, e.images, e.unit_price_micros, e.amount_micros) for e in ledger.entries()
    ]
    assert rows == [
        (EntryKind.TOPUP, None, 0, 0, 100_000),
        (EntryKind.RESERVE, delivered.id, 3, 4_700, -14_100),
        (EntryKind.RESERVE, failed.id, 2, 10_000, -20_000),
        (EntryKind.SETTLE, delivered.id, 3, 4_700, 0),
        (EntryKind.RELEASE, failed.id, 2, 10_000, 20_000),
    ]
    assert sum(e.amount_micros for e in ledger.entries(key_id=key.id)) == 85_900
    assert ledger.audit() == []


def test_each_job_is_settled_or_released_exactly_once(db):
    keys, jobs, ledger = db.keys(), db.jobs(), db.ledger()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    done, failed = submit(db, key), submit(db, key)

    assert jobs.finish(done.id, generation_time=1.0)
    assert not jobs.finish(done.id, generation_time=1.0)
    assert not jobs.fail(done.id, "late failure")
    assert jobs.fail(failed.id, "boom")
    assert not jobs.fail(failed.id, "boom again")
    assert not jobs.finish(failed.id, generation_time=1.0)
    assert not jobs.finish(10_000, generation_time=1.0) and not jobs.fail(10_000, "no such job")

    kinds = [(e.job_id, e.kind) for e in ledger.entries() if e.job_id]
    assert sorted(kinds) == sorted(
        [
            (done.id, EntryKind.RESERVE),
            (done.id, EntryKind.SETTLE),
            (failed.id, EntryKind.RESERVE),
            (failed.id, EntryKind.RELEASE),
        ]
    )
    assert keys.get(key.id).balance == Decimal("1") - PRICE
    # The database itself refuses a second outcome for a job.
    with pytest.raises(IntegrityError), db.sessions.begin() as session:
        session.execute(
            insert(LedgerEntry).values(
                key_id=key.id, job_id=done.id, kind="release", images=1,
                unit_price_micros=4_700, amount_micros=4_700, created_at=db.clock(),
            )
        )  # fmt: skip


def test_a_failed_job_leaves_the_balance_where_it_was(db):
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("0.0094"))
    job = submit(db, key, samples=2)
    assert keys.get(key.id).balance_micros == 0
    assert jobs.fail(job.id, "generator died")
    assert keys.get(key.id).balance == Decimal("0.0094")
    assert db.ledger().usage() == []
    assert db.ledger().audit() == []


def test_only_the_owner_of_a_job_ends_it_when_an_owner_is_named(db):
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("0.0094"))
    job = jobs.create(
        request_id=str(uuid.uuid4()), key=key, model_id="stable-diffu", samples=1,
        params={}, meta={}, output_names=["o-0.png"], unit_price=PRICE, owner="replica-b",
    )  # fmt: skip
    assert not jobs.fail(job.id, "CUDA error", owner="replica-a")
    assert jobs.finish(job.id, generation_time=1.0, owner="replica-a") is None
    assert jobs.get(job.id).status is JobStatus.PROCESSING
    assert jobs.finish(job.id, generation_time=1.0, owner="replica-b").status is JobStatus.SUCCESS
    assert keys.get(key.id).balance == PRICE
    assert db.ledger().audit() == []


def test_a_request_must_be_covered_in_full(db):
    keys = db.keys()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=PRICE)
    with pytest.raises(InsufficientCredit) as refused:
        submit(db, key, samples=2)
    assert str(refused.value) == (
        "Insufficient credits: this request costs 0.0094 USD, your balance is 0.0047 USD"
    )
    assert db.jobs().processing() == [] and len(db.ledger().entries()) == 1
    submit(db, key, samples=1)
    assert keys.get(key.id).balance_micros == 0


def test_balance_can_never_go_negative_in_the_database(db):
    _, key = db.keys().create("alice", Plan.PAY_PER_USE)
    with pytest.raises(IntegrityError), db.sessions.begin() as session:
        session.execute(update(ApiKey).where(ApiKey.id == key.id).values(balance_micros=-1))


def test_free_allowance_runs_out_at_the_configured_count_and_renews_monthly(db):
    limits = PlanLimits(
        max_concurrent={Plan.FREE: 10, Plan.PAY_PER_USE: 10, Plan.PREMIUM: 10},
        free_images_per_month=5,
    )
    keys, jobs = db.keys(), db.jobs(limits)
    _, key = keys.create("free", Plan.FREE)

    first = submit(db, key, samples=4, jobs=jobs)
    with pytest.raises(InsufficientCredit, match="only 1 of your free monthly allowance of 5"):
        submit(db, key, samples=2, jobs=jobs)
    failed = submit(db, key, samples=1, jobs=jobs)
    with pytest.raises(InsufficientCredit) as refused:
        submit(db, key, samples=1, jobs=jobs)
    assert str(refused.value) == "Your free monthly allowance of 5 images is used up"

    jobs.finish(first.id, generation_time=1.0)
    jobs.fail(failed.id, "boom")  # a failed image does not count
    assert db.ledger().free_images_used(key.id, db.clock()) == 4
    submit(db, key, samples=1, jobs=jobs)
    with pytest.raises(InsufficientCredit):
        submit(db, key, samples=1, jobs=jobs)

    db.clock.now = datetime(2026, 4, 1, 0, 0, tzinfo=UTC)  # a new calendar month
    assert db.ledger().free_images_used(key.id, db.clock()) == 0
    submit(db, key, samples=5, jobs=jobs)
    assert keys.get(key.id).balance_micros == 0
    assert all(e.amount_micros == 0 for e in db.ledger().entries(key_id=key.id))


def test_premium_is_never_charged_but_its_images_are_counted(db):
    keys, jobs, ledger = db.keys(), db.jobs(), db.ledger()
    _, key = keys.create("vip", Plan.PREMIUM)
    for _ in range(3):
        jobs.finish(submit(db, key, samples=4).id, generation_time=1.0)
    assert keys.get(key.id).balance_micros == 0
    assert {(e.unit_price_micros, e.amount_micros) for e in ledger.entries()} == {(0, 0)}
    assert ledger.usage() == [UsageRow(key.id, "vip", Plan.PREMIUM, "stable-diffu", 12, Decimal(0))]


def test_revoked_key_cannot_create_jobs_even_with_a_stale_record(db):
    keys = db.keys()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    keys.revoke("alice")
    with pytest.raises(InvalidApiKey):
        submit(db, key)
    assert db.ledger().entries(key_id=key.id)[-1].kind is EntryKind.TOPUP


def test_concurrency_limit_counts_processing_jobs(db):
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("free", Plan.FREE)
    running = [submit(db, key) for _ in range(5)]
    with pytest.raises(ConcurrencyLimitExceeded) as refused:
        submit(db, key)
    assert refused.value.limit == 5 and jobs.count_processing(key.key_hash) == 5
    jobs.finish(running[0].id, generation_time=1.0)
    submit(db, key)


def test_usage_report_totals_per_key_and_model(db):
    keys, jobs, ledger = db.keys(), db.jobs(), db.ledger()
    _, alice = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    _, bob = keys.create("bob", Plan.FREE)
    for key, samples, model in [
        (alice, 2, "sd"),
        (alice, 1, "sd"),
        (alice, 1, "xl"),
        (bob, 3, "sd"),
    ]:
        jobs.finish(submit(db, key, samples, model_id=model).id, generation_time=1.0)
    jobs.fail(submit(db, alice, 4, model_id="sd").id, "boom")  # not delivered: not in usage
    submit(db, alice, 1, model_id="sd")  # still processing: not yet in usage
    db.clock.now = datetime(2026, 3, 20, tzinfo=UTC)
    jobs.finish(submit(db, alice, 2, model_id="xl").id, generation_time=1.0)

    assert ledger.usage() == [
        UsageRow(alice.id, "alice", Plan.PAY_PER_USE, "sd", 3, Decimal("0.0141")),
        UsageRow(alice.id, "alice", Plan.PAY_PER_USE, "xl", 3, Decimal("0.0141")),
        UsageRow(bob.id, "bob", Plan.FREE, "sd", 3, Decimal(0)),
    ]
    assert ledger.usage(key="bob") == ledger.usage(key=bob.id) == ledger.usage()[2:]
    assert ledger.usage(key="alice", since=date(2026, 3, 20)) == [
        UsageRow(alice.id, "alice", Plan.PAY_PER_USE, "xl", 2, Decimal("0.0094"))
    ]
    document = usage_document(ledger.usage())
    assert document["total_images"] == 9 and document["total_amount_usd"] == "0.0282"
    assert document["usage"][0] == {
        "key_id": alice.id, "key": "alice", "plan": "pay_per_use",
        "model_id": "sd", "images": 3, "amount_usd": "0.0141",
    }  # fmt: skip
    charged = Decimal("1") - keys.get(alice.id).balance
    assert charged == Decimal("0.0282") + PRICE  # delivered + the job still processing
    assert ledger.audit() == []
