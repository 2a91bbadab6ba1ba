"""Several models and LoRAs on one Ray Serve fleet, and the enterprise management routes.

The generator holds one pipeline at a time here (max_loaded_models=1), so every switch of
model goes through Serve's multiplexed loader and the engine's LRU.
"""

from __future__ import annotations

import io
import time
from decimal import Decimal

import numpy as np
import pytest
import requests
from PIL import Image

from service.config import DEMO_API_KEY
from service.engine.tiny_model import (
    build_tiny_embedding,
    build_tiny_lora,
    build_tiny_model,
    build_tiny_upscaler,
    build_tiny_vae,
)
from service.store.db import make_engine, make_sessionmaker
from service.store.keys import KeyStore
from tests.conftest import running_app

pytestmark = pytest.mark.slow

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("models")
    other = build_tiny_model(tmp / "other", seed=1)
    build_tiny_lora(tiny_model_dir, tmp / "loras" / "style.safetensors", seed=3)
    build_tiny_embedding(tiny_model_dir, tmp / "embeddings" / "moody.pt", vectors=2, seed=4)
    build_tiny_vae(tiny_model_dir, tmp / "vaes" / "crisp.safetensors", seed=5, layout="ldm")
    broken = build_tiny_model(tmp / "broken", seed=2)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    settings = {
        "models": {
            "stable-diffu": str(tiny_model_dir),
            "other": {"path": str(other), "price_per_image_usd": "0.01", "default_steps": 3},
            "broken": str(broken),
        },
        "lora_dir": str(tmp / "loras"),
        "embeddings_dir": str(tmp / "embeddings"),
        "vae_dir": str(tmp / "vaes"),
        "upscaler": str(build_tiny_upscaler(tmp / "x2.pth", scale=2)),
        "max_loaded_models": 1,
        "sync_window_s": 60,
    }
    args = {"generator_health_check_period_s": 2}
    with running_app(tmp, tiny_model_dir, args, settings) as (base_url, app_settings):
        yield base_url, make_sessionmaker(make_engine(app_settings["database_url"]))


def call(base_url, path, key=DEMO_API_KEY, **body):
    response = requests.post(base_url + path, json={"key": key, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def generate(base_url, prompt="a tower", seed=7, **fields):
    body = {**SMALL, **fields}
    return call(base_url, "/api/v6/images/text2img", prompt=prompt, seed=seed, **body)


def fetch_image(body) -> Image.Image:
    assert body["status"] == "success", body
    return Image.open(io.BytesIO(requests.get(body["output"][0], timeout=30).content))


def pixels(body) -> np.ndarray:
    return np.asarray(fetch_image(body))


def test_model_list_reads_the_registry(fleet):
    base_url, _ = fleet
    models = {m["model_id"]: m for m in call(base_url, "/api/v4/dreambooth/model_list")}
    assert set(models) == {"stable-diffu", "other", "broken"}
    assert models["other"]["price_per_image_usd"] == "0.01"
    assert models["other"]["default_steps"] == 3
    assert models["stable-diffu"]["prediction_type"] == "v_prediction"
    assert models["stable-diffu"]["loras"] == ["style"]


def test_two_models_alternate_on_one_slot_and_differ(fleet):
    base_url, _ = fleet
    first = {m: pixels(generate(base_url, model_id=m)) for m in ("stable-diffu", "other")}
    assert not np.array_equal(first["stable-diffu"], first["other"])
    for model in ("stable-diffu", "other", "stable-diffu"):
        assert np.array_equal(pixels(generate(base_url, model_id=model)), first[model])


def test_lora_changes_the_image_and_leaves_nothing_behind(fleet):
    base_url, _ = fleet
    base = pixels(generate(base_url))
    styled_body = generate(base_url, lora_model="style", lora_strength="1")
    assert styled_body["meta"]["lora"] == "style" and styled_body["meta"]["lora_strength"] == "1"
    styled = pixels(styled_body)
    assert not np.array_equal(base, styled)
    assert not np.array_equal(
        pixels(generate(base_url, lora_model="style", lora_strength=0.3)), styled
    )
    assert np.array_equal(pixels(generate(base_url)), base)


def test_unknown_lora_and_corrupt_model_are_clear_errors(fleet):
    base_url, _ = fleet
    unknown = generate(base_url, lora_model="nope")
    assert unknown["status"] == "error"
    assert "lora_model 'nope' is not available; available LoRAs: style" in unknown["message"]
    broken = generate(base_url, model_id="broken")
    assert broken["status"] == "failed"
    assert "model_id 'broken' could not be loaded" in broken["message"]
    assert "/" not in broken["message"]  # no server path reaches the client
    assert generate(base_url)["status"] == "success"


def test_enterprise_routes_need_admin_and_manage_the_fleet(fleet):
    base_url, sessions = fleet
    user_key, _ = KeyStore(sessions).create("not-an-admin", "premium")
    denied = call(base_url, "/api/v1/enterprise/system_details", key=user_key)
    assert denied["status"] == "error" and "admin" in denied["message"]

    loaded = call(base_url, "/api/v1/enterprise/load_model", model_id="other")
    assert loaded["status"] == "success" and loaded["loaded_models"] == ["other"]
    details = call(base_url, "/api/v1/enterprise/system_details")
    assert details["generator"]["loaded_models"] == ["other"]
    assert details["models"] == ["broken", "other", "stable-diffu"]
    assert details["generator"]["device"] == "cpu" and details["generator"]["healthy"]

    reloaded = call(base_url, "/api/v6/images/model_reload", model_id="stable-diffu")
    assert reloaded["loaded_models"] == ["stable-diffu"]
    cleared = call(base_url, "/api/v1/enterprise/clear_cache")
    assert cleared["unloaded"] == ["stable-diffu"] and cleared["loaded_models"] == []
    assert generate(base_url)["status"] == "success"  # loads again on demand

    bad = call(base_url, "/api/v1/enterprise/load_model", model_id="sdxl")
    assert bad["status"] == "error" and "available models" in bad["message"]


def test_clear_queue_cancels_and_refunds(fleet):
    base_url, sessions = fleet
    keys = KeyStore(sessions)
    before = keys.find("demo").balance
    slow = {"width": 256, "height": 256, "num_inference_steps": 8, "samples": 4}
    accepted = [
        call(base_url, "/api/v6/images/text2img", prompt="q", instant_response="yes", **slow)
        for _ in range(3)
    ]
    assert all(body["status"] == "processing" for body in accepted)
    cleared = call(base_url, "/api/v1/enterprise/clear_queue")
    assert cleared["status"] == "success" and cleared["cancelled"] >= 1
    statuses = [call(base_url, f"/api/v6/images/fetch/{body['id']}")["status"] for body in accepted]
    assert set(statuses) <= {"failed", "success"}
    delivered = statuses.count("success")
    assert before - keys.find("demo").balance == delivered * 4 * Decimal("0.0047")


def test_restart_server_replaces_the_replica_without_losing_requests(fleet):
    base_url, _ = fleet
    old = call(base_url, "/api/v1/enterprise/restart_server")["generator"]["replica"]
    deadline = time.monotonic() + 60
    replica = old
    while replica == old and time.monotonic() < deadline:
        assert generate(base_url)["status"] == "success"
        replica = call(base_url, "/api/v1/enterprise/system_details")["generator"]["replica"]
        time.sleep(0.5)
    assert replica != old, "the generator replica was never replaced"
    assert generate(base_url)["status"] == "success"


def test_an_embedding_changes_only_the_requests_that_name_it(fleet):
    base_url, _ = fleet
    models = call(base_url, "/api/v4/dreambooth/model_list")
    assert all(entry["embeddings"] == ["moody"] for entry in models)

    def tower(**fields):
        return generate(base_url, prompt="a moody tower", **fields)

    plain = pixels(tower())
    named = tower(embeddings_model="moody")
    assert named["meta"]["embeddings_model"] == "moody"
    assert not np.array_equal(pixels(named), plain)
    assert np.array_equal(pixels(tower()), plain)

    # an id this server does not have (a hosted one): served without it, and said so
    unknown = generate(base_url, prompt="a moody tower", embeddings_model="dark")
    assert unknown["meta"]["embeddings_model"] is None
    assert unknown["meta"]["not_applied"] == [
        "embeddings_model 'dark' (not available; available embeddings: moody)"
    ]
    assert np.array_equal(pixels(unknown), plain)


def test_a_custom_vae_decodes_only_the_requests_that_name_it(fleet):
    base_url, _ = fleet
    models = call(base_url, "/api/v4/dreambooth/model_list")
    assert all(entry["vaes"] == ["crisp"] for entry in models)

    plain = generate(base_url, vae="default")
    assert plain["meta"]["vae"] is None
    crisp = generate(base_url, vae="crisp")
    assert crisp["meta"]["vae"] == "crisp" and "vae" not in crisp["meta"]["not_applied"]
    assert not np.array_equal(pixels(crisp), pixels(plain))

    unknown = generate(base_url, vae="kl-f8")
    assert unknown["meta"]["vae"] is None
    assert unknown["meta"]["not_applied"] == ["vae 'kl-f8' (not available; available VAEs: crisp)"]
    assert np.array_equal(pixels(unknown), pixels(plain))


def test_upscale_gives_images_the_factor_times_larger(fleet):
    base_url, _ = fleet

    doubled = generate(base_url, upscale="yes")
    assert doubled["meta"]["upscale"] == 2 and fetch_image(doubled).size == (128, 128)
    # the network is x2: a factor of 3 is resized from its output
    tripled = generate(base_url, upscale=3, samples=2)
    assert tripled["meta"]["upscale"] == 3 and fetch_image(tripled).size == (192, 192)
    assert len(tripled["output"]) == 2
    plain = generate(base_url, upscale="no")
    assert plain["meta"]["upscale"] == "no" and fetch_image(plain).size == (64, 64)
    refused = generate(base_url, upscale="8x")
    assert refused["status"] == "error"
    assert refused["message"].startswith("upscale must be")


def test_self_attention_guidance_and_token_merging_through_serve(fleet):
    base_url, _ = fleet

    def tower(**fields):
        return generate(base_url, seed=11, scheduler="DDIM", **fields)

    plain = tower()
    guided = tower(self_attention="yes")
    merged = tower(tomesd="yes")
    assert (guided["meta"]["self_attention"], merged["meta"]["tomesd"]) == ("yes", "yes")
    assert not np.array_equal(pixels(guided), pixels(plain))
    assert not np.array_equal(pixels(merged), pixels(plain))
    assert np.array_equal(pixels(tower(self_attention="yes")), pixels(guided))


def test_highres_fix_through_serve(fleet):
    base_url, _ = fleet
    path = "/api/v6/images/text2img"
    body = dict(prompt="a harbour", width=832, height=832, num_inference_steps=2, seed=3)
    fixed = call(base_url, path, highres_fix="yes", **body)
    assert fixed["status"] == "success" and fixed["meta"]["highres_fix"] == "yes"
    assert fetch_image(fixed).size == (832, 832)
    small = call(base_url, path, highres_fix="yes", prompt="x", **SMALL)
    assert small["meta"]["highres_fix"] == "no"
    assert small["meta"]["not_applied"] == [
        "highres_fix (64x64 is not above the model's native 768x768)"
    ]
