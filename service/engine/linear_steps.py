"""Scheduler steps that never make the CPU wait for the GPU.

Some diffusers schedulers copy a table entry to the device inside `step` (UniPC, sdserve's
default, does so several times a step and solves a small linear system there). Each such copy
blocks the host until the GPU has finished the UNet forward, so the GPU then sits idle while
Python finishes the step and prepares the next one: ~0.3-0.5 ms per request per step of CPU
time, paid again by every request of a batch.

A deterministic scheduler's step is linear: the latents after any step are a fixed combination
of the initial latents and the model outputs so far, with coefficients that depend only on the
schedule. So the scheduler runs on a *twin* on the CPU — a row of coefficients over those
tensors, float64 — fed a one-hot row for each new model output, and the device only computes
coefficients · tensors. The scheduler's own code and configuration (Karras sigmas, solver
order, v-prediction, ...) run unchanged; what changes is that the device work is one small
weighted sum per request per step, queued without waiting.

Not linear, so stepped directly: schedulers that draw noise inside `step` (ancestral, DDPM,
SDE variants, LCM), DDIM with `eta` > 0, and sample clipping or dynamic thresholding. The ones
taken accept a `generator` but draw nothing with it in these configurations (Euler only with
`s_churn` > 0, which sdserve never passes), so the request's generators advance as they would
stepping directly.
"""

from __future__ import annotations

from typing import Any

import torch

LINEAR_SCHEDULERS = frozenset(
    {
        "DDIMScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "IPNDMScheduler",
    }
)


def is_linear(scheduler: Any, step_kwargs: dict) -> bool:
    """Whether `scheduler.step` (with `step_kwargs`) is linear in the sample and model outputs."""
    config = scheduler.config
    return (
        type(scheduler).__name__ in LINEAR_SCHEDULERS
        and not config.get("thresholding", False)
        and not config.get("clip_sample", False)
        and "sde" not in str(config.get("algorithm_type", ""))
        and not step_kwargs.get("eta")
    )


class LinearStepper:
    """Steps one request's latents through its scheduler by way of the CPU twin.

    `latents` are the pass's initial latents (noise already scaled by the scheduler);
    `model_calls` bounds the model outputs the pass will take (its timesteps).
    """

    def __init__(self, latents: torch.Tensor, model_calls: int) -> None:
        capacity = model_calls + 1
        # basis[0]: the initial latents, basis[k + 1]: the k-th model output
        self.basis = latents.new_empty((capacity, *latents.shape))
        self.basis[0].copy_(latents)
        self.size = 1
        self.twin = torch.zeros(1, capacity, dtype=torch.float64)
        self.twin[0, 0] = 1.0
        self._pin = latents.device.type == "cuda"

    def step(
        self, scheduler: Any, model_output: torch.Tensor, timestep: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """The latents after one `scheduler.step` with `model_output`, without a host wait."""
        if self.size == self.basis.shape[0]:
            raise RuntimeError("LinearStepper: more model outputs than the pass has timesteps")
        k = self.size
        self.basis[k].copy_(model_output)
        self.size += 1
        unit = torch.zeros_like(self.twin)
        unit[0, k] = 1.0
        self.twin = scheduler.step(unit, timestep, self.twin, **kwargs, return_dict=False)[0]
        coefficients = self.twin[0, : self.size].to(self.basis.dtype)
        if self._pin:  # a pinned source makes the copy asynchronous
            coefficients = coefficients.pin_memory()
        coefficients = coefficients.to(self.basis.device, non_blocking=True)
        basis = self.basis[: self.size]
        # A multiply and a sum, not a matmul: a matmul may run in TF32 where a deployment
        # allows it, and these latents are carried for every remaining step.
        weights = coefficients.reshape(-1, *([1] * (basis.dim() - 1)))
        return (weights * basis).sum(0)
