"""The HTTP layer alone: real routes, database and files, with a fake engine injected.

The Ray Serve + diffusers path is covered by tests/e2e; here the engine is replaced so each
response shape and error can be checked quickly and exactly.
"""

import asyncio
import base64
import io
import json
import os
import re
import time
from decimal import Decimal

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.exc import OperationalError

from service.api.routes import create_app
from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams
from service.pricing import PlanLimits, PriceList
from service.serving.ingress import build_image_service
from tests.recording import HOSTED_API_NULLS, RecordingMetrics

KEY = "test-key"


def write_model_configs(path):
    (path / "unet").mkdir(parents=True)
    (path / "vae").mkdir()
    (path / "unet" / "config.json").write_text(json.dumps({"sample_size": 32}))
    (path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16, 32, 32]}))


class FakeEngine:
    """Noise images of the asked size; can be told to fail or to be slow."""

    def __init__(self):
        self.calls: list[GenerationParams] = []
        self.fail = False
        self.delay_s = 0.0

    async def __call__(self, params: GenerationParams) -> GenerationOutput:
        self.calls.append(params)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("the GPU caught fire")
        rng = np.random.default_rng(params.seed)
        images = [
            rng.integers(0, 255, (params.height, params.width, 3), dtype=np.uint8)
            for _ in range(params.samples)
        ]
        return GenerationOutput(images=images, seed=params.seed, batch_size=params.samples)


def make_app(tmp_path, **overrides):
    """The HTTP app on a SQLite file and an image folder under `tmp_path`, with a FakeEngine;
    returns (app, engine, service)."""
    write_model_configs(tmp_path / "model")
    settings = Settings(
        **{
            "models": {"stable-diffu": str(tmp_path / "model")},
            "database_url": f"sqlite:///{tmp_path}/db.sqlite",
            "image_store_url": str(tmp_path / "images"),
            "public_base_url": "http://testserver",
            "demo_key": KEY,
            "demo_key_balance_usd": 1,
            "min_size": 64,
            "sync_window_s": 5,
            "max_body_bytes": 4096,
            "webhook_attempts": 1,
            "webhook_allowed_hosts": ["127.0.0.1"],
            **overrides,
        }
    )
    engine = FakeEngine()
    service = build_image_service(settings, engine)
    app = create_app(settings.max_body_bytes, settings.strict_http_status)
    app.state.service = service
    return app, engine, service


@pytest.fixture()
def env(tmp_path):
    app, engine, service = make_app(tmp_path)
    with TestClient(app) as client:
        yield client, engine, service


def post(client, path, **body):
    return client.post(path, json={"key": KEY, **body})


def test_text2img_success_shape_and_png(env):
    client, engine, _ = env
    r = post(client, "/api/v6/images/text2img", prompt="a cat", width=128, height=64, samples=2)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "success", body
    assert isinstance(body["id"], int) and len(body["output"]) == 2
    assert body["proxy_links"] == body["output"]
    meta = body["meta"]
    assert (meta["W"], meta["H"], meta["n_samples"], meta["id"]) == (128, 64, 2, body["id"])
    assert meta["seed"] == engine.calls[0].seed
    for i, url in enumerate(body["output"]):
        assert url.startswith("http://testserver/images/") and url.endswith(f"-{i}.png")
        image = client.get(url.removeprefix("http://testserver"))
        assert image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (128, 64)


def test_base64_outputs(env):
    client, _, _ = env
    body = post(
        client, "/api/v6/images/text2img", prompt="x", width=64, height=64, base64="yes"
    ).json()
    url = body["output"][0]
    assert url.endswith(".base64")
    text = client.get(url.removeprefix("http://testserver")).text
    assert Image.open(io.BytesIO(base64.b64decode(text))).size == (64, 64)


def test_instant_response_then_fetch_in_every_form(env):
    client, engine, service = env
    engine.delay_s = 0.3
    body = post(
        client, "/api/v6/images/text2img", prompt="x", width=64, height=64, instant_response="yes"
    ).json()
    assert body["status"] == "processing" and body["output"] == []
    assert body["message"] == body["messege"]
    job_id = body["id"]
    assert body["fetch_result"] == f"http://testserver/api/v6/images/fetch/{job_id}"
    future = body["future_links"][0]
    assert client.get(future.removeprefix("http://testserver")).status_code == 404
    asyncio.run(asyncio.sleep(0.6))
    for path, extra in [
        (f"/api/v6/images/fetch/{job_id}", {}),
        ("/api/v6/images/fetch", {"request_id": job_id}),
        (f"/api/v7/images/fetch/{job_id}", {}),
        (f"/api/v3/fetch/{job_id}", {}),
        ("/api/v4/dreambooth/fetch", {"request_id": str(job_id)}),
    ]:
        fetched = post(client, path, **extra).json()
        assert fetched["status"] == "success", (path, fetched)
        assert fetched["output"] == body["future_links"]
    assert client.get(future.removeprefix("http://testserver")).status_code == 200


def test_sync_window_passes_then_processing(env, tmp_path):
    client, engine, service = env
    service.settings = service.settings.model_copy(update={"sync_window_s": 0.05})
    engine.delay_s = 0.5
    body = post(client, "/api/v7/images/text-to-image", prompt="x", width=64, height=64).json()
    assert body["status"] == "processing"
    assert "/api/v7/images/fetch/" in body["fetch_result"]


def test_key_from_headers_and_bad_keys(env):
    client, _, _ = env
    ok = client.post(
        "/api/v6/images/text2img",
        json={"prompt": "x", "width": 64, "height": 64},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert ok.json()["status"] == "success"
    ok = client.post(
        "/api/v7/images/text-to-image",
        json={"prompt": "x", "width": 64, "height": 64},
        headers={"key": KEY},
    )
    assert ok.json()["status"] == "success"
    for body in ({"prompt": "x"}, {"prompt": "x", "key": "wrong"}):
        r = client.post("/api/v6/images/text2img", json=body)
        assert r.status_code == 200
        assert r.json()["status"] == "error" and "Invalid API key" in r.json()["messege"]


def test_bad_input_is_named_and_nothing_is_stored(env):
    client, engine, service = env
    cases = [
        ("width must be a multiple of 8", {"prompt": "x", "width": 100}),
        ("samples must be an integer between 1 and 4", {"prompt": "x", "samples": 5}),
        (
            "num_inference_steps must be an integer between 1 and 50",
            {"prompt": "x", "num_inference_steps": 0},
        ),
        ("scheduler must be one of", {"prompt": "x", "scheduler": "Magic"}),
        ("available models: stable-diffu", {"prompt": "x", "model_id": "nope"}),
        ("prompt must be a non-empty string", {"prompt": ""}),
        ("prompt must be a non-empty string", {"prompt": "null"}),
        ("width must be a multiple of 8 between 64 and 1024", {"prompt": "x", "width": "wide"}),
        ("seed must be an integer between 1 and 4294967295", {"prompt": "x", "seed": "abc"}),
        ("track_id must be at most 256 characters", {"prompt": "x", "track_id": "t" * 257}),
    ]
    for expected, body in cases:
        r = post(client, "/api/v6/images/text2img", **body)
        assert r.status_code == 200
        assert r.json()["status"] == "error" and expected in r.json()["message"], r.json()
    malformed = client.post(
        "/api/v6/images/text2img",
        content=b'{"key": "x", "prompt": ',
        headers={"content-type": "application/json"},
    )
    assert malformed.json() == {
        "status": "error",
        "message": "request body is not valid JSON",
        "messege": "request body is not valid JSON",
    }
    too_deep = b'{"key": "x", "prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    not_utf8 = b'{"key": "x", "prompt": "\xc3\x28"}'
    for unreadable in (too_deep, not_utf8):
        r = client.post(
            "/api/v6/images/text2img",
            content=unreadable,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text  # like every other bad body in ModelsLab mode
        assert r.json()["status"] == "error" and "could not be parsed" in r.json()["message"]
    big = client.post("/api/v6/images/text2img", json={"key": KEY, "prompt": "x" * 5000})
    assert big.status_code == 413 and "larger than the limit of 4096 bytes" in big.json()["message"]
    assert engine.calls == []
    assert service.jobs.processing() == [] and service.jobs.get(1) is None
    assert (
        post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64).json()["status"]
        == "success"
    )


def test_failed_generation_is_reported_and_fetchable(env):
    client, engine, _ = env
    engine.fail = True
    body = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64).json()
    assert body["status"] == "failed" and "the GPU caught fire" in body["message"]
    fetched = post(client, f"/api/v6/images/fetch/{body['id']}").json()
    assert fetched["status"] == "failed"


def test_fetch_of_unknown_or_foreign_job(env):
    client, _, service = env
    job = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64).json()["id"]
    other, _ = service.keys.create("other", "premium")
    for key in (other,):
        r = client.post(f"/api/v6/images/fetch/{job}", json={"key": key})
        assert r.json()["status"] == "error" and "not found" in r.json()["message"]
    r = post(client, "/api/v6/images/fetch/999999")
    assert r.json()["status"] == "error"
    for bad in ("abc", "0", str(2**63)):
        r = post(client, f"/api/v6/images/fetch/{bad}")
        assert r.status_code == 200 and r.json()["status"] == "error"
        assert r.json()["message"].startswith("the request id in the path must be an integer")


def test_image_route_refuses_paths_outside_the_store(env):
    client, _, _ = env
    for name in ("../db.sqlite", "..%2Fdb.sqlite", "abc.png", "temp/../../db.sqlite"):
        assert client.get(f"/images/{name}").status_code == 404


def test_system_load_model_list_and_request_count(env):
    client, _, _ = env
    load = post(client, "/api/v3/system_load").json()
    assert load == {"queue_num": 0, "queue_time": 0.0, "status": "ok"}
    models = post(client, "/api/v4/dreambooth/model_list").json()
    assert models[0]["model_id"] == "stable-diffu" and models[0]["width"] == 256
    count = post(client, "/api/v6/processing/request_count").json()
    assert count["status"] == "success" and count["processing_count"] == 0


def test_webhook_failure_is_recorded(env):
    client, _, service = env
    body = post(
        client,
        "/api/v6/images/text2img",
        prompt="x",
        width=64,
        height=64,
        webhook="http://127.0.0.1:9/hook",
        track_id=77,
    ).json()
    assert body["status"] == "success" and body["meta"]["track_id"] == "77"
    asyncio.run(asyncio.sleep(0.5))
    job = service.jobs.get(body["id"])
    assert job.webhook_status == "failed"


# ---- keys, plans and the ledger, over HTTP ------------------------------------------------------


def balance(service, name):
    return service.keys.find(name).balance


def test_failed_generation_charges_nothing(env):
    client, engine, service = env
    before = balance(service, "demo")
    engine.fail = True
    assert (
        post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64).json()["status"]
        == "failed"
    )
    assert balance(service, "demo") == before
    engine.fail = False
    post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64, samples=2)
    assert before - balance(service, "demo") == Decimal("0.0094")
    assert service.ledger.audit() == []


def test_forty_concurrent_requests_against_a_balance_for_ten(env):
    client, _, service = env
    service.jobs._limits = PlanLimits({"free": 5, "pay_per_use": 64, "premium": 64}, 25)
    key, _ = service.keys.create("ten-images", "pay_per_use", balance=Decimal("0.047"))
    app = client.app

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as ac:
            body = {"key": key, "prompt": "x", "width": 64, "height": 64}
            return await asyncio.gather(
                *(ac.post("/api/v6/images/text2img", json=body) for _ in range(40))
            )

    responses = [r.json() for r in asyncio.run(burst())]
    statuses = [r["status"] for r in responses]
    assert statuses.count("success") == 10, statuses
    refused = [r for r in responses if r["status"] == "error"]
    assert len(refused) == 30
    assert all("Insufficient credits" in r["message"] for r in refused)
    assert balance(service, "ten-images") == 0
    usage = service.ledger.usage("ten-images")
    assert sum(row.images for row in usage) == 10
    assert sum(row.amount_usd for row in usage) == Decimal("0.047")
    assert service.ledger.audit() == []


def test_concurrency_limit_answers_429_with_retry_after(env):
    client, engine, service = env
    key, _ = service.keys.create("freebie", "free")
    engine.delay_s = 0.5
    app = client.app

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as ac:
            body = {"key": key, "prompt": "x", "width": 64, "height": 64}
            return await asyncio.gather(
                *(ac.post("/api/v6/images/text2img", json=body) for _ in range(8))
            )

    responses = asyncio.run(burst())
    limited = [r for r in responses if r.status_code == 429]
    assert len(limited) == 3  # the free plan allows 5 at once
    assert all(int(r.headers["Retry-After"]) >= 1 for r in limited)
    assert all(r.json()["retry_after"] > 0 and "at most 5" in r.json()["message"] for r in limited)


def test_free_allowance_premium_and_revocation(env):
    client, _, service = env
    free_key, _ = service.keys.create("free-user", "free")
    premium_key, _ = service.keys.create("premium-user", "premium")
    body = {"prompt": "x", "width": 64, "height": 64, "samples": 4}
    results = [
        client.post("/api/v6/images/text2img", json={"key": free_key, **body}).json()["status"]
        for _ in range(7)
    ]
    assert results == ["success"] * 6 + ["error"]  # 25 a month: 6 x 4 = 24, then 4 > 1 left
    for _ in range(3):
        ok = client.post("/api/v6/images/text2img", json={"key": premium_key, **body}).json()
        assert ok["status"] == "success"
    premium = [row for row in service.ledger.usage("premium-user")]
    assert sum(r.images for r in premium) == 12 and sum(r.amount_usd for r in premium) == 0
    service.keys.revoke("premium-user")
    revoked = client.post("/api/v6/images/text2img", json={"key": premium_key, **body}).json()
    assert revoked["status"] == "error" and revoked["message"] == "Invalid API key"


def test_enterprise_routes_need_an_admin_key(env):
    client, _, service = env
    user_key, _ = service.keys.create("not-admin", "premium")
    post(client, "/api/v1/enterprise/images/text2img", prompt="x", width=64, height=64)
    denied = client.post("/api/v1/enterprise/usage", json={"key": user_key}).json()
    assert denied["status"] == "error" and "admin" in denied["message"]
    denied = client.post(
        "/api/v1/enterprise/images/text2img", json={"key": user_key, "prompt": "x"}
    ).json()
    assert denied["status"] == "error" and "admin" in denied["message"]
    report = post(client, "/api/v1/enterprise/usage").json()
    assert report["status"] == "success"
    assert report["total_images"] == 1 and report["total_amount_usd"] == "0.0047"
    assert report["usage"][0]["key"] == "demo"
    missing = post(client, "/api/v1/enterprise/usage", key_name="ghost").json()
    assert missing["status"] == "error"


def test_load_model_without_a_model_id_names_the_field(env):
    client, _, _ = env
    for missing in ({}, {"model_id": None}, {"model_id": "null"}, {"model_id": " "}):
        body = post(client, "/api/v1/enterprise/load_model", **missing).json()
        assert body["status"] == "error", body
        assert body["message"] == "model_id is required; available models: stable-diffu"


def test_an_idempotency_key_makes_a_retry_safe(env):
    client, engine, service = env
    before = balance(service, "demo")
    body = {"key": KEY, "prompt": "a fox", "width": 64, "height": 64, "samples": 2}
    headers = {"Idempotency-Key": "order-17"}
    first = client.post("/api/v6/images/text2img", json=body, headers=headers).json()
    assert first["status"] == "success", first
    # the same request again, even through another route family: the first job, no new charge
    retry = client.post("/api/v7/images/text-to-image", json=body, headers=headers).json()
    assert retry["id"] == first["id"] and retry["output"] == first["output"]
    assert len(engine.calls) == 1
    assert before - balance(service, "demo") == Decimal("0.0094")

    # the same key with another request is refused, and nothing is generated or charged
    other = client.post(
        "/api/v6/images/text2img", json={**body, "prompt": "a wolf"}, headers=headers
    ).json()
    assert other["status"] == "error"
    assert other["message"].startswith("Idempotency-Key was already used by this API key")
    bad = client.post(
        "/api/v6/images/text2img", json=body, headers={"Idempotency-Key": "two words"}
    ).json()
    assert bad["message"] == (
        "Idempotency-Key header must be 1-200 visible ASCII characters (no spaces)"
    )
    # without the header every request is new: a random seed each, a charge each
    client.post("/api/v6/images/text2img", json=body)
    client.post("/api/v6/images/text2img", json=body)
    assert len(engine.calls) == 3
    assert before - balance(service, "demo") == Decimal("0.0282")
    assert service.ledger.audit() == []


def test_images_past_the_retention_are_pruned(env, tmp_path):
    client, _, service = env
    body = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64, samples=2)
    body = body.json()
    assert service.prune_images() == 0  # no retention set: images stay
    stamp = time.time() - 3 * 86400
    for url in body["output"]:
        os.utime(tmp_path / "images" / url.rsplit("/", 1)[1], (stamp, stamp))
    service.settings.image_retention_days = 2
    assert service.prune_images() == 2
    assert all(
        client.get(url.removeprefix("http://testserver")).status_code == 404
        for url in body["output"]
    )
    # the job itself, and what was charged for it, stay
    fetched = post(client, f"/api/v6/images/fetch/{body['id']}").json()
    assert fetched["status"] == "success" and fetched["output"] == body["output"]


def test_image_urls_can_point_at_a_cdn_in_front_of_the_store(tmp_path):
    """With image_url_base, clients download from where the operator serves the store (here a
    plain static file server over the store's parent folder), not through this server."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    cdn = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=cdn.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{cdn.server_port}/outputs"
    app, _, _ = make_app(tmp_path, image_store_url=str(tmp_path / "outputs"), image_url_base=base)
    try:
        with TestClient(app) as client:
            fields = {"prompt": "x", "width": 64, "height": 64}
            png = post(client, "/api/v6/images/text2img", **fields).json()
            temp = post(client, "/api/v6/images/text2img", temp="yes", **fields).json()
            for body in (png, temp):
                [url] = body["output"]
                assert url.startswith(base + "/"), url
                served = httpx.get(url)
                assert served.status_code == 200
                assert Image.open(io.BytesIO(served.content)).size == (64, 64)
            assert temp["output"][0].startswith(base + "/temp/")
    finally:
        cdn.shutdown()
    with pytest.raises(ValueError, match="is not an http:// or https:// URL"):
        Settings(image_url_base="cdn.example.com")


def test_an_expired_key_is_refused_with_when(env):
    client, engine, service = env
    from datetime import UTC, datetime, timedelta

    from service.pricing import Plan

    plaintext, _ = service.keys.create(
        "short-lived", Plan.PREMIUM, expires_at=datetime.now(UTC) + timedelta(seconds=1)
    )
    body = {"key": plaintext, "prompt": "x", "width": 64, "height": 64}
    first = client.post("/api/v6/images/text2img", json=body).json()
    assert first["status"] == "success", first
    time.sleep(1.2)
    for path, payload in [
        ("/api/v6/images/text2img", body),
        (f"/api/v6/images/fetch/{first['id']}", {"key": plaintext}),
    ]:
        refused = client.post(path, json=payload).json()
        assert refused["status"] == "error"
        assert re.fullmatch(
            r"Invalid API key: it expired at \d{4}-\d\d-\d\d \d\d:\d\d UTC", refused["message"]
        ), refused
    assert len(engine.calls) == 1


def test_a_temp_image_is_never_cached_past_its_24_hours(env):
    client, _, _ = env
    fields = {"prompt": "x", "width": 64, "height": 64}
    for temp, caching in (("no", "public, max-age=86400"), ("yes", "no-store")):
        [url] = post(client, "/api/v6/images/text2img", temp=temp, **fields).json()["output"]
        served = client.get(url)
        assert served.status_code == 200 and served.headers["cache-control"] == caching


# ---- what hosted-API client code sends ------------------------------------------------------


def test_null_spellings_from_the_hosted_api_examples_are_served_with_defaults(env):
    client, engine, service = env
    body = post(
        client,
        "/api/v6/images/text2img",
        prompt="a cat",
        width=64,
        height=64,
        safety_checker_type="none",
        **HOSTED_API_NULLS,
    ).json()
    assert body["status"] == "success", body
    meta = body["meta"]
    assert (meta["webhook"], meta["track_id"], meta["lora"], meta["vae"]) == (None,) * 4
    assert meta["negative_prompt"] == "" and meta["scheduler"] == "UniPCMultistepScheduler"
    assert meta["algorithm_type"] == "none" and meta["not_applied"] == []
    job = service.jobs.get(body["id"])
    assert job.track_id is None and job.webhook is None
    assert engine.calls[0].embeddings == () and engine.calls[0].negative_prompt == ""


def test_unknown_vae_and_embeddings_are_served_and_reported_not_applied(env):
    client, engine, _ = env
    body = post(
        client,
        "/api/v6/images/text2img",
        prompt="x",
        width=64,
        height=64,
        vae="kl-f8",
        embeddings_model="dark",
    ).json()
    assert body["status"] == "success", body
    assert body["meta"]["vae"] is None and body["meta"]["embeddings_model"] is None
    assert body["meta"]["not_applied"] == [
        "embeddings_model 'dark' (not available; available embeddings: none)",
        "vae 'kl-f8' (not available; available VAEs: none)",
    ]
    assert engine.calls[0].vae is None and engine.calls[0].embeddings == ()


def test_a_max_size_below_the_models_size_caps_the_default_size(tmp_path):
    app, engine, _ = make_app(tmp_path, max_size=128)  # the model's native size is 256
    with TestClient(app) as client:
        body = post(client, "/api/v6/images/text2img", prompt="x").json()
        assert body["status"] == "success", body
        assert (body["meta"]["W"], body["meta"]["H"]) == (128, 128)
        assert (engine.calls[0].width, engine.calls[0].height) == (128, 128)
        # and model_list says the size a request without one gets
        [listed] = post(client, "/api/v4/dreambooth/model_list").json()
        assert (listed["width"], listed["height"]) == (128, 128)


def test_clip_skip_beyond_the_text_encoders_depth_is_refused_before_queueing(tmp_path):
    layers = 5  # the tiny demo model's depth
    (tmp_path / "model" / "text_encoder").mkdir(parents=True)
    (tmp_path / "model" / "text_encoder" / "config.json").write_text(
        json.dumps({"model_type": "clip_text_model", "num_hidden_layers": layers})
    )
    app, engine, service = make_app(tmp_path)
    with TestClient(app) as client:
        fields = {"prompt": "x", "width": 64, "height": 64}
        deepest = post(client, "/api/v6/images/text2img", clip_skip=layers, **fields).json()
        assert deepest["status"] == "success" and deepest["meta"]["clip_skip"] == layers
        refused = post(client, "/api/v6/images/text2img", clip_skip=layers + 1, **fields).json()
        assert refused["status"] == "error"
        assert refused["message"] == (
            f"clip_skip must be an integer between 1 and {layers} "
            f"(the text encoder of 'stable-diffu' has {layers} layers)"
        )
    assert len(engine.calls) == 1 and service.jobs.get(deepest["id"] + 1) is None


def test_every_api_call_is_counted_once_by_route_and_outcome(tmp_path):
    app, _, service = make_app(tmp_path, max_inflight_jobs=1)
    service.metrics = metrics = RecordingMetrics()
    with TestClient(app) as client:
        made = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64).json()
        post(client, f"/api/v6/images/fetch/{made['id']}")
        post(client, "/api/v4/dreambooth/model_list")
        post(client, "/api/v6/images/text2img", prompt="x", width=7, height=64)
        service._admitting = 1  # the server is full: one job being admitted
        busy = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64).json()
        service._admitting = 0
    counted = [(route, status) for route, _model, status, _s in metrics.of("request_done")]
    assert counted == [
        ("/api/v6/images/text2img", "success"),
        ("/api/v6/images/fetch/{job_id}", "success"),
        ("/api/v4/dreambooth/model_list", "success"),
        ("/api/v6/images/text2img", "error"),
        ("/api/v6/images/text2img", "rate_limited"),
    ]
    assert busy["status"] == "error" and "Server busy" in busy["message"]
    assert metrics.of("rate_limit") == [("pay_per_use",)]  # the capacity 429 too


def test_billed_metric_is_what_the_ledger_charged_when_the_price_changes_meanwhile(tmp_path):
    app, engine, service = make_app(tmp_path, default_price_per_image_usd="0.002")
    service.metrics = metrics = RecordingMetrics()

    async def repriced_while_generating(params):
        service.prices = PriceList(Decimal("0.05"))  # a new price list lands meanwhile
        return await engine(params)

    service._generate = repriced_while_generating
    with TestClient(app) as client:
        body = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64, samples=3)
    assert body.json()["status"] == "success"
    charged = -sum(e.amount_micros for e in service.ledger.entries(job_id=body.json()["id"]))
    assert charged == 3 * 2000  # reserved at the price of the moment it was accepted
    assert metrics.of("billed") == [("stable-diffu", "pay_per_use", Decimal("0.006"))]


class _Rollback(Exception):
    sqlstate = "40P01"  # deadlock_detected, as psycopg's errors carry it


@pytest.mark.parametrize(
    ("orig", "reason"),
    [
        (_Rollback("deadlock detected"), "the database rolled this request back"),
        (ConnectionRefusedError("connection refused"), "the database cannot be reached"),
    ],
)
def test_a_database_error_answers_503_saying_which_it_was(tmp_path, orig, reason):
    app, engine, service = make_app(tmp_path)

    def create(**_fields):
        raise OperationalError("INSERT INTO jobs ...", {}, orig)

    service.jobs.create = create
    with TestClient(app) as client:
        answer = post(client, "/api/v6/images/text2img", prompt="x", width=64, height=64)
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    body = answer.json()
    assert body["status"] == "error" and body["message"].startswith(
        f"Service temporarily unavailable: {reason}"
    )
    assert "INSERT" not in body["message"] and engine.calls == []
