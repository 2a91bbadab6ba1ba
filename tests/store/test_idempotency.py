"""Idempotency keys: a retried request gets its first job back and is charged once, on SQLite
and on PostgreSQL, also when the retries race each other."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from service.pricing import Plan
from service.store.errors import DuplicateRequest, IdempotencyKeyReused
from tests.store.conftest import submit_job


def submit(jobs, key, idempotency_key, fingerprint="f1"):
    return submit_job(
        jobs, key, samples=2, idempotency_key=idempotency_key, fingerprint=fingerprint
    )


def test_a_retry_returns_the_first_job_and_charges_nothing(db):
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    first = submit(jobs, key, "order-17")
    assert keys.get(key.id).balance == Decimal("0.9906")

    with pytest.raises(DuplicateRequest) as retry:
        submit(jobs, key, "order-17")
    assert retry.value.job.id == first.id
    assert keys.get(key.id).balance == Decimal("0.9906")

    # still the same job once it has finished
    assert jobs.finish(first.id, generation_time=0.5)
    with pytest.raises(DuplicateRequest) as later:
        submit(jobs, key, "order-17")
    assert later.value.job.id == first.id
    assert keys.get(key.id).balance == Decimal("0.9906")
    assert db.ledger().audit() == []


def test_the_same_idempotency_key_with_another_request_is_refused(db):
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    submit(jobs, key, "order-17", fingerprint="f1")
    with pytest.raises(IdempotencyKeyReused, match="different request"):
        submit(jobs, key, "order-17", fingerprint="f2")
    assert keys.get(key.id).balance == Decimal("0.9906")


def test_idempotency_keys_belong_to_one_api_key(db):
    keys, jobs = db.keys(), db.jobs()
    _, alice = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    _, bob = keys.create("bob", Plan.PAY_PER_USE, balance=Decimal("1"))
    a = submit(jobs, alice, "same")
    b = submit(jobs, bob, "same")
    assert a.id != b.id
    assert keys.get(bob.id).balance == Decimal("0.9906")
    # and requests without a key never collide
    assert submit(jobs, alice, None).id != submit(jobs, alice, None).id


def test_racing_retries_make_exactly_one_job(db):
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    threads = 16
    start = threading.Barrier(threads)

    def one(_):
        start.wait()
        try:
            return submit(jobs, key, "order-99")
        except DuplicateRequest as duplicate:
            return duplicate.job

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(threads)))
    assert len({job.id for job in results}) == 1
    assert keys.get(key.id).balance == Decimal("0.9906")
    assert jobs.count_processing(key.key_hash) == 1
