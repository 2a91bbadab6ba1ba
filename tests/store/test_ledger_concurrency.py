"""Races: many requests of one key at once never overspend it nor exceed its concurrency."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from sqlalchemy.exc import OperationalError

from service.pricing import Plan, PlanLimits
from service.store import ledger
from service.store.errors import ConcurrencyLimitExceeded, InsufficientCredit

PRICE = Decimal("0.0047")
THREADS = 40


def one_image_request(jobs, key):
    return jobs.create(
        request_id=str(uuid.uuid4()),
        key=key,
        model_id="stable-diffu",
        samples=1,
        params={},
        meta={},
        output_names=["x-0.png"],
        unit_price=PRICE,
    )


def race(db, key, jobs):
    """THREADS one-image requests released at the same instant; returns (jobs, refusals)."""
    start = threading.Barrier(THREADS)

    def one(_):
        start.wait()
        try:
            return one_image_request(jobs, key)
        except (InsufficientCredit, ConcurrencyLimitExceeded) as exc:
            return exc

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(one, range(THREADS)))
    accepted = [r for r in results if not isinstance(r, Exception)]
    return accepted, [r for r in results if isinstance(r, Exception)]


def test_forty_requests_against_a_balance_for_ten(db):
    keys, ledger = db.keys(), db.ledger()
    # a concurrency limit above THREADS, so only the balance decides
    jobs = db.jobs(limits=_limits(pay_per_use=100))
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("0.047"))

    accepted, refused = race(db, key, jobs)

    assert len(accepted) == 10 and len(refused) == 30
    assert all(isinstance(r, InsufficientCredit) for r in refused)
    assert keys.get(key.id).balance_micros == 0
    for job in accepted:
        assert jobs.finish(job.id, generation_time=0.1)
    assert keys.get(key.id).balance_micros == 0
    entries = ledger.entries(key_id=key.id)
    charges = [e for e in entries if e.kind != "topup"]
    assert -sum(e.amount_micros for e in charges) == 47_000 == 10 * 4_700
    assert sum(e.amount_micros for e in entries) == 0
    [row] = ledger.usage()
    assert (row.images, row.amount_usd) == (10, Decimal("0.047"))
    assert ledger.audit() == []


def test_forty_requests_against_a_concurrency_limit_of_fifteen(db):
    keys, jobs = db.keys(), db.jobs(limits=_limits(premium=15))
    _, key = keys.create("vip", Plan.PREMIUM)

    accepted, refused = race(db, key, jobs)

    assert len(accepted) == 15 and len(refused) == 25
    assert {r.limit for r in refused if isinstance(r, ConcurrencyLimitExceeded)} == {15}
    assert len(refused) == sum(isinstance(r, ConcurrencyLimitExceeded) for r in refused)
    assert jobs.count_processing(key.key_hash) == 15
    assert jobs.fail(accepted[0].id, "boom")
    accepted, refused = race(db, key, jobs)
    assert (len(accepted), len(refused)) == (1, THREADS - 1)


def _limits(**overrides: int) -> PlanLimits:
    limits = {"free": 5, "pay_per_use": 10, "premium": 15, **overrides}
    return PlanLimits(max_concurrent=limits, free_images_per_month=25)


def _spend_from_another_process(url: str, key_id: int, attempts: int, go) -> int:
    """In a separate process (as a second ingress replica is): `attempts` one-image requests
    of key `key_id`, started when `go` is set; returns how many were accepted."""
    from service.store.db import make_engine, make_sessionmaker
    from service.store.jobs import JobStore
    from service.store.keys import KeyStore

    sessions = make_sessionmaker(make_engine(url))
    key = KeyStore(sessions).get(key_id)
    jobs = JobStore(sessions, _limits(pay_per_use=1000))
    go.wait()
    accepted = 0
    for _ in range(attempts):
        try:
            one_image_request(jobs, key)
            accepted += 1
        except InsufficientCredit:
            pass
    return accepted


def test_processes_sharing_a_sqlite_file_never_overspend_a_key(tmp_path):
    """Two ingress replicas on one SQLite file: 3 processes x 30 requests against a balance
    for 25 images — exactly 25 accepted, nothing lost to lock timeouts."""
    import multiprocessing

    from service.store.db import make_engine, make_sessionmaker, migrate
    from service.store.keys import KeyStore
    from service.store.ledger import Ledger

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    engine = make_engine(url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    _, key = KeyStore(sessions).create("shared", Plan.PAY_PER_USE, balance=PRICE * 25)
    context = multiprocessing.get_context("spawn")
    go = context.Manager().Event()
    with context.Pool(3) as pool:
        pending = [
            pool.apply_async(_spend_from_another_process, (url, key.id, 30, go)) for _ in range(3)
        ]
        go.set()
        accepted = sum(result.get(timeout=120) for result in pending)
    assert accepted == 25
    assert KeyStore(sessions).get(key.id).balance_micros == 0
    assert Ledger(sessions).audit() == []


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # SQLite has one writer at a time
def test_two_sweeps_giving_up_orphans_of_the_same_keys_do_not_deadlock(db, monkeypatch):
    """A dead replica left jobs of keys a, b, b, a; two replicas sweep at once and each gets two
    of them (SKIP LOCKED), so their refunds meet the keys in opposite orders. A request of key a
    queued behind them must be accepted, and both sweeps must end every job they took."""
    keys = db.keys()
    _, a = keys.create("a", Plan.PAY_PER_USE, balance=Decimal("1"))
    _, b = keys.create("b", Plan.PAY_PER_USE, balance=Decimal("1"))
    dead = db.jobs()
    orphans = [one_image_request(dead, key).id for key in (a, b, b, a)]
    db.clock.advance(seconds=1)  # their heartbeats are now stale
    release = ledger.release

    def slow_release(conn, job_id, *, now):  # holds each key lock long enough to meet the other
        released = release(conn, job_id, now=now)
        time.sleep(0.3)
        return released

    monkeypatch.setattr(ledger, "release", slow_release)
    outcomes: dict[str, object] = {}

    def run(name, delay_s, work):
        time.sleep(delay_s)
        try:
            outcomes[name] = work()
        except OperationalError as exc:
            outcomes[name] = exc

    threads = [
        threading.Thread(target=run, args=(name, delay, work))
        for name, delay, work in (
            ("first", 0.0, lambda: db.jobs().claim_orphans("first", 0.0, 1, 2)),
            ("second", 0.1, lambda: db.jobs().claim_orphans("second", 0.0, 1, 2)),
            ("request", 0.2, lambda: one_image_request(db.jobs(), a)),
        )
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not isinstance(outcomes["request"], Exception), outcomes["request"]
    assert outcomes["first"] == ([], orphans[:2]), outcomes["first"]
    assert outcomes["second"] == ([], orphans[2:]), outcomes["second"]
    assert keys.get(a.id).balance_micros == keys.get(b.id).balance_micros - 4_700  # the request
    assert db.ledger().audit() == []


class _RolledBack(Exception):
    sqlstate = "40P01"  # how psycopg's DeadlockDetected carries it


@pytest.mark.parametrize(("sqlstate", "runs"), [("40P01", 2), ("40001", 2), ("08006", 1)])
def test_a_request_the_database_rolled_back_is_run_again(db, monkeypatch, sqlstate, runs):
    """A deadlock victim or serialization failure wrote nothing: accepting the request again is
    safe, and better than a 503. A lost connection (08006) is not retried here."""
    keys, jobs = db.keys(), db.jobs()
    _, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1"))
    write = jobs._sessions.write
    calls = []

    def first_one_rolled_back():
        calls.append(1)
        if len(calls) == 1:
            orig = _RolledBack("deadlock detected")
            orig.sqlstate = sqlstate
            raise OperationalError("SELECT ... FOR UPDATE", {}, orig)
        return write()

    monkeypatch.setattr(jobs._sessions, "write", first_one_rolled_back)
    if runs == 1:
        with pytest.raises(OperationalError):
            one_image_request(jobs, key)
    else:
        one_image_request(jobs, key)
    assert len(calls) == runs
    assert keys.get(key.id).balance_micros == 10**6 - (4_700 if runs == 2 else 0)
    assert db.ledger().audit() == []
