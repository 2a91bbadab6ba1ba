"""Step-level batching in the generator deployment: the alternative to `@serve.batch`.

A loop thread owns the engine and runs `ContinuousBatcher.step()` back to back while any request
is waiting or running, and sleeps on a condition otherwise. `generate` (on the replica's event
loop) submits a request and awaits its future, so a request joins the running set at the next
denoising step instead of waiting for a whole batch to finish.

Metrics are the request mode's, per step: queue wait (submit to admission), batch size (images
in each UNet forward), GPU-seconds and cost (each iteration's wall time, once), images and the
inference stage (admission to decoded images) per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal

from service.engine.continuous import ContinuousBatcher, StepReport
from service.engine.protocol import GenerationOutput, GenerationParams
from service.metrics import Metrics, NoMetrics, resolution_bucket

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long the idle loop sleeps between checks of its stop flag

STEP_ENGINE_METHODS = ("start_requests", "denoise_step", "decode_states", "activate_loras")


def supports_step_batching(engine: object) -> bool:
    """Whether an engine exposes the denoising-step interface (service.engine.pipeline:Engine
    does; the BlankEngine, which has no steps, does not)."""
    return all(callable(getattr(engine, name, None)) for name in STEP_ENGINE_METHODS)


class StepBatching:
    """The generator's step loop: one thread, one `ContinuousBatcher`, futures per request."""

    def __init__(
        self,
        engine,
        *,
        max_running_images: int,
        admission: str,
        metrics: Metrics | NoMetrics,
        gpu_hour_price_usd: Decimal,
        device: str = "cpu",
        queue_depth: Callable[[], int] = lambda: 0,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        """`queue_depth` gives the requests waiting outside the batcher (model loads) to add to
        the gauge; `on_fatal` is told of an error that leaves the device unusable."""
        self.batcher = ContinuousBatcher(
            engine, max_running_images, admission, on_step=self._record
        )
        self.metrics = metrics
        self.gpu_hour_price_usd = gpu_hour_price_usd
        self.device = device
        self._outside_queue = queue_depth
        self._on_fatal = on_fatal
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._turned_at = time.monotonic()  # the loop's last turn: a step, or an idle wait

    def start(self) -> None:
        """Start the loop thread (after warm-up, so the first step finds a warm engine)."""
        if self._thread is None:
            self._turned_at = time.monotonic()
            self._thread = threading.Thread(
                target=self._loop, name="sdserve-step-loop", daemon=True
            )
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def generate(self, params: GenerationParams) -> GenerationOutput:
        """Submit and wait; a cancelled caller's request leaves the batch at the next step."""
        if params.vae is not None or params.embeddings:
            # Checking these loads files (a custom VAE onto the device): off the event loop,
            # which every other request of this replica is waiting on. Submitting checks again,
            # from what is then cached.
            await asyncio.to_thread(self.batcher.engine.check_request, params)
        future = self.batcher.submit(params)
        self.metrics.set_queue_depth(self.queue_depth())
        return await asyncio.wrap_future(future)

    def queue_depth(self) -> int:
        return self._outside_queue() + self.batcher.waiting()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No step runs inside: for warm-ups, reloads and unloads from other threads."""
        with self.batcher.exclusive():
            yield

    def stalled(self, limit_s: float) -> str | None:
        """Why the loop is stuck (its thread died, or no turn in `limit_s`), else None. An
        idle loop turns every IDLE_WAIT_S; a hung step (a device that never answers) does not."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopped.is_set():
            return "the step loop thread has died"
        since = time.monotonic() - self._turned_at
        if since > limit_s:
            return f"no denoising step has finished for {since:.0f} s"
        return None

    def _loop(self) -> None:
        while not self._stopped.is_set():
            self._turned_at = time.monotonic()
            try:
                report = self.batcher.step()
            except Exception:  # step() fails requests, not itself; never let the loop die
                log.exception("step loop iteration failed")
                continue
            if report is None:
                self._turned_at = time.monotonic()
                # nothing stepped: a cancelled request may still have left the queue
                self.metrics.set_queue_depth(self.queue_depth())
                self.batcher.wait_for_work(IDLE_WAIT_S)

    def _record(self, report: StepReport) -> None:
        """Metrics of one step, recorded before its requests' futures are settled."""
        model = report.model_id
        for _, wait_s in report.admitted:
            self.metrics.stage("queue", model, wait_s)
        self.metrics.step_done(model, report.images, report.seconds, self.gpu_hour_price_usd)
        resolution = resolution_bucket(report.width, report.height)
        for params, seconds in report.finished:
            self.metrics.images_done(model, resolution, params.samples, seconds)
        self.metrics.set_queue_depth(self.queue_depth())
        if report.failed:
            log.warning("%d requests failed in a step of %s", len(report.failed), model)
        if report.error is not None and self._on_fatal is not None:
            self._on_fatal(report.error)
        if self.device.startswith("cuda") and report.finished:
            import torch

            self.metrics.set_gpu_memory(
                torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            )
