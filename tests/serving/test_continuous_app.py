"""Both batching modes in the real app (Ray Serve, the tiny model, HTTP): a mixed burst of
requests — other step counts, schedulers, guidance, image counts — gives each request the image
it gets alone, and the generator's metrics (queue wait, batch size, GPU-seconds, images) show up
in the scrape. Step mode is what service/serving/continuous.py adds; request mode is the
`@serve.batch` path, kept as it was."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from service.config import DEMO_API_KEY
from tests.conftest import free_port, running_app
from tests.serving.test_metrics import scrape, total

pytestmark = pytest.mark.slow

SMALL = {"width": 128, "height": 128}
MIX = [
    {"num_inference_steps": 6, "scheduler": "DPMSolverMultistepScheduler"},
    {"num_inference_steps": 3, "scheduler": "HeunDiscreteScheduler", "samples": 2},
    {"num_inference_steps": 5, "scheduler": "EulerAncestralDiscreteScheduler",
     "guidance_scale": 1},
    {"num_inference_steps": 4, "scheduler": "UniPCMultistepScheduler",
     "negative_prompt": "blurry"},
    {"num_inference_steps": 2, "scheduler": "DDIMScheduler", "width": 64, "height": 64},
    {"num_inference_steps": 4, "scheduler": "KDPM2AncestralDiscreteScheduler"},
]  # fmt: skip


@pytest.fixture(scope="module", params=["step", "request"])
def app(request, tmp_path_factory, tiny_model_dir):
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"batching-{mode}")
    port = free_port()
    limits = {"free": 5, "pay_per_use": 32, "premium": 32}
    settings = {"sync_window_s": 60, "max_concurrent_requests": limits}
    args = {"batching": mode, "max_running_images": 8}
    with running_app(tmp, tiny_model_dir, args=args, settings=settings, metrics_port=port) as (
        base_url,
        _,
    ):
        yield mode, base_url, f"http://127.0.0.1:{port}/metrics"


def text2img(base_url: str, **fields) -> dict:
    body = {"key": DEMO_API_KEY, "prompt": "a lighthouse at dusk", "seed": 1, **SMALL, **fields}
    response = requests.post(base_url + "/api/v6/images/text2img", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "success", result
    return result


def pixels(url: str) -> np.ndarray:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=int)


def test_a_mixed_burst_gives_every_request_its_image_alone(app):
    mode, base_url, metrics_url = app
    burst = [
        {"prompt": f"request {i}", "seed": 500 + i, **fields} for i, fields in enumerate(MIX * 2)
    ]
    before = scrape(metrics_url)

    def send(fields):
        time.sleep(0.05 * (fields["seed"] % 5))  # arrivals spread over the first steps
        return text2img(base_url, **fields)

    with ThreadPoolExecutor(len(burst)) as pool:
        bodies = list(pool.map(send, burst))
    assert max(body["meta"]["batch_size"] for body in bodies) > 1
    for fields, body in list(zip(burst, bodies, strict=True))[: len(MIX)]:
        alone = text2img(base_url, **fields)
        for busy_url, alone_url in zip(body["output"], alone["output"], strict=True):
            assert np.abs(pixels(busy_url) - pixels(alone_url)).max() <= 1, (mode, fields)

    # the burst holds MIX twice, then MIX once more alone
    images = 3 * sum(fields.get("samples", 1) for fields in MIX)
    deadline = time.monotonic() + 30
    while True:
        after = scrape(metrics_url)
        generated = total(after, "ray_sdserve_images_generated_total") - total(
            before, "ray_sdserve_images_generated_total"
        )
        if generated >= images:
            break
        assert time.monotonic() < deadline, f"metrics never caught up: {generated} < {images}"
        time.sleep(0.5)
    assert generated == images

    def grew(name, **labels):
        return total(after, name, **labels) - total(before, name, **labels)

    batches = grew("ray_sdserve_batch_size_count")
    assert batches > 0
    if mode == "step":
        # one observation per UNet step, and the mixed requests shared them: in request mode
        # each of these shapes and schedulers is its own pipeline call
        assert batches >= 2 * 3 - 1
        assert grew("ray_sdserve_batch_size_sum") / batches > 1
    assert grew("ray_sdserve_gpu_seconds_total") > 0
    assert grew("ray_sdserve_cost_to_serve_usd_total") > 0
    for stage in ("queue", "inference"):
        assert grew("ray_sdserve_stage_duration_seconds_count", stage=stage) >= len(burst)


def test_the_replica_says_which_batching_it_runs(app):
    mode, base_url, _ = app
    response = requests.post(
        base_url + "/api/v1/enterprise/system_details", json={"key": DEMO_API_KEY}, timeout=30
    )
    assert response.status_code == 200, response.text
    generator = response.json()["generator"]
    assert generator["batching"] == mode
    assert generator["queue_depth"] == 0
