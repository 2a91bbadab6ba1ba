"""API keys: created once and shown once, found by hash, revoked at once, topped up exactly."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from service.pricing import Plan
from service.store.errors import InvalidApiKey, KeyNameTaken, KeyNotFound
from service.store.keys import hash_key
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
    with pytest.raises(KeyNameTaken):
        keys.ensure("another-secret", "demo", Plan.PAY_PER_USE, Decimal("10"))
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
