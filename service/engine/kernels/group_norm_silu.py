"""GroupNorm followed by SiLU (optionally after adding a per-channel bias) as one Triton op.

Every ResnetBlock2D of the SD2 UNet and VAE runs `silu(group_norm(x [+ temb]))` twice. In eager
torch that is 4-5 passes over the activation (add, norm statistics, normalize, SiLU); here it is
three: one read for per-channel statistics, one read and one write for normalize + SiLU. Both
NCHW and channels_last inputs are read in their own layout (no copies), statistics are computed
in float32 with Welford's method (no E[x²] - E[x]² cancellation), and the output keeps the
input's dtype and memory format.

Three launches: per-channel partial statistics over chunks of H×W (enough programs to fill the
GPU even at batch 1), a per-group combine into mean and 1/std, then the elementwise pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; the CPU venv installs it for the interpreter.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

OP_NAME = "sdserve::group_norm_silu"
TILE_ELEMENTS = 4096  # elements per program tile on a GPU: 8 KiB of bf16, 16 KiB of fp32
INTERPRETER_TILE_ELEMENTS = 1 << 18  # the CPU interpreter pays per program: few, large tiles
MAX_SPLITS = 64  # H×W chunks per channel in the statistics pass (the combine loads them at once)
GPU_PROGRAMS_TARGET = 4 * 132  # ~4 programs per SM of an H100 in the statistics pass


def group_norm_silu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """`silu(group_norm(x + add))` in plain torch: the definition the kernel must match.

    `add` is one value per (sample, channel), shape (N, C) or (N, C, 1, 1), like a ResNet
    block's projected time embedding.
    """
    if add is not None:
        x = x + add.reshape(add.shape[0], add.shape[1], 1, 1)
    return F.silu(F.group_norm(x, num_groups, weight, bias, eps))


def triton_available() -> bool:
    """Whether Triton can be imported at all."""
    return triton is not None


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter: `TRITON_INTERPRET=1` must have been
    set before Triton was first imported (its own library functions are built then)."""
    if triton is None or not triton.knobs.runtime.interpret:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_apply_silu_kernel, InterpretedFunction)


def triton_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton kernels run for tensors on `device`: CUDA, or CPU when interpreting."""
    device = torch.device(device)
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """`silu(group_norm(x + add))` through the Triton kernels where they run, else the reference.

    It goes through a registered torch op (`torch.ops.sdserve.group_norm_silu`), so torch.compile
    keeps it as one opaque call (no graph break) and CUDA graphs capture its three launches.
    """
    if not triton_runs_on(x.device) or x.dim() != 4:
        return group_norm_silu_reference(x, weight, bias, num_groups, eps, add)
    return group_norm_silu_triton(x, weight, bias, num_groups, eps, add)


def group_norm_silu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton op itself, no fallback: for modules that checked `triton_runs_on` once when
    they were built. Under torch.compile it is one opaque call, with no graph break."""
    if add is not None:
        add = add.reshape(add.shape[0], add.shape[1])
    return torch.ops.sdserve.group_norm_silu(x, weight, bias, num_groups, eps, add)


def _launch(x, weight, bias, num_groups, eps, add, *, out=None):
    """Run the three kernels.

    `out` (tests only) is written in place of a fresh output, e.g. one filled with NaN to show
    that every element was written.
    """
    n, c, h, w = x.shape
    if c % num_groups:
        raise ValueError(f"num_groups: {c} channels are not divisible into {num_groups} groups")
    if not _dense(x):
        x = x.contiguous()
    if add is not None:
        add = add.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    hw = h * w
    cpg = c // num_groups
    # Dense in either layout, so H×W is one axis; strides from the layout, not x.stride(), which
    # may hold any value for a dimension of size 1.
    channels_last = not x.is_contiguous()
    if channels_last:
        stride_n, stride_c, stride_hw = hw * c, 1, c
    else:
        stride_n, stride_c, stride_hw = c * hw, hw, 1
    y = torch.empty_like(x) if out is None else out  # same memory format as x
    on_gpu = x.device.type == "cuda"
    block_c, block_hw = _tile(c, hw, channels_last=channels_last, on_gpu=on_gpu)
    c_tiles = triton.cdiv(c, block_c)
    target = GPU_PROGRAMS_TARGET if on_gpu else 1
    splits = max(1, min(MAX_SPLITS, triton.cdiv(hw, block_hw), triton.cdiv(target, n * c_tiles)))
    hw_per_split = triton.cdiv(triton.cdiv(hw, splits), block_hw) * block_hw
    splits = triton.cdiv(hw, hw_per_split)

    # The statistics pass carries three fp32 accumulators per tile element: 8 warps keep them
    # at 48 registers a thread. (The interpreter takes no launch options.)
    options = {"num_warps": 8} if on_gpu else {}
    partials = torch.empty((n * c * splits * 3,), device=x.device, dtype=torch.float32)
    stats = torch.empty((n * num_groups * 2,), device=x.device, dtype=torch.float32)
    add_arg = add if add is not None else x  # never read when HAS_ADD is False
    _channel_stats_kernel[(splits, c_tiles, n)](
        x,
        add_arg,
        partials,
        c,
        hw,
        splits,
        hw_per_split,
        stride_n,
        stride_c,
        stride_hw,
        HAS_ADD=add is not None,
        BLOCK_C=block_c,
        BLOCK_HW=block_hw,
        **options,
    )
    # One group per program on a GPU (many tiny programs are cheap there); all groups of a
    # sample in one program for the interpreter.
    block_g = 1 if on_gpu else triton.next_power_of_2(num_groups)
    _group_stats_kernel[(n, triton.cdiv(num_groups, block_g))](
        partials,
        stats,
        c,
        cpg,
        num_groups,
        splits,
        eps,
        BLOCK_G=block_g,
        BLOCK_CPG=triton.next_power_of_2(cpg),
        BLOCK_S=triton.next_power_of_2(splits),
    )
    _apply_silu_kernel[(triton.cdiv(hw, block_hw), c_tiles, n)](
        x,
        add_arg,
        stats,
        weight,
        bias,
        y,
        c,
        hw,
        cpg,
        num_groups,
        stride_n,
        stride_c,
        stride_hw,
        HAS_ADD=add is not None,
        BLOCK_C=block_c,
        BLOCK_HW=block_hw,
        **options,
    )
    return y


def _tile(channels: int, hw: int, *, channels_last: bool, on_gpu: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW): on a GPU wide along whichever axis is contiguous in memory."""
    if not on_gpu:
        block_c = min(1024, triton.next_power_of_2(channels))
        return block_c, min(triton.next_power_of_2(hw), INTERPRETER_TILE_ELEMENTS // block_c)
    block_c = min(64 if channels_last else 8, triton.next_power_of_2(channels))
    block_hw = max(16, min(triton.next_power_of_2(hw), TILE_ELEMENTS // block_c))
    return block_c, block_hw


def _register_op():
    """Register `sdserve::group_norm_silu`: an opaque op that torch.compile and CUDA graphs call
    as one unit, with a shape-only fake for tracing."""

    @torch.library.custom_op(OP_NAME, mutates_args=())
    def group_norm_silu_op(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        num_groups: int,
        eps: float,
        add: torch.Tensor | None,
    ) -> torch.Tensor:
        return _launch(x, weight, bias, num_groups, eps, add)

    @group_norm_silu_op.register_fake
    def _(x, weight, bias, num_groups, eps, add):
        return torch.empty_like(x if _dense(x) else x.contiguous())

    return group_norm_silu_op


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


if triton is not None:

    @triton.jit
    def _channel_stats_kernel(
        x_ptr,
        add_ptr,
        partials_ptr,
        C,
        HW,
        SPLITS,
        HW_PER_SPLIT,
        stride_n,
        stride_c,
        stride_hw,
        HAS_ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        """Per channel, over one chunk of H×W: (count, mean, M2) by per-lane Welford."""
        split = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2)
        c_ok = c < C
        base = x_ptr + n.to(tl.int64) * stride_n
        shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        if HAS_ADD:
            shift = tl.load(add_ptr + n * C + c, mask=c_ok, other=0.0).to(tl.float32)
        hw_start = split * HW_PER_SPLIT
        hw_end = tl.minimum(hw_start + HW_PER_SPLIT, HW)
        count = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
        for start in range(hw_start, hw_end, BLOCK_HW):
            hw = start + tl.arange(0, BLOCK_HW)
            ok = c_ok[:, None] & (hw < hw_end)[None, :]
            offsets = c[:, None] * stride_c + hw[None, :] * stride_hw
            value = tl.load(base + offsets, mask=ok, other=0.0).to(tl.float32) + shift[:, None]
            new_count = count + ok.to(tl.float32)
            delta = value - mean
            mean = tl.where(ok, mean + delta / tl.maximum(new_count, 1.0), mean)
            m2 = tl.where(ok, m2 + delta * (value - mean), m2)
            count = new_count
        # Combine the lanes of each channel (Chan et al.'s parallel formula).
        total = tl.sum(count, axis=1)
        channel_mean = tl.sum(count * mean, axis=1) / tl.maximum(total, 1.0)
        spread = mean - channel_mean[:, None]
        channel_m2 = tl.sum(m2 + count * spread * spread, axis=1)
        out = partials_ptr + ((n * C + c) * SPLITS + split) * 3
        tl.store(out, total, mask=c_ok)
        tl.store(out + 1, channel_mean, mask=c_ok)
        tl.store(out + 2, channel_m2, mask=c_ok)

    @triton.jit
    def _group_stats_kernel(
        partials_ptr,
        stats_ptr,
        C,
        CPG,
        G,
        SPLITS,
        eps,
        BLOCK_G: tl.constexpr,
        BLOCK_CPG: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """Per (sample, group): combine the channels' chunks into mean and 1/sqrt(var + eps)."""
        n = tl.program_id(0)
        g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        lane = tl.arange(0, BLOCK_CPG)
        split = tl.arange(0, BLOCK_S)
        ok = (g < G)[:, None, None] & (lane < CPG)[None, :, None] & (split < SPLITS)[None, None, :]
        channel = n * C + g[:, None, None] * CPG + lane[None, :, None]
        at = partials_ptr + (channel * SPLITS + split[None, None, :]) * 3
        count = tl.load(at, mask=ok, other=0.0)
        mean = tl.load(at + 1, mask=ok, other=0.0)
        m2 = tl.load(at + 2, mask=ok, other=0.0)
        total = tl.sum(tl.sum(count, axis=2), axis=1)
        group_mean = tl.sum(tl.sum(count * mean, axis=2), axis=1) / tl.maximum(total, 1.0)
        spread = mean - group_mean[:, None, None]
        variance = tl.sum(tl.sum(m2 + count * spread * spread, axis=2), axis=1)
        variance = variance / tl.maximum(total, 1.0)
        g_ok = g < G
        tl.store(stats_ptr + (n * G + g) * 2, group_mean, mask=g_ok)
        tl.store(stats_ptr + (n * G + g) * 2 + 1, 1.0 / tl.sqrt(variance + eps), mask=g_ok)

    @triton.jit
    def _apply_silu_kernel(
        x_ptr,
        add_ptr,
        stats_ptr,
        weight_ptr,
        bias_ptr,
        y_ptr,
        C,
        HW,
        CPG,
        G,
        stride_n,
        stride_c,
        stride_hw,
        HAS_ADD: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
    ):
        """y = silu((x + add - mean) * rstd * weight + bias), as one fused multiply-add + SiLU."""
        hw = tl.program_id(0) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        n = tl.program_id(2)
        c_ok = c < C
        ok = c_ok[:, None] & (hw < HW)[None, :]
        group = n * G + c // CPG
        mean = tl.load(stats_ptr + group * 2, mask=c_ok, other=0.0)
        rstd = tl.load(stats_ptr + group * 2 + 1, mask=c_ok, other=0.0)
        weight = tl.load(weight_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        scale = rstd * weight
        shift = bias - mean * scale
        if HAS_ADD:
            shift += tl.load(add_ptr + n * C + c, mask=c_ok, other=0.0).to(tl.float32) * scale
        offsets = n.to(tl.int64) * stride_n + c[:, None] * stride_c + hw[None, :] * stride_hw
        value = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        out = value * scale[:, None] + shift[:, None]
        out = out * tl.sigmoid(out)
        tl.store(y_ptr + offsets, out.to(y_ptr.dtype.element_ty), mask=ok)

    _register_op()
