"""Token merging (tomesd): the merge and unmerge are exact inverses where tokens repeat, the
right level is merged by the right amount, and images stay deterministic and independent of
what shares their UNet forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.engine.continuous import ContinuousBatcher
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.token_merging import TokenMerging, cell_choices, merged_level, plan_merge


def grid_tokens(rows, height, width, channels=8, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, height * width, channels, generator=generator)


def test_repeated_tokens_merge_and_unmerge_back_exactly():
    """Each 2x2 cell holds one token four times: every merge is into an equal token, so
    unmerge(merge(x)) is x, with half the tokens in between."""
    cells = grid_tokens(2, 4, 5, seed=1).reshape(2, 4, 5, 8)
    x = cells.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(2, 80, 8)
    choices = cell_choices(torch.tensor([999.0, 10.0]), 20)
    plan = plan_merge(x, 8, 10, 0.5, choices)
    merged = plan.merge(x)
    assert merged.shape == (2, 40, 8)
    torch.testing.assert_close(plan.unmerge(merged), x)


def test_merging_removes_the_ratio_of_tokens_and_keeps_the_rest_in_place():
    x = grid_tokens(3, 6, 6)
    plan = plan_merge(x, 6, 6, 0.25, cell_choices(torch.tensor([1.0, 2.0, 3.0]), 9))
    merged = plan.merge(x)
    assert merged.shape == (3, 36 - 9, 8)
    restored = plan.unmerge(merged)
    kept = plan.kept_positions[..., None].expand(-1, -1, 8)
    torch.testing.assert_close(restored.gather(1, kept), x.gather(1, kept))
    assert not torch.allclose(restored, x)  # merged tokens took their destination's value


def test_odd_grids_keep_the_last_row_and_column_as_sources():
    x = grid_tokens(1, 5, 7)
    plan = plan_merge(x, 5, 7, 0.5, cell_choices(torch.tensor([5.0]), 2 * 3))
    assert plan.dst_positions.shape == (1, 6)
    assert plan.merge(x).shape == (1, 35 - 17, 8)
    assert plan.unmerge(plan.merge(x)).shape == x.shape


def test_cell_choices_depend_only_on_the_rows_timestep():
    a = cell_choices(torch.tensor([981.0, 21.0]), 50)
    b = cell_choices(torch.tensor([21.0, 500.0, 981.0]), 50)
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])
    assert int(a.min()) >= 0 and int(a.max()) <= 3


def test_the_ratio_is_bounded():
    for ratio in (0, -0.1, 0.8):
        with pytest.raises(ValueError, match="tomesd ratio"):
            TokenMerging(ratio)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine({"a": tiny_model_dir})


def request(tomesd=True, seed=5, **fields) -> GenerationParams:
    base = dict(prompt="a castle", model_id="a", width=64, height=64, num_inference_steps=3)
    return GenerationParams(tomesd=tomesd, seed=seed, **{**base, **fields})


def image(engine, params) -> np.ndarray:
    return engine.generate([params])[0].images[0]


def test_the_highest_attention_level_is_merged_by_the_ratio(engine):
    unet = engine.load("a").unet
    assert merged_level(unet) == 2  # the tiny model's first level has no attention
    seen: list[int] = []
    # the query projection sees the tokens attention runs on
    queries = [m.attn1.to_q for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]
    handles = [
        q.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1])) for q in queries
    ]
    try:
        image(engine, request(num_inference_steps=1, guidance_scale=1.0))
        merged_run = list(seen)
        seen.clear()
        image(engine, request(False, num_inference_steps=1, guidance_scale=1.0))
    finally:
        for handle in handles:
            handle.remove()
    # 64 px -> an 8x8 latent -> 4x4 = 16 tokens at level 2 (and the mid block), half merged
    assert set(seen) == {16} and set(merged_run) == {8}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_tokens_are_matched_by_the_blocks_input_before_its_norm(engine, monkeypatch):
    """As ToMe for SD: similarity from the transformer block's input, not from norm1's output,
    which is what attention takes (and what is merged)."""
    from service.engine import token_merging

    unet = engine.load("a").unet
    block_inputs, attention_inputs, metrics = [], [], []
    blocks = [m for m in unet.modules() if hasattr(m, "attn1") and hasattr(m, "attn2")]
    handles = [
        b.register_forward_pre_hook(lambda m, a, k: block_inputs.append(a[0]), with_kwargs=True)
        for b in blocks
    ] + [
        b.norm1.register_forward_hook(lambda m, a, out: attention_inputs.append(out))
        for b in blocks
    ]
    planned = token_merging.plan_merge

    def recording(x, *args):
        metrics.append(x)
        return planned(x, *args)

    monkeypatch.setattr(token_merging, "plan_merge", recording)
    try:
        image(engine, request(num_inference_steps=1, guidance_scale=1.0))
    finally:
        for handle in handles:
            handle.remove()
    assert metrics and all(any(x is b for b in block_inputs) for x in metrics)
    assert not any(x is a for x in metrics for a in attention_inputs)


def test_merged_images_are_deterministic_and_independent_of_their_batch(engine):
    plain = image(engine, request(False))
    merged = image(engine, request())
    assert not np.array_equal(plain, merged)
    assert np.array_equal(image(engine, request()), merged)
    assert np.array_equal(image(engine, request(False)), plain)  # no hook left behind

    alone = image(engine, request(seed=8, width=128, height=96))
    outputs = engine.generate(
        [request(seed=8, width=128, height=96), request(seed=3, samples=2, width=128, height=96)]
    )
    assert outputs[0].batch_size == 3
    assert np.abs(outputs[0].images[0].astype(int) - alone).max() <= 1


def test_step_batching_keeps_merged_and_plain_requests_apart(engine):
    batcher = ContinuousBatcher(engine, max_running_images=8)
    merged = batcher.submit(request(seed=8))
    plain = batcher.submit(request(False, seed=8))
    batcher.run_until_idle()
    assert (
        np.abs(merged.result(60).images[0].astype(int) - image(engine, request(seed=8))).max() <= 1
    )
    assert np.array_equal(plain.result(60).images[0], image(engine, request(False, seed=8)))


def test_the_optimized_path_runs_merged_requests_eager_and_others_compiled(engine, tiny_model_dir):
    from service.engine.optimize import OptimizationConfig, runner_for

    config = OptimizationConfig(
        enabled=True, compile=True, compile_backend="eager", triton_kernels=False
    )
    optimized = Engine({"a": tiny_model_dir}, optimizations=config)
    plain = image(optimized, request(False))
    stats = runner_for(optimized.load("a")).stats
    compiled, eager = stats.compiled_calls, stats.eager_calls
    assert compiled > 0
    merged = image(optimized, request())
    assert stats.compiled_calls == compiled and stats.eager_calls == eager + 3  # 3 steps
    # the same merge as the stock engine's (fused QKV and fp32 latents: rounding only)
    assert np.abs(merged.astype(int) - image(engine, request())).max() <= 2
    assert np.array_equal(image(optimized, request(False)), plain)
    assert stats.compiled_calls == compiled + 3
