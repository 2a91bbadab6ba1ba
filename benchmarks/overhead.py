"""What sdserve's request path costs on top of Ray Serve itself, measured on this machine.

In one Ray cluster, the same closed-loop client (httpx, N concurrent connections, a fixed
duration) drives in turn:

  echo   a bare Ray Serve deployment that returns the JSON body it gets
         (`max_ongoing_requests` raised so Serve's own limit does not cap it)
  full   the whole sdserve path for POST /api/v6/images/text2img with
         `engine: service.engine.blank:BlankEngine`: auth, validation, ledger reserve and job
         row, the generator hop and its batching, PNG storage, settle, the response

Both run in the same Ray environment (sdserve's RAY_ENV) with the same number of replicas
(`--replicas`, default 2: one per core on the 2-core machine this was written on). Rounds
alternate (echo, full, echo, full, ...) so that background load falls on both alike. Prints
requests/s and p50/p95 latency of each, the ratio of requests/s (target: full keeps at least
half of echo's) and the p50 latency the full path adds; writes JSON under benchmarks/results/.

    .venv/bin/python benchmarks/overhead.py                 # ~2.5 minutes on 2 cores
    .venv/bin/python benchmarks/overhead.py --profile-dir /tmp/prof   # + py-spy of replicas
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.5
BENCH_KEY = "sdserve-bench-premium-key"
BODY = {
    "prompt": "a lighthouse at dusk, oil painting",
    "width": 64,
    "height": 64,
    "samples": 1,
    "num_inference_steps": 1,
    "seed": 1234,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the client --------------------------------------------------------------------------------


async def closed_loop(
    url: str, body: dict, connections: int, duration_s: float, warmup_s: float, expect
) -> dict[str, Any]:
    """N workers, each sending its next request when the previous one answered; only
    requests that start and end inside the measured window count."""
    import httpx

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        measure_from = start + warmup_s
        end = measure_from + duration_s

        async def worker():
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                try:
                    response = await client.post(url, json=body)
                    problem = expect(response)
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
                done = time.perf_counter()
                if sent >= measure_from and done <= end:
                    if problem:
                        errors[problem] += 1
                    else:
                        latencies.append(done - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
    latencies.sort()
    count = len(latencies)
    return {
        "requests": count,
        "errors": dict(errors),
        "rps": round(count / duration_s, 2),
        "p50_ms": round(1000 * latencies[count // 2], 2) if count else None,
        "p95_ms": round(1000 * latencies[int(count * 0.95)], 2) if count else None,
        "mean_ms": round(1000 * statistics.fmean(latencies), 2) if count else None,
    }


def expect_echo(response) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    return None if response.json().get("prompt") == BODY["prompt"] else "wrong echo"


def expect_success(response) -> str | None:
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    status = response.json().get("status")
    return None if status == "success" else f"status {status}"


# ---- the deployments ---------------------------------------------------------------------------


def echo_app(max_ongoing_requests: int, num_cpus: float, replicas: int = 1):
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(
        name="Echo",
        num_replicas=replicas,
        max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus},
    )
    class Echo:
        async def __call__(self, request: Request) -> dict:
            return await request.json()

    return Echo.bind()


def full_app_args(data_dir: Path, base_url: str, args) -> dict[str, Any]:
    from service.config import DEFAULT_MODEL_ID
    from service.engine.tiny_model import build_tiny_model

    # The blank engine never loads it, but the model registry reads its configs (sizes, price).
    model_dir = build_tiny_model(data_dir / "tiny-sd2")
    return {
        "engine": "service.engine.blank:BlankEngine",
        "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s,
        "ingress_max_ongoing_requests": args.max_ongoing_requests,
        "ingress_replicas": args.replicas,
        "ingress_num_cpus": args.num_cpus,
        "generator_num_cpus": args.num_cpus,
        "settings": {
            "models": {DEFAULT_MODEL_ID: str(model_dir)},
            "database_url": args.database_url or f"sqlite:///{data_dir / 'bench.db'}",
            "image_store_url": str(data_dir / "images"),
            "public_base_url": base_url,
            "min_size": 64,
            "warmup": False,
            "demo_key": "",
            # a premium admin key created at start; its plan's limit raised out of the way
            "admin_key": BENCH_KEY,
            "max_concurrent_requests": {"free": 5, "pay_per_use": 10, "premium": 100_000},
            "generator_call_max_requests": args.max_per_call,
        },
    }


def wait_until_up(url: str, timeout_s: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not come up within {timeout_s} s")


# ---- profiling ---------------------------------------------------------------------------------


def replica_pids() -> dict[str, list[int]]:
    """Pids of this cluster's proxy and replicas, by deployment (from the GCS)."""
    from ray._private import state

    pids: dict[str, list[int]] = {}
    for info in state.actors().values():
        name = info.get("ActorClassName", "")
        if info.get("State") != "ALIVE" or not info.get("Pid"):
            continue
        for wanted in ("Ingress", "Generator", "Echo", "ProxyActor"):
            if name.endswith(wanted):
                pids.setdefault(wanted, []).append(info["Pid"])
    return pids


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def start_profilers(out_dir: Path, duration_s: float, names: list[str]) -> list:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    pids = replica_pids()
    processes = []
    for name in names:
        if name not in pids:
            continue
        raw = out_dir / f"{name}.txt"
        command = [py_spy, "record", "--pid", str(pids[name][0])]
        command += ["--duration", str(int(duration_s))]
        command += [
            "--rate",
            "50",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
            "--gil",
        ]
        processes.append((name, raw, subprocess.Popen(command, stdout=subprocess.DEVNULL)))
    return processes


def top_frames(raw: Path, limit: int = 15) -> dict[str, list]:
    """From py-spy's collapsed stacks: the functions most often on the stack (inclusive) and
    at its top (self), as shares of all samples."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        raw_frames = [f for f in stack.split(";") if f]
        if not raw_frames:
            continue
        frames = [_frame(f) for f in raw_frames]
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
        for frame in {_frame(f) for f in raw_frames if " (service/" in f}:
            ours[frame] += n

    def share(counter):
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(limit)]

    return {
        "samples": total,
        "self_pct": share(own),
        "inclusive_pct": share(inclusive),
        # sdserve's own functions (service/...), inclusive: where its share of the time goes
        "service_inclusive_pct": share(ours),
    }


def _frame(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file.py)`, so a function's lines add up."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(where).name})" if where else name


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32, help="concurrent requests")
    parser.add_argument("--duration-s", type=float, default=15, help="measured, per round")
    parser.add_argument("--warmup-s", type=float, default=3, help="unmeasured, per round")
    parser.add_argument("--rounds", type=int, default=2, help="echo/full pairs")
    parser.add_argument("--max-ongoing-requests", type=int, default=1000)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.1)
    parser.add_argument("--num-cpus", type=float, default=0.5, help="per replica")
    parser.add_argument(
        "--replicas", type=int, default=2, help="of the echo and of the ingress alike"
    )
    parser.add_argument(
        "--max-per-call", type=int, default=8, help="requests per generator call (1: no sharing)"
    )
    parser.add_argument("--database-url", default="", help="default: SQLite in a temp folder")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead-cpu.json"
    )
    parser.add_argument("--profile-dir", type=Path, help="py-spy the replicas in round 1")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from service.serving.app import RAY_ENV, apply_ray_env, build_app

    data_dir = Path(tempfile.mkdtemp(prefix="sdserve-overhead-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    apply_ray_env()  # as sdserve runs Ray; the echo shares the cluster, so it gets it too
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    results: dict[str, list] = {"echo": [], "full": []}
    profiles = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            echo_app(args.max_ongoing_requests, args.num_cpus, args.replicas),
            name="echo",
            route_prefix="/echo",
        )
        serve.run(build_app(full_app_args(data_dir, base, args)), name="sdserve", route_prefix="/")
        wait_until_up(f"{base}/readyz")
        body = {**BODY, "key": BENCH_KEY}
        targets = {
            "echo": (f"{base}/echo", BODY, expect_echo),
            "full": (f"{base}/api/v6/images/text2img", body, expect_success),
        }
        for round_index in range(args.rounds):
            for name, (url, payload, expect) in targets.items():
                components = ["Echo"] if name == "echo" else ["Ingress", "Generator"]
                components.append("ProxyActor")
                profilers = []
                if args.profile_dir and round_index == 0:
                    out_dir = args.profile_dir / name
                    out_dir.mkdir(parents=True, exist_ok=True)
                    profilers = start_profilers(
                        out_dir, args.warmup_s + args.duration_s, components
                    )
                found = replica_pids()
                pids = {c: found[c] for c in components if c in found}
                pids["client"] = [os.getpid()]
                cpu_before = {c: cpu_seconds(pid) for c, pid in pids.items()}
                figures = asyncio.run(
                    closed_loop(
                        url, payload, args.connections, args.duration_s, args.warmup_s, expect
                    )
                )
                # CPU of each process over the round (warm-up included): cores busy, and
                # milliseconds per request served
                round_s = args.warmup_s + args.duration_s
                served = max(figures["requests"] * round_s / args.duration_s, 1)
                used = {c: cpu_seconds(pid) - cpu_before[c] for c, pid in pids.items()}
                figures["cpu_cores"] = {c: round(u / round_s, 2) for c, u in used.items()}
                figures["cpu_ms_per_request"] = {
                    c: round(1000 * u / served, 2) for c, u in used.items()
                }
                for prof_name, raw, process in profilers:
                    process.wait(60)
                    if raw.exists():
                        profiles[f"{name}/{prof_name}"] = top_frames(raw)
                results[name].append(figures)
                print(
                    f"round {round_index + 1} {name:>4}: {figures['rps']:8.1f} req/s  "
                    f"p50 {figures['p50_ms']} ms  p95 {figures['p95_ms']} ms  "
                    f"errors {figures['errors'] or 0}  cpu cores {figures['cpu_cores']}",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)

    def combined(rounds):
        return {
            "rps": round(statistics.fmean(r["rps"] for r in rounds), 2),
            "p50_ms": round(statistics.median(r["p50_ms"] for r in rounds), 2),
            "p95_ms": round(statistics.median(r["p95_ms"] for r in rounds), 2),
            "errors": sum(sum(r["errors"].values()) for r in rounds),
            "rounds": rounds,
        }

    echo, full = combined(results["echo"]), combined(results["full"])
    ratio = round(full["rps"] / echo["rps"], 3) if echo["rps"] else None
    document = {
        "benchmark": "overhead",
        "what": "closed-loop requests/s and latency: bare Ray Serve echo vs the full sdserve "
        "text2img path with the blank engine (64x64, 1 step, premium key), same run",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {
            "connections": args.connections,
            "duration_s_per_round": args.duration_s,
            "warmup_s_per_round": args.warmup_s,
            "rounds": args.rounds,
            "max_ongoing_requests": args.max_ongoing_requests,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
            "num_cpus_per_replica": args.num_cpus,
            "echo_and_ingress_replicas": args.replicas,
            "generator_call_max_requests": args.max_per_call,
            "ray_env": {name: os.environ.get(name) for name in RAY_ENV},
            "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite",
            "client": "httpx.AsyncClient in the driver process",
        },
        "echo": echo,
        "full": full,
        "rps_ratio_full_over_echo": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio is not None and ratio >= TARGET_RATIO,
        "p50_added_ms": round(full["p50_ms"] - echo["p50_ms"], 2),
        "profiles": profiles or None,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(
        f"\necho {echo['rps']} req/s (p50 {echo['p50_ms']} ms), full path {full['rps']} req/s "
        f"(p50 {full['p50_ms']} ms): ratio {ratio} (target >= {TARGET_RATIO}), "
        f"p50 added {document['p50_added_ms']} ms\nwritten to {args.out}"
    )
    return 0 if document["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
