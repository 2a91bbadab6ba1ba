"""API keys: created once and shown once, found by hash, revoked at once, topped up exactly."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pytest

from service.config import Settings
from service.pricing import MAX_USD, Plan
from service.store.errors import DuplicateRequest, InvalidApiKey, KeyNameTaken, KeyNotFound
from service.store.keys import KeyStore, KeyValueTaken, hash_key
from service.store.ledger import EntryKind
from tests.store.conftest import submit_job


def test_create_returns_a_secret_stored_only_as_its_hash(db):
    keys = db.keys()
    plaintext, key = keys.create("alice", Plan.PAY_PER_USE, balance=Decimal("1.5"), admin=True)
    other, _ = keys.create("bob", "free")

    assert plaintext.startswith("sk-") and len(plaintext) == 3 + 43 and plaintext != other
    assert key.key_hash == hash_key(plaintext) and plaintext not in key.key_hash
    assert (key.name, key.plan, key.admin, key.balance, key.revoked) == (
        "alice",
        Plan.PAY_PER_USE,
        True,
        Decimal("1.5"),
        False,
    )
    assert keys.authenticate(plaintext) == key
    assert keys.get(key.id) == key and keys.find("alice") == key
    assert [k.name for k in keys.list()] == ["alice", "bob"]
    [topup] = db.ledger().entries(key_id=key.id)
    assert (topup.kind, topup.amount_micros) == (EntryKind.TOPUP, 1_500_000)


@pytest.mark.parametrize("plaintext", [None, "", "sk-unknown", "sdserve-demo-key"])
def test_unknown_or_missing_keys_do_not_authenticate(db, plaintext):
    db.keys().create("alice", Plan.FREE)
    assert db.keys().authenticate(plaintext) is None


def test_names_are_unique_and_balances_belong_to_pay_per_use(db):
    keys = db.keys()
    keys.create("alice", Plan.FREE)
    with pytest.raises(KeyNameTaken):
        keys.create("alice", Plan.PREMIUM)
    with pytest.raises(ValueError, match="only pay_per_use"):
        keys.create("carol", Plan.PREMIUM, balance=Decimal("5"))
    with pytest.raises(ValueError, match="finer than a micro-dollar"):
        keys.create("dave", Plan.PAY_PER_USE, balance=Decimal("0.0000001"))
    assert [k.name for k in keys.list()] == ["alice"]


def test_revoked_key_stops_working_at_once(db):
    keys = db.keys()
    plaintext, key = keys.create("alice", Plan.PREMIUM)
    assert keys.revoke("alice").revoked
    assert keys.authenticate(plaintext) is None
    assert keys.revoke(key.id).revoked  # idempotent, by id too
    with pytest.raises(KeyNotFound):
        keys.revoke("nobody")


def test_topup_adds_exactly_and_is_recorded(db):
    keys = db.keys()
    _, key = keys.create("alice", Plan.PAY_PER_USE)
    assert keys.topup("alice", Decimal("0.1")).balance == Decimal("0.1")
    assert keys.topup(key.id, Decimal("0.2")).balance_micros == 300_000
    amounts = [e.amount_micros for e in db.ledger().entries(key_id=key.id)]
    assert amounts == [100_000, 200_000]
    assert db.ledger().audit() == []
    with pytest.raises(ValueError, match="positive"):
        keys.topup("alice", Decimal("-1"))
    with pytest.raises(KeyNotFound):
        keys.topup("nobody", Decimal("1"))
    keys.create("bob", Plan.FREE)
    with pytest.raises(ValueError, match="only pay_per_use"):
        keys.topup("bob", Decimal("1"))


def test_ensure_seeds_once_and_never_resets_the_balance(db):
    keys = db.keys()
    seeded = keys.ensure("sdserve-demo-key", "demo", Plan.PAY_PER_USE, Decimal("10"), admin=True)
    assert seeded.admin and seeded.balance == Decimal("10")
    keys.topup("demo", Decimal("1"))
    again = keys.ensure("sdserve-demo-key", "demo", Plan.PAY_PER_USE, Decimal("10"), admin=True)
    assert again.id == seeded.id and again.balance == Decimal("11")
    assert keys.authenticate("sdserve-demo-key") == again
    assert len(db.ledger().entries(key_id=seeded.id)) == 2


def test_keys_work_in_a_fresh_interpreter_that_imports_only_them(tmp_path):
    # A top-up writes a ledger row whose table refers to jobs: importing keys must suffice.
    script = (
        "from decimal import Decimal\n"
        "from service.store.db import make_engine, make_sessionmaker, migrate\n"
        "from service.store.keys import KeyStore\n"
        f"engine = make_engine('sqlite:///{tmp_path / 'k.db'}')\n"
        "migrate(engine)\n"
        "_, key = KeyStore(make_sessionmaker(engine)).create('a', 'pay_per_use', Decimal(1))\n"
        "print(key.balance_micros)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1000000"


def test_a_key_stops_working_when_it_expires(db):
    keys, jobs = db.keys(), db.jobs()
    soon = db.clock.now + timedelta(days=1)
    plaintext, key = keys.create("temp", Plan.PAY_PER_USE, Decimal("1"), expires_at=soon)
    assert key.expires_at == soon and keys.authenticate(plaintext) == key
    accepted = submit_job(jobs, key)

    db.clock.advance(days=1)  # the expiry instant itself is already past
    with pytest.raises(InvalidApiKey, match="it expired at 2026-03-16 12:00 UTC"):
        keys.authenticate(plaintext)  # refused, and says when
    assert keys.find("temp").expired(db.clock.now)
    # a request authenticated a moment before is still refused when its job is created
    with pytest.raises(InvalidApiKey, match="expired at 2026-03-16 12:00 UTC"):
        submit_job(jobs, key)
    # what it had running finishes and settles as usual
    assert jobs.finish(accepted.id, generation_time=0.1)
    assert keys.find("temp").balance == Decimal("0.9953")

    # given more time, it works again; `never` clears the expiry
    assert keys.set_expiry("temp", db.clock.now + timedelta(hours=1)).expires_at is not None
    assert keys.authenticate(plaintext) is not None
    assert keys.set_expiry("temp", None).expires_at is None
    with pytest.raises(ValueError, match="must be in the future"):
        keys.set_expiry("temp", db.clock.now - timedelta(seconds=1))
    with pytest.raises(ValueError, match="must carry its time zone"):
        keys.create("naive", Plan.FREE, expires_at=datetime(2030, 1, 1))
    with pytest.raises(KeyNotFound):
        keys.set_expiry("nobody", None)


def rotations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rotated" in r.getMessage()]


def test_a_changed_value_rotates_the_named_key_and_keeps_its_account(db, caplog):
    keys = db.keys()
    first = keys.ensure("sk-old-admin", "admin", Plan.PAY_PER_USE, Decimal("10"), admin=True)
    keys.topup("admin", Decimal("1"))
    caplog.set_level(logging.WARNING, logger="service.store.keys")

    rotated = keys.ensure("sk-new-admin", "admin", Plan.PAY_PER_USE, Decimal("10"), admin=True)
    assert keys.authenticate("sk-old-admin") is None  # the old value stops working at once
    assert keys.authenticate("sk-new-admin") == rotated
    assert (rotated.id, rotated.name, rotated.admin) == (first.id, "admin", True)
    assert rotated.key_hash == hash_key("sk-new-admin")
    assert rotated.balance == Decimal("11")  # not a new account: no second first balance
    assert [e.amount_micros for e in db.ledger().entries(key_id=first.id)] == [10**7, 10**6]
    assert db.ledger().audit() == []
    [logged] = rotations(caplog)
    assert "'admin'" in logged and "sk-" not in logged and "new-admin" not in logged
    assert [k.name for k in keys.list()] == ["admin"]


def test_a_rotated_key_keeps_its_jobs_and_its_old_value_creates_none(db):
    keys, jobs = db.keys(), db.jobs()
    old = keys.ensure("sk-old", "demo", Plan.PAY_PER_USE, Decimal("1"), admin=True)
    running = submit_job(jobs, old, idempotency_key="idem-1")
    new = keys.ensure("sk-new", "demo", Plan.PAY_PER_USE, Decimal("1"), admin=True)

    # fetching, the concurrency count and orphan take-over find a job's key by its hash
    assert jobs.get(running.id).key_hash == new.key_hash == keys.by_hash(new.key_hash).key_hash
    assert jobs.count_processing(new.key_hash) == 1
    with pytest.raises(DuplicateRequest):  # a retry after the rotation: not charged again
        submit_job(jobs, keys.authenticate("sk-new"), idempotency_key="idem-1")
    with pytest.raises(InvalidApiKey):  # a record read with the old value (an ingress cache)
        submit_job(jobs, old)
    assert keys.get(new.id).balance_micros == 10**6 - 4_700
    assert db.ledger().audit() == []


def test_a_name_taken_by_a_key_made_otherwise_is_not_rotated(db):
    keys = db.keys()
    secret, theirs = keys.create("admin", Plan.FREE)  # `sdserve keys create --name admin`
    with pytest.raises(KeyNameTaken):
        keys.ensure("sk-configured", "admin", Plan.PREMIUM, admin=True)
    assert keys.authenticate(secret) == theirs and keys.authenticate("sk-configured") is None


def test_a_revoked_key_stays_revoked_until_its_value_changes(db, caplog):
    keys = db.keys()
    keys.ensure("sk-v1", "admin", Plan.PREMIUM)
    keys.revoke("admin")
    caplog.set_level(logging.WARNING, logger="service.store.keys")

    # the configuration still holds the revoked value: the revocation is respected
    again = keys.ensure("sk-v1", "admin", Plan.PREMIUM)
    assert again.revoked and keys.authenticate("sk-v1") is None
    assert rotations(caplog) == []

    # a new value: the key works again, with that value only
    rotated = keys.ensure("sk-v2", "admin", Plan.PREMIUM)
    assert not rotated.revoked and rotated.id == again.id
    assert keys.authenticate("sk-v2") == rotated
    assert keys.authenticate("sk-v1") is None
    [logged] = rotations(caplog)
    assert "lifted its revocation" in logged


def test_a_value_that_is_another_keys_is_refused(db):
    keys = db.keys()
    alice_secret, alice = keys.create("alice", Plan.FREE)
    with pytest.raises(KeyValueTaken, match="'admin' is already the key named 'alice'"):
        keys.ensure(alice_secret, "admin", Plan.PREMIUM, admin=True)  # no such key yet
    keys.ensure("sk-admin", "admin", Plan.PREMIUM, admin=True)
    with pytest.raises(KeyValueTaken):
        keys.ensure(alice_secret, "admin", Plan.PREMIUM, admin=True)  # a rotation onto it
    assert keys.authenticate("sk-admin").name == "admin"
    assert keys.authenticate(alice_secret) == alice


@pytest.mark.parametrize("existing", [False, True], ids=["seed", "rotate"])
def test_replicas_starting_at_once_all_end_with_the_configured_value(db, caplog, existing):
    if existing:
        db.keys().ensure("sk-before", "admin", Plan.PAY_PER_USE, Decimal("5"))
    caplog.set_level(logging.WARNING, logger="service.store.keys")
    replicas = 8
    start = threading.Barrier(replicas)

    def replica(_):
        keys = KeyStore(db.sessions, clock=db.clock)  # each replica its own store
        start.wait()
        return keys.ensure("sk-after", "admin", Plan.PAY_PER_USE, Decimal("5"))

    with ThreadPoolExecutor(replicas) as pool:
        seen = list(pool.map(replica, range(replicas)))

    [key] = db.keys().list()
    assert {r.id for r in seen} == {key.id} and key.key_hash == hash_key("sk-after")
    assert all(r.key_hash == key.key_hash and not r.revoked for r in seen)
    assert db.keys().authenticate("sk-before") is None
    assert key.balance == Decimal("5") and len(db.ledger().entries(key_id=key.id)) == 1
    # under the row lock one replica rotates and the others find it done
    assert len(rotations(caplog)) == (1 if existing else 0)


def test_startup_rotates_the_configured_admin_key(db, tmp_path, caplog):
    """build_image_service seeds SDSERVE_ADMIN_KEY: a new value (a rotated Secret) replaces the
    old one at the next start; a revoked value stays revoked, and says so."""
    from service.serving.ingress import build_image_service
    from tests.api.test_routes import write_model_configs

    write_model_configs(tmp_path / "model")
    url = db.engine.url.render_as_string(hide_password=False)

    def start(admin_key: str) -> None:
        settings = Settings(
            database_url=url,
            admin_key=admin_key,
            demo_key="",
            models={"stable-diffu": str(tmp_path / "model")},
            image_store_url=str(tmp_path / "images"),
        )
        service = build_image_service(settings, generate=None)
        service.keys._sessions.kw["bind"].dispose()

    caplog.set_level(logging.WARNING)
    keys = db.keys()
    start("sk-leaked")
    admin = keys.authenticate("sk-leaked")
    assert admin.admin and admin.plan is Plan.PREMIUM

    start("sk-fresh")
    assert keys.authenticate("sk-leaked") is None
    assert keys.authenticate("sk-fresh").id == admin.id

    keys.revoke("admin")
    caplog.clear()
    start("sk-fresh")  # the Secret still holds the revoked value
    assert keys.authenticate("sk-fresh") is None
    [warning] = [r for r in caplog.records if r.name == "service.serving.ingress"]
    assert warning.levelno == logging.WARNING and "revoked" in warning.getMessage()

    start("sk-newest")
    assert keys.authenticate("sk-newest").id == admin.id
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "sk-" not in logged
    assert [k.name for k in keys.list()] == ["admin"]


def test_balances_and_top_ups_stay_within_the_largest_amount(db):
    keys = db.keys()
    _, key = keys.create("rich", Plan.PAY_PER_USE, balance=MAX_USD)
    assert key.balance == MAX_USD
    with pytest.raises(ValueError, match="balance to 1000000000.000001 USD; a balance is at most"):
        keys.topup("rich", Decimal("0.000001"))
    with pytest.raises(ValueError, match="out of range"):
        keys.topup("rich", Decimal("9999999999999"))
    with pytest.raises(ValueError, match="out of range"):
        keys.create("big", Plan.PAY_PER_USE, balance=Decimal("1e20"))
    assert keys.find("rich").balance == MAX_USD
    assert [k.name for k in keys.list()] == ["rich"]
    assert db.ledger().audit() == []


def test_a_number_that_names_no_key_is_its_id(db):
    keys = db.keys()
    _, alice = keys.create("alice", Plan.PAY_PER_USE)
    _, one = keys.create("1", Plan.PAY_PER_USE)  # id 2, named "1"
    assert keys.find("2") == one  # no key named "2": the key with id 2
    assert keys.topup("2", Decimal("1")).name == "1"
    assert keys.revoke("1").id == one.id  # a name always wins over an id
    assert not keys.find("alice").revoked
    assert keys.set_expiry("2", db.clock.now + timedelta(days=1)).name == "1"
    # no such id, ids beyond the column (32-bit on PostgreSQL), a digit that is not ASCII
    for unknown in ("3", "0", str(2**31), "9" * 18, "9" * 20, "٣"):
        assert keys.find(unknown) is None
        with pytest.raises(KeyNotFound, match="No API key named or numbered"):
            keys.revoke(unknown)
    # creating a key named like another's id is allowed: names are checked as names
    _, two = keys.create("2", Plan.FREE)
    assert keys.find("2") == two
    assert keys.find(2**63) is None and keys.get(alice.id).name == "alice"


def test_an_expiry_past_the_calendars_end_is_refused(db):
    keys = db.keys()
    keys.create("alice", Plan.FREE)
    late = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))
    with pytest.raises(ValueError, match="must be in the future and before 9999-12-31"):
        keys.set_expiry("alice", late)
    latest = datetime(9999, 12, 31, 23, 0, tzinfo=UTC)
    assert keys.set_expiry("alice", latest).expires_at == latest
