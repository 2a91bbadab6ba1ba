"""CPU time of one denoising step outside the UNet: scheduler, guidance and the engine's own
Python, per scheduler and batch size, stepping the latents directly against through the CPU
twin (service/engine/linear_steps.py).

The UNet is replaced by a stub that returns zeros, so only the step's own work is timed. On a
GPU this is the time the device sits idle per step whenever the step waits for it (a
synchronizing copy inside the scheduler); with the twin nothing waits and it overlaps the UNet.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py \
        --out benchmarks/results/step-overhead-cpu.json
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from service.engine.optimize import OptimizationConfig, runner_for
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.tiny_model import build_tiny_model

SCHEDULERS = ("DDIMScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")


def measure(engine: Engine, scheduler: str, batch: int, steps: int, rounds: int) -> float:
    """Best-of-`rounds` milliseconds per step for `batch` one-image requests."""
    pipe = engine.load("tiny")
    requests = [
        GenerationParams(
            prompt="a lighthouse at dusk",
            model_id="tiny",
            width=64,
            height=64,
            num_inference_steps=steps,
            scheduler=scheduler,
            seed=i,
        )
        for i in range(batch)
    ]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):
            states = engine.start_requests(pipe, requests)
            started, count = time.perf_counter(), 0
            while not all(state.done for state in states):
                engine.denoise_step(pipe, [s for s in states if not s.done])
                count += 1
            best = min(best, (time.perf_counter() - started) / count)
    return round(best * 1e3, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    results: dict = {}
    for twin in (False, True):
        config = OptimizationConfig(
            enabled=True, compile=False, triton_kernels=False, linear_steps=twin
        )
        engine = Engine({"tiny": model}, optimizations=config)
        runner = runner_for(engine.load("tiny"))
        runner.unet = lambda sample, timestep, embeds, hooks=(): torch.zeros_like(sample)
        mode = "twin" if twin else "direct"
        for scheduler in SCHEDULERS:
            for batch in batches:
                ms = measure(engine, scheduler, batch, args.steps, args.rounds)
                results.setdefault(scheduler, {}).setdefault(str(batch), {})[mode] = ms
                print(f"{scheduler:30s} batch {batch:2d} {mode:6s} {ms:7.3f} ms/step", flush=True)
    out = {
        "benchmark": "step_overhead",
        "what": "CPU ms per denoising step outside the UNet (stub UNet returning zeros), tiny "
        "model at 64 px, one-image requests, best of rounds",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "steps": args.steps,
        "ms_per_step": results,
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
