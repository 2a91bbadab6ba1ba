"""Highres fix: a first pass at the native pixel count, then the upscaled latents re-denoised at
the requested size; deterministic, independent of the batch, in both batching modes."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.continuous import ContinuousBatcher
from service.engine.highres import HIGHRES_STRENGTH, first_pass_size, second_pass_start
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams

MODEL = "a"


def test_first_pass_keeps_the_aspect_at_the_native_pixel_count():
    assert first_pass_size(1024, 1024, 768, 768) == (768, 768)
    assert first_pass_size(1024, 768, 768, 768) == (880, 664)  # 4:3, 584k of 590k pixels
    assert first_pass_size(768, 768, 768, 768) is None
    assert first_pass_size(1024, 512, 768, 768) is None  # fewer pixels than native
    assert first_pass_size(2048, 256, 512, 512) == (1448, 176)
    assert second_pass_start(30) == 30 - round(30 * HIGHRES_STRENGTH) == 12
    assert second_pass_start(1) == 0  # at least one step


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine({MODEL: tiny_model_dir})


def request(highres=True, seed=5, **fields) -> GenerationParams:
    base = dict(prompt="a harbour", model_id=MODEL, width=1024, height=768, num_inference_steps=2)
    return GenerationParams(highres_fix=highres, seed=seed, **{**base, **fields})


def test_the_two_passes_run_at_their_sizes(engine, monkeypatch):
    sizes = []
    step = engine.denoise_step

    def spy(pipe, states):
        sizes.append(sorted({tuple(s.latents.shape[-2:]) for s in states}))
        return step(pipe, states)

    monkeypatch.setattr(engine, "denoise_step", spy)
    (output,) = engine.generate([request()])
    assert output.images[0].shape == (768, 1024, 3)
    # 2 steps at 880x664 (the tiny model is 768-native), then round(2 x 0.6) = 1 at 1024x768
    assert sizes == [[(83, 110)]] * 2 + [[(96, 128)]]


def test_fixed_images_are_batch_independent_and_differ_from_direct(engine):
    fixed = engine.generate([request()])[0].images[0]
    direct = engine.generate([request(False)])[0].images[0]
    assert not np.array_equal(fixed, direct)
    outputs = engine.generate([request(seed=5), request(seed=6, samples=2)])
    assert np.abs(outputs[0].images[0].astype(int) - fixed).max() <= 1
    # not above the native size: nothing to fix, the direct image
    small = request(width=512, height=512)
    assert np.array_equal(
        engine.generate([small])[0].images[0],
        engine.generate([request(False, width=512, height=512)])[0].images[0],
    )


def test_step_batching_runs_the_passes_of_different_requests_side_by_side(engine):
    """One request in its second pass while another is in its first: one forward per size."""
    alone = {
        seed: engine.generate([request(seed=seed, num_inference_steps=steps)])[0].images[0]
        for seed, steps in ((5, 2), (6, 4))
    }
    batcher = ContinuousBatcher(engine, max_running_images=8)
    futures = {
        5: batcher.submit(request(seed=5)),
        6: batcher.submit(request(seed=6, num_inference_steps=4)),
    }
    batcher.run_until_idle()
    for seed, future in futures.items():
        assert np.abs(future.result(120).images[0].astype(int) - alone[seed]).max() <= 1


def test_a_scheduler_that_cannot_re_noise_fails_only_its_own_request(engine):
    """IPNDM has no `add_noise`: its highres request is refused when submitted, naming the
    field, and the highres requests sharing its bucket keep running."""
    from service.engine.schedulers import HIGHRES_SCHEDULERS, SCHEDULERS

    assert set(SCHEDULERS) - HIGHRES_SCHEDULERS == {"IPNDMScheduler"}
    with pytest.raises(ValueError, match="^highres_fix: needs a scheduler that can re-noise"):
        engine.generate([request(scheduler="IPNDMScheduler")])
    batcher = ContinuousBatcher(engine)
    bystander = batcher.submit(request(seed=7, scheduler="DDIMScheduler", num_inference_steps=3))
    with pytest.raises(ValueError, match="^highres_fix:"):
        batcher.submit(request(seed=8, scheduler="IPNDMScheduler", num_inference_steps=1))
    batcher.run_until_idle()
    assert bystander.result(timeout=0).images[0].shape == (768, 1024, 3)
