"""The generator deployment: one engine per replica, requests batched by compatible shape."""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections import defaultdict

from ray import serve

from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams, TextToImageEngine
from service.metrics import get_metrics, resolution_bucket

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


def import_object(path: str):
    """`package.module:Name` -> the object."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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
        engine: str = "service.engine.pipeline:Engine",
    ):
        engine_class = import_object(engine)
        device = resolve_device(settings.device)
        self.device = device
        self.settings = settings
        self.metrics = get_metrics()
        self.engine: TextToImageEngine = engine_class(
            settings.model_paths(), device=device, dtype=resolve_dtype(settings.dtype, device)
        )
        for model_id in settings.model_paths():
            started = time.perf_counter()
            self.engine.load(model_id)
            if settings.warmup:
                self.engine.warmup(model_id)
            self.metrics.set_warmup(model_id, time.perf_counter() - started)
        self.max_batch_images = max_batch_images
        self._waiting = 0
        self._unusable: str | None = None
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("generator ready on %s with models %s", device, sorted(settings.models))

    async def generate(self, params: GenerationParams) -> GenerationOutput:
        self._waiting += 1
        self.metrics.set_queue_depth(self._waiting)
        result = await self._batched((params, time.perf_counter()))
        if isinstance(result, Exception):
            raise result
        return result

    def ready(self) -> bool:
        """Models loaded and warmed (the constructor has returned) and no fatal error seen."""
        return self._unusable is None

    def check_health(self) -> None:
        """Serve restarts a replica whose accelerator hit an unrecoverable error."""
        if self._unusable is not None:
            raise RuntimeError(f"generator unusable: {self._unusable}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def _batched(self, items: list[tuple[GenerationParams, float]]) -> list:
        started = time.perf_counter()
        requests = [params for params, _ in items]
        for params, enqueued in items:
            self.metrics.stage("queue", params.model_id, started - enqueued)
        self._waiting -= len(items)
        self.metrics.set_queue_depth(self._waiting)

        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for index, params in enumerate(requests):
            groups[params.batch_key()].append(index)
        samples = [params.samples for params in requests]
        for indices in groups.values():
            for chunk in split_by_images(indices, samples, self.max_batch_images):
                results_of_chunk = await self._run_chunk([requests[i] for i in chunk])
                for index, output in zip(chunk, results_of_chunk, strict=True):
                    results[index] = output
        return results

    async def _run_chunk(self, chunk: list[GenerationParams]) -> list:
        """One pipeline call; its failure fails only its own requests."""
        first = chunk[0]
        started = time.perf_counter()
        try:
            outputs = await asyncio.to_thread(self.engine.generate, chunk)
        except Exception as exc:
            log.exception("generation failed for a group of %d requests", len(chunk))
            if _is_fatal_device_error(exc):
                self._unusable = f"{type(exc).__name__}: {exc}"[:500]
            return [exc] * len(chunk)
        self.metrics.batch_done(
            first.model_id,
            resolution_bucket(first.width, first.height),
            sum(params.samples for params in chunk),
            time.perf_counter() - started,
            self.settings.gpu_hour_price_usd,
        )
        if self.device.startswith("cuda"):
            import torch

            self.metrics.set_gpu_memory(
                torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            )
        return outputs


def _is_fatal_device_error(exc: BaseException) -> bool:
    """CUDA errors other than out-of-memory leave the context unusable until restart."""
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "NCCL" in text
