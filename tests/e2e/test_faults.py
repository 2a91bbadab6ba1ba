"""Replicas killed under load on the real Ray Serve app: no job lost, nobody charged wrongly."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest
import ray
import requests

from service.config import DEMO_API_KEY
from service.store.db import make_engine, make_sessionmaker
from service.store.keys import KeyStore
from service.store.ledger import Ledger
from tests.conftest import running_app

pytestmark = pytest.mark.slow

SLOW = {"width": 256, "height": 256, "num_inference_steps": 12, "samples": 2}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("faults")
    settings = {"heartbeat_interval_s": 0.5, "orphan_after_s": 3, "warmup": False}
    with running_app(tmp, tiny_model_dir, settings=settings) as (base_url, app_settings):
        yield base_url, make_sessionmaker(make_engine(app_settings["database_url"]))


def submit(base_url: str, n: int) -> list[int]:
    ids = []
    for i in range(n):
        body = {"key": DEMO_API_KEY, "prompt": f"p{i}", "instant_response": "yes", **SLOW}
        response = requests.post(f"{base_url}/api/v6/images/text2img", json=body, timeout=30)
        assert response.json()["status"] == "processing", response.text
        ids.append(response.json()["id"])
    return ids


def kill_replica(deployment: str) -> None:
    names = [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::sdserve#{deployment}#")
    ]
    assert names, f"no {deployment} replica found"
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def final_states(base_url: str, ids: list[int], timeout_s: float = 120) -> dict[int, dict]:
    deadline = time.monotonic() + timeout_s
    states: dict[int, dict] = {}
    while time.monotonic() < deadline and len(states) < len(ids):
        for job_id in ids:
            if job_id in states:
                continue
            try:
                body = requests.post(
                    f"{base_url}/api/v6/images/fetch/{job_id}",
                    json={"key": DEMO_API_KEY},
                    timeout=10,
                ).json()
            except requests.RequestException:
                continue  # the ingress is being replaced
            if body.get("status") in ("success", "failed"):
                states[job_id] = body
        time.sleep(0.5)
    return states


def check_money(sessions, states: dict[int, dict], balance_before) -> None:
    delivered = sum(len(body["output"]) for body in states.values() if body["status"] == "success")
    charged = balance_before - KeyStore(sessions).find("demo").balance
    assert charged == delivered * Decimal("0.0047")
    assert Ledger(sessions).audit() == []


def test_generator_killed_mid_batch(app):
    base_url, sessions = app
    before = KeyStore(sessions).find("demo").balance
    ids = submit(base_url, 4)
    time.sleep(1.5)  # the first batch is running
    kill_replica("Generator")
    states = final_states(base_url, ids)
    assert sorted(states) == ids, "some job stayed processing"
    for body in states.values():
        assert body["status"] == "success" or body["message"].startswith("Image generation failed")
    check_money(sessions, states, before)
    # the fleet serves again
    assert final_states(base_url, submit(base_url, 1))


def test_ingress_killed_with_jobs_in_flight(app):
    base_url, sessions = app
    before = KeyStore(sessions).find("demo").balance
    ids = submit(base_url, 3)
    time.sleep(0.5)
    kill_replica("Ingress")
    states = final_states(base_url, ids)
    assert sorted(states) == ids, "an orphaned job was never taken over"
    assert all(body["status"] == "success" for body in states.values()), states
    check_money(sessions, states, before)
