"""The generator deployment: one engine per replica, requests batched by compatible shape."""

from __future__ import annotations

import asyncio
import importlib
import logging
import pickle
import threading
import time
from collections import Counter, defaultdict

from ray import serve

from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams, TextToImageEngine
from service.metrics import get_metrics, resolution_bucket
from service.serving.continuous import StepBatching, supports_step_batching
from service.serving.logs import route_service_logs_through_serve

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> str:
    import torch

    if setting != "auto":
        return setting
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(setting: str, device: str, optimized: bool = False):
    import torch

    if setting == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        # bf16 has fp32's range: no SD2 attention overflow (black/NaN images) at 768.
        return torch.bfloat16 if optimized else torch.float16
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


class ReplicaUnusable(RuntimeError):
    """This replica's accelerator hit an unrecoverable error: the request did not run here,
    and the ingress sends it again, to the replica that replaces this one or another."""


class Generator:
    """Holds the diffusion engine. `batching="request"`: `@serve.batch` collects requests,
    which are grouped by `GenerationParams.batch_key()` so that each group is one pipeline
    call. `batching="step"`: requests join a running batch at the next denoising step
    (service/serving/continuous.py, docs/batching.md)."""

    def __init__(
        self,
        settings: Settings,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_batch_images: int,
        engine: str = "service.engine.pipeline:Engine",
        batching: str = "request",
        max_running_images: int = 16,
        admission: str = "oldest_first",
    ):
        route_service_logs_through_serve()
        engine_class = import_object(engine)
        device = resolve_device(settings.device)
        self.device = device
        self.settings = settings
        self.metrics = get_metrics()
        from service.engine.optimize import OptimizationConfig  # torch: replicas only

        optimizations = OptimizationConfig.for_device(device, **settings.engine_optimizations())
        self.engine: TextToImageEngine = engine_class(
            settings.model_paths(),
            device=device,
            dtype=resolve_dtype(settings.dtype, device, optimizations.enabled),
            loras=settings.lora_paths(),
            embeddings=settings.embedding_paths(),
            vaes=settings.vae_paths(),
            token_merging_ratio=settings.tomesd_ratio or None,
            max_loaded_models=settings.max_loaded_models,
            vae_batch_size=settings.vae_batch_size,
            optimizations=optimizations,
        )

        # Ray Serve routes a request to a replica that already holds its model (the ingress
        # sets multiplexed_model_id); the engine's own LRU bounds the memory.
        async def load_model(model_id: str) -> str:  # a plain function: Serve tags it
            return await self._load_model(model_id)

        self._get_model = serve.multiplexed(max_num_models_per_replica=settings.max_loaded_models)(
            load_model
        )
        self.safety = None  # a service.engine.safety.SafetyChecker when one is configured
        if settings.safety_checker:
            from service.engine.safety import SafetyChecker  # torch: replicas only

            self.safety = SafetyChecker(settings.safety_checker, device=device)
        self.upscaler = None  # a service.engine.upscaler.Upscaler when one is configured
        if settings.upscaler:
            import torch

            from service.engine.upscaler import Upscaler

            self.upscaler = Upscaler(
                settings.upscaler,
                device=device,
                dtype=torch.float16 if device.startswith("cuda") else torch.float32,
                tile=settings.upscaler_tile,
            )
        self.max_batch_images = max_batch_images
        # Requests not yet in a batch (model load, checks, @serve.batch's queue): a set, so
        # that one cancelled anywhere leaves it exactly once.
        self._waiting: set[object] = set()
        self._in_use: Counter[str] = Counter()  # model id -> its requests on this replica
        self._by_token: dict[str, asyncio.Task] = {}  # shared calls' requests, for cancelling
        self._calls = threading.Lock()  # request mode: one pipeline call, warm-up or unload
        # safety checks and upscales, one at a time: each one's device time is its own
        self._post_processing = threading.Lock()
        self._unusable: str | None = None  # a fatal device error: refuse work until replaced
        self._restart_requested = False  # still works, but fails health checks to be replaced
        self._batched.set_max_batch_size(max_batch_size)
        self._batched.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self._steps: StepBatching | None = None
        if batching == "step":
            if supports_step_batching(self.engine):
                self._steps = StepBatching(
                    self.engine,
                    max_running_images=max_running_images,
                    admission=admission,
                    metrics=self.metrics,
                    gpu_hour_price_usd=settings.gpu_hour_price_usd,
                    device=device,
                    queue_depth=lambda: len(self._waiting),
                    on_fatal=self._note_fatal,
                )
            else:
                log.warning("engine %s has no denoising steps: request batching instead", engine)
        for model_id in settings.models_to_preload()[: settings.max_loaded_models]:
            self._load_and_warm(model_id)
        if self._steps is not None:
            self._steps.start()
        log.info(
            "generator ready on %s with models %s, %s batching",
            device,
            self.engine.loaded_models(),
            "step" if self._steps else "request",
        )

    def _engine_to_itself(self):
        """Warm-ups and unloads wait for the current step (step mode) or pipeline call (request
        mode): a warm-up generates without LoRAs, which would switch off a running batch's."""
        return self._steps.exclusive() if self._steps is not None else self._calls

    def _generate_alone(self, chunk: list[GenerationParams]) -> list:
        with self._calls:
            return self.engine.generate(chunk)

    def _note_fatal(self, exc: BaseException) -> None:
        if _is_fatal_device_error(exc):
            self._unusable = f"{type(exc).__name__}: {exc}"[:500]

    def _load_and_warm(self, model_id: str) -> float:
        started = time.perf_counter()
        with self._engine_to_itself():
            self.engine.load(model_id)
            if self.settings.warmup:
                self.engine.warmup(model_id)
        seconds = time.perf_counter() - started
        self.metrics.set_warmup(model_id, seconds)
        return seconds

    async def _load_model(self, model_id: str) -> str:
        """Serve's multiplexed loader: a cold model's load time is the request's wait."""
        if model_id not in self.engine.loaded_models():
            started = time.perf_counter()
            await asyncio.to_thread(self.engine.load, model_id)
            self.metrics.stage("model_load", model_id, time.perf_counter() - started)
        return model_id

    def _refuse_if_unusable(self) -> None:
        if self._unusable is not None:
            raise ReplicaUnusable(f"generator replica unusable: {self._unusable}")

    async def generate(self, params: GenerationParams) -> GenerationOutput:
        self._refuse_if_unusable()
        ticket = object()
        self._waiting.add(ticket)
        self.metrics.set_queue_depth(len(self._waiting))
        self._in_use[params.model_id] += 1
        try:
            return await self._generate_here(params, ticket)
        except Exception as exc:
            if self._unusable is not None and not isinstance(exc, ReplicaUnusable):
                # the device failed under it: sent again, to a working replica
                raise ReplicaUnusable(f"generator replica unusable: {self._unusable}") from exc
            raise
        finally:
            self._in_use[params.model_id] -= 1
            if not self._in_use[params.model_id]:
                del self._in_use[params.model_id]

    async def _generate_here(self, params: GenerationParams, ticket: object) -> GenerationOutput:
        try:
            await self._get_model(params.model_id)
            checked = params.embeddings or params.vae is not None
            if self._steps is None and checked and hasattr(self.engine, "check_request"):
                # A bad embedding or VAE must fail its own request, not the batch it would join
                # (the step batcher checks each request on submit).
                await asyncio.to_thread(self.engine.check_request, params)
            if self._steps is not None:
                self._leave_queue(ticket)
                result = await self._steps.generate(params)
            else:
                result = await self._batched((params, time.perf_counter(), ticket))
                if isinstance(result, Exception):
                    raise result
        finally:  # failed or cancelled (also inside @serve.batch's queue, which drops it)
            self._leave_queue(ticket)
        if params.safety_checker:
            result = await asyncio.to_thread(self._check_safety, params, result)
        if params.upscale > 1:
            result = await asyncio.to_thread(self._upscale, params, result)
        return result

    def _leave_queue(self, ticket: object) -> None:
        if ticket in self._waiting:
            self._waiting.discard(ticket)
            self.metrics.set_queue_depth(len(self._waiting))

    def _upscale(self, params: GenerationParams, output: GenerationOutput) -> GenerationOutput:
        """After the safety check: a flagged image is treated at the size the checker saw."""
        if self.upscaler is None:
            raise RuntimeError("upscale was asked for but this generator has no upscaler")
        with self._post_processing:  # timed alone: waiting for another's turn is no work
            started = time.perf_counter()
            output.images = self.upscaler.upscale(output.images, params.upscale)
            seconds = time.perf_counter() - started
        self.metrics.gpu_work_done(
            "upscale",
            params.model_id,
            seconds,
            self.settings.gpu_hour_price_usd,
        )
        return output

    def _check_safety(self, params: GenerationParams, output: GenerationOutput):
        """Flag the request's images and replace the flagged ones; a request that asked for the
        check never gets an unchecked image (no checker here fails the request)."""
        from service.engine.safety import treat

        if self.safety is None:
            raise RuntimeError("safety_checker was asked for but this generator has no checker")
        with self._post_processing:
            started = time.perf_counter()
            flags = self.safety.flags(output.images)
            seconds = time.perf_counter() - started
        output.images = [
            treat(image, params.safety_checker_type) if flagged else image
            for image, flagged in zip(output.images, flags, strict=True)
        ]
        output.extra["nsfw_flags"] = flags
        self.metrics.gpu_work_done(
            "safety_check",
            params.model_id,
            seconds,
            self.settings.gpu_hour_price_usd,
        )
        self.metrics.safety_checked(params.model_id, sum(flags), len(flags) - sum(flags))
        return output

    async def generate_stream(self, batch: list[GenerationParams], tokens: list[str] | None = None):
        """Requests the ingress sent in one call (see GeneratorFleet), each generated as if it
        had come alone: yields (index, output) as each finishes, a failed one's exception in
        place of its output, so that no request waits for a slower one. `tokens` name the
        requests for `cancel_requests`; one cancelled so yields nothing. Closed early (the
        caller cancelled), it cancels the requests still running."""
        self._refuse_if_unusable()  # the whole call, so that the ingress sends it elsewhere
        tasks = [asyncio.ensure_future(self.generate(params)) for params in batch]
        index = {task: i for i, task in enumerate(tasks)}
        named = dict(zip(tokens or (), tasks, strict=False))
        self._by_token.update(named)
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=index.__getitem__):
                    if task.cancelled():  # by cancel_requests: its caller has gone
                        continue
                    error = task.exception()
                    yield index[task], task.result() if error is None else _sendable(error)
        finally:
            for task in pending:
                task.cancel()
            for token in named:
                self._by_token.pop(token, None)

    async def cancel_requests(self, tokens: list[str]) -> int:
        """Stop the named requests of shared calls (the ingress broadcasts this to every
        replica: a token not here is ignored). Returns how many were running here."""
        cancelled = 0
        for token in tokens:
            task = self._by_token.get(token)
            if task is not None and not task.done():
                task.cancel()
                cancelled += 1
        return cancelled

    # ---- what the enterprise routes ask of a replica -------------------------------------------

    async def load_model(self, model_id: str, reload: bool = False) -> dict:
        """Load (or reload from disk) and warm a model on this replica."""
        if reload:
            await asyncio.to_thread(self._unload, model_id)
        await self._get_model(model_id)
        seconds = await asyncio.to_thread(self._load_and_warm, model_id)
        return {"model_id": model_id, "seconds": round(seconds, 3), **self.details()}

    def clear_cache(self) -> dict:
        """Unload every pipeline no request on this replica needs (one a running batch needs
        would be loaded again inside its next step, stalling every batch); give cached GPU
        memory back."""
        unloaded = [
            m for m in self.engine.loaded_models() if not self._in_use.get(m) and self._unload(m)
        ]
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return {"unloaded": unloaded, **self.details()}

    def request_restart(self) -> dict:
        """Fail the next health check, so Serve replaces this replica; requests that were
        queued here are retried by the ingress on the replacement."""
        self._restart_requested = True
        return self.details()

    def _unload(self, model_id: str) -> bool:
        with self._engine_to_itself():
            return self.engine.unload(model_id)

    def details(self) -> dict:
        from ray import serve as ray_serve

        context = ray_serve.get_replica_context()
        gpu = None
        if self.device.startswith("cuda"):
            import torch

            props = torch.cuda.get_device_properties(0)
            gpu = {
                "name": props.name,
                "memory_total_bytes": props.total_memory,
                "memory_allocated_bytes": torch.cuda.memory_allocated(),
                "memory_peak_bytes": torch.cuda.max_memory_allocated(),
            }
        return {
            "replica": context.replica_tag if context else None,
            "device": self.device,
            "gpu": gpu,
            "loaded_models": self.engine.loaded_models(),
            "queue_depth": self._steps.queue_depth() if self._steps else len(self._waiting),
            "batching": "step" if self._steps else "request",
            "healthy": self._unusable is None and not self._restart_requested,
        }

    def ready(self) -> bool:
        """Models loaded and warmed (the constructor has returned) and no fatal error seen."""
        return self._unusable is None and not self._restart_requested

    def check_health(self) -> None:
        """Serve restarts a replica whose accelerator hit an unrecoverable error, or that was
        asked to restart."""
        if self._unusable is not None:
            raise RuntimeError(f"generator unusable: {self._unusable}")
        if self._restart_requested:
            raise RuntimeError("generator restart requested")
        if self._steps is not None:
            stall = self._steps.stalled(self.settings.step_stall_timeout_s)
            if stall is not None:
                raise RuntimeError(f"generator step loop stuck: {stall}")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def _batched(self, items: list[tuple[GenerationParams, float, object]]) -> list:
        started = time.perf_counter()
        requests = [params for params, _, _ in items]
        for params, enqueued, ticket in items:
            self.metrics.stage("queue", params.model_id, started - enqueued)
            self._waiting.discard(ticket)
        self.metrics.set_queue_depth(len(self._waiting))

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
            outputs = await asyncio.to_thread(self._generate_alone, chunk)
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


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself if it survives pickling on its way back, else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _is_fatal_device_error(exc: BaseException) -> bool:
    """CUDA errors other than out-of-memory leave the context unusable until restart."""
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "NCCL" in text
