"""The generator deployment: one engine per replica, requests batched by compatible shape."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from ray import serve

from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str):
    import torch

    if setting == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return getattr(torch, setting)


def split_by_images(batch: list[int], samples: list[int], max_images: int) -> list[list[int]]:
    """Greedy split of request indices into chunks of at most `max_images` images each."""
    chunks: list[list[int]] = []
    current: list[int] = []
    total = 0
    for index in batch:
        if current and total + samples[index] > max_images:
            chunks.append(current)
            current, total = [], 0
        current.append(index)
        total += samples[index]
    if current:
        chunks.append(current)
    return chunks


class Generator:
    """Holds the diffusion engine; `@serve.batch` collects requests, which are grouped by
    `GenerationParams.batch_key()` so that each group is one pipeline call."""

    def __init__(
        self,
        settings: Settings,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_batch_images: int,
    ):
        from service.engine.pipeline import Engine

        device = resolve_device(settings.device)
        self.engine = Engine(
            settings.model_paths(), device=device, dtype=resolve_dtype(settings.dtype, device)
        )
        for model_id in settings.model_paths():
            self.engine.load(model_id)
            if settings.warmup:
                self.engine.warmup(model_id)
        self.max_batch_images = max_batch_images
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("generator ready on %s with models %s", device, sorted(settings.models))

    async def generate(self, params: GenerationParams) -> GenerationOutput:
        result = await self._batched(params)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def _batched(self, requests: list[GenerationParams]) -> list:
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, params in enumerate(requests):
            groups[params.batch_key()].append(index)
        samples = [params.samples for params in requests]
        for indices in groups.values():
            for chunk in split_by_images(indices, samples, self.max_batch_images):
                try:
                    outputs = await asyncio.to_thread(
                        self.engine.generate, [requests[i] for i in chunk]
                    )
                except Exception as exc:  # one failing group must not fail the others
                    log.exception("generation failed for a group of %d requests", len(chunk))
                    outputs = [exc] * len(chunk)
                for index, output in zip(chunk, outputs, strict=True):
                    results[index] = output
        return results
