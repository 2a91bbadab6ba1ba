"""Metrics from a real Ray Serve app: a known mix of traffic, then the scrape must say so."""

from __future__ import annotations

import glob
import json
import time
from collections import defaultdict
from decimal import Decimal

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from service.config import DEMO_API_KEY
from service.store.db import make_engine, make_sessionmaker
from service.store.keys import KeyStore
from service.store.ledger import Ledger
from tests.conftest import free_port, running_app

pytestmark = pytest.mark.slow

SMALL = {"width": 128, "height": 128, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from service.engine.tiny_model import build_tiny_upscaler

    tmp = tmp_path_factory.mktemp("metrics")
    port = free_port()
    settings = {"upscaler": str(build_tiny_upscaler(tmp / "x2.pth", scale=2))}
    with running_app(tmp, tiny_model_dir, settings=settings, metrics_port=port) as (
        base_url,
        settings,
    ):
        sessions = make_sessionmaker(make_engine(settings["database_url"]))
        yield base_url, f"http://127.0.0.1:{port}/metrics", sessions


def scrape(url: str) -> dict[str, list]:
    """Samples by name, each as (labels, value)."""
    samples = defaultdict(list)
    for family in text_string_to_metric_families(requests.get(url, timeout=10).text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples, name, **labels) -> float:
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def post(base_url, path="/api/v6/images/text2img", **body):
    return requests.post(base_url + path, json=body, timeout=120)


def test_a_known_mix_shows_up_in_the_scrape(app):
    base_url, metrics_url, sessions = app
    free_key, _ = KeyStore(sessions).create("free-metrics", "free")

    sync = [
        post(base_url, key=DEMO_API_KEY, prompt="a", samples=n, **SMALL).json() for n in (1, 2, 1)
    ]
    assert [b["status"] for b in sync] == ["success"] * 3

    bad = [
        post(base_url, key=DEMO_API_KEY, prompt="a", width=100),
        post(base_url, key=DEMO_API_KEY, prompt="a", scheduler="Nope"),
        requests.post(base_url + "/api/v6/images/text2img", data="{oops", timeout=30),
        post(base_url, key="not-a-key", prompt="a"),
    ]
    assert [r.json()["status"] for r in bad] == ["error"] * 4

    # five slow jobs fill the free plan's five slots; the sixth request is refused
    slow = {"width": 256, "height": 256, "num_inference_steps": 4, "samples": 4}
    accepted = [
        post(base_url, key=free_key, prompt="b", instant_response="yes", **slow).json()
        for _ in range(5)
    ]
    refused = post(base_url, key=free_key, prompt="b", instant_response="yes", **slow)
    assert [b["status"] for b in accepted] == ["processing"] * 5
    assert refused.status_code == 429

    for body in accepted:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            fetched = requests.post(body["fetch_result"], json={"key": free_key}, timeout=30)
            if fetched.json()["status"] != "processing":
                break
            time.sleep(0.3)
        assert fetched.json()["status"] == "success"

    # Ray exports every 0.5 s here; wait until the last job's numbers are in
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(metrics_url)
        # the ingress's and the generator's figures reach the exporter each on their own
        if (
            total(samples, "ray_sdserve_job_duration_seconds_count") >= 8
            and total(samples, "ray_sdserve_images_generated_total") >= 4 + 20
        ):
            break
        assert time.monotonic() < deadline, "metrics never caught up"
        time.sleep(0.5)

    requests_total = "ray_sdserve_requests_total"
    generate = "/api/v6/images/text2img"
    assert total(samples, requests_total, route=generate, status="success") == 3
    assert total(samples, requests_total, status="processing") == 5
    assert total(samples, requests_total, status="error") == 4
    assert total(samples, requests_total, status="rate_limited") == 1
    # every poll of a fetch link is a call answered, whatever its job's state
    fetches = total(samples, requests_total, route="/api/v6/images/fetch/{job_id}")
    assert fetches == total(samples, requests_total, status="success") - 3 >= 5
    errors = "ray_sdserve_errors_total"
    assert total(samples, errors, type="validation") == 3
    assert total(samples, errors, type="auth") == 1
    assert total(samples, errors, type="rate_limit") == 1
    assert total(samples, "ray_sdserve_rate_limited_total", plan="free") == 1

    assert total(samples, "ray_sdserve_images_generated_total") == 4 + 20
    assert total(samples, "ray_sdserve_job_duration_seconds_count", status="success") == 8
    for stage in ("validation", "queue", "inference", "storage"):
        count = total(samples, "ray_sdserve_stage_duration_seconds_count", stage=stage)
        assert count > 0, stage
    assert total(samples, "ray_sdserve_batch_size_count") > 0
    assert total(samples, "ray_sdserve_gpu_seconds_total") > 0
    assert total(samples, "ray_sdserve_cost_to_serve_usd_total") > 0
    assert total(samples, "ray_sdserve_model_warmup_seconds", model="stable-diffu") > 0
    assert "ray_sdserve_generator_queue_depth" in samples
    assert "ray_sdserve_inflight_jobs" in samples

    billed = Decimal(str(total(samples, "ray_sdserve_price_billed_usd_total")))
    ledger_total = sum(row.amount_usd for row in Ledger(sessions).usage())
    assert ledger_total == Decimal("0.0188")  # 4 pay-per-use images at 0.0047
    assert billed.quantize(Decimal("0.000001")) == ledger_total
    assert total(samples, "ray_sdserve_price_billed_usd_total", plan="free") == 0


def test_upscaling_is_a_stage_and_counts_as_device_time(app):
    base_url, metrics_url, _ = app
    gpu_before = total(scrape(metrics_url), "ray_sdserve_gpu_seconds_total")
    size = {"width": 256, "height": 256, "num_inference_steps": 2, "samples": 2}
    body = post(base_url, key=DEMO_API_KEY, prompt="a", upscale="yes", **size).json()
    assert body["status"] == "success" and body["meta"]["upscale"] == 2
    stage = "ray_sdserve_stage_duration_seconds_count"
    deadline = time.monotonic() + 30
    while total(samples := scrape(metrics_url), stage, stage="upscale") < 1:
        assert time.monotonic() < deadline, "the upscale stage never showed up"
        time.sleep(0.5)
    # Device time grew by the generation (the engine's clock) and by more that only the
    # upscaling explains: two 256 px images through the tiny x2 network take ~0.1 s here,
    # the generator's own overhead around a batch a few ms.
    grown = total(samples, "ray_sdserve_gpu_seconds_total") - gpu_before
    assert grown - body["meta"]["inference_seconds"] >= 0.04


def test_readyz_and_healthz(app):
    base_url, _, _ = app
    assert requests.get(base_url + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(base_url + "/readyz", timeout=10).json() == {"status": "ok"}


def ingress_log_entries(*texts: str, timeout_s: float = 10) -> list[dict]:
    """The Ingress replicas' JSON log entries whose line holds every one of `texts`, waited
    for (Serve writes its log files asynchronously)."""
    import ray

    logs_dir = ray._private.worker._global_node.get_logs_dir_path()
    deadline = time.monotonic() + timeout_s
    found: list[dict] = []
    while not found and time.monotonic() < deadline:
        for path in glob.glob(f"{logs_dir}/serve/replica_sdserve_Ingress_*.log"):
            with open(path, encoding="utf-8") as log_file:
                found += [json.loads(line) for line in log_file if all(t in line for t in texts)]
        time.sleep(0.2)
    return found


def test_logs_are_json_with_the_request_id_of_the_response(app):
    base_url, _, _ = app
    body = post(base_url, key=DEMO_API_KEY, prompt="log me", **SMALL).json()
    request_id = body["meta"]["request_id"]
    found = ingress_log_entries(request_id)
    assert found, "no log line carries the response's request_id"
    assert all(entry["request_id"] == request_id for entry in found)


def test_the_services_own_info_lines_reach_the_replica_log(app):
    """Unknown fields are ignored and logged (README): an INFO line of the service's own
    logger, in the Ingress replica's log with the request's id."""
    base_url, _, _ = app
    body = post(base_url, key=DEMO_API_KEY, prompt="extra", watermark="yes", **SMALL).json()
    request_id = body["meta"]["request_id"]
    found = ingress_log_entries(request_id, "ignored unknown fields")
    assert found, "the service's INFO line is not in the replica log"
    assert found[0]["message"] == "ignored unknown fields: watermark"
    assert found[0]["levelname"] == "INFO" and found[0]["filename"] == "text2img.py"
