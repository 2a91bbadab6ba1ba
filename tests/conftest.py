"""Shared fixtures: the tiny model (built once per session) and a real Ray Serve app."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from service.ports import free_port  # noqa: F401  (tests import it from here)

# Nothing in the tests may reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU through Triton's interpreter (tests/engine/test_kernels.py); it must
# be on before anything imports Triton. Engines use the kernels only where asked to.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A stopping ingress replica stays reachable this long so HAProxy stops routing to it first
# (service/serving/app.py keeps 5 s for one machine). No test stops an ingress replica under
# traffic; every module's teardown stops one, and the benchmarks' runs inherit this.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from service.engine.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd2", seed=0)


@contextmanager
def running_app(
    tmp: Path,
    model_dir: Path,
    args: dict | None = None,
    settings: dict | None = None,
    metrics_port: int | None = None,
):
    """Start Ray, Serve and the sdserve app on a free loopback port; yields (base_url, settings).

    One per test module: Ray takes ~10 s to start on this machine. With `metrics_port`, Ray
    exports metrics there every 0.5 s (instead of 10 s) so tests can read them soon.
    """
    import httpx
    import ray
    from ray import serve

    from service.serving.app import build_app

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    app_settings = {
        "models": {"stable-diffu": str(model_dir)},
        "database_url": f"sqlite:///{tmp}/sdserve.db",
        "image_store_url": str(tmp / "images"),
        "public_base_url": base_url,
        "min_size": 64,
        **(settings or {}),
    }
    app_args = {"max_batch_size": 8, "batch_wait_timeout_s": 0.2, **(args or {})}
    app_args["settings"] = app_settings
    metrics_options = {}
    if metrics_port:
        metrics_options = {
            "_metrics_export_port": metrics_port,
            "_system_config": {"metrics_report_interval_ms": 500},
        }
    from service.serving.app import apply_ray_env, start_serve

    apply_ray_env()  # as `sdserve serve` and the image run Ray
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        configure_logging=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}},
        **metrics_options,
    )
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name="sdserve", route_prefix="/")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base_url, app_settings
    finally:
        serve.shutdown()
        ray.shutdown()
