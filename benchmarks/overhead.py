"""What sdserve's request path costs on top of Ray Serve itself, measured on this machine.

The same closed-loop client (aiohttp, N concurrent connections, a fixed duration) drives:

  echo   a bare Ray Serve deployment that returns the JSON body it gets
         (`max_ongoing_requests` raised so Serve's own limit does not cap it)
  full   the whole sdserve path for POST /api/v6/images/text2img with
         `engine: service.engine.blank:BlankEngine`: auth, validation, ledger reserve and job
         row, the generator hop and its batching, PNG storage, settle, the response

on two stacks, each its own Ray cluster: Serve as installed ("serve-defaults": its Python
HTTP proxy and actor calls; the echo only, before and again after the other stack) and
sdserve's Ray environment ("sdserve", RAY_ENV: HAProxy, gRPC, main-loop replicas; echo and
full path, rounds alternating so background load falls on both alike). Echo and ingress get
the same number of replicas (`--replicas`, default 2: one per core on the 2-core machine this
was written on). Prints requests/s, p50/p95 and the CPU per request of the server's processes
and of the client, the ratio of the full path's requests/s to each echo's (target: at least
half of the bare echo on Serve's defaults), and writes JSON under benchmarks/results/.

    .venv/bin/python benchmarks/overhead.py                 # ~3.5 minutes on 2 cores
    .venv/bin/python benchmarks/overhead.py --baseline-rounds 0     # the sdserve stack only
    .venv/bin/python benchmarks/overhead.py --profile-dir /tmp/prof   # + py-spy of replicas
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
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


# ---- the client --------------------------------------------------------------------------------


async def closed_loop(
    url: str, body: dict, connections: int, duration_s: float, warmup_s: float, expect
) -> dict[str, Any]:
    """N workers, each sending its next request when the previous one answered; only
    requests that start and end inside the measured window count.

    aiohttp (a dependency of Ray's): httpx's pool spent a full core at ~300 requests/s with 32
    connections, so the client, not the server, set the echo's rate."""
    import aiohttp

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    payload = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        start = time.perf_counter()
        measure_from = start + warmup_s
        end = measure_from + duration_s

        async def worker():
            while True:
                sent = time.perf_counter()
                if sent >= end:
                    return
                try:
                    async with client.post(url, data=payload, headers=headers) as response:
                        problem = expect(response.status, await response.read())
                except (aiohttp.ClientError, TimeoutError) as exc:
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


def expect_echo(status: int, data: bytes) -> str | None:
    if status != 200:
        return f"HTTP {status}"
    return None if json.loads(data).get("prompt") == BODY["prompt"] else "wrong echo"


def expect_success(status: int, data: bytes) -> str | None:
    if status != 200:
        return f"HTTP {status}"
    answer = json.loads(data).get("status")
    return None if answer == "success" else f"status {answer}"


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


def wait_until_up(url: str, timeout_s: float = 120, method: str = "GET") -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            body = BODY if method == "POST" else None
            if httpx.request(method, url, json=body, timeout=2).status_code == 200:
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
    # HAProxy (sdserve's RAY_ENV) is a child process of the proxy actor, not an actor
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == "haproxy":
                pids.setdefault("haproxy", []).append(int(stat.parent.name))
        except OSError:
            continue
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
        if name not in pids or name == "haproxy":  # not a Python process
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


# ---- one stack: a Ray cluster, its deployments, the measured rounds ----------------------------

# The stacks a phase runs on. "serve-defaults": Ray Serve as installed, none of sdserve's
# RAY_ENV (its Python HTTP proxy, actor calls between deployments): the stack the issue's
# "bare echo" figure was taken on. "sdserve": the environment sdserve runs Ray with.
STACKS = ("serve-defaults", "sdserve")


def stack_env(stack: str) -> dict[str, str]:
    from service.serving.app import RAY_ENV, single_node_ray_env

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    if stack == "sdserve":
        env.update({**RAY_ENV, **single_node_ray_env()})
        # an explicit RAY_SERVE_* of the caller's still wins, as with `sdserve serve`
        env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")})
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_phase(stack: str, args) -> dict[str, Any]:
    """In this process (started with stack_env(stack)): a Ray cluster with the echo and, on the
    sdserve stack, the full path; `args.rounds` rounds, alternating the paths."""
    import ray
    from ray import serve

    from service.ports import free_port
    from service.serving.app import build_app, start_serve

    data_dir = Path(tempfile.mkdtemp(prefix="sdserve-overhead-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    results: dict[str, list] = {"echo": [], "full": []}
    profiles = {}
    try:
        start_serve({"host": "127.0.0.1", "port": port})
        serve.run(
            echo_app(args.max_ongoing_requests, args.num_cpus, args.replicas),
            name="echo",
            route_prefix="/echo",
        )
        targets = {"echo": (f"{base}/echo", BODY, expect_echo)}
        if stack == "sdserve":
            serve.run(
                build_app(full_app_args(data_dir, base, args)), name="sdserve", route_prefix="/"
            )
            wait_until_up(f"{base}/readyz")
            body = {**BODY, "key": BENCH_KEY}
            targets["full"] = (f"{base}/api/v6/images/text2img", body, expect_success)
        wait_until_up(f"{base}/echo", method="POST")
        for round_index in range(args.rounds):
            for name, (url, payload, expect) in targets.items():
                components = ["Echo"] if name == "echo" else ["Ingress", "Generator"]
                components += ["ProxyActor", "haproxy"]
                profilers = []
                if args.profile_dir and round_index == 0:
                    out_dir = args.profile_dir / stack / name
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
                figures["server_cpu_ms_per_request"] = round(
                    sum(v for c, v in figures["cpu_ms_per_request"].items() if c != "client"), 2
                )
                for prof_name, raw, process in profilers:
                    process.wait(60)
                    if raw.exists():
                        profiles[f"{stack}/{name}/{prof_name}"] = top_frames(raw)
                results[name].append(figures)
                label = f"{name} ({stack})"
                print(
                    f"round {round_index + 1} {label:>22}: {figures['rps']:8.1f} req/s  "
                    f"p50 {figures['p50_ms']} ms  p95 {figures['p95_ms']} ms  "
                    f"errors {figures['errors'] or 0}  cpu cores {figures['cpu_cores']}",
                    flush=True,
                )
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "stack": stack,
        "ray_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")},
        "rounds": results,
        "profiles": profiles,
    }


def combined(rounds: list[dict]) -> dict[str, Any] | None:
    if not rounds:
        return None
    return {
        "rps": round(statistics.fmean(r["rps"] for r in rounds), 2),
        "p50_ms": round(statistics.median(r["p50_ms"] for r in rounds), 2),
        "p95_ms": round(statistics.median(r["p95_ms"] for r in rounds), 2),
        "server_cpu_ms_per_request": round(
            statistics.fmean(r["server_cpu_ms_per_request"] for r in rounds), 2
        ),
        "client_cpu_ms_per_request": round(
            statistics.fmean(r["cpu_ms_per_request"]["client"] for r in rounds), 2
        ),
        "errors": sum(sum(r["errors"].values()) for r in rounds),
        "rounds": rounds,
    }


# ---- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=32, help="concurrent requests")
    parser.add_argument("--duration-s", type=float, default=15, help="measured, per round")
    parser.add_argument("--warmup-s", type=float, default=3, help="unmeasured, per round")
    parser.add_argument(
        "--rounds", type=int, default=2, help="echo/full pairs on the sdserve stack"
    )
    parser.add_argument(
        "--baseline-rounds",
        type=int,
        default=1,
        help="rounds of the echo on Serve's defaults, before and again after the sdserve stack "
        "(0: skip that stack)",
    )
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
    parser.add_argument("--phase", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--phase-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # a child of the run below, in its stack's environment
        args.phase_out.write_text(json.dumps(run_phase(args.phase, args)))
        return 0

    # Each stack is its own Ray cluster in its own process: Ray's processes read RAY_SERVE_*
    # when they start. Serve's defaults run before and after, so drift falls on both sides.
    plan = ["sdserve"]
    if args.baseline_rounds:
        plan = ["serve-defaults", "sdserve", "serve-defaults"]
    load_before = os.getloadavg()
    phases = []
    with tempfile.TemporaryDirectory(prefix="sdserve-overhead-phases-") as tmp:
        for index, stack in enumerate(plan):
            out = Path(tmp) / f"{index}.json"
            rounds = args.rounds if stack == "sdserve" else args.baseline_rounds
            command = [sys.executable, __file__, *argv, "--rounds", str(rounds)]
            command += ["--phase", stack, "--phase-out", str(out)]
            done = subprocess.run(command, env=stack_env(stack), cwd=ROOT)
            if done.returncode != 0:
                print(f"the {stack} phase failed (exit {done.returncode})", file=sys.stderr)
                return 2
            phases.append(json.loads(out.read_text()))

    default_echo = combined(
        [r for p in phases if p["stack"] == "serve-defaults" for r in p["rounds"]["echo"]]
    )
    ours = next(p for p in phases if p["stack"] == "sdserve")
    echo, full = combined(ours["rounds"]["echo"]), combined(ours["rounds"]["full"])

    def ratio(baseline):
        return round(full["rps"] / baseline["rps"], 3) if baseline and baseline["rps"] else None

    # The target compares with a bare echo on Serve as installed (the 250 req/s);
    # without that stack, with the echo beside it.
    judged = default_echo or echo
    document = {
        "benchmark": "overhead",
        "what": "closed-loop requests/s and latency: bare Ray Serve echo (on Serve's defaults "
        "and on sdserve's Ray environment) vs the full sdserve text2img path with the blank "
        "engine (64x64, 1 step, premium key), same run",
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
            "baseline_rounds_before_and_after": args.baseline_rounds,
            "max_ongoing_requests": args.max_ongoing_requests,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
            "num_cpus_per_replica": args.num_cpus,
            "echo_and_ingress_replicas": args.replicas,
            "generator_call_max_requests": args.max_per_call,
            "ray_env": {p["stack"]: p["ray_env"] for p in phases},
            "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite",
            "client": "aiohttp.ClientSession in the phase's driver process",
        },
        "echo_serve_defaults": default_echo,
        "echo": echo,
        "full": full,
        "rps_ratio_full_over_echo_serve_defaults": ratio(default_echo),
        "rps_ratio_full_over_echo_same_stack": ratio(echo),
        "target_ratio": TARGET_RATIO,
        "target_compares_with": "echo_serve_defaults" if default_echo else "echo",
        "meets_target": ratio(judged) is not None and ratio(judged) >= TARGET_RATIO,
        "p50_added_ms": round(full["p50_ms"] - judged["p50_ms"], 2),
        "profiles": {k: v for p in phases for k, v in p["profiles"].items()} or None,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")

    def line(label, figures):
        return (
            f"  {label:<34} {figures['rps']:7.1f} req/s  p50 {figures['p50_ms']:7.1f} ms  "
            f"server CPU {figures['server_cpu_ms_per_request']:5.2f} ms/req  "
            f"client CPU {figures['client_cpu_ms_per_request']:5.2f} ms/req"
        )

    print()
    if default_echo:
        print(line("echo, Serve's defaults", default_echo))
    print(line("echo, sdserve's Ray environment", echo))
    print(line("full path, sdserve's Ray environment", full))
    if default_echo:
        print(f"ratio full / echo on Serve's defaults: {ratio(default_echo)}")
    print(f"ratio full / echo on the same stack:   {ratio(echo)}")
    print(
        f"target >= {TARGET_RATIO} against {document['target_compares_with']}: "
        f"{'met' if document['meets_target'] else 'MISSED'}; p50 added "
        f"{document['p50_added_ms']} ms\nwritten to {args.out}"
    )
    return 0 if document["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
