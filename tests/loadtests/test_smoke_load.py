"""The load test's smoke run: the real app on the tiny model, locust headless for ~35 s with at
least one user of each class, then the books must balance.

Zero unexpected failures (clean errors to bad inputs and 429s to the burst keys are expected),
every job accepted during the run ended in success or a refunded failure, the ledger settles
exactly the images the load test saw delivered, and every webhook arrived.
"""

from __future__ import annotations

import json

import pytest

from loadtests.accounting import check_ledger
from loadtests.run import create_keys, locust_command, run_locust
from loadtests.slo import evaluate
from service.store.db import make_engine, make_sessionmaker
from service.store.ledger import Ledger
from tests.conftest import free_port, running_app

pytestmark = pytest.mark.slow

USERS = 6  # sync and polling users, one each of webhook, bad input and burst
DURATION_S = 35
LIMITS = {"free": 5, "pay_per_use": 10, "premium": 1000}
SETTINGS = {
    "max_concurrent_requests": LIMITS,
    "free_images_per_month": 1_000_000,
    "demo_key": "",
    "webhook_timeout_s": 10,
    "webhook_allowed_hosts": ["127.0.0.1"],  # the load test's own receiver
    "webhook_secret": "smoke-webhook-secret",  # the receiver verifies every signature
}
# What a smoke run can hold on any machine: correctness, not latency.
SMOKE_SLO = {
    "failure_ratio_max": 0.0,
    "webhook_delivery_ratio_min": 1.0,
    "every_accepted_job_finishes": True,
    "ledger_matches_deliveries": True,
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("loadtest")
    metrics_port = free_port()
    with running_app(tmp, tiny_model_dir, settings=SETTINGS, metrics_port=metrics_port) as (
        base_url,
        settings,
    ):
        keys = create_keys(settings["database_url"], LIMITS, tag="smoke")
        keys_file = tmp / "keys.json"
        keys_file.write_text(json.dumps(keys.to_dict()))
        out = tmp / "report"
        out.mkdir()
        command = locust_command(
            base_url,
            keys_file,
            out,
            users=USERS,
            spawn_rate=USERS,
            duration_s=DURATION_S,
            metrics_urls=[f"http://127.0.0.1:{metrics_port}/metrics"],
            metrics_settle_s=1.5,
            drain_timeout_s=30,
            stop_timeout_s=20,
        )
        summary = run_locust(
            command, out, timeout_s=DURATION_S + 90, webhook_secret=SETTINGS["webhook_secret"]
        )
        summary["ledger"] = check_ledger(settings["database_url"], summary["images"]["delivered"])
        engine = make_engine(settings["database_url"])
        audit = Ledger(make_sessionmaker(engine)).audit()
        engine.dispose()
    yield summary, audit, out


def test_no_unexpected_failures(smoke):
    summary, _, out = smoke
    assert summary["failures"] == [], (out / "locust.log").read_text()[-3000:]
    assert summary["total"]["failures"] == 0
    assert summary["total"]["requests"] > 50


def test_every_user_class_did_its_part(smoke):
    summary, _, _ = smoke
    endpoints = summary["endpoints"]
    for name in (
        "text2img sync",
        "text2img instant",
        "fetch",
        "text2img webhook",
        "webhook delivery",
        "text2img bad input",
        "text2img burst",
        "job end-to-end",
    ):
        assert endpoints.get(name, {}).get("requests", 0) > 0, name
    # the burst keys were refused with 429 at least once (counted by the service itself)
    assert sum(summary["service"]["rate_limited_by_plan"].values()) > 0
    assert summary["service"]["requests_by_status"].get("error", 0) > 0  # the bad inputs


def test_every_accepted_job_ended_and_failed_ones_were_refunded(smoke):
    summary, _, _ = smoke
    jobs, ledger = summary["jobs"], summary["ledger"]
    assert jobs["accepted"] > 0 and jobs["unfinished"] == 0
    assert jobs["success"] + jobs["failed"] == jobs["accepted"]
    assert "processing" not in ledger["jobs_by_status"]
    assert ledger["failed_jobs_refunded"] == ledger["jobs_by_status"].get("failed", 0)


def test_the_ledger_matches_the_images_delivered(smoke):
    summary, audit, _ = smoke
    ledger = summary["ledger"]
    assert audit == []
    assert ledger["problems"] == []
    assert ledger["ledger_images"] == summary["images"]["delivered"] > 0
    assert ledger["successful_job_images"] == ledger["ledger_images"]


def test_every_webhook_was_delivered(smoke):
    summary, _, _ = smoke
    hooks = summary["webhooks"]
    assert hooks["expected"] > 0
    assert hooks["delivered"] == hooks["expected"]
    assert hooks["bad_payloads"] == 0
    assert hooks["signatures_checked"] is True  # and each verified: no bad payload


def test_reports_and_service_figures(smoke):
    summary, _, out = smoke
    for name in ("report.html", "locust_stats.csv", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    service = summary["service"]
    assert service["batch_size_images"]["count"] > 0
    assert service["batch_size_images"]["mean"] >= 1
    assert service["queue_wait_s"]["count"] > 0
    assert service["images_generated"] == summary["images"]["delivered"]
    assert all(check.ok is not False for check in evaluate(summary, SMOKE_SLO))
    assert summary["task_errors"] == []
    # every burst met the limiter both ways: some accepted, the rest refused with 429
    limit = summary["endpoints"]["burst limit"]
    assert limit["requests"] > 0 and limit["failures"] == 0
