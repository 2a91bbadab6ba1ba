"""Every metric follows the naming rules of STYLE.md, and no label can carry a key or prompt."""

import re

from ray.util.metrics import Counter, Gauge, Histogram

from service.metrics import BATCH_SIZE_BUCKETS, LATENCY_BUCKETS_S, Metrics, resolution_bucket

# each takes a handful of values (verdict: flagged or passed)
ALLOWED_LABELS = {
    "route",
    "model",
    "status",
    "type",
    "plan",
    "stage",
    "resolution",
    "kind",
    "verdict",
}


def all_metrics():
    return [m for m in vars(Metrics()).values() if isinstance(m, Counter | Gauge | Histogram)]


def test_names_prefix_units_and_suffixes():
    metrics = all_metrics()
    assert len(metrics) >= 15
    for metric in metrics:
        name = metric._name
        assert re.fullmatch(r"sdserve_[a-z0-9_]+", name), name
        assert ":" not in name
        if isinstance(metric, Counter):
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), name
        if "duration" in name or "warmup" in name:
            assert name.endswith("_seconds"), name
        if "memory" in name:
            assert name.endswith("_bytes"), name
        if "usd" in name:
            assert isinstance(metric, Counter), name


def test_labels_are_low_cardinality():
    for metric in all_metrics():
        assert set(metric._tag_keys) <= ALLOWED_LABELS, (metric._name, metric._tag_keys)
        assert not {"key", "prompt", "api_key", "user"} & set(metric._tag_keys)


def test_buckets_are_increasing_and_cover_the_stated_ranges():
    assert list(LATENCY_BUCKETS_S) == sorted(set(LATENCY_BUCKETS_S))
    assert LATENCY_BUCKETS_S[0] == 0.05 and LATENCY_BUCKETS_S[-1] == 300
    assert list(BATCH_SIZE_BUCKETS) == sorted(set(BATCH_SIZE_BUCKETS))
    assert BATCH_SIZE_BUCKETS[0] == 1


def test_resolution_buckets():
    assert resolution_bucket(64, 64) == "256"
    assert resolution_bucket(512, 768) == "768"
    assert resolution_bucket(1024, 1024) == "1024"
    assert resolution_bucket(2048, 512) == "larger"
