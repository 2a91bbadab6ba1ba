"""Step-level continuous batching: requests join the running batch at the next denoising step.

Request-level batching runs a batch from its first step to its last: a request that arrives one
step into a 50-step batch waits for that whole batch, then for its own. Here a loop keeps one
running set per shape bucket (model, LoRA set, resolution) and, at each iteration, picks one
bucket and

1. admits its waiting requests in arrival order while the running set has room; a request's
   text embeddings, scheduler and initial noise are made on admission (`Engine.start_requests`);
2. runs ONE UNet forward over every running request, each row at its own timestep and with its
   own guidance scale, and advances each request's own diffusers scheduler
   (`Engine.denoise_step`);
3. VAE-decodes the requests that took their last step and resolves their futures.

Requests with different step counts and different schedulers share the forward. A request's
"step" is one UNet evaluation: Heun and KDPM2 (two evaluations per sampling step, repeated
entries in their `timesteps`) simply take more of them, driven by their own scheduler. Models,
LoRA sets, resolutions and token merging never share a forward: they are the bucket key.

Fairness. Within a bucket admission is FIFO, and a request that does not fit blocks the ones
behind it (small requests never overtake a large one forever). Across buckets:
`oldest_first` steps the bucket that holds the oldest request, running or waiting — the oldest
request keeps that rank until it finishes, so every request is served after finitely many
steps; `round_robin` steps the buckets with work in turn.

`submit` may be called from any thread; `step` from one thread at a time (the serving layer
runs it in a loop thread, service/serving/continuous.py). No Ray here.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from service.engine.pipeline import Engine, RequestState
from service.engine.protocol import GenerationOutput, GenerationParams
from service.engine.schedulers import SchedulerChoice, validate_scheduler_options

log = logging.getLogger(__name__)

ADMISSION_ORDERS = ("oldest_first", "round_robin")
"""How the loop picks the shape bucket to step next (see the module docstring)."""

STEPS_AHEAD = 2
"""Steps the loop may issue ahead of the device. Nothing in a step waits for a GPU, so without
a bound the loop would queue dozens of steps of the running set, and a request arriving then
would join the forward only after all of them, not at the next step. Two keep the GPU fed: one
runs while the next is queued, and issuing a step takes far less than running it."""


class BucketKey(NamedTuple):
    model_id: str
    loras: tuple
    width: int
    height: int
    tomesd: bool
    highres_fix: bool


def bucket_key(params: GenerationParams) -> BucketKey:
    """Requests with equal keys can share a UNet forward, whatever their step, step count,
    scheduler, guidance or prompt: same weights (model + LoRA set), same latent shape and the
    same attention (with or without token merging). A highres-fix request's two passes have
    two shapes: the engine runs one forward per shape."""
    return BucketKey(
        params.model_id,
        params.loras,
        params.width,
        params.height,
        params.tomesd,
        params.highres_fix,
    )


@dataclass(eq=False)
class Ticket:
    """One submitted request: waiting for admission, then running with its `state`."""

    params: GenerationParams
    choice: SchedulerChoice
    sequence: int  # arrival order, across all buckets
    submitted_at: float
    future: Future = field(default_factory=Future)
    state: RequestState | None = None
    admitted_at: float | None = None
    peak_step_images: int = 0  # the largest UNet batch (in images) this request was part of

    @property
    def samples(self) -> int:
        return self.params.samples


@dataclass(eq=False)
class _Bucket:
    key: BucketKey
    waiting: deque[Ticket] = field(default_factory=deque)
    running: list[Ticket] = field(default_factory=list)

    def running_images(self) -> int:
        return sum(ticket.samples for ticket in self.running)

    def oldest(self) -> int:
        heads = [ticket.sequence for ticket in self.running]
        if self.waiting:
            heads.append(self.waiting[0].sequence)
        return min(heads)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)


class WallTimer:
    """A step's time by the wall clock: right where the device runs work as it is issued (CPU)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def start(self) -> float:
        return self.clock()

    def stop(self, started: float) -> tuple[float, float]:
        return started, self.clock()

    def wait(self, span: tuple[float, float]) -> None:
        pass

    def seconds(self, span: tuple[float, float]) -> float | None:
        return span[1] - span[0]


class CudaEventTimer:
    """A step's device time, from CUDA events recorded around it on the current stream.

    The step loop does not wait for the GPU (it issues steps ahead of it, see linear_steps.py):
    the wall time of a step is the time to issue it, and the step that does wait (a VAE
    decode's copy to the host) would carry the queued steps' GPU time, whatever their model.
    Events are read once they have completed, so timing adds no wait.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _record(self) -> torch.cuda.Event:
        # blocking: a wait for the device sleeps instead of spinning a core the replica's
        # other threads (its request handling) need
        event = torch.cuda.Event(enable_timing=True, blocking=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> torch.cuda.Event:
        return self._record()

    def stop(self, started: torch.cuda.Event) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return started, self._record()

    def wait(self, span: tuple) -> None:
        """Until the step's work (and so all work queued before it) has completed."""
        span[1].synchronize()

    def seconds(self, span: tuple) -> float | None:
        """None while the step's work is still queued."""
        started, ended = span
        if not ended.query():
            return None
        return started.elapsed_time(ended) / 1000


def step_timer(device: torch.device, clock: Callable[[], float] = time.perf_counter):
    """The timer that measures a step's device time on `device`. CUDA events are tried once
    here, every call the loop will make, so that a device without them costs the figures'
    accuracy (the wall clock), never the step loop."""
    if device.type != "cuda":
        return WallTimer(clock)
    timer = CudaEventTimer(device)
    try:
        span = timer.stop(timer.start())
        timer.wait(span)
        timer.seconds(span)
    except Exception:
        log.warning("CUDA event timing failed on %s: steps are timed by the wall clock", device)
        return WallTimer(clock)
    return timer


@dataclass
class StepReport:
    """What one iteration did; the serving layer turns it into metrics."""

    model_id: str
    width: int
    height: int
    admitted: list[tuple[GenerationParams, float]] = field(default_factory=list)  # queue wait s
    requests: int = 0  # requests in the UNet forward
    images: int = 0  # images in the UNet forward: the per-step batch size
    unet_rows: int = 0  # images plus the unconditional rows of guided requests
    finished: list[tuple[GenerationParams, float]] = field(default_factory=list)  # admitted→done s
    failed: list[tuple[GenerationParams, BaseException]] = field(default_factory=list)
    # device time of admission (text encoding, noise) + forward + scheduler steps + decode;
    # set when the step's work has completed, before `on_step` sees the report
    seconds: float = 0.0
    error: BaseException | None = None  # what failed a whole running set, if anything did
    # futures to settle once the report is recorded: (future, output or exception)
    outcomes: list[tuple[Future, object]] = field(default_factory=list, repr=False)


class ContinuousBatcher:
    """Keeps the running sets of one engine and advances them one denoising step at a time."""

    def __init__(
        self,
        engine: Engine,
        max_running_images: int = 16,
        admission: str = "oldest_first",
        clock: Callable[[], float] = time.perf_counter,
        on_step: Callable[[StepReport], None] | None = None,
        timer=None,
        steps_ahead: int = STEPS_AHEAD,
    ) -> None:
        """`max_running_images` bounds one bucket's running set, i.e. one UNet forward (a single
        larger request still runs, alone). `admission` is one of `ADMISSION_ORDERS`.
        `on_step` sees each report, in step order, once its device time is known and before
        its futures are settled (metrics are recorded before a caller can observe the
        result, as with request batching). `timer` measures that time (`step_timer` of the
        engine's device by default); at most `steps_ahead` steps are issued and not yet done
        on the device."""
        if max_running_images < 1:
            raise ValueError(f"max_running_images: must be at least 1, got {max_running_images}")
        if admission not in ADMISSION_ORDERS:
            raise ValueError(
                f"admission: unknown order {admission!r}; allowed: {', '.join(ADMISSION_ORDERS)}"
            )
        self.engine = engine
        self.max_running_images = max_running_images
        self.admission = admission
        self.clock = clock
        self.on_step = on_step
        self.timer = timer or step_timer(torch.device(getattr(engine, "device", "cpu")), clock)
        if steps_ahead < 1:
            raise ValueError(f"steps_ahead: must be at least 1, got {steps_ahead}")
        self.steps_ahead = steps_ahead
        # steps whose device work may still be queued: reported once it completes
        self._unreported: deque[tuple[StepReport, object]] = deque()
        self._work = threading.Condition()  # guards the buckets; notified on submit
        self._buckets: dict[BucketKey, _Bucket] = {}  # insertion order is the round-robin order
        self._sequence = itertools.count()
        self._last_key: BucketKey | None = None
        # the engine: one step at a time, or a warm-up / unload in between (`exclusive`)
        self._engine_lock = threading.RLock()
        self._active_loras: tuple[weakref.ref, tuple] | None = None

    # ---- any thread --------------------------------------------------------------------------

    def submit(self, params: GenerationParams) -> Future:
        """Queue a request; its future gets a `GenerationOutput` or the exception that failed
        it. Invalid requests raise ValueError here, naming the field."""
        self.engine.check_request(params)
        choice = validate_scheduler_options(
            params.scheduler,
            params.use_karras_sigmas,
            params.algorithm_type,
            params.num_inference_steps,
        )
        with self._work:
            ticket = Ticket(params, choice, next(self._sequence), self.clock())
            key = bucket_key(params)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(key)
            bucket.waiting.append(ticket)
            self._work.notify_all()
        return ticket.future

    def waiting(self) -> int:
        """Requests submitted and not yet admitted."""
        with self._work:
            return sum(len(bucket.waiting) for bucket in self._buckets.values())

    def running(self) -> int:
        """Requests admitted and not yet finished."""
        with self._work:
            return sum(len(bucket.running) for bucket in self._buckets.values())

    def idle(self) -> bool:
        with self._work:
            return not any(bucket.has_work() for bucket in self._buckets.values())

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until some request is waiting or running; False on timeout."""
        with self._work:
            return self._work.wait_for(
                lambda: any(bucket.has_work() for bucket in self._buckets.values()), timeout
            )

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Engine]:
        """The engine to itself between two steps (warm-up, unload): nothing steps meanwhile.
        Whatever LoRAs it leaves active are re-activated by the next step."""
        with self._engine_lock:
            self._active_loras = None
            try:
                yield self.engine
            finally:
                self._active_loras = None

    # ---- the loop thread ---------------------------------------------------------------------

    def step(self) -> StepReport | None:
        """One iteration: pick a bucket, admit, one UNet forward, decode what finished.
        None when there is nothing to do. Failures fail requests, never raise."""
        with self._work:
            bucket = self._pick()
            admitted = self._admit(bucket) if bucket is not None else []
        if bucket is None:
            self._report(wait=True)  # idle: nothing to issue while the device finishes
            return None
        key = bucket.key
        report = StepReport(key.model_id, key.width, key.height)
        with self._engine_lock, torch.inference_mode():
            started = span = None
            try:
                # Inside: after a sticky CUDA error even recording an event raises, and the
                # running set must still fail (and say so to `on_step`) rather than hang.
                started = self.timer.start()
                self._step_bucket(bucket, admitted, report)
            except Exception as exc:  # a bug of ours, or a dead device: fail the set
                log.exception("step of bucket %s failed", bucket.key)
                self._fail_running(bucket, exc, report)
            if started is not None:
                try:
                    span = self.timer.stop(started)
                except Exception as exc:
                    log.exception("step of bucket %s: the timer failed", bucket.key)
                    self._fail_running(bucket, exc, report)
        with self._work:
            if not bucket.has_work() and self._buckets.get(bucket.key) is bucket:
                del self._buckets[bucket.key]
        self._unreported.append((report, span))
        # A step with outcomes has waited for the device already (decode) or failed: report it
        # now, so its futures are settled at once; others as soon as their work completes.
        self._report(wait=bool(report.outcomes))
        return report

    def _report(self, wait: bool) -> None:
        """Give `on_step` the steps whose device work has completed, oldest first, then settle
        their futures. `wait`: all of them, waiting for the device if need be. Under the
        engine lock: an event query must not meet a CUDA-graph capture of a warm-up."""
        if not self._unreported:  # the idle loop's case: no lock to wait for behind a warm-up
            return
        with self._engine_lock:
            # The device runs its queue in order: waiting for one step completes all before it.
            if wait and self._unreported:
                self._wait_for(self._unreported[-1])
            elif len(self._unreported) > self.steps_ahead:
                self._wait_for(self._unreported[-1 - self.steps_ahead])
            while self._unreported:
                report, span = self._unreported[0]
                try:
                    seconds = 0.0 if span is None else self.timer.seconds(span)
                except Exception:  # a timer that fails costs the figure, never the requests
                    log.exception("step timing failed")
                    seconds = 0.0
                if seconds is None and wait:  # waited, yet not done: do not hold the futures
                    seconds = 0.0
                if seconds is None:
                    return
                self._unreported.popleft()
                report.seconds = seconds
                if self.on_step is not None:
                    try:
                        self.on_step(report)
                    except Exception:
                        log.exception("on_step failed")
                for future, outcome in report.outcomes:
                    _settle(future, outcome)

    def _wait_for(self, entry: tuple[StepReport, object]) -> None:
        if entry[1] is None:  # a step whose timer failed: nothing to wait on
            return
        try:
            self.timer.wait(entry[1])
        except Exception:
            log.exception("waiting for a step's device work failed")

    def run_until_idle(self, max_steps: int | None = None) -> list[StepReport]:
        """Step until nothing is waiting or running (tests and benchmarks drive it this way)."""
        reports = []
        for _ in itertools.count() if max_steps is None else range(max_steps):
            report = self.step()
            if report is None:
                break
            reports.append(report)
        return reports

    def _pick(self) -> _Bucket | None:
        for bucket in self._buckets.values():
            while bucket.waiting and bucket.waiting[0].future.cancelled():
                bucket.waiting.popleft()
        candidates = [bucket for bucket in self._buckets.values() if bucket.has_work()]
        if not candidates:
            return None
        if self.admission == "oldest_first":
            chosen = min(candidates, key=_Bucket.oldest)
        else:
            keys = [bucket.key for bucket in candidates]
            after = keys.index(self._last_key) + 1 if self._last_key in keys else 0
            chosen = candidates[after % len(candidates)]
        self._last_key = chosen.key
        return chosen

    def _admit(self, bucket: _Bucket) -> list[Ticket]:
        """FIFO: admit from the head while it fits; a request larger than the whole set runs
        alone. Called with the lock held."""
        admitted: list[Ticket] = []
        room = self.max_running_images - bucket.running_images()
        now = self.clock()
        while bucket.waiting:
            head = bucket.waiting[0]
            if head.future.cancelled():
                bucket.waiting.popleft()
                continue
            if bucket.running and head.samples > room:
                break
            bucket.waiting.popleft()
            head.admitted_at = now
            bucket.running.append(head)
            admitted.append(head)
            room -= head.samples
        return admitted

    def _step_bucket(self, bucket: _Bucket, admitted: list[Ticket], report: StepReport) -> None:
        try:
            pipe = self.engine.load(bucket.key.model_id)
            self._activate_loras(pipe, bucket.key.loras)
        except Exception as exc:
            self._fail_running(bucket, exc, report)
            return
        for ticket in admitted:
            report.admitted.append((ticket.params, ticket.admitted_at - ticket.submitted_at))
        self._start(pipe, bucket, admitted, report)

        with self._work:
            for ticket in [t for t in bucket.running if t.future.cancelled()]:
                bucket.running.remove(ticket)
            running = list(bucket.running)
        if not running:
            return
        report.requests = len(running)
        report.images = sum(ticket.samples for ticket in running)
        report.unet_rows = report.images + sum(
            ticket.samples for ticket in running if ticket.state.uncond_embeds is not None
        )
        for ticket in running:
            ticket.peak_step_images = max(ticket.peak_step_images, report.images)
        try:
            self.engine.denoise_step(pipe, [ticket.state for ticket in running])
        except Exception as exc:
            log.exception("denoising step failed for %d requests", len(running))
            self._fail_running(bucket, exc, report)
            return

        finished = [ticket for ticket in running if ticket.state.done]
        if not finished:
            return
        with self._work:
            for ticket in finished:
                bucket.running.remove(ticket)
        try:
            images = self.engine.decode_states(pipe, [ticket.state for ticket in finished])
        except Exception as exc:
            log.exception("VAE decode failed for %d requests", len(finished))
            report.error = exc
            for ticket in finished:
                self._fail(ticket, exc, report)
            return
        done_at = self.clock()
        offset = 0
        for ticket in finished:
            seconds = done_at - ticket.admitted_at
            extra = {"scheduler": ticket.choice.name, "batching": "step"}
            if ticket.choice.notes:
                extra["scheduler_notes"] = list(ticket.choice.notes)
            output = GenerationOutput(
                images=images[offset : offset + ticket.samples],
                seed=ticket.params.seed,
                prompt_truncated=ticket.state.prompt_truncated,
                batch_size=ticket.peak_step_images,
                inference_seconds=seconds,
                extra=extra,
            )
            offset += ticket.samples
            ticket.state = None  # latents and embeddings go back now, not with the future
            report.finished.append((ticket.params, seconds))
            report.outcomes.append((ticket.future, output))

    def _start(self, pipe, bucket: _Bucket, admitted: list[Ticket], report: StepReport) -> None:
        """States for newly admitted requests: one text-encoder call for all of them; if that
        fails, one call each, so only the request at fault fails."""
        if not admitted:
            return
        try:
            states = self.engine.start_requests(pipe, [ticket.params for ticket in admitted])
        except Exception:
            states = []
            for ticket in admitted:
                try:
                    states.extend(self.engine.start_requests(pipe, [ticket.params]))
                except Exception as exc:
                    states.append(None)
                    with self._work:
                        bucket.running.remove(ticket)
                    self._fail(ticket, exc, report)
        for ticket, state in zip(admitted, states, strict=True):
            ticket.state = state

    def _activate_loras(self, pipe, loras: tuple) -> None:
        """`Engine.activate_loras` walks every module: only when the bucket's LoRA set or the
        pipeline changed since the last step."""
        active = self._active_loras
        if active is not None and active[0]() is pipe and active[1] == loras:
            return
        self._active_loras = None
        self.engine.activate_loras(pipe, tuple(tuple(lora) for lora in loras))
        self._active_loras = (weakref.ref(pipe), loras)

    def _fail_running(self, bucket: _Bucket, exc: BaseException, report: StepReport) -> None:
        report.error = exc
        with self._work:
            running, bucket.running = bucket.running, []
        for ticket in running:
            self._fail(ticket, exc, report)

    @staticmethod
    def _fail(ticket: Ticket, exc: BaseException, report: StepReport) -> None:
        ticket.state = None
        report.failed.append((ticket.params, exc))
        report.outcomes.append((ticket.future, exc))


def _settle(future: Future, outcome: object) -> None:
    """A cancelled future (its caller went away) just drops the outcome."""
    with contextlib.suppress(InvalidStateError):
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
