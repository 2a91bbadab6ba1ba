"""The Grafana dashboard queries only metrics the service exports."""

import json
import re
from pathlib import Path

from ray.util.metrics import Counter, Gauge, Histogram

from service.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "helm" / "sdserve" / "dashboards" / "sdserve.json"


def exported_names() -> set[str]:
    names = set()
    for metric in vars(Metrics()).values():
        if isinstance(metric, Histogram):
            names |= {f"ray_{metric._name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        elif isinstance(metric, Counter | Gauge):
            names.add(f"ray_{metric._name}")
    return names


def test_every_query_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"ray_sdserve_[a-z0-9_]+", target["expr"]))
            assert names, target["expr"]
            assert names <= exported, names - exported
            used |= names
    # latency, throughput, batch size, queue, price vs cost and errors are all on it
    for family in (
        "request_duration",
        "stage_duration",
        "images_generated",
        "batch_size",
        "generator_queue_depth",
        "price_billed",
        "cost_to_serve",
        "errors_total",
    ):
        assert any(family in name for name in used), family
