"""ModelsLab scheduler names mapped to diffusers scheduler classes, built per request.

A request names a scheduler (with or without the `Scheduler` suffix), `use_karras_sigmas` and
`algorithm_type`; the scheduler is built from the model's own scheduler config so that its
noise schedule and prediction type (v-prediction for SD 2.0 768-v) carry over.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import diffusers
import numpy as np
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler as _DiffusersLMS
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import is_scipy_available

if TYPE_CHECKING:
    import torch

SUFFIX = "Scheduler"


class _PolynomialLMSDiscreteScheduler(_DiffusersLMS):
    """diffusers' LMS scheduler without scipy: its coefficients integrate a polynomial exactly."""

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sigmas = [float(self.sigmas[t - k]) for k in range(order)]
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != current_order:
                basis *= np.polynomial.Polynomial([-sigmas[k], 1.0]) / (
                    sigmas[current_order] - sigmas[k]
                )
        antiderivative = basis.integ()
        return float(antiderivative(float(self.sigmas[t + 1])) - antiderivative(sigmas[0]))


_PolynomialLMSDiscreteScheduler.__name__ = "LMSDiscreteScheduler"
_PolynomialLMSDiscreteScheduler.__qualname__ = "LMSDiscreteScheduler"

_LMS = _DiffusersLMS if is_scipy_available() else _PolynomialLMSDiscreteScheduler
_CLASSES: dict[str, type[SchedulerMixin]] = {
    "DDPMScheduler": diffusers.DDPMScheduler,
    "DDIMScheduler": diffusers.DDIMScheduler,
    "PNDMScheduler": diffusers.PNDMScheduler,
    "LMSDiscreteScheduler": _LMS,
    "EulerDiscreteScheduler": diffusers.EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": diffusers.EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": diffusers.DPMSolverMultistepScheduler,
    "DPMSolverSinglestepScheduler": diffusers.DPMSolverSinglestepScheduler,
    "HeunDiscreteScheduler": diffusers.HeunDiscreteScheduler,
    "KDPM2DiscreteScheduler": diffusers.KDPM2DiscreteScheduler,
    "KDPM2AncestralDiscreteScheduler": diffusers.KDPM2AncestralDiscreteScheduler,
    "UniPCMultistepScheduler": diffusers.UniPCMultistepScheduler,
    "DEISMultistepScheduler": diffusers.DEISMultistepScheduler,
    "IPNDMScheduler": diffusers.IPNDMScheduler,
    "LCMScheduler": diffusers.LCMScheduler,
}

SCHEDULERS: tuple[str, ...] = tuple(_CLASSES)
"""Canonical scheduler names: the diffusers class names."""

# Schedulers whose timesteps are integers with an `alphas_cumprod` entry, which self-attention
# guidance needs (service/engine/self_attention_guidance.py; checked against every scheduler in
# tests/engine/test_self_attention_guidance.py).
SAG_SCHEDULERS = frozenset(
    {
        "DDPMScheduler",
        "DDIMScheduler",
        "PNDMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "LCMScheduler",
    }
)

# Schedulers that can noise latents to a timestep (`add_noise`), which the highres fix's
# second pass needs; IPNDM cannot.
HIGHRES_SCHEDULERS = frozenset(name for name, cls in _CLASSES.items() if hasattr(cls, "add_noise"))

_BY_LOWER: dict[str, str] = {}
for _name in SCHEDULERS:
    _BY_LOWER[_name.lower()] = _name
    _BY_LOWER[_name.removesuffix(SUFFIX).lower()] = _name

# ModelsLab's names first, then diffusers' own; the value is what diffusers expects.
ALGORITHM_TYPES: dict[str, str] = {
    "dpmsolver+++": "sde-dpmsolver++",
    "dpmsolver++": "dpmsolver++",
    "sde-dpmsolver++": "sde-dpmsolver++",
    "dpmsolver": "dpmsolver",
    "sde-dpmsolver": "sde-dpmsolver",
}
_ALGORITHMS_BY_SCHEDULER: dict[str, frozenset[str]] = {
    "DPMSolverMultistepScheduler": frozenset(
        {"dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"}
    ),
    "DPMSolverSinglestepScheduler": frozenset({"dpmsolver++", "sde-dpmsolver++", "dpmsolver"}),
}
_NO_ALGORITHM = {"", "none", "null", "default"}

# Largest step count each scheduler accepts (LCM distils from 50 original steps).
MAX_STEPS: dict[str, int] = {"LCMScheduler": 50}


@dataclass(frozen=True)
class SchedulerChoice:
    """A validated scheduler request: what will actually be built, and notes on ignored options."""

    name: str
    use_karras_sigmas: bool
    algorithm_type: str | None
    notes: tuple[str, ...] = ()


def canonical_scheduler_name(name: str) -> str:
    """The diffusers class name for a ModelsLab scheduler name (suffix and case optional)."""
    canonical = _BY_LOWER.get(str(name).strip().lower())
    if canonical is None:
        raise ValueError(f"scheduler: unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")
    return canonical


def accepts_karras_sigmas(name: str) -> bool:
    """Whether the scheduler has a sigma schedule that `use_karras_sigmas` can change."""
    return "use_karras_sigmas" in _init_params(_CLASSES[canonical_scheduler_name(name)])


def validate_scheduler_options(
    scheduler: str,
    use_karras_sigmas: bool = False,
    algorithm_type: str | None = None,
    num_inference_steps: int | None = None,
) -> SchedulerChoice:
    """Normalize a request's scheduler options; ValueError names the offending field.

    `use_karras_sigmas` is dropped for schedulers without sigmas and `algorithm_type` for those
    other than DPMSolver (the latter is reported in `notes`, since a client set it on purpose).
    """
    name = canonical_scheduler_name(scheduler)
    notes: list[str] = []
    karras = bool(use_karras_sigmas) and accepts_karras_sigmas(name)

    algorithm = None
    if algorithm_type is not None and str(algorithm_type).strip().lower() not in _NO_ALGORITHM:
        key = str(algorithm_type).strip().lower()
        if key not in ALGORITHM_TYPES:
            raise ValueError(
                f"algorithm_type: unknown algorithm type {algorithm_type!r}; allowed: none, "
                f"{', '.join(ALGORITHM_TYPES)}"
            )
        allowed = _ALGORITHMS_BY_SCHEDULER.get(name)
        if allowed is None:
            notes.append(f"algorithm_type {algorithm_type!r} ignored: {name} does not take one")
        elif ALGORITHM_TYPES[key] not in allowed:
            raise ValueError(
                f"algorithm_type: {algorithm_type!r} is not supported by {name}; allowed: none, "
                f"{', '.join(k for k, v in ALGORITHM_TYPES.items() if v in allowed)}"
            )
        else:
            algorithm = ALGORITHM_TYPES[key]

    if name == "IPNDMScheduler":
        notes.append(
            "IPNDMScheduler is a continuous-time scheduler that ignores the model's prediction "
            "type and timestep range: Stable Diffusion checkpoints give poor images with it"
        )
    if num_inference_steps is not None:
        limit = MAX_STEPS.get(name)
        if num_inference_steps < 1 or (limit is not None and num_inference_steps > limit):
            raise ValueError(
                f"num_inference_steps: {num_inference_steps} is out of range for {name} "
                f"(1..{limit or 'any'})"
            )
    return SchedulerChoice(name, karras, algorithm, tuple(notes))


def build_scheduler(
    base_config: Mapping,
    name: str,
    use_karras_sigmas: bool,
    algorithm_type: str | None,
) -> SchedulerMixin:
    """A fresh scheduler of the requested class, built from the model's scheduler config.

    Each request gets its own instance: multistep schedulers keep per-run state.
    """
    choice = validate_scheduler_options(name, use_karras_sigmas, algorithm_type)
    cls = _CLASSES[choice.name]
    params = _init_params(cls)
    # Keys of other scheduler classes (e.g. PNDM's skip_prk_steps in SD 2.0's DDIM config) would
    # make diffusers log a warning on every request.
    config = {k: v for k, v in base_config.items() if k.startswith("_") or k in params}
    overrides: dict = {}
    if "use_karras_sigmas" in params:
        overrides["use_karras_sigmas"] = choice.use_karras_sigmas
    if choice.algorithm_type is not None:
        overrides["algorithm_type"] = choice.algorithm_type
        if choice.algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            # diffusers rejects the DPM-Solver (non-++) variants with a final sigma of zero.
            overrides["final_sigmas_type"] = "sigma_min"
    final_sigmas_type = overrides.get("final_sigmas_type", config.get("final_sigmas_type", "zero"))
    if choice.name == "DPMSolverSinglestepScheduler" and final_sigmas_type == "zero":
        # diffusers forces this itself in set_timesteps, with a warning each time.
        overrides["lower_order_final"] = True
    return cls.from_config(config, **overrides)


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def add_noise(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor
) -> torch.Tensor:
    """`scheduler.add_noise`, leaving the scheduler's tables on the CPU: DDIM, DDPM, PNDM and
    LCM move `alphas_cumprod` to the latents' device there, after which every step would index
    a device table (and the CPU twin of linear_steps.py would meet a device scalar)."""
    table = getattr(scheduler, "alphas_cumprod", None)
    noised = scheduler.add_noise(latents, noise, timestep)
    if table is not None:
        scheduler.alphas_cumprod = table
    return noised
