"""Highres fix (a request's `highres_fix`): large images without repeated subjects.

A model denoised at more pixels than it was trained at tends to repeat its subject across the
canvas. The fix, as popularized by the AUTOMATIC1111 web UI: a first pass at the model's native
pixel count (same aspect ratio, multiple of 8), then its latents upscaled (bicubic) to the
requested size, noised back to `HIGHRES_STRENGTH` of the schedule and denoised again from there
(image-to-image on the latents, as diffusers' img2img pipeline starts its schedule part-way).
The second pass takes round(steps x strength) steps, so a request costs its first pass plus that
share of a full-size pass. A request no larger than the native size needs no fix.
"""

from __future__ import annotations

import math

HIGHRES_STRENGTH = 0.6  # share of the schedule the second pass re-denoises
MIN_SIDE = 64


def first_pass_size(
    width: int, height: int, native_width: int, native_height: int
) -> tuple[int, int] | None:
    """(width, height) of the first pass, or None if the request is not above the native pixel
    count: the same aspect ratio scaled to the native pixel count, rounded down to multiples
    of 8."""
    native = native_width * native_height
    if width * height <= native:
        return None
    scale = math.sqrt(native / (width * height))
    return (
        max(MIN_SIDE, int(width * scale) // 8 * 8),
        max(MIN_SIDE, int(height * scale) // 8 * 8),
    )


def second_pass_start(steps: int) -> int:
    """Index of the first step the second pass runs (of `steps`), at least one step run."""
    return steps - max(1, round(steps * HIGHRES_STRENGTH))
