"""Prometheus metrics of every replica, exported through Ray's metrics agent.

Ray prefixes each name with `ray_` on export (`sdserve_requests_total` is scraped as
`ray_sdserve_requests_total`), and adds the node and worker as labels, so several replicas
add up in a `sum by`. Labels are low-cardinality by construction: a model label only ever
holds a served model id, never what a client typed, and no key or prompt is ever a label.
Outside a Ray worker (unit tests of one layer) every call is a no-op.
"""

from __future__ import annotations

import functools
import logging
import threading
from decimal import Decimal

log = logging.getLogger(__name__)

PREFIX = "sdserve_"

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
"""Whole requests and each of their stages. From 50 ms (validation, a 512 px tiny-model image)
to 300 s (a full queue of 50-step 1024 px batches); roughly doubling, so p50/p95/p99 of both a
0.5 s GPU image and a minute-long queue wait are read within a factor of two."""

BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
"""Images per pipeline call: dense at small sizes where a missing request per batch matters,
up to the largest batch an H100 holds at 512 px."""

RESOLUTIONS = (256, 512, 768, 1024)


def resolution_bucket(width: int, height: int) -> str:
    """The label for an image size: its longer side rounded up to a common size."""
    side = max(width, height)
    for bucket in RESOLUTIONS:
        if side <= bucket:
            return str(bucket)
    return "larger"


def _never_raises(method):
    """A metric that cannot be recorded is logged, never allowed to fail a request."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            method(*args, **kwargs)
        except Exception:
            log.warning("could not record metric %s", method.__name__, exc_info=True)

    return wrapper


def _positive(value: float) -> bool:
    # Ray's counters refuse increments of 0.
    return value > 0


class Metrics:
    """Every metric of the service; created once per process by `get_metrics()`."""

    def __init__(self):
        from ray.util.metrics import Counter, Gauge, Histogram

        def counter(name, description, tags):
            return Counter(PREFIX + name, description=description, tag_keys=tags)

        def histogram(name, description, buckets, tags):
            return Histogram(
                PREFIX + name, description=description, boundaries=list(buckets), tag_keys=tags
            )

        def gauge(name, description, tags=()):
            return Gauge(PREFIX + name, description=description, tag_keys=tags)

        self.request_duration = histogram(
            "request_duration_seconds",
            "HTTP request time, from arrival to response.",
            LATENCY_BUCKETS_S,
            ("route", "model", "status"),
        )
        self.job_duration = histogram(
            "job_duration_seconds",
            "Job time, from acceptance to images stored (or failure).",
            LATENCY_BUCKETS_S,
            ("model", "resolution", "status"),
        )
        self.stage_duration = histogram(
            "stage_duration_seconds",
            "Time in each stage: validation, queue, inference, storage.",
            LATENCY_BUCKETS_S,
            ("stage", "model"),
        )
        self.requests = counter(
            "requests_total",
            "Requests by route and outcome (success, processing, failed, error, rate_limited).",
            ("route", "model", "status"),
        )
        self.errors = counter("errors_total", "Errors answered, by type.", ("route", "type"))
        self.rate_limited = counter(
            "rate_limited_total", "Requests refused with 429, by plan.", ("plan",)
        )
        self.images = counter(
            "images_generated_total", "Images generated.", ("model", "resolution")
        )
        self.safety_images = counter(
            "safety_checked_images_total",
            "Images the safety checker looked at, by verdict (flagged, passed).",
            ("model", "verdict"),
        )
        self.batch_size = histogram(
            "batch_size",
            "Images per pipeline call (request batching) or per UNet step (step batching).",
            BATCH_SIZE_BUCKETS,
            ("model",),
        )
        self.queue_depth = gauge("generator_queue_depth", "Requests waiting in a generator.")
        self.inflight = gauge("inflight_jobs", "Jobs accepted by an ingress and not ended.")
        self.gpu_seconds = counter(
            "gpu_seconds_total",
            "Accelerator time of pipeline calls (a batch's time split across its images).",
            ("model",),
        )
        self.price_billed = counter(
            "price_billed_usd_total",
            "Price billed for delivered images, in USD.",
            ("model", "plan"),
        )
        self.cost_to_serve = counter(
            "cost_to_serve_usd_total",
            "GPU-seconds times the configured GPU-hour price, in USD.",
            ("model",),
        )
        self.gpu_memory = gauge(
            "gpu_memory_bytes", "CUDA memory of a generator: in_use and peak.", ("kind",)
        )
        self.warmup = gauge(
            "model_warmup_seconds", "Load plus warm-up (compile) time of a model.", ("model",)
        )

    # ---- ingress -------------------------------------------------------------------------------

    @_never_raises
    def request_done(self, route: str, model: str, status: str, seconds: float) -> None:
        tags = {"route": route, "model": model, "status": status}
        self.requests.inc(1, tags)
        self.request_duration.observe(seconds, tags)

    @_never_raises
    def error(self, route: str, kind: str) -> None:
        self.errors.inc(1, {"route": route, "type": kind})

    @_never_raises
    def rate_limit(self, plan: str) -> None:
        self.rate_limited.inc(1, {"plan": plan})

    @_never_raises
    def stage(self, stage: str, model: str, seconds: float) -> None:
        self.stage_duration.observe(seconds, {"stage": stage, "model": model})

    @_never_raises
    def safety_checked(self, model: str, flagged: int, passed: int) -> None:
        for verdict, count in (("flagged", flagged), ("passed", passed)):
            if count:
                self.safety_images.inc(count, {"model": model, "verdict": verdict})

    @_never_raises
    def job_done(self, model: str, resolution: str, status: str, seconds: float) -> None:
        tags = {"model": model, "resolution": resolution, "status": status}
        self.job_duration.observe(seconds, tags)

    @_never_raises
    def billed(self, model: str, plan: str, usd: Decimal) -> None:
        if _positive(usd):
            self.price_billed.inc(float(usd), {"model": model, "plan": plan})

    @_never_raises
    def set_inflight(self, jobs: int) -> None:
        self.inflight.set(jobs)

    # ---- generator -----------------------------------------------------------------------------

    @_never_raises
    def batch_done(
        self,
        model: str,
        resolution: str,
        images: int,
        seconds: float,
        gpu_hour_price_usd: Decimal,
    ) -> None:
        self.batch_size.observe(images, {"model": model})
        self.images.inc(images, {"model": model, "resolution": resolution})
        self._device_time(model, seconds, gpu_hour_price_usd)
        self.stage_duration.observe(seconds, {"stage": "inference", "model": model})

    @_never_raises
    def step_done(
        self, model: str, images: int, seconds: float, gpu_hour_price_usd: Decimal
    ) -> None:
        """One iteration of step-level batching: its UNet batch (images) and its time."""
        if images:
            self.batch_size.observe(images, {"model": model})
        self._device_time(model, seconds, gpu_hour_price_usd)

    @_never_raises
    def gpu_work_done(
        self, stage: str, model: str, seconds: float, gpu_hour_price_usd: Decimal
    ) -> None:
        """Work on the generator's device after generation (safety check, upscaling): its stage
        time, and its device time and cost, which a request's images cost to serve too."""
        self.stage_duration.observe(seconds, {"stage": stage, "model": model})
        self._device_time(model, seconds, gpu_hour_price_usd)

    def _device_time(self, model: str, seconds: float, gpu_hour_price_usd: Decimal) -> None:
        if _positive(seconds):
            self.gpu_seconds.inc(seconds, {"model": model})
        cost = seconds / 3600 * float(gpu_hour_price_usd)
        if _positive(cost):
            self.cost_to_serve.inc(cost, {"model": model})

    @_never_raises
    def images_done(self, model: str, resolution: str, images: int, seconds: float) -> None:
        """A request's images, decoded under step-level batching (admission to images)."""
        self.images.inc(images, {"model": model, "resolution": resolution})
        self.stage_duration.observe(seconds, {"stage": "inference", "model": model})

    @_never_raises
    def set_queue_depth(self, waiting: int) -> None:
        self.queue_depth.set(waiting)

    @_never_raises
    def set_gpu_memory(self, in_use: int, peak: int) -> None:
        self.gpu_memory.set(in_use, {"kind": "in_use"})
        self.gpu_memory.set(peak, {"kind": "peak"})

    @_never_raises
    def set_warmup(self, model: str, seconds: float) -> None:
        self.warmup.set(seconds, {"model": model})


class NoMetrics:
    """Stands in outside Ray: every recording method does nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


_lock = threading.Lock()
_metrics: Metrics | NoMetrics | None = None


def get_metrics() -> Metrics | NoMetrics:
    """This process's metrics: Ray-exported inside a Ray worker, no-ops elsewhere."""
    global _metrics
    with _lock:
        if _metrics is None:
            import ray

            _metrics = Metrics() if ray.is_initialized() else NoMetrics()
        return _metrics
