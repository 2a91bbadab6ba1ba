"""Scheduler steps through the CPU twin (service/engine/linear_steps.py): the same latents as
the scheduler stepping them directly, for every scheduler it takes, in the engine too."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from service.engine.linear_steps import LINEAR_SCHEDULERS, LinearStepper, is_linear
from service.engine.optimize import OptimizationConfig
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.schedulers import accepts_karras_sigmas, build_scheduler
from service.engine.tiny_model import SD2_SCHEDULER_CONFIG

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

BASE = DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG).config  # SD2: v-prediction
MODEL = "stable-diffu"


def fake_model(sample: torch.Tensor, step: int) -> torch.Tensor:
    """Deterministic and nonlinear in the sample, so a wrong combination shows."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.tanh(0.7 * sample) + 0.3 * torch.randn(sample.shape, generator=g)


def run(name: str, karras: bool, steps: int, twin: bool) -> list[torch.Tensor]:
    scheduler = build_scheduler(BASE, name, karras, None)
    scheduler.set_timesteps(steps, device="cpu")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g) * scheduler.init_noise_sigma
    kwargs = {"eta": 0.0} if name == "DDIMScheduler" else {}
    stepper = LinearStepper(latents, len(scheduler.timesteps)) if twin else None
    trajectory = []
    for step, t in enumerate(scheduler.timesteps):
        output = fake_model(scheduler.scale_model_input(latents, t), step)
        if stepper is not None:
            latents = stepper.step(scheduler, output, t, **kwargs)
        else:
            latents = scheduler.step(output, t, latents, **kwargs, return_dict=False)[0]
        trajectory.append(latents)
    return trajectory


CASES = [
    (name, karras)
    for name in sorted(LINEAR_SCHEDULERS)
    for karras in ((False, True) if accepts_karras_sigmas(name) else (False,))
]


@pytest.mark.parametrize(("name", "karras"), CASES)
def test_the_twin_gives_the_schedulers_own_latents_at_every_step(name, karras):
    direct = run(name, karras, steps=7, twin=False)
    twin = run(name, karras, steps=7, twin=True)
    assert len(direct) == len(twin) >= 7
    for step, (a, b) in enumerate(zip(direct, twin, strict=True)):
        assert torch.isfinite(b).all()
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 2e-5, f"{name} step {step}: relative error {rel:.2e}"


def test_noise_drawing_and_clipping_schedulers_are_stepped_directly():
    def build(name, **config):
        return build_scheduler({**BASE, **config}, name, False, None)

    assert is_linear(build("UniPCMultistepScheduler"), {})
    assert is_linear(build("DPMSolverMultistepScheduler"), {"generator": []})  # draws nothing
    assert not is_linear(build("EulerAncestralDiscreteScheduler"), {"generator": []})
    assert not is_linear(build("DDPMScheduler"), {"generator": []})
    assert not is_linear(build("DDIMScheduler"), {"eta": 0.5})
    assert not is_linear(build("DDIMScheduler", clip_sample=True), {"eta": 0.0})
    sde = build_scheduler(BASE, "DPMSolverMultistepScheduler", False, "sde-dpmsolver++")
    assert not is_linear(sde, {})


def test_highres_noising_leaves_the_schedulers_tables_on_the_cpu():
    """diffusers' DDIM moves `alphas_cumprod` to the latents' device in add_noise; the twin
    (and a sync-free step) needs it on the CPU. The meta device stands in for a GPU here."""
    from service.engine.schedulers import add_noise

    scheduler = build_scheduler(BASE, "DDIMScheduler", False, None)
    scheduler.set_timesteps(4, device="cpu")
    latents = torch.zeros(1, 4, 8, 8, device="meta")
    noised = add_noise(scheduler, latents, torch.zeros_like(latents), scheduler.timesteps[:1])
    assert noised.device.type == "meta"
    assert scheduler.alphas_cumprod.device.type == "cpu"
    scheduler.add_noise(latents, torch.zeros_like(latents), scheduler.timesteps[:1])
    assert scheduler.alphas_cumprod.device.type == "meta"  # what add_noise alone does


def test_more_outputs_than_timesteps_is_an_error():
    scheduler = build_scheduler(BASE, "EulerDiscreteScheduler", False, None)
    scheduler.set_timesteps(1, device="cpu")
    stepper = LinearStepper(torch.zeros(1, 4, 2, 2), model_calls=1)
    t = scheduler.timesteps[0]
    stepper.step(scheduler, torch.zeros(1, 4, 2, 2), t)
    with pytest.raises(RuntimeError, match="more model outputs"):
        stepper.step(scheduler, torch.zeros(1, 4, 2, 2), t)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    optimized = OptimizationConfig(enabled=True, compile=False, triton_kernels=False)
    direct = OptimizationConfig(
        enabled=True, compile=False, triton_kernels=False, linear_steps=False
    )
    return (
        Engine({MODEL: tiny_model_dir}, optimizations=optimized),
        Engine({MODEL: tiny_model_dir}, optimizations=direct),
    )


@pytest.mark.parametrize(
    ("scheduler", "fields"),
    [
        ("UniPCMultistepScheduler", {}),
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "samples": 2}),
        ("HeunDiscreteScheduler", {}),
        ("PNDMScheduler", {"samples": 2}),
        ("DDIMScheduler", {"highres_fix": True, "width": 128, "height": 128}),
        ("EulerAncestralDiscreteScheduler", {}),  # stepped directly, same path both sides
    ],
)
def test_the_engine_makes_the_same_images_with_and_without_the_twin(engines, scheduler, fields):
    twin_engine, direct_engine = engines
    params = GenerationParams(
        prompt="a lighthouse at dusk",
        negative_prompt="blurry",
        seed=77,
        width=fields.pop("width", 64),
        height=fields.pop("height", 64),
        num_inference_steps=4,
        scheduler=scheduler,
        **fields,
    )
    pipe = twin_engine.load(MODEL)
    with torch.inference_mode():
        states = twin_engine.start_requests(pipe, [params])
    assert (states[0].stepper is not None) == (scheduler in LINEAR_SCHEDULERS)
    ours = twin_engine.generate([params])[0].images
    reference = direct_engine.generate([params])[0].images
    for a, b in zip(ours, reference, strict=True):
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1


def test_step_level_batching_with_the_twin_equals_each_request_alone(engines):
    """Requests of several schedulers join the running set mid-flight (service/engine/
    continuous.py), each stepping its own twin; each image equals the request made alone by
    the engine that steps its scheduler directly."""
    from service.engine.continuous import ContinuousBatcher

    twin_engine, direct_engine = engines
    mix = [
        GenerationParams(prompt="unipc", seed=5, width=64, height=64, num_inference_steps=4),
        GenerationParams(
            prompt="dpm karras", seed=6, width=64, height=64, num_inference_steps=5,
            scheduler="DPMSolverMultistepScheduler", use_karras_sigmas=True, samples=2,
        ),
        GenerationParams(
            prompt="ancestral", seed=7, width=64, height=64, num_inference_steps=3,
            scheduler="EulerAncestralDiscreteScheduler",
        ),
        GenerationParams(
            prompt="heun", seed=8, width=64, height=64, num_inference_steps=3,
            scheduler="HeunDiscreteScheduler", guidance_scale=1.0,
        ),
    ]  # fmt: skip
    batcher = ContinuousBatcher(twin_engine, max_running_images=16)
    futures = []
    for params in mix:  # one arrival per step
        futures.append(batcher.submit(params))
        batcher.step()
    batcher.run_until_idle()
    for params, future in zip(mix, futures, strict=True):
        got = future.result(timeout=0).images
        expected = direct_engine.generate([params])[0].images
        for a, b in zip(got, expected, strict=True):
            assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1
