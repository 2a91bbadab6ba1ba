"""Hand-written Triton kernels for the SD2 UNet and VAE, each with a plain-torch reference.

A kernel runs on CUDA, or on CPU through Triton's interpreter (`TRITON_INTERPRET=1`, for tests);
anywhere else the torch reference runs. `OptimizationConfig.triton_kernels` is the switch.
"""

from service.engine.kernels.group_norm_silu import (
    group_norm_silu,
    group_norm_silu_reference,
    group_norm_silu_triton,
    triton_available,
    triton_runs_on,
)

__all__ = [
    "group_norm_silu",
    "group_norm_silu_reference",
    "group_norm_silu_triton",
    "triton_available",
    "triton_runs_on",
]
