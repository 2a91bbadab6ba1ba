"""What the load test sends and what it expects back, independent of locust.

Profiles say which sizes, steps and sample counts a request draws (the tiny CPU model cannot
take SD 2.0's 768 px in a load test); bad inputs pair a broken body with the words its clean
error must contain; `JobBook` remembers every job the service accepted, so the end of a run can
check that each one finished and count the images delivered.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REQUEST_NAMES = {
    "sync": "text2img sync",
    "instant": "text2img instant",
    "webhook": "text2img webhook",
    "bad": "text2img bad input",
    "burst": "text2img burst",
    "fetch": "fetch",
    "image": "image download",
    "delivery": "webhook delivery",
    "job": "job end-to-end",
    "limit": "burst limit",
}
"""Names of the entries in locust's statistics (and the keys of the SLO's `p95_ms`)."""

HTTP_METHODS = ("GET", "POST")
"""Request types that are real HTTP calls; the rest (WEBHOOK, JOB, CHECK) are measured events."""


def percentile(sorted_times: list[float], q: float) -> float | None:
    """Nearest-rank percentile of ascending times: the smallest one at or above a `q` share of
    them (None when there are none)."""
    if not sorted_times:
        return None
    rank = max(1, math.ceil(q * len(sorted_times)))
    return round(sorted_times[rank - 1], 1)


def burst_problem(limit: int, accepted: int, limited: int) -> RuntimeError | None:
    """A burst of twice a key's limit, sent at once, must meet the limiter both ways: some
    accepted and some refused. (More than `limit` may be accepted when a job of the burst
    ends before its last request arrives.)"""
    if accepted + limited != 2 * limit:
        return RuntimeError(f"{accepted + limited} answers to a burst of {2 * limit}")
    if accepted == 0:
        return RuntimeError(f"limit {limit}: the whole burst of {2 * limit} was refused")
    if limited == 0:
        return RuntimeError(f"limit {limit}: the whole burst of {2 * limit} was accepted")
    return None


PROMPTS = (
    "a lighthouse at dusk, oil painting",
    "a red fox in fresh snow, photograph, 85mm",
    "isometric city block, voxel art",
    "portrait of an astronaut, studio lighting",
    "a bowl of ramen, watercolor",
    "mountain lake at sunrise, highly detailed",
)
SCHEDULERS = (
    "UniPCMultistepScheduler",
    "DDIMScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)


@dataclass(frozen=True)
class Profile:
    """The request shapes of a run: (width, height) with weights, steps, samples with weights."""

    name: str
    sizes: tuple[tuple[tuple[int, int], int], ...]
    steps: tuple[int, ...]
    samples: tuple[tuple[int, int], ...]
    # the smallest image of the profile: what burst requests ask for
    burst: dict[str, int] = field(default_factory=dict)

    def draw(self, rng: random.Random) -> dict[str, Any]:
        """Fields of one request, numbers sent as strings half the time as real clients do."""
        (width, height) = _weighted(rng, self.sizes)
        samples = _weighted(rng, self.samples)
        fields: dict[str, Any] = {
            "prompt": rng.choice(PROMPTS),
            "negative_prompt": rng.choice(("", "blurry, low quality")),
            "width": width,
            "height": height,
            "samples": samples,
            "num_inference_steps": rng.choice(self.steps),
            "guidance_scale": 7.5,
            "seed": rng.choice((None, -1, rng.randint(1, 2**31))),
            "scheduler": rng.choice(SCHEDULERS),
        }
        if rng.random() < 0.5:
            for name in ("width", "height", "samples", "num_inference_steps"):
                fields[name] = str(fields[name])
        return fields


def _weighted(rng: random.Random, choices):
    values = [value for value, _ in choices]
    weights = [weight for _, weight in choices]
    return rng.choices(values, weights=weights)[0]


PROFILES = {
    # The tiny random-weight model on CPU (make loadtest, the smoke run): the service must
    # allow 64 px images (min_size: 64, as loadtests/serve_config.yaml sets).
    "tiny": Profile(
        name="tiny",
        sizes=(((64, 64), 4), ((128, 128), 3), ((128, 64), 2), ((96, 128), 1)),
        steps=(2,),
        samples=((1, 6), (2, 3), (4, 1)),
        burst={"width": 64, "height": 64, "num_inference_steps": 2, "samples": 1},
    ),
    # Real SD 2.0 on GPUs: the sizes and steps clients of the hosted API ask for.
    "sd2": Profile(
        name="sd2",
        sizes=(((768, 768), 5), ((512, 512), 3), ((768, 512), 1), ((512, 768), 1)),
        steps=(20, 25, 30),
        samples=((1, 6), (2, 2), (4, 2)),
        burst={"width": 512, "height": 512, "num_inference_steps": 20, "samples": 1},
    ),
}


@dataclass(frozen=True)
class BadInput:
    """A broken request and a fragment its error message must contain."""

    label: str
    fields: dict[str, Any] | None  # None: the raw `body` is sent as is
    expect: str
    body: str | None = None
    bad_key: bool = False


BAD_INPUTS = (
    BadInput("width not a multiple of 8", {"width": 100}, "width must be a multiple of 8"),
    BadInput("height too large", {"height": 4096}, "height must be a multiple of 8"),
    BadInput("too many samples", {"samples": 9}, "samples must be an integer between"),
    BadInput("too many steps", {"num_inference_steps": 500}, "num_inference_steps must be"),
    BadInput("guidance out of range", {"guidance_scale": 50}, "guidance_scale must be"),
    BadInput("unknown scheduler", {"scheduler": "NopeScheduler"}, "scheduler must be one of"),
    BadInput("empty prompt", {"prompt": "  "}, "prompt must be a non-empty"),
    BadInput("unknown model", {"model_id": "no-such-model"}, "model_id 'no-such-model'"),
    BadInput("width not a number", {"width": "wide"}, "width"),
    BadInput("unknown LoRA", {"lora_model": "no-such-lora"}, "lora_model"),
    BadInput("webhook not http", {"webhook": "ftp://example.invalid/x"}, "webhook must be"),
    BadInput("unknown key", {}, "Invalid API key", bad_key=True),
    BadInput("malformed JSON", None, "not valid JSON", body='{"prompt": "a", oops'),
)


def check_error_body(status_code: int, body: Any, expect: str) -> str | None:
    """None when `body` is the clean ModelsLab error naming `expect`, else what is wrong.

    HTTP 200 is the hosted API's way; a 4xx is accepted too (SDSERVE_STRICT_HTTP_STATUS).
    """
    if not (status_code == 200 or 400 <= status_code < 500):
        return f"HTTP {status_code}, expected 200 or a 4xx"
    if not isinstance(body, dict) or body.get("status") != "error":
        return f"expected status 'error', got {_short(body)}"
    message = body.get("message")
    if not isinstance(message, str) or expect.lower() not in message.lower():
        return f"message {message!r} does not name {expect!r}"
    if body.get("messege") != message:
        return "'messege' differs from 'message'"
    return None


def check_rate_limited(status_code: int, body: Any, retry_after_header: str | None) -> str | None:
    """None when a refusal is the documented 429: JSON error with retry_after and the header."""
    if status_code != 429:
        return f"HTTP {status_code}, expected 429"
    if not isinstance(body, dict) or body.get("status") != "error":
        return f"expected status 'error', got {_short(body)}"
    retry_after = body.get("retry_after")
    if not isinstance(retry_after, int | float) or retry_after <= 0:
        return f"retry_after {retry_after!r} is not a positive number"
    if not retry_after_header:
        return "no Retry-After header"
    return None


def check_job_body(body: Any, samples: int) -> str | None:
    """None when `body` is a well-formed success, processing or failed job body."""
    if not isinstance(body, dict):
        return f"not a JSON object: {_short(body)}"
    status = body.get("status")
    if not isinstance(body.get("id"), int):
        return f"status {status!r} without an integer id: {_short(body)}"
    if not isinstance(body.get("output"), list):
        return "output is not a list"
    if status == "success":
        if len(body["output"]) != samples:
            return f"{len(body['output'])} output URLs for {samples} samples"
    elif status == "processing":
        if len(body.get("future_links") or []) != samples:
            return f"{len(body.get('future_links') or [])} future_links for {samples} samples"
        if not str(body.get("fetch_result", "")).endswith(f"/{body['id']}"):
            return f"fetch_result {body.get('fetch_result')!r} does not end with the id"
    elif status != "failed":
        return f"unexpected status {status!r}: {_short(body)}"
    return None


def _short(body: Any) -> str:
    text = json.dumps(body) if not isinstance(body, str) else body
    return text[:200]


def poll_delays(style: str):
    """Seconds to wait before each fetch, as the official clients poll.

    `sdk`: modelslab-py's fetch(), a fixed 2 s between tries. `cli`: the official CLI, 1 s
    doubling up to 10 s. Both give up after about five minutes.
    """
    if style == "sdk":
        delays, step = [], 2.0
    elif style == "cli":
        delays, step = [], 1.0
    else:
        raise ValueError(f"unknown polling style {style!r}")
    total = 0.0
    while total < 300:
        delays.append(step)
        total += step
        if style == "cli":
            step = min(step * 2, 10.0)
    return delays


# ---- jobs ------------------------------------------------------------------------------------


@dataclass
class TrackedJob:
    job_id: int
    key: str
    samples: int
    accepted_at: float
    status: str = "processing"
    webhook: bool = False
    track_id: str | None = None
    ended_at: float | None = None


class JobBook:
    """Every job the service accepted in this run, and how each one ended (thread-safe)."""

    def __init__(self):
        self._jobs: dict[int, TrackedJob] = {}
        self._lock = threading.Lock()

    def accepted(
        self, job_id: int, key: str, samples: int, *, webhook: bool = False, track_id=None
    ) -> TrackedJob:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                job = TrackedJob(job_id, key, samples, time.monotonic(), webhook=webhook)
                job.track_id = track_id
                self._jobs[job_id] = job
            return job

    def ended(self, job_id: int, status: str) -> None:
        """Record a final status (success or failed) seen in any response or webhook."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and job.status == "processing" and status != "processing":
                job.status = status
                job.ended_at = time.monotonic()

    def get(self, job_id: int) -> TrackedJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def unfinished(self) -> list[TrackedJob]:
        with self._lock:
            return [job for job in self._jobs.values() if job.status == "processing"]

    def jobs(self) -> list[TrackedJob]:
        with self._lock:
            return list(self._jobs.values())

    def summary(self) -> dict[str, Any]:
        jobs = self.jobs()
        unfinished = sorted(job.job_id for job in jobs if job.status == "processing")
        return {
            "accepted": len(jobs),
            "success": sum(job.status == "success" for job in jobs),
            "failed": sum(job.status == "failed" for job in jobs),
            "unfinished": len(unfinished),
            "unfinished_ids": unfinished[:50],
            "images_delivered": sum(job.samples for job in jobs if job.status == "success"),
        }


# ---- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BurstKey:
    """A key that the burst users drive past its plan's concurrency limit."""

    plan: str
    key: str
    limit: int


@dataclass(frozen=True)
class LoadKeys:
    """Keys of a run: `traffic` keys spread the main mix (their plan's concurrency limit must
    cover the users on each), `burst` keys are pushed into their 429s on purpose."""

    traffic: tuple[str, ...]
    burst: tuple[BurstKey, ...] = ()

    @classmethod
    def load(cls, path: str | Path) -> LoadKeys:
        data = json.loads(Path(path).read_text())
        traffic = tuple(data.get("traffic") or ())
        if not traffic:
            raise ValueError(f"{path}: 'traffic' must list at least one API key")
        burst = tuple(
            BurstKey(plan=item["plan"], key=item["key"], limit=int(item["limit"]))
            for item in data.get("burst") or ()
        )
        return cls(traffic=traffic, burst=burst)

    def to_dict(self) -> dict[str, Any]:
        return {
            "traffic": list(self.traffic),
            "burst": [{"plan": b.plan, "key": b.key, "limit": b.limit} for b in self.burst],
        }
