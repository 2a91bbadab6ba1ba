"""Faults around a job on the real Ray Serve app with the tiny model: the image store fails on
write, webhook receivers are slow, down or broken; and what the real pipeline makes of huge and
strange prompts, and of traversal paths sent over real HTTP."""

from __future__ import annotations

import http.client
import shutil
import time
from pathlib import Path

import pytest
import requests

from service.config import DEMO_API_KEY
from service.store.db import make_engine, make_sessionmaker
from service.store.keys import KeyStore
from service.store.ledger import Ledger
from tests.conftest import running_app
from tests.reliability.helpers import WebhookReceiver, closed_port

pytestmark = pytest.mark.slow

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}
WEBHOOK_ATTEMPTS = 3
WEBHOOK_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("job-faults")
    settings = {
        "warmup": False,
        "webhook_allowed_hosts": ["127.0.0.1"],
        "webhook_attempts": WEBHOOK_ATTEMPTS,
        "webhook_timeout_s": WEBHOOK_TIMEOUT_S,
        "webhook_backoff_s": 0.2,
    }
    with running_app(tmp, tiny_model_dir, settings=settings) as (base_url, app_settings):
        sessions = make_sessionmaker(make_engine(app_settings["database_url"]))
        yield base_url, sessions, Path(app_settings["image_store_url"])


def text2img(base_url: str, **fields) -> dict:
    body = {"key": DEMO_API_KEY, "prompt": "a lighthouse", **FAST, **fields}
    response = requests.post(f"{base_url}/api/v6/images/text2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def fetch(base_url: str, job_id: int) -> dict:
    url = f"{base_url}/api/v6/images/fetch/{job_id}"
    return requests.post(url, json={"key": DEMO_API_KEY}, timeout=30).json()


def wait_for(base_url: str, job_id: int, done, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        body = fetch(base_url, job_id)
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def test_image_storage_fails_on_write(app, record):
    base_url, sessions, images = app
    before = KeyStore(sessions).find("demo").balance
    # The store's folder becomes a plain file: every write fails (a full or read-only volume,
    # a lost mount), even for root.
    shutil.move(images, images.with_name("images.moved"))
    images.write_text("not a folder")
    with WebhookReceiver() as receiver:
        try:
            failed = text2img(base_url, samples=2, webhook=receiver.url("/ok"), track_id="s1")
            instant = text2img(base_url, instant_response="yes")
            later = wait_for(base_url, instant["id"], lambda b: b["status"] != "processing")
            hooked = wait_for(base_url, failed["id"], lambda b: b["webhook_status"])
        finally:
            images.unlink()
            shutil.move(images.with_name("images.moved"), images)
        assert failed["status"] == "failed" and failed["output"] == []
        assert failed["message"].startswith("Image generation failed")
        assert "http" not in str(failed), "a failed job returned a URL"
        assert later["status"] == "failed" and later["output"] == []
        assert all(requests.get(u, timeout=10).status_code == 404 for u in instant["future_links"])
        assert hooked["webhook_status"] == "success"
        [delivered] = receiver.bodies("/ok")
        assert delivered["status"] == "failed" and delivered["output"] == []
        assert delivered["track_id"] == "s1"
    assert KeyStore(sessions).find("demo").balance == before
    assert Ledger(sessions).audit() == []
    assert not list(images.rglob("*.partial"))
    # the store is back: the service writes again by itself
    ok = text2img(base_url)
    assert ok["status"] == "success"
    assert requests.get(ok["output"][0], timeout=30).status_code == 200
    record(
        "fault",
        "image store fails on write (its folder replaced by a file) for a sync, an instant and "
        "a webhook job",
        '`status: "failed"`, `output: []`, no image URL in the answer or the webhook; the '
        "instant job's future links stay 404; nothing charged (ledger audit clean); served "
        "again once the store is back",
    )


def test_a_storage_failure_does_not_reveal_server_paths(app, record):
    base_url, _sessions, images = app
    shutil.move(images, images.with_name("images.moved"))
    images.write_text("not a folder")
    try:
        failed = text2img(base_url)
    finally:
        images.unlink()
        shutil.move(images.with_name("images.moved"), images)
    assert failed["status"] == "failed"
    leaked = str(images.parent) in failed["message"]
    record(
        "security",
        "the message of a job failed by the image store",
        "OPEN: names the server's image folder" if leaked else "no server path",
    )
    assert not leaked


def test_webhook_receiver_slow_down_or_failing(app, record):
    base_url, _sessions, _images = app
    with WebhookReceiver(slow_s=3 * WEBHOOK_TIMEOUT_S) as receiver:
        hooks = {
            "slow": receiver.url("/slow"),
            "error": receiver.url("/error"),
            "down": f"http://127.0.0.1:{closed_port()}/hook",
            "ok": receiver.url("/ok"),
        }
        started = {}
        for name, url in hooks.items():
            body = text2img(base_url, webhook=url, track_id=name)
            assert body["status"] == "success", (name, body)
            started[name] = body
        # the slow receiver's delivery takes seconds: the answer did not wait for it
        assert started["slow"]["webhook_status"] == ""
        final = {
            name: wait_for(base_url, body["id"], lambda b: b["webhook_status"], 40)
            for name, body in started.items()
        }
        time.sleep(2 * WEBHOOK_TIMEOUT_S)  # no attempt comes after the status is written
        counts = {name: receiver.count(f"/{name}") for name in ("slow", "error", "ok")}
    assert {name: body["webhook_status"] for name, body in final.items()} == {
        "slow": "failed",
        "error": "failed",
        "down": "failed",
        "ok": "success",
    }
    assert counts == {"slow": WEBHOOK_ATTEMPTS, "error": WEBHOOK_ATTEMPTS, "ok": 1}
    assert all(body["status"] == "success" for body in final.values())
    record(
        "fault",
        f"webhook receiver slow (answers after {3 * WEBHOOK_TIMEOUT_S:g} s, timeout "
        f"{WEBHOOK_TIMEOUT_S:g} s), down (connection refused) or answering HTTP 500",
        "generation unaffected (the answer never waits for delivery); exactly "
        f"{WEBHOOK_ATTEMPTS} attempts with backoff, counted at the receiver; "
        '`webhook_status` = "failed" (a 2xx receiver: 1 attempt, "success")',
    )


def test_huge_and_strange_prompts_on_the_tiny_model(app, record):
    base_url, _sessions, _images = app
    huge = " ".join(f"word{i}" for i in range(6000))[:60_000].strip()
    body = text2img(base_url, prompt=huge)
    assert body["status"] == "success" and body["meta"]["prompt_truncated"] is True
    short = text2img(base_url, prompt="a lighthouse at dusk")
    assert short["meta"]["prompt_truncated"] is False
    for prompt in (
        "a 🐱‍👤 ninja cat 🏳️‍🌈",
        "مصباح \u202eevil\u202c שלום",
        "light\x00house\x07",
        "灯台 𝕃𝕚𝕘𝕙𝕥 𓀀",
        "\u200b\u200d\u0301",
    ):
        answer = text2img(base_url, prompt=prompt)
        assert answer["status"] == "success", (prompt, answer)
        assert answer["meta"]["prompt"] == prompt.strip()
    record(
        "bad input",
        "60 KB prompt, emoji, right-to-left, NUL/control, astral-plane and zero-width prompts "
        "through the real tokenizer and pipeline (tiny model, SQLite)",
        "served; the 60 KB prompt is cut to 77 tokens and `meta.prompt_truncated` says so",
    )


def test_traversal_over_real_http(app, record):
    base_url, _sessions, images = app
    (images.parent / "secret.txt").write_text("TOP-SECRET")
    name = text2img(base_url)["output"][0].rsplit("/images/", 1)[1]
    host, port = base_url.removeprefix("http://").split(":")
    paths = [
        f"/images/{name}",
        "/images/../secret.txt",
        "/images/..%2fsecret.txt",
        "/images/%2e%2e/secret.txt",
        "/images/%252e%252e%252fsecret.txt",
        "/images/temp/../../secret.txt",
        f"/images/{name}/../../secret.txt",
        "/static/../api/routes.py",
        "/static/..%2froutes.py",
        "/static/docs/..%2f..%2froutes.py",
    ]
    statuses = {}
    for path in paths:
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", path)  # sent as written: no client-side normalisation
        response = connection.getresponse()
        body = response.read()
        connection.close()
        statuses[path] = response.status
        assert b"TOP-SECRET" not in body and b"import " not in body, path
    assert statuses.pop(f"/images/{name}") == 200
    assert set(statuses.values()) == {404}, statuses
    record(
        "security",
        "path traversal over real HTTP through Ray Serve's proxy (raw ../, %2f, %2e%2e, "
        "double-encoded) on /images/ and /static/",
        "404; nothing outside the store or the static folder is read",
    )
