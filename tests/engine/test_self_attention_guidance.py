"""Self-attention guidance (self_attention): our loop reproduces diffusers' SAG pipeline, and a
SAG request changes nothing for the requests that share its UNet forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionSAGPipeline

from service.engine.continuous import ContinuousBatcher
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.schedulers import SCHEDULERS, build_scheduler
from service.engine.self_attention_guidance import SAG_SCALE, SAG_SCHEDULERS
from service.engine.tiny_model import SD2_SCHEDULER_CONFIG

MODEL = "a"


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine({MODEL: tiny_model_dir})


def request(sag=True, seed=5, **fields) -> GenerationParams:
    base = dict(prompt="a lighthouse", model_id=MODEL, width=64, height=64, num_inference_steps=3)
    return GenerationParams(self_attention=sag, seed=seed, **{**base, **fields})


def image(engine, params) -> np.ndarray:
    return engine.generate([params])[0].images[0]


def test_sag_schedulers_are_those_with_integer_timesteps():
    config = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG).config
    integer = set()
    for name in SCHEDULERS:
        scheduler = build_scheduler(config, name, True, None)
        scheduler.set_timesteps(10)
        if not scheduler.timesteps.is_floating_point() and hasattr(scheduler, "alphas_cumprod"):
            integer.add(name)
    assert integer == SAG_SCHEDULERS


@pytest.mark.parametrize(
    ("scheduler", "guidance_scale", "samples"),
    [("DDIMScheduler", 7.5, 1), ("UniPCMultistepScheduler", 7.5, 2), ("DDIMScheduler", 1.0, 1)],
)
def test_matches_diffusers_sag_pipeline(engine, scheduler, guidance_scale, samples):
    """Within 1/255 per pixel of `StableDiffusionSAGPipeline` at diffusers' default scale."""
    params = request(
        negative_prompt="fog",
        scheduler=scheduler,
        guidance_scale=guidance_scale,
        samples=samples,
        seed=2024,
    )
    ours = engine.generate([params])[0].images

    pipe = engine.load(MODEL)
    reference = StableDiffusionSAGPipeline(
        **{k: v for k, v in pipe.components.items() if k not in ("image_encoder",)}
    )
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = build_scheduler(pipe.scheduler.config, scheduler, True, None)
    generators = [torch.Generator().manual_seed(params.seed + i) for i in range(samples)]
    expected = reference(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=guidance_scale,
        sag_scale=SAG_SCALE,
        num_images_per_prompt=samples,
        generator=generators,
        output_type="np",
    ).images
    assert len(ours) == len(expected) == samples
    for got, want in zip(ours, expected, strict=True):
        assert np.abs(got.astype(np.float64) - want * 255).max() <= 1.0
    # and the guidance did something
    assert not np.array_equal(ours[0], engine.generate([request(False, **{
        k: getattr(params, k)
        for k in ("negative_prompt", "scheduler", "guidance_scale", "samples", "seed")
    })])[0].images[0])  # fmt: skip


def test_sag_and_plain_requests_share_a_forward_without_leaking(engine):
    alone = [image(engine, request(True, seed=8)), image(engine, request(False, seed=9))]
    outputs = engine.generate(
        [request(True, seed=8), request(False, seed=9), request(True, seed=3, guidance_scale=1.0)]
    )
    assert outputs[0].batch_size == 3
    assert np.abs(outputs[0].images[0].astype(int) - alone[0]).max() <= 1
    assert np.abs(outputs[1].images[0].astype(int) - alone[1]).max() <= 1
    unguided = image(engine, request(True, seed=3, guidance_scale=1.0))
    assert np.abs(outputs[2].images[0].astype(int) - unguided).max() <= 1


def test_step_batching_guides_only_the_requests_that_ask(engine):
    batcher = ContinuousBatcher(engine, max_running_images=8)
    guided = batcher.submit(request(True, seed=8))
    plain = batcher.submit(request(False, seed=8, num_inference_steps=2))
    batcher.run_until_idle()
    want = image(engine, request(True, seed=8))
    assert np.abs(guided.result(60).images[0].astype(int) - want).max() <= 1
    want = image(engine, request(False, num_inference_steps=2, seed=8))
    assert np.abs(plain.result(60).images[0].astype(int) - want).max() <= 1


def test_sigma_schedulers_are_refused_naming_the_field(engine):
    with pytest.raises(ValueError, match="^self_attention: needs a scheduler with integer"):
        engine.generate([request(scheduler="EulerDiscreteScheduler")])
    assert image(engine, request()).shape == (64, 64, 3)


def test_sag_with_token_merging_and_on_the_optimized_path(engine, tiny_model_dir):
    from service.engine.optimize import OptimizationConfig

    both = image(engine, request(tomesd=True))
    assert not np.array_equal(both, image(engine, request()))
    config = OptimizationConfig(
        enabled=True, compile=True, compile_backend="eager", triton_kernels=False
    )
    optimized = Engine({MODEL: tiny_model_dir}, optimizations=config)
    assert np.abs(image(optimized, request()).astype(int) - image(engine, request())).max() <= 2
    assert np.abs(image(optimized, request(tomesd=True)).astype(int) - both).max() <= 2


def test_degrading_leaves_the_schedulers_tables_on_the_cpu():
    """SAG's re-noising goes through the same `add_noise` as the highres fix: diffusers' DDIM
    would move `alphas_cumprod` to the device, which the next step's CPU twin cannot index.
    The meta device stands in for a GPU."""
    import torch

    from service.engine.schedulers import build_scheduler
    from service.engine.self_attention_guidance import degrade

    scheduler = build_scheduler({"num_train_timesteps": 1000}, "DDIMScheduler", False, None)
    scheduler.set_timesteps(4, device="cpu")
    x0 = torch.zeros(1, 4, 8, 8, device="meta")
    probs = torch.zeros(1, 2, 16, 16, device="meta")
    degrade(scheduler, x0, torch.zeros_like(x0), probs, (4, 4), scheduler.timesteps[:1])
    assert scheduler.alphas_cumprod.device.type == "cpu"
