"""The pieces of the load test that need no server: SLO verdicts, the Prometheus arithmetic,
the expectations on bodies, and the step-load answer."""

from __future__ import annotations

import json

import pytest
import yaml

from loadtests import prometheus
from loadtests.run import parse_duration
from loadtests.slo import best_step, evaluate, load_slo, main
from loadtests.traffic import (
    BAD_INPUTS,
    PROFILES,
    JobBook,
    burst_problem,
    check_error_body,
    check_job_body,
    check_rate_limited,
    percentile,
    poll_delays,
)
from loadtests.webhooks import Deliveries, WebhookReceiver


def endpoint(requests=100, failures=0, p95=100.0):
    return {"requests": requests, "failures": failures, "p95_ms": p95}


def passing_summary():
    return {
        "endpoints": {
            "text2img sync": endpoint(p95=900),
            "fetch": endpoint(p95=40),
            "webhook delivery": endpoint(requests=10, p95=800),
        },
        "webhooks": {"expected": 10, "delivered": 10, "ratio": 1.0, "bad_payloads": 0},
        "jobs": {"accepted": 50, "success": 50, "failed": 0, "unfinished": 0},
        "ledger": {"ledger_images": 60, "delivered_images": 60, "problems": []},
    }


SLO = {
    "failure_ratio_max": 0.01,
    "p95_ms": {"text2img sync": 1000, "fetch": 100, "webhook delivery": 5000},
    "webhook_delivery_ratio_min": 1.0,
    "every_accepted_job_finishes": True,
    "jobs_failed_max": 0,
    "ledger_matches_deliveries": True,
}


def test_a_run_within_every_threshold_passes():
    checks = evaluate(passing_summary(), SLO)
    assert checks and all(c.ok is True for c in checks), [c.line() for c in checks]


@pytest.mark.parametrize(
    "change, failed",
    [
        # nothing measured: every threshold that needs figures fails, none is skipped
        (
            lambda s: s.clear(),
            [
                "failure_ratio_max",
                "p95_ms[text2img sync]",
                "p95_ms[fetch]",
                "p95_ms[webhook delivery]",
                "webhook_delivery_ratio_min",
                "every_accepted_job_finishes",
            ],
        ),
        # a user class that vanished (its tasks raised, so locust reported no request)
        (lambda s: s["endpoints"].pop("fetch"), ["p95_ms[fetch]"]),
        (
            lambda s: s.update(task_errors=[{"error": "KeyError('id')", "occurrences": 40}]),
            ["load test tasks ran cleanly"],
        ),
        # every webhook submit failed, so none was expected
        (
            lambda s: s["webhooks"].update(expected=0, delivered=0, ratio=None),
            ["webhook_delivery_ratio_min"],
        ),
        (lambda s: s["webhooks"].update(unreadable=1), ["webhook_delivery_ratio_min"]),
        (lambda s: s["jobs"].update(success=0, failed=50), ["jobs_failed_max"]),
    ],
)
def test_a_run_that_cannot_show_the_slo_fails(change, failed):
    summary = passing_summary()
    change(summary)
    checks = evaluate(summary, SLO)
    assert [c.name for c in checks if c.ok is False] == failed
    # only the ledger may be unjudged: a remote run cannot read the database
    assert all(c.ok is not None for c in checks if c.name != "ledger_matches_deliveries")


def test_an_empty_summary_is_no_pass(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    assert main([str(tmp_path / "summary.json")]) == 1
    assert "SLO met" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, failed",
    [
        (lambda s: s["endpoints"]["fetch"].update(p95_ms=150), "p95_ms[fetch]"),
        (lambda s: s["endpoints"]["fetch"].update(failures=5), "failure_ratio_max"),
        (lambda s: s["webhooks"].update(delivered=9, ratio=0.9), "webhook_delivery_ratio_min"),
        (lambda s: s["jobs"].update(unfinished=1), "every_accepted_job_finishes"),
        (lambda s: s["ledger"].update(problems=["off by one"]), "ledger_matches_deliveries"),
    ],
)
def test_each_missed_threshold_is_named(change, failed):
    summary = passing_summary()
    change(summary)
    assert [c.name for c in evaluate(summary, SLO) if c.ok is False] == [failed]


def test_the_checker_exits_non_zero_naming_the_threshold(tmp_path, capsys):
    summary = passing_summary()
    summary["endpoints"]["fetch"]["p95_ms"] = 250
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "slo.yaml").write_text(yaml.safe_dump(SLO))
    code = main([str(tmp_path / "summary.json"), "--slo", str(tmp_path / "slo.yaml")])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  p95_ms[fetch]: measured 250, threshold 100" in out
    assert "SLO FAILED: p95_ms[fetch]" in out
    summary["endpoints"]["fetch"]["p95_ms"] = 50
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main([str(tmp_path / "summary.json"), "--slo", str(tmp_path / "slo.yaml")]) == 0


def test_the_shipped_slo_file_loads_and_unknown_keys_are_refused(tmp_path):
    assert load_slo()["failure_ratio_max"] == 0.0
    (tmp_path / "slo.yaml").write_text("p95: {fetch: 1}\n")
    with pytest.raises(ValueError, match="unknown SLO keys"):
        load_slo(tmp_path / "slo.yaml")


def test_step_load_answer_is_the_best_passing_step():
    steps = [
        {"users": 2, "rps": 3.0, "images_per_s": 2.0, "within_slo": True, "failed": []},
        {"users": 4, "rps": 5.5, "images_per_s": 3.5, "within_slo": True, "failed": []},
        {"users": 6, "rps": 6.0, "images_per_s": 3.6, "within_slo": False, "failed": ["x"]},
    ]
    assert best_step(steps, SLO)["users"] == 4
    assert best_step(steps[2:], SLO) is None


def test_histogram_delta_and_quantiles():
    def series(worker, le_counts, total_sum):
        labels = (("WorkerId", worker), ("_source", "u"))
        out = {}
        for le, count in le_counts.items():
            out[("ray_sdserve_batch_size_bucket", tuple(sorted((*labels, ("le", le)))))] = count
        out[("ray_sdserve_batch_size_count", labels)] = le_counts["+Inf"]
        out[("ray_sdserve_batch_size_sum", labels)] = total_sum
        return out

    before = series("a", {"1.0": 10, "2.0": 10, "4.0": 10, "+Inf": 10}, 10)
    # worker a ran 10 batches of 2 more; worker b appeared during the run with 10 batches of 4
    after = {
        **series("a", {"1.0": 10, "2.0": 20, "4.0": 20, "+Inf": 20}, 30),
        **series("b", {"1.0": 0, "2.0": 0, "4.0": 10, "+Inf": 10}, 40),
    }
    figures = prometheus.histogram(prometheus.delta(before, after), "ray_sdserve_batch_size")
    assert figures["count"] == 20
    assert figures["mean"] == 3.0  # (20 + 40) / 20
    assert figures["p50"] == 2.0
    assert 2.0 < figures["p95"] <= 4.0


def test_bad_inputs_expect_clean_errors():
    message = "width must be a multiple of 8 between 64 and 1024"
    clean = {"status": "error", "message": message, "messege": message}
    assert check_error_body(200, clean, "width must be a multiple of 8") is None
    assert check_error_body(422, clean, "width must be a multiple of 8") is None
    assert "HTTP 500" in check_error_body(500, clean, "width")
    assert "does not name" in check_error_body(200, clean, "height")
    assert "expected status" in check_error_body(200, {"status": "success"}, "width")
    assert len({case.label for case in BAD_INPUTS}) == len(BAD_INPUTS)


def test_rate_limit_and_job_bodies():
    limited = {"status": "error", "message": "Too many", "retry_after": 1.0}
    assert check_rate_limited(429, limited, "1") is None
    assert "Retry-After" in check_rate_limited(429, limited, None)
    assert "retry_after" in check_rate_limited(429, {"status": "error"}, "1")
    assert check_job_body({"status": "success", "id": 3, "output": ["a", "b"]}, 2) is None
    assert "output URLs" in check_job_body({"status": "success", "id": 3, "output": ["a"]}, 2)
    processing = {
        "status": "processing",
        "id": 7,
        "output": [],
        "future_links": ["x"],
        "fetch_result": "http://h/api/v6/images/fetch/7",
    }
    assert check_job_body(processing, 1) is None
    assert "integer id" in check_job_body({"status": "error", "message": "no"}, 1)


def test_polling_follows_the_official_clients():
    sdk, cli = poll_delays("sdk"), poll_delays("cli")
    assert set(sdk) == {2.0} and 290 <= sum(sdk) <= 310
    assert cli[:5] == [1.0, 2.0, 4.0, 8.0, 10.0] and max(cli) == 10.0


def test_profiles_draw_valid_shapes():
    import random

    rng = random.Random(0)
    for profile in PROFILES.values():
        for _ in range(50):
            fields = profile.draw(rng)
            assert int(fields["width"]) % 8 == 0 and int(fields["height"]) % 8 == 0
            assert 1 <= int(fields["samples"]) <= 4


def test_job_book_and_webhook_deliveries():
    book, deliveries = JobBook(), Deliveries()
    book.accepted(1, "k", 2, webhook=True, track_id="t1")
    book.accepted(2, "k", 1)
    book.ended(1, "success")
    assert book.summary()["unfinished_ids"] == [2]
    assert book.summary()["images_delivered"] == 2
    deliveries.record({"id": 1, "status": "success", "output": ["u"], "track_id": "t1"})
    deliveries.record({"id": 1, "status": "success", "output": ["u"], "track_id": "t1"})
    deliveries.record("garbage")
    summary = deliveries.summary([(1, "t1")])
    assert summary["delivered"] == 1 and summary["duplicates"] == 1
    assert summary["unreadable"] == 1 and summary["bad_payloads"] == 0
    assert deliveries.summary([(1, "other")])["bad_payloads"] == 1


def test_durations():
    assert parse_duration("90") == 90
    assert parse_duration("2m") == 120
    assert parse_duration("1h30m10s") == 5410
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_percentiles_are_of_the_raw_times():
    # locust's own rounds 15490 ms to 15000, which would pass a 15000 ms threshold
    assert percentile([15490.0] * 100, 0.95) == 15490.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([], 0.95) is None


@pytest.mark.parametrize(
    "accepted, limited, problem",
    [
        (2, 2, None),
        (3, 1, None),  # a job of the burst ended before its last request: fine
        (0, 4, "was refused"),
        (4, 0, "was accepted"),
        (2, 1, "3 answers to a burst of 4"),
    ],
)
def test_a_burst_must_meet_the_limiter_both_ways(accepted, limited, problem):
    found = burst_problem(2, accepted, limited)
    assert (found is None) if problem is None else (problem in str(found))


def test_the_receiver_verifies_each_webhook_signature():
    import io
    import time

    from service.api.webhooks import sign

    received = []
    receiver = WebhookReceiver("127.0.0.1", 0, lambda body, signed: received.append(signed))
    receiver.secret = "s3cret"
    body = json.dumps({"id": 1, "status": "success", "output": ["u"]}).encode()

    def post(signature: str | None) -> None:
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/hook",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
        }
        if signature is not None:
            environ["HTTP_X_SDSERVE_SIGNATURE"] = signature
        receiver._app(environ, lambda *_: None)

    post(sign("s3cret", body, int(time.time())))
    post(sign("another", body, int(time.time())))
    post(None)
    assert received == [True, False, False]
    deliveries = Deliveries()
    assert deliveries.record(json.loads(body), signed=False).problem == (
        "missing or wrong X-Sdserve-Signature"
    )
