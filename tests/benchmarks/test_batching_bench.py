"""benchmarks/batching.py's CI smoke run: both modes, the same Poisson stream, real Ray Serve and
the tiny model on CPU; the JSON holds what docs/batching.md summarizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_quick_run_compares_both_modes_under_the_same_stream(tmp_path):
    out = tmp_path / "batching.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "batching.py"), "--quick"]
    command += ["--device", "cpu", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    # 110 s measured beside other work on 2 cores: the bound only stops a hang
    done = subprocess.run(command, capture_output=True, text=True, timeout=480, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "highest load with p95" in done.stdout, done.stdout[-2000:]

    result = json.loads(out.read_text())
    assert result["device"]["type"] == "cpu" and result["model"] == "tiny"
    runs = result["runs"]
    assert {(r["mode"], r["load_factor"]) for r in runs} == {
        (mode, factor) for mode in ("request", "step") for factor in (1.0, 3.0)
    }
    for run in runs:
        assert run["failed"] == 0, run["errors"]
        assert run["completed"] == run["requests"] == 10
        assert 0 < run["p50_s"] <= run["p95_s"] <= run["max_s"]
        assert run["throughput_images_per_s"] > 0
    # the same offered load for both modes at each level
    for factor in (1.0, 3.0):
        offered = {r["offered_rps"] for r in runs if r["load_factor"] == factor}
        assert len(offered) == 1
    assert result["solo"]["service_s"] > 0 and result["p95_target_s"] > 0
    assert set(result["highest_load_under_target_rps"]) == {"request", "step"}
    assert result["summary"]["favours"] in ("request", "step")


def test_engine_target_runs_without_ray(tmp_path):
    """The GPU image has torch and diffusers but no Ray or pydantic: the engine target must not
    need them (the GPU command in benchmarks/GPU.md runs exactly this path)."""
    out = tmp_path / "batching-engine.json"
    script = ROOT / "benchmarks" / "batching.py"
    argv = [str(script), "--quick", "--target", "auto", "--device", "cpu", "--out", str(out)]
    code = (
        "import sys, runpy\n"
        "for name in ('ray', 'pydantic', 'pydantic_settings', 'sqlalchemy', 'fastapi'):\n"
        "    sys.modules[name] = None\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["target"] == "engine"
    assert {run["mode"] for run in result["runs"]} == {"request", "step"}
    assert all(run["failed"] == 0 and run["completed"] == 10 for run in result["runs"])
    assert result["ready_s"] is not None


def test_open_loop_counts_only_delivered_images_as_throughput():
    """A stand-in generate (this tests the stream's bookkeeping, not the engine): every other
    request fails, so half the images were delivered."""
    import asyncio
    import time
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from batching import open_loop

    async def generate(params):
        await asyncio.sleep(0.3)
        if params.fail:
            raise RuntimeError("replica died")
        return SimpleNamespace(batch_size=params.samples)

    requests = [SimpleNamespace(samples=4, fail=i % 2 == 1) for i in range(8)]
    offsets = [0.0] * len(requests)
    started = time.perf_counter()
    result = asyncio.run(open_loop(generate, requests, offsets))
    wall = time.perf_counter() - started  # at least the run's own clock, 0.05 s + 0.3 s
    assert (result["completed"], result["failed"]) == (4, 4)
    assert result["errors"] == ["RuntimeError: replica died"]
    # 16 delivered images over the run; counting the failed requests' would read 32
    assert 16 <= result["throughput_images_per_s"] * wall < 28
