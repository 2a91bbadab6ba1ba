"""The whole service over HTTP: real Ray Serve, the diffusers pipeline on the tiny model,
SQLite and image files — as a client that moved from the hosted API sees it."""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import requests
from PIL import Image

from service.api.webhooks import SIGNATURE_HEADER, verify_signature
from service.config import DEMO_API_KEY
from service.engine.tiny_model import build_tiny_safety_checker
from tests.conftest import running_app

pytestmark = pytest.mark.slow

FAST = {"width": 128, "height": 128, "num_inference_steps": 2}
WEBHOOK_SECRET = "whsec-e2e"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("e2e")
    # the demo key's plan allows 10 requests at once; the batching test sends 16
    limits = {"free": 5, "pay_per_use": 32, "premium": 32}
    # the webhook test's receiver listens on this machine, which webhooks may not reach unless
    # allowed
    settings = {
        "sync_window_s": 60,
        "max_concurrent_requests": limits,
        "webhook_allowed_hosts": ["127.0.0.1"],
        "webhook_secret": WEBHOOK_SECRET,
        # flags every image it is asked to check; requests that do not ask are not checked
        "safety_checker": str(build_tiny_safety_checker(tmp / "checker", flags="all")),
    }
    with running_app(tmp, tiny_model_dir, settings=settings) as (base_url, _):
        yield base_url


def text2img(server, path="/api/v6/images/text2img", **fields):
    body = {"key": DEMO_API_KEY, "prompt": "a lighthouse at dusk", **FAST, **fields}
    response = requests.post(server + path, json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def fetch_png(url: str) -> Image.Image:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_the_model_page_snippet_works_by_changing_the_base_url(server):
    # The `requests` snippet of the hosted model page, verbatim but for the URL, size and steps.
    url = server + "/api/v6/images/text2img"
    payload = json.dumps(
        {
            "key": DEMO_API_KEY,
            "model_id": "stable-diffu",
            "prompt": "ultra realistic close up portrait ((beautiful pale cyberpunk female))",
            "negative_prompt": "painting, extra fingers, mutated hands, poorly drawn hands",
            "width": "256",
            "height": "256",
            "samples": "1",
            "num_inference_steps": "2",
            "safety_checker": "no",
            "enhance_prompt": "yes",
            "seed": None,
            "guidance_scale": 7.5,
            "multi_lingual": "no",
            "panorama": "no",
            "self_attention": "no",
            "upscale": "no",
            "embeddings_model": None,
            "lora_model": None,
            "tomesd": "yes",
            "clip_skip": "2",
            "use_karras_sigmas": "yes",
            "vae": None,
            "lora_strength": None,
            "scheduler": "UniPCMultistepScheduler",
            "webhook": None,
            "track_id": None,
        }
    )
    headers = {"Content-Type": "application/json"}
    response = requests.request("POST", url, headers=headers, data=payload, timeout=120)
    body = response.json()
    assert body["status"] == "success", body
    assert isinstance(body["id"], int) and body["generationTime"] > 0
    assert len(body["output"]) == 1
    assert fetch_png(body["output"][0]).size == (256, 256)
    meta = body["meta"]
    assert meta["clip_skip"] == 2 and meta["seed"] > 0
    assert "enhance_prompt" in meta["not_applied"]
    assert meta["tomesd"] == "yes" and "tomesd" not in " ".join(meta["not_applied"])
    assert meta["self_attention"] == "no"


def test_four_samples_are_four_distinct_images(server):
    body = text2img(server, samples=4, seed=1234)
    assert body["status"] == "success"
    pixels = [np.asarray(fetch_png(url)) for url in body["output"]]
    assert len(pixels) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.array_equal(pixels[i], pixels[j])


def test_same_seed_gives_byte_identical_images(server):
    first = text2img(server, seed=987654, negative_prompt="fog")
    second = text2img(server, seed=987654, negative_prompt="fog")
    assert first["meta"]["seed"] == second["meta"]["seed"] == 987654
    a = requests.get(first["output"][0], timeout=30).content
    b = requests.get(second["output"][0], timeout=30).content
    assert a == b
    other = requests.get(text2img(server, seed=987655)["output"][0], timeout=30).content
    assert other != a


def test_instant_response_then_fetch_result(server):
    body = text2img(server, instant_response="yes", samples="2")
    assert body["status"] == "processing"
    assert body["output"] == [] and len(body["future_links"]) == 2
    deadline = time.monotonic() + 60
    while True:
        fetched = requests.post(body["fetch_result"], json={"key": DEMO_API_KEY}, timeout=30).json()
        if fetched["status"] != "processing" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert fetched["status"] == "success"
    assert fetched["output"] == body["future_links"]
    assert all(fetch_png(url).size == (128, 128) for url in fetched["output"])


def test_v3_and_v7_routes(server):
    v3 = text2img(server, "/api/v3/text2img")
    v7 = text2img(server, "/api/v7/images/text-to-image", scheduler="EulerAncestralDiscrete")
    assert v3["status"] == v7["status"] == "success"
    assert v7["meta"]["scheduler"] == "EulerAncestralDiscreteScheduler"


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"width": 1032}, "width must be a multiple of 8 between 64 and 1024"),
        ({"height": 130}, "height must be a multiple of 8"),
        ({"samples": 5}, "samples must be an integer between 1 and 4"),
        ({"num_inference_steps": 51}, "num_inference_steps must be an integer between 1 and 50"),
        ({"scheduler": "Warp"}, "scheduler must be one of"),
        ({"model_id": "sdxl"}, "available models: stable-diffu"),
        ({"prompt": ""}, "prompt must be a non-empty string"),
    ],
)
def test_bad_input_gets_a_named_error(server, fields, expected):
    body = text2img(server, **fields)
    assert body["status"] == "error" and expected in body["message"]
    assert body["messege"] == body["message"]


def test_malformed_and_oversized_bodies_then_still_serving(server):
    url = server + "/api/v6/images/text2img"
    broken = requests.post(url, data='{"key": "x", "prompt"', timeout=30)
    assert broken.json()["status"] == "error" and "not valid JSON" in broken.json()["message"]
    huge = requests.post(url, json={"key": DEMO_API_KEY, "prompt": "x" * 200_000}, timeout=30)
    assert huge.status_code == 413 and huge.json()["status"] == "error"
    bad_key = requests.post(url, json={"key": "nope", "prompt": "x"}, timeout=30).json()
    assert bad_key["message"] == "Invalid API key"
    load = requests.post(server + "/api/v3/system_load", json={"key": DEMO_API_KEY}, timeout=30)
    assert load.json()["status"] == "ok"
    assert text2img(server)["status"] == "success"


def test_sixteen_concurrent_requests_are_batched(server):
    def one(i):
        return text2img(server, seed=100 + i, prompt=f"prompt number {i}")

    with ThreadPoolExecutor(16) as pool:
        bodies = list(pool.map(one, range(16)))
    assert all(b["status"] == "success" for b in bodies)
    batch_sizes = [b["meta"]["batch_size"] for b in bodies]
    assert max(batch_sizes) > 1, batch_sizes
    # the batched images are the ones the same seeds give alone
    alone = text2img(server, seed=100, prompt="prompt number 0")
    batched = np.asarray(fetch_png(bodies[0]["output"][0]), dtype=int)
    single = np.asarray(fetch_png(alone["output"][0]), dtype=int)
    assert np.abs(batched - single).max() <= 1


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        signature = self.headers.get(SIGNATURE_HEADER, "")
        _Receiver.received.append(
            {**json.loads(body), "_verified": verify_signature(WEBHOOK_SECRET, signature, body)}
        )
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_receives_the_result_with_track_id(server):
    receiver = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{receiver.server_port}/hook"
        body = text2img(server, webhook=hook, track_id="order-42")
        assert body["status"] == "success"
        deadline = time.monotonic() + 15
        while not _Receiver.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _Receiver.received, "webhook never arrived"
        delivered = _Receiver.received[0]
        assert delivered["status"] == "success" and delivered["track_id"] == "order-42"
        assert delivered.pop("_verified"), "the webhook's signature did not verify"
        assert delivered["id"] == body["id"] and delivered["output"] == body["output"]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            fetched = requests.post(
                f"{server}/api/v6/images/fetch/{body['id']}", json={"key": DEMO_API_KEY}, timeout=30
            ).json()
            if fetched["webhook_status"]:
                break
            time.sleep(0.1)
        assert fetched["webhook_status"] == "success"
    finally:
        receiver.shutdown()


def test_the_safety_checker_replaces_flagged_images_as_asked(server):
    plain = text2img(server, seed=4242, samples=2)
    assert plain["nsfw_content_detected"] is False
    assert plain["meta"]["safety_checker"] == "no" and "nsfw_flags" not in plain["meta"]
    original = [np.asarray(fetch_png(url)) for url in plain["output"]]
    assert all(image.std() > 0 for image in original)

    black = text2img(
        server, seed=4242, samples=2, safety_checker="yes", safety_checker_type="black"
    )
    assert black["status"] == "success", black
    assert black["nsfw_content_detected"] is True
    assert black["meta"]["safety_checker"] == "yes"
    assert black["meta"]["safety_checker_type"] == "black"
    assert black["meta"]["nsfw_flags"] == [True, True]
    assert black["meta"]["not_applied"] == []
    assert all(not np.asarray(fetch_png(url)).any() for url in black["output"])

    # The default treatment: a notice of the image's size, the same whatever the picture was.
    notice = text2img(server, seed=4242, samples=2, safety_checker="yes")
    assert notice["meta"]["safety_checker_type"] == "sensitive_content_text"
    notices = [np.asarray(fetch_png(url)) for url in notice["output"]]
    assert notices[0].shape == original[0].shape
    assert np.array_equal(notices[0], notices[1])
    assert not np.array_equal(notices[0], original[0])

    # fetch (and so the webhook) reports the verdict too
    fetched = requests.post(
        server + f"/api/v6/images/fetch/{black['id']}", json={"key": DEMO_API_KEY}, timeout=30
    ).json()
    assert fetched["nsfw_content_detected"] is True
    assert fetched["meta"]["nsfw_flags"] == [True, True]
