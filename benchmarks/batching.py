"""Request-level against step-level batching, under the same Poisson arrival stream.

Target `serve` (where Ray is installed): in one Ray cluster, two Generator deployments run side
by side, identical but for `batching` ("request": `@serve.batch`; "step": requests join the
running batch at the next denoising step). No HTTP, database or storage: only what batching
changes. Target `engine` (the GPU image, which has torch and diffusers but no Ray): both modes
on one Engine in this process, step mode through the service's own ContinuousBatcher, request
mode through a reproduction of `@serve.batch` (`InProcessModes`). An open-loop load generator
sends requests at seeded Poisson arrival times; the request mix
(step counts, schedulers, one or two images) comes from the same seed, so both modes see the
very same requests at the very same offsets. Latency = images back − scheduled arrival.

1. Solo: a few requests of the mix, one at a time, in each mode; the lower mean is the service
   time S (request mode's also holds its batch wait). Offered loads are multiples of 1/S (the
   rate one unbatched server sustains); the p95 target is `--slo-factor` × S unless
   `--p95-target-s` is given.
2. For each load, ascending, request mode then step mode (interleaved, so background load on a
   shared machine falls on both alike): p50/p95/mean latency, throughput, failures.
3. Per mode, the highest load whose p95 stays under the target (no lower load above it).

    .venv/bin/python benchmarks/batching.py                       # CPU, tiny model, ~5 min
    .venv/bin/python benchmarks/batching.py --quick --out /tmp/b.json   # CI smoke, < 60 s
    .venv/bin/python benchmarks/batching.py --target engine      # the same, without Ray
    python3 benchmarks/batching.py --model full --device cuda     # see benchmarks/GPU.md

Writes JSON (default benchmarks/results/batching-<device>-<model>.json) and prints a table.
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a plain script from a checkout (the GPU machine)
    sys.path.insert(0, str(ROOT))

MODEL_ID = "bench"
MODES = ("request", "step")
PROMPTS = (
    "a lighthouse at dusk, oil painting",
    "an astronaut riding a horse on the moon",
    "a bowl of ramen, studio photograph",
    "a fox in the snow, watercolor",
)
DEFAULT_SCHEDULERS = (
    "UniPCMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
)


# ---- the workload ------------------------------------------------------------------------------


def make_requests(args, count: int, seed: int) -> list:
    """`count` requests of the mix, from `seed`: the same list for both modes."""
    from service.engine.protocol import GenerationParams

    rng = random.Random(seed)
    steps = args.steps if args.mix == "mixed" else [args.steps[len(args.steps) // 2]]
    schedulers = args.schedulers if args.mix == "mixed" else args.schedulers[:1]
    requests = []
    for i in range(count):
        requests.append(
            GenerationParams(
                prompt=rng.choice(PROMPTS),
                model_id=MODEL_ID,
                width=args.size,
                height=args.size,
                samples=2 if rng.random() < args.two_image_share else 1,
                num_inference_steps=rng.choice(steps),
                scheduler=rng.choice(schedulers),
                guidance_scale=args.guidance,
                seed=seed * 100_000 + i,
            )
        )
    return requests


def poisson_offsets(count: int, seed: int) -> list[float]:
    """Arrival offsets of a unit-rate Poisson process; divided by the load for each level."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(1.0)
        offsets.append(t)
    return offsets


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


async def open_loop(generate, requests: list, offsets: list[float]) -> dict[str, Any]:
    """Send request i at offsets[i] s from now, whatever is still running; wait for all."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    done_at: list[float] = []
    images_done = 0
    start = time.perf_counter() + 0.05

    async def one(params, offset: float) -> None:
        nonlocal images_done
        scheduled = start + offset
        await asyncio.sleep(max(0.0, scheduled - time.perf_counter()))
        try:
            output = await generate(params)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            return
        finished = time.perf_counter()
        latencies.append(finished - scheduled)
        batch_sizes.append(output.batch_size)
        done_at.append(finished)
        images_done += params.samples

    await asyncio.gather(*(one(p, o) for p, o in zip(requests, offsets, strict=True)))
    result: dict[str, Any] = {
        "requests": len(requests),
        "completed": len(latencies),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
    }
    if latencies:
        result.update(
            p50_s=round(quantile(latencies, 0.50), 4),
            p95_s=round(quantile(latencies, 0.95), 4),
            mean_s=round(statistics.fmean(latencies), 4),
            max_s=round(max(latencies), 4),
            # images delivered: a failed request's never reached its client
            throughput_images_per_s=round(images_done / (max(done_at) - start), 3),
            mean_reported_batch_images=round(statistics.fmean(batch_sizes), 2),
        )
    return result


# ---- the two modes, deployed (target "serve") or in this process (target "engine") --------


def model_folder(args, workdir: Path) -> Path:
    """The tiny model, or the full-size SD 2.0 architecture (built once into --model-dir)."""
    if args.model == "tiny":
        from service.engine.tiny_model import build_tiny_model

        return build_tiny_model(Path(args.model_dir or workdir / "tiny-sd2"), seed=0)
    folder = Path(args.model_dir or workdir / "sd2-full")
    if (folder / "model_index.json").exists():
        return folder
    import torch

    from service.engine.sd2_configs import build_sd2_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return build_sd2_model(folder, device=device)


def deploy(mode: str, args, folder: Path, gpus: float):
    """The production Generator, configured as AppConfig would for `mode`."""
    from ray import serve

    from service.config import load_settings
    from service.serving.app import AppConfig, generator_args
    from service.serving.generator import Generator

    config = AppConfig(
        batching=mode,
        max_batch_size=args.max_batch_size,
        max_batch_images=args.max_batch_images,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_running_images=args.max_running_images,
    )
    settings = load_settings(
        models={MODEL_ID: str(folder)},
        default_model_id=MODEL_ID,
        device=args.device,
        optimize=args.optimize,
        demo_key="",
    )
    app = (
        serve.deployment(Generator, name=f"Generator-{mode}")
        .options(
            num_replicas=1,
            max_ongoing_requests=config.generator_ongoing(),
            ray_actor_options={"num_cpus": args.generator_num_cpus, "num_gpus": gpus},
            health_check_timeout_s=600,
        )
        .bind(*generator_args(config, settings))
    )
    handle = serve.run(app, name=f"batching-{mode}", route_prefix=None)

    # The handle's router runs on the event loop that first uses it (sdserve's RAY_ENV), so
    # it is made inside the measuring loop.
    routed = None

    async def generate(params):
        nonlocal routed
        routed = routed or handle.options(multiplexed_model_id=MODEL_ID).generate
        return await routed.remote(params)

    return generate


class InProcessModes:
    """Both modes on one `Engine` in this process, without Ray (the GPU image has torch and
    diffusers only). Step mode is the service's own `ContinuousBatcher` in a loop thread.
    Request mode reproduces `@serve.batch` (Ray 2.60's `_BatchQueue`) and `Generator._batched`:
    a batch is sealed `batch_wait_timeout_s` after its first request or at `max_batch_size`,
    even while the previous one still runs; sealed batches run one at a time
    (`max_concurrent_batches=1`), grouped by `batch_key()` and split at `max_batch_images`."""

    def __init__(self, engine, args) -> None:
        from service.engine.continuous import ContinuousBatcher

        self.engine = engine
        self.args = args
        self.batcher = ContinuousBatcher(engine, args.max_running_images)
        self._queue: asyncio.Queue | None = None
        self._running = asyncio.Semaphore(1)
        self._stop = False
        self._thread = threading.Thread(target=self._step_loop, daemon=True)
        self._thread.start()

    def _step_loop(self) -> None:
        while not self._stop:
            if self.batcher.step() is None:
                self.batcher.wait_for_work(0.2)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)

    async def step(self, params):
        return await asyncio.wrap_future(self.batcher.submit(params))

    async def request(self, params):
        if self._queue is None:
            self._queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._seal_batches())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((params, future))
        return await future

    async def _seal_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.args.batch_wait_timeout_s
            while len(batch) < self.args.max_batch_size:
                try:
                    item = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
                batch.append(item)
            loop.create_task(self._run_sealed(batch))

    async def _run_sealed(self, batch: list) -> None:
        async with self._running:
            groups: dict[tuple, list] = {}
            for params, future in batch:
                groups.setdefault(params.batch_key(), []).append((params, future))
            for group in groups.values():
                for chunk in _split_by_images(group, self.args.max_batch_images):
                    try:
                        outputs = await asyncio.to_thread(
                            self.engine.generate, [params for params, _ in chunk]
                        )
                    except Exception as exc:
                        for _, future in chunk:
                            future.set_exception(exc)
                        continue
                    for (_, future), output in zip(chunk, outputs, strict=True):
                        future.set_result(output)


def _split_by_images(group: list, max_images: int) -> list[list]:
    """`service.serving.generator.split_by_images` (which needs Ray to import), on pairs."""
    chunks, current, total = [], [], 0
    for item in group:
        if current and total + item[0].samples > max_images:
            chunks.append(current)
            current, total = [], 0
        current.append(item)
        total += item[0].samples
    return chunks + [current] if current else chunks


def make_engine(args, folder: Path):
    import torch

    from service.engine.optimize import OptimizationConfig
    from service.engine.pipeline import Engine

    optimize = {"auto": None, "on": True, "off": False}[args.optimize]
    overrides = {} if optimize is None else {"enabled": optimize}
    if args.compile_cache_dir:
        overrides["compile_cache_dir"] = args.compile_cache_dir
    optimizations = OptimizationConfig.for_device(args.device, **overrides)
    if args.device.startswith("cuda"):
        dtype = torch.bfloat16 if optimizations.enabled else torch.float16
    else:
        dtype = torch.float32
    return Engine({MODEL_ID: folder}, device=args.device, dtype=dtype, optimizations=optimizations)


# ---- the run -----------------------------------------------------------------------------------


def highest_load_under(runs: list[dict], mode: str, target_s: float) -> float | None:
    """The highest offered load whose p95 is under the target, with every lower one too."""
    best = None
    for run in sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["offered_rps"]):
        if run.get("failed") or run.get("p95_s") is None or run["p95_s"] >= target_s:
            break
        best = run["offered_rps"]
    return best


async def measure(args, clients: dict, save) -> dict[str, Any]:
    """`clients[mode](params)` generates one request in that mode; `save(partial)` is called
    after each load level, so a run killed at its time limit keeps what it measured."""
    solo_requests = make_requests(args, args.solo, seed=args.seed + 1)
    solo: dict[str, list[float]] = {mode: [] for mode in MODES}
    for params in solo_requests:  # one at a time: nothing to batch with
        for mode in MODES:
            started = time.perf_counter()
            await clients[mode](params)
            solo[mode].append(time.perf_counter() - started)
    # The service time: request mode's solo latency also holds its batch_wait_timeout_s.
    service_s = min(statistics.fmean(latencies) for latencies in solo.values())
    target_s = args.p95_target_s or args.slo_factor * service_s
    print(
        "solo: mean "
        + ", ".join(f"{mode} {statistics.fmean(solo[mode]):.3f} s" for mode in MODES)
        + f"; service time {service_s:.3f} s; p95 target {target_s:.3f} s",
        flush=True,
    )

    requests = make_requests(args, args.requests, seed=args.seed)
    unit_offsets = poisson_offsets(args.requests, seed=args.seed)
    runs: list[dict] = []
    skipped: list[float] = []

    def outcome() -> dict[str, Any]:
        highest = {mode: highest_load_under(runs, mode, target_s) for mode in MODES}
        return {
            "solo": {
                "requests": len(solo_requests),
                "service_s": round(service_s, 4),
                **{
                    mode: {
                        "mean_s": round(statistics.fmean(latencies), 4),
                        "latencies_s": [round(x, 4) for x in latencies],
                    }
                    for mode, latencies in solo.items()
                },
            },
            "p95_target_s": round(target_s, 4),
            "runs": runs,
            "skipped_load_factors": skipped,
            "highest_load_under_target_rps": highest,
            "summary": summarize(runs, highest),
        }

    for factor in args.loads:
        if args.budget_s and time.perf_counter() - args.started > args.budget_s:
            skipped.append(factor)
            continue
        rps = factor / service_s
        offsets = [t / rps for t in unit_offsets]
        for mode in MODES:
            result = await open_loop(clients[mode], requests, offsets)
            run = {"mode": mode, "load_factor": factor, "offered_rps": round(rps, 4), **result}
            runs.append(run)
            print(
                f"{mode:>7}  load {factor:4.2f}x ({rps:6.2f} req/s)  "
                f"p50 {run.get('p50_s', float('nan')):7.3f} s  "
                f"p95 {run.get('p95_s', float('nan')):7.3f} s  "
                f"{run.get('throughput_images_per_s', 0):6.2f} img/s  failed {run['failed']}",
                flush=True,
            )
        save(outcome())
    return outcome()


def summarize(runs: list[dict], highest: dict) -> dict[str, Any]:
    """Step over request, per load: latency ratios (< 1: step mode is faster)."""
    by_key = {(r["mode"], r["load_factor"]): r for r in runs}
    per_load = []
    for factor in sorted({r["load_factor"] for r in runs}):
        req, step = by_key[("request", factor)], by_key[("step", factor)]
        if req.get("p50_s") and step.get("p50_s"):
            per_load.append(
                {
                    "load_factor": factor,
                    "p50_step_over_request": round(step["p50_s"] / req["p50_s"], 3),
                    "p95_step_over_request": round(step["p95_s"] / req["p95_s"], 3),
                }
            )
    wins = sum(1 for row in per_load if row["p95_step_over_request"] < 1)
    favours = "step" if (highest["step"] or 0) > (highest["request"] or 0) else None
    if favours is None:
        if (highest["request"] or 0) > (highest["step"] or 0):
            favours = "request"
        else:
            favours = "step" if wins > len(per_load) / 2 else "request"
    return {"per_load": per_load, "p95_wins_step": wins, "favours": favours}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        choices=("auto", "serve", "engine"),
        default="auto",
        help="serve: the Generator deployment on Ray Serve; engine: both modes in this process "
        "without Ray (the GPU image); auto: serve where Ray is installed",
    )
    parser.add_argument("--model", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--model-dir", help="where the model folder is built (kept, reused)")
    parser.add_argument("--compile-cache-dir", help="engine target: persistent Inductor cache")
    parser.add_argument("--budget-s", type=float, help="start no load level after this")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--optimize", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--size", type=int, help="width = height (default: 64 tiny, 768 full)")
    parser.add_argument("--steps", help="step counts of the mix (default: 10,20,30 / 20,30,50)")
    parser.add_argument("--schedulers", default=",".join(DEFAULT_SCHEDULERS))
    parser.add_argument("--mix", choices=("mixed", "uniform"), default="mixed")
    parser.add_argument("--two-image-share", type=float, default=0.2)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--requests", type=int, default=48, help="requests per load level")
    parser.add_argument("--solo", type=int, default=6, help="requests run alone first")
    parser.add_argument("--loads", default="0.5,1,1.5,2,3,4,6,8", help="multiples of 1/S")
    parser.add_argument("--slo-factor", type=float, default=4.0)
    parser.add_argument("--p95-target-s", type=float)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-images", type=int, default=16)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.1)
    parser.add_argument("--max-running-images", type=int, default=16)
    parser.add_argument("--generator-num-cpus", type=float, default=1)
    parser.add_argument("--quick", action="store_true", help="CI smoke: tiny numbers")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    full = args.model == "full"
    if args.quick:
        args.requests, args.solo, args.loads = 10, 2, "1,3"
        args.steps = args.steps or "3,5"
    args.size = args.size or (768 if full else 64)
    args.steps = [int(s) for s in (args.steps or ("20,30,50" if full else "10,20,30")).split(",")]
    args.schedulers = args.schedulers.split(",")
    args.loads = [float(x) for x in args.loads.split(",")]
    return args


def run_serve(args, folder: Path, save) -> tuple[dict, float]:
    import ray
    from ray import serve

    from service.ports import free_port
    from service.serving.app import apply_ray_env, start_serve

    gpus = 0.5 if args.device.startswith("cuda") else 0  # both replicas on one GPU, idle by turns
    apply_ray_env()
    ray.init(
        num_cpus=max(4, 2 * int(args.generator_num_cpus) + 1),
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}},
    )
    started = time.perf_counter()
    try:
        start_serve({"host": "127.0.0.1", "port": free_port()})
        clients = {mode: deploy(mode, args, folder, gpus) for mode in MODES}
        ready_s = time.perf_counter() - started
        return asyncio.run(measure(args, clients, save)), ready_s
    finally:
        serve.shutdown()
        ray.shutdown()


def run_engine(args, folder: Path, save) -> tuple[dict, float]:
    if args.device == "cpu":  # as a Serve replica with generator_num_cpus gets (OMP threads)
        import torch

        torch.set_num_threads(max(1, int(args.generator_num_cpus)))
    started = time.perf_counter()
    engine = make_engine(args, folder)
    engine.warmup(MODEL_ID, args.size, args.size)  # compiles / captures on the GPU path
    ready_s = time.perf_counter() - started

    async def go() -> dict:
        modes = InProcessModes(engine, args)
        try:
            return await measure(args, {"request": modes.request, "step": modes.step}, save)
        finally:
            modes.close()

    return asyncio.run(go()), ready_s


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    args.started = time.perf_counter()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.target == "auto":
        try:
            import pydantic  # noqa: F401
            import ray  # noqa: F401
        except ImportError:
            args.target = "engine"
        else:
            args.target = "serve"
    workdir = Path(tempfile.mkdtemp(prefix="sdserve-batching-"))
    folder = model_folder(args, workdir)
    device_type = args.device.split(":")[0]
    out = Path(
        args.out
        or ROOT
        / "benchmarks"
        / "results"
        / f"batching-{device_type}-{args.model}{'-' + args.mix if args.mix != 'mixed' else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu_name = torch.cuda.get_device_name(0) if device_type == "cuda" else None
    header = {
        "benchmark": "batching",
        "target": args.target,
        "device": {"type": device_type, "name": gpu_name or platform.processor()},
        "cpus": os.cpu_count(),
        "model": args.model,
        "workload": {
            "mix": args.mix,
            "size": args.size,
            "steps": args.steps,
            "schedulers": args.schedulers,
            "two_image_share": args.two_image_share,
            "guidance_scale": args.guidance,
            "requests_per_load": args.requests,
            "load_factors": args.loads,
            "seed": args.seed,
        },
        "config": {
            "request": {
                "max_batch_size": args.max_batch_size,
                "max_batch_images": args.max_batch_images,
                "batch_wait_timeout_s": args.batch_wait_timeout_s,
            },
            "step": {"max_running_images": args.max_running_images, "admission": "oldest_first"},
            "generator_num_cpus": args.generator_num_cpus,
            "optimize": args.optimize,
        },
        "versions": {"torch": torch.__version__},
    }
    if args.target == "serve":
        import ray

        header["versions"]["ray"] = ray.__version__

    def save(measured: dict, ready_s: float | None = None) -> None:
        result = {**header, "ready_s": None if ready_s is None else round(ready_s, 1)}
        out.write_text(json.dumps({**result, **measured}, indent=2) + "\n")

    runner = run_serve if args.target == "serve" else run_engine
    measured, ready_s = runner(args, folder, save)
    save(measured, ready_s)
    highest = measured["highest_load_under_target_rps"]
    print(
        f"highest load with p95 < {measured['p95_target_s']} s: request {highest['request']} "
        f"req/s, step {highest['step']} req/s; favours {measured['summary']['favours']}"
    )
    print(f"wrote {out}")
    return {**header, **measured}


if __name__ == "__main__":
    main()
