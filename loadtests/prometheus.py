"""The service's own figures over a run: two scrapes of Ray's metrics port, subtracted.

Ray exports every series per worker (labels `WorkerId`, `Component`, ...), so each series is
subtracted on its own and then the series are summed; a replica that started during the run
counts from zero. Quantiles are read from the histogram buckets by linear interpolation, as
PromQL's histogram_quantile does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

Sample = tuple[str, tuple[tuple[str, str], ...]]  # (name, sorted labels)

BATCH_SIZE = "ray_sdserve_batch_size"
STAGE_DURATION = "ray_sdserve_stage_duration_seconds"
IMAGES_GENERATED = "ray_sdserve_images_generated_total"
REQUESTS_TOTAL = "ray_sdserve_requests_total"
RATE_LIMITED_TOTAL = "ray_sdserve_rate_limited_total"


def scrape(urls: list[str], timeout_s: float = 10.0) -> dict[Sample, float]:
    """Every sample of every URL (one per Ray node), keyed by name and labels."""
    samples: dict[Sample, float] = {}
    for url in urls:
        text = requests.get(url, timeout=timeout_s).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = tuple(sorted({**sample.labels, "_source": url}.items()))
                samples[(sample.name, labels)] = sample.value
    return samples


def delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    """after - before per series; a series missing before counts from zero, and a counter
    that went down (its worker restarted) counts from zero again."""
    changes = {}
    for key, value in after.items():
        previous = before.get(key, 0.0)
        changes[key] = value - previous if value >= previous else value
    return changes


def _matches(labels: tuple[tuple[str, str], ...], wanted: dict[str, str]) -> bool:
    found = dict(labels)
    return all(found.get(name) == value for name, value in wanted.items())


def total(samples: dict[Sample, float], name: str, **labels: str) -> float:
    return sum(
        value for (n, lbls), value in samples.items() if n == name and _matches(lbls, labels)
    )


def by_label(samples: dict[Sample, float], name: str, label: str) -> dict[str, float]:
    sums: dict[str, float] = defaultdict(float)
    for (n, lbls), value in samples.items():
        if n == name:
            sums[dict(lbls).get(label, "")] += value
    return {key: value for key, value in sorted(sums.items()) if value}


def histogram(
    samples: dict[Sample, float], name: str, floor: float = 0.0, **labels: str
) -> dict[str, Any]:
    """count, mean, p50, p95, p99 of a histogram (over the samples given, e.g. a delta).
    `floor` is the smallest value a sample can take (1 for a batch size)."""
    buckets: dict[float, float] = defaultdict(float)
    for (n, lbls), value in samples.items():
        if n == name + "_bucket" and _matches(lbls, labels):
            buckets[float(dict(lbls)["le"])] += value
    count = total(samples, name + "_count", **labels)
    summed = total(samples, name + "_sum", **labels)
    bounds = sorted(buckets.items())
    return {
        "count": int(round(count)),
        "mean": round(summed / count, 4) if count else None,
        "p50": _quantile(0.50, bounds, floor),
        "p95": _quantile(0.95, bounds, floor),
        "p99": _quantile(0.99, bounds, floor),
    }


def _quantile(q: float, bounds: list[tuple[float, float]], floor: float = 0.0) -> float | None:
    """histogram_quantile over cumulative (le, count) pairs; the first bucket starts at
    `floor` (PromQL assumes 0)."""
    if not bounds or bounds[-1][1] <= 0:
        return None
    rank = q * bounds[-1][1]
    lower_bound, lower_count = min(floor, bounds[0][0]), 0.0
    for upper_bound, cumulative in bounds:
        if cumulative >= rank:
            if math.isinf(upper_bound):
                return round(lower_bound, 4)  # above the highest finite bucket
            if cumulative == lower_count:
                return round(upper_bound, 4)
            fraction = (rank - lower_count) / (cumulative - lower_count)
            return round(lower_bound + (upper_bound - lower_bound) * fraction, 4)
        lower_bound, lower_count = upper_bound, cumulative
    return None


def service_figures(
    before: dict[Sample, float], after: dict[Sample, float], seconds: float
) -> dict[str, Any]:
    """What the service itself measured between two scrapes: batch sizes, queue wait,
    images generated, requests by status."""
    changes = delta(before, after)
    images = total(changes, IMAGES_GENERATED)
    return {
        "batch_size_images": histogram(changes, BATCH_SIZE, floor=1),
        "queue_wait_s": histogram(changes, STAGE_DURATION, stage="queue"),
        "inference_s": histogram(changes, STAGE_DURATION, stage="inference"),
        "images_generated": int(round(images)),
        "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
        "requests_by_status": {
            k: int(v) for k, v in by_label(changes, REQUESTS_TOTAL, "status").items()
        },
        "rate_limited_by_plan": {
            k: int(v) for k, v in by_label(changes, RATE_LIMITED_TOTAL, "plan").items()
        },
    }
