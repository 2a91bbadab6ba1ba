"""Self-attention guidance (a request's `self_attention`): sharper detail for one more UNet pass.

SAG (Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance",
ICCV 2023, arXiv:2210.00939). At each step the UNet's middle self-attention tells which latent
regions the model attends to most (a key whose attention, summed over all queries and averaged
over heads, exceeds 1). The predicted clean latent x0 is blurred in those regions (Gaussian, 9
taps, sigma 1), noised back to the step's level with the predicted noise, and run through the
UNet with the unconditional text; the guided prediction is pushed away from that degraded one:

    eps += scale * (eps_uncond - eps_degraded)          (with classifier-free guidance)
    eps += scale * (eps - eps_degraded)                  (without: the conditional pass)

The scale is diffusers' default, 0.75. x0 and the noise are predicted from the model output
through the scheduler's `alphas_cumprod` at an integer timestep, so SAG needs a scheduler with
integer timesteps (`SAG_SCHEDULERS`); sigma-based ones (Euler, Heun, LMS, KDPM2, IPNDM) are not.
The attention probabilities are recomputed from the middle block's own query and key
projections in a forward pre-hook (the block itself keeps its fast SDPA or fused kernels), on the
thread that installed the hook and only for the rows that asked for SAG.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.schedulers import (
    SAG_SCHEDULERS,  # noqa: F401  (re-exported)
    add_noise,
)

SAG_SCALE = 0.75
BLUR_KERNEL = 9
BLUR_SIGMA = 1.0


class AttentionCapture:
    """The middle block's self-attention probabilities, for chosen rows of the next UNet call.

    Use as a context manager around exactly one UNet forward; `probs` is then
    (len(rows), heads, tokens, tokens) and `grid` the middle block's (h, w).
    """

    def __init__(self, unet: nn.Module, rows: list[int]) -> None:
        block = unet.mid_block.attentions[0]
        self._block = block
        self._attention = block.transformer_blocks[0].attn1
        self._rows = rows
        self.probs: torch.Tensor | None = None
        self.grid: tuple[int, int] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[AttentionCapture]:
        thread = threading.get_ident()
        rows = torch.tensor(self._rows, dtype=torch.long)

        def before(module, args):
            if threading.get_ident() == thread:
                self.probs = _attention_probs(module, args[0][rows.to(args[0].device)])

        def after(module, args, output):
            if threading.get_ident() == thread:
                self.grid = tuple(output[0].shape[-2:])

        handles = [
            self._attention.register_forward_pre_hook(before),
            self._block.register_forward_hook(after),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def _attention_probs(attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) per head, from the block's own projections, in fp32."""
    rows, tokens, _ = hidden.shape
    heads = attention.heads
    query = attention.to_q(hidden).float().reshape(rows, tokens, heads, -1).transpose(1, 2)
    key = attention.to_k(hidden).float().reshape(rows, tokens, heads, -1).transpose(1, 2)
    return (query @ key.transpose(-1, -2) * attention.scale).softmax(dim=-1)


def predict_x0_and_eps(
    scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise implied by one model output at an integer timestep."""
    alpha = scheduler.alphas_cumprod[int(timestep)].to(sample.device, sample.dtype)
    a, b = alpha.sqrt(), (1 - alpha).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - b * model_output) / a, model_output
    if kind == "v_prediction":
        return a * sample - b * model_output, b * sample + a * model_output
    if kind == "sample":
        return model_output, (sample - a * model_output) / b
    raise ValueError(f"self_attention: prediction type {kind!r} is not supported")


def gaussian_blur(latents: torch.Tensor) -> torch.Tensor:
    half = (BLUR_KERNEL - 1) / 2
    x = torch.linspace(-half, half, BLUR_KERNEL)
    taps = torch.exp(-0.5 * (x / BLUR_SIGMA) ** 2)
    taps = (taps / taps.sum()).to(latents.device, latents.dtype)
    channels = latents.shape[1]
    kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, BLUR_KERNEL, BLUR_KERNEL)
    padded = F.pad(latents, [BLUR_KERNEL // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=channels)


def degrade(
    scheduler,
    x0: torch.Tensor,
    eps: torch.Tensor,
    probs: torch.Tensor,
    grid: tuple[int, int],
    timestep: torch.Tensor,
) -> torch.Tensor:
    """x0 blurred where the middle attention concentrates, noised back to `timestep`."""
    rows, channels, height, width = x0.shape
    attended = probs.mean(dim=1).sum(dim=1) > 1.0  # (rows, tokens): keys attended most
    mask = attended.reshape(rows, 1, *grid).to(x0.dtype).expand(-1, channels, -1, -1)
    mask = F.interpolate(mask, (height, width))
    blurred = gaussian_blur(x0) * mask + x0 * (1 - mask)
    return add_noise(scheduler, blurred, eps, timestep.reshape(1))
