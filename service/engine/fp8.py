"""FP8 (e4m3) matmuls for the UNet's transformer linears, on GPUs with FP8 tensor cores.

An H100/H200 multiplies e4m3 at twice its bf16 rate. SD 2.0's UNet spends 27 % of a guided
step's FLOPs in linears (QKV, attention output, GEGLU feed-forward, proj_in/proj_out; counted
with FlopCounterMode at 768 px), 44 % in convolutions and 29 % in attention; torch has no FP8
convolution or SDPA, so only linears change, and not all of them (`convert_linears`).

Weights are quantized once, per output channel; activations per token at each call (dynamic
scaling: no calibration data, and a token with large values does not flatten the others).
`torch._scaled_mm` applies both scales to the fp32 accumulator and writes bf16; under
torch.compile, Inductor fuses each activation's scaling into the kernel that produced it.

The linear modules stay in place with their original weights (peft wraps them for a LoRA,
and `restore_linears` puts the plain forward back); only their `forward` is replaced.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
FP8_ATTRIBUTE = "_sdserve_fp8"  # (weight e4m3 [out, in], scale fp32 [1, out]) on a converted Linear
# _scaled_mm's CUDA kernels need both GEMM dimensions of the weight to be multiples of 16.
ALIGNMENT = 16


def fp8_runs_on(device: str | torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or newer. `_scaled_mm` also runs on CPU
    (slowly; it is how the tests check the numerics)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (rows, k) as e4m3 with one fp32 scale per row: x ≈ q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def _float8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight, weight_scale = getattr(self, FP8_ATTRIBUTE)
    rows = x.reshape(-1, x.shape[-1])
    q, scale = quantize_rows(rows)
    y = torch._scaled_mm(
        q, weight.t(), scale_a=scale, scale_b=weight_scale, out_dtype=torch.bfloat16
    )
    if self.bias is not None:
        y = y + self.bias
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def convertible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.in_features % ALIGNMENT == 0
        and module.out_features % ALIGNMENT == 0
    )


def to_float8(linear: nn.Linear) -> None:
    """Quantize `linear`'s weight (per output channel) and route its forward through FP8."""
    with torch.no_grad():
        weight, scale = quantize_rows(linear.weight)
    setattr(linear, FP8_ATTRIBUTE, (weight, scale.reshape(1, -1).contiguous()))
    linear.forward = types.MethodType(_float8_forward, linear)


def convert_linears(unet: nn.Module) -> int:
    """FP8 for the aligned linears the UNet's transformer blocks call; returns how many.

    Per-token scales follow a token's largest value, so a linear whose input has a few large
    channels, or whose error lands straight on the residual stream, loses more. Measured on
    the full-size UNet (random weights, one guided forward at 32×32 latents with the text
    encoder's embeddings; benchmarks/fp8_sensitivity.py, results/fp8-sensitivity-cpu.json),
    each group alone in FP8 moved the noise prediction by: proj_in 4.1 %, proj_out 4.8 %,
    cross-attention output 2.4 %, cross-attention K/V 1.2 %; the others 0.06-1.1 %. Those
    four groups stay bf16, so FP8 covers 80 % of the linears' FLOPs there (84 % at 96×96
    latents, where the 77 text tokens' K/V are a smaller share) and moves the prediction 1.7 %.

    Also left in bf16: linears outside the blocks (time embedding, resnets' time projections),
    which multiply one row per image, so scaling costs more than FP8 saves; and, with fused
    projections, the separate Q/K/V linears diffusers keeps beside them, never called.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    kept: set[nn.Module] = set()
    for module in unet.modules():
        if isinstance(module, Transformer2DModel):
            kept.update((module.proj_in, module.proj_out))
        if not isinstance(module, Attention):
            continue
        if getattr(module, "to_qkv", None) is not None:
            kept.update((module.to_q, module.to_k, module.to_v))  # fused: not called
        if module.is_cross_attention:
            kept.update((module.to_k, module.to_v, module.to_out[0]))
            if getattr(module, "to_kv", None) is not None:
                kept.add(module.to_kv)
    converted = 0
    for block in unet.modules():
        if not isinstance(block, Transformer2DModel):
            continue
        for module in block.modules():
            if module in kept or hasattr(module, FP8_ATTRIBUTE) or not convertible(module):
                continue
            to_float8(module)
            converted += 1
    return converted


def restore_linears(model: nn.Module) -> int:
    """Undo `convert_linears`: the plain bf16 forward on the original weights again."""
    restored = 0
    for module in model.modules():
        if hasattr(module, FP8_ATTRIBUTE):
            delattr(module, FP8_ATTRIBUTE)
            del module.forward
            restored += 1
    return restored
