"""The GroupNorm+SiLU Triton kernel against its torch reference, through Triton's CPU interpreter.

Every case draws fresh random inputs (its own seed, a random offset and scale) and compares
with the float64 reference by ‖out − ref‖ / ‖ref‖; shapes include channel counts and group
sizes that are not powers of two, odd H×W, both memory layouts, and fp32/fp16/bf16.
"""

# ruff: noqa: E402
import os

import pytest
import torch

pytest.importorskip("triton")

from diffusers import AutoencoderKL
from diffusers.models.resnet import ResnetBlock2D

from service.engine.kernels import (
    group_norm_silu,
    group_norm_silu_reference,
    group_norm_silu_triton,
    triton_runs_on,
)
from service.engine.kernels.group_norm_silu import _launch
from service.engine.optimize import GroupNormSiLU, fuse_group_norm_silu, unfuse_group_norm_silu

# Relative error allowed against float64, per dtype: fp32 arithmetic is far under 1e-5; fp16 and
# bf16 outputs are rounded once (unit roundoff 4.9e-4 and 3.9e-3).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

CASES = [
    # (N, C, H, W, groups, channels_last, dtype, with_add)
    (2, 40, 8, 8, 4, False, torch.float32, False),  # 10 channels per group
    (2, 40, 8, 8, 4, True, torch.float32, True),
    (3, 30, 5, 7, 3, True, torch.float32, True),  # odd H×W, 10 per group
    (1, 12, 3, 3, 4, False, torch.float32, True),  # 3 per group
    (2, 96, 6, 10, 32, True, torch.float32, False),  # SD2-like: 32 groups of 3
    (1, 320, 4, 4, 32, True, torch.bfloat16, True),  # SD2's first stage, 10 per group
    (2, 64, 9, 9, 32, False, torch.float16, True),
    (2, 24, 16, 16, 8, True, torch.float16, False),
    (1, 8, 1, 1, 2, False, torch.float32, False),  # one pixel: variance over 4 channels only
]


def _inputs(case_index: int, n, c, h, w, channels_last, dtype, with_add):
    g = torch.Generator().manual_seed(1000 + case_index * 7919 + int.from_bytes(os.urandom(2)))
    offset, scale = torch.randn(2, generator=g).tolist()
    x = torch.randn(n, c, h, w, generator=g) * (1 + abs(scale) * 3) + offset * 4
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, generator=g)
    bias = torch.randn(c, generator=g)
    add = torch.randn(n, c, generator=g) if with_add else None
    cast = [t if t is None else t.to(dtype) for t in (x, weight, bias, add)]
    if channels_last:
        cast[0] = cast[0].contiguous(memory_format=torch.channels_last)
    return cast


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def test_interpreter_is_on_for_these_tests():
    """tests/conftest.py sets TRITON_INTERPRET=1 before anything imports Triton."""
    assert triton_runs_on("cpu")


@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_torch_reference(case):
    n, c, h, w, groups, channels_last, dtype, with_add = CASES[case]
    x, weight, bias, add = _inputs(case, n, c, h, w, channels_last, dtype, with_add)
    reference = group_norm_silu_reference(
        x.double(),
        weight.double(),
        bias.double(),
        groups,
        1e-5,
        None if add is None else add.double(),
    )
    torch_same_dtype = group_norm_silu_reference(x, weight, bias, groups, 1e-5, add)

    out = group_norm_silu(x, weight, bias, groups, 1e-5, add)

    assert out.shape == x.shape and out.dtype == dtype
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout)
    assert torch.isfinite(out).all()
    error = _rel(out, reference)
    assert error <= max(TOLERANCE[dtype], 1.5 * _rel(torch_same_dtype, reference))


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_output_element_is_written(channels_last):
    x, weight, bias, add = _inputs(99, 2, 20, 6, 5, channels_last, torch.float32, True)
    poisoned = torch.full_like(x, float("nan"))
    _launch(x, weight, bias, 5, 1e-5, add, out=poisoned)
    assert torch.isfinite(poisoned).all()
    reference = group_norm_silu_reference(x.double(), weight.double(), bias.double(), 5, 1e-5, add)
    assert _rel(poisoned, reference) <= 1e-5


def test_large_mean_small_spread_keeps_precision():
    """Welford statistics: no E[x²] − E[x]² cancellation when |mean| ≫ std."""
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(2)))
    x = 1000.0 + torch.randn(2, 16, 8, 8, generator=g)  # E[x²] - E[x]² in fp32: ~6 % off
    weight, bias = torch.ones(16), torch.zeros(16)
    out = group_norm_silu(x, weight, bias, 4, 1e-6)
    reference = group_norm_silu_reference(x.double(), weight.double(), bias.double(), 4, 1e-6)
    assert _rel(out, reference) <= 1e-4


def test_rejects_channels_not_divisible_into_groups():
    x = torch.randn(1, 10, 4, 4)
    with pytest.raises(ValueError, match="num_groups"):
        _launch(x, torch.ones(10), torch.zeros(10), 4, 1e-5, None)


def test_traces_with_fake_tensors_for_torch_compile():
    """The registered op has a shape-only fake: torch.compile can trace through it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.randn(2, 40, 8, 8).contiguous(memory_format=torch.channels_last)
    weight, bias, add = torch.randn(40), torch.randn(40), torch.randn(2, 40)
    graph = make_fx(lambda x, w, b, a: group_norm_silu(x, w, b, 4, 1e-5, a), tracing_mode="fake")(
        x, weight, bias, add
    )
    assert "sdserve.group_norm_silu" in graph.code
    compiled = torch.compile(
        lambda x: group_norm_silu_triton(x, weight, bias, 4, 1e-5, add),
        backend="eager",
        fullgraph=True,  # the op traces without a graph break
    )
    expected = group_norm_silu_reference(x, weight, bias, 4, 1e-5, add)
    assert torch.allclose(compiled(x), expected, atol=1e-5, rtol=1e-5)


def test_fused_resnet_block_matches_diffusers():
    """A ResNet block with a time embedding: norm1→SiLU and (x + temb)→norm2→SiLU fused."""
    torch.manual_seed(int.from_bytes(os.urandom(2)))
    block = ResnetBlock2D(in_channels=24, out_channels=40, temb_channels=16, groups=4).eval()
    x = torch.randn(2, 24, 6, 6)
    temb = torch.randn(2, 16)
    with torch.inference_mode():
        expected = block(x, temb)
        assert fuse_group_norm_silu(block) == 2
        assert isinstance(block.norm1, GroupNormSiLU)
        fused = block(x, temb)
        unfuse_group_norm_silu(block)
        again = block(x, temb)
    assert _rel(fused, expected.double()) <= 1e-5
    assert torch.equal(again, expected)


def test_fused_vae_decoder_matches_diffusers():
    torch.manual_seed(int.from_bytes(os.urandom(2)))
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    ).eval()
    latents = torch.randn(1, 4, 4, 4)
    with torch.inference_mode():
        expected = vae.decode(latents, return_dict=False)[0]
        fused_pairs = fuse_group_norm_silu(vae.decoder)
        out = vae.decode(latents, return_dict=False)[0]
    # 2 norms in each of the mid block's 2 and the up blocks' 2 × 2 resnets, + conv_norm_out
    assert fused_pairs == 2 * (2 + 4) + 1
    assert _rel(out, expected.double()) <= 1e-5
