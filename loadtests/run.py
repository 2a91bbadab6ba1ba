"""Run a load test end to end: serve the tiny model locally (unless --host names a server),
create the keys, run locust headless, follow every job to its end, check the ledger, write the
reports and check the SLO. Exits non-zero when a threshold of the SLO failed.

    python -m loadtests.run --users 8 --duration 60s              # make loadtest
    python -m loadtests.run --step --step-users 2 --step-max-users 16
    python -m loadtests.run --host https://sd.example.com --keys-file keys.json \\
        --traffic-profile sd2 --metrics-url http://ray-head:8080/metrics --slo my-slo.yaml

Reports go to loadtests/reports/<time>/ (and loadtests/reports/latest): locust's CSV files and
HTML report, summary.json, the logs of locust and of the local server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import yaml

from loadtests.slo import DEFAULT_SLO, load_slo, report
from loadtests.traffic import PROFILES, BurstKey, LoadKeys
from loadtests.webhooks import SECRET_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "loadtests" / "reports"
SERVE_CONFIG = ROOT / "loadtests" / "serve_config.yaml"
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
STEP_LOCUSTFILE = ROOT / "loadtests" / "stepload.py"
SERVER_START_TIMEOUT_S = 180
SERVER_STOP_TIMEOUT_S = 60
# The local server's Ray workers export metrics this often, so the last scrape is current.
LOCAL_METRICS_INTERVAL_MS = 500
BURST_BALANCE_USD = Decimal(1000)


def parse_duration(text: str) -> float:
    """Seconds of a locust-style duration: 90, 90s, 2m, 1h30m."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text.replace(" ", ""):
        raise ValueError(f"not a duration: {text!r} (use e.g. 60s, 2m, 1h30m)")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


# ---- keys -------------------------------------------------------------------------------------


def create_keys(
    database_url: str,
    limits: dict[str, int] | None = None,
    traffic_keys: int = 2,
    tag: str | None = None,
) -> LoadKeys:
    """Premium keys for the main mix and one free and one pay-per-use key for the bursts,
    written straight into the service's database (local runs and tests). `limits` are the
    server's per-plan concurrency limits (its settings, else the defaults)."""
    from service.config import load_settings
    from service.store.db import make_engine, make_sessionmaker
    from service.store.keys import KeyStore

    limits = {**load_settings().max_concurrent_requests, **(limits or {})}
    tag = tag or time.strftime("%Y%m%d%H%M%S")
    engine = make_engine(database_url)
    try:
        store = KeyStore(make_sessionmaker(engine))
        traffic = tuple(
            store.create(f"loadtest-{tag}-traffic-{i}", "premium")[0] for i in range(traffic_keys)
        )
        free, _ = store.create(f"loadtest-{tag}-burst-free", "free")
        paid, _ = store.create(
            f"loadtest-{tag}-burst-pay", "pay_per_use", balance=BURST_BALANCE_USD
        )
    finally:
        engine.dispose()
    return LoadKeys(
        traffic=traffic,
        burst=(
            BurstKey("free", free, limits.get("free", 5)),
            BurstKey("pay_per_use", paid, limits.get("pay_per_use", 10)),
        ),
    )


def burst_limits(config: dict[str, Any]) -> dict[str, int]:
    """Per-plan concurrency limits a Serve config sets (the burst users aim past them)."""
    settings = config["applications"][0]["args"].get("settings") or {}
    return dict(settings.get("max_concurrent_requests") or {})


# ---- the local server -------------------------------------------------------------------------


@contextmanager
def local_server(run_dir: Path, serve_config: Path, log_path: Path, webhook_host: str = ""):
    """`sdserve serve` on free loopback ports with the run's own database and image folder;
    yields (base_url, metrics_url, database_url, config). Stopped with SIGINT, as Ctrl-C.
    `webhook_host` is added to the webhook targets the service allows."""
    from service.ports import free_port

    config = yaml.safe_load(serve_config.read_text())
    args = config["applications"][0].setdefault("args", {})
    settings = args.setdefault("settings", {})
    allowed = settings.setdefault("webhook_allowed_hosts", [])
    if webhook_host and webhook_host not in allowed:
        allowed.append(webhook_host)
    database_url = f"sqlite:///{run_dir / 'sdserve.db'}"
    settings["database_url"] = database_url
    # webhooks are signed, and the receiver checks them (loadtests/webhooks.py)
    settings.setdefault("webhook_secret", secrets.token_hex(32))
    settings["image_store_url"] = str(run_dir / "images")
    run_config = run_dir / "serve_config.yaml"
    run_config.write_text(yaml.safe_dump(config, sort_keys=False))

    port, metrics_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_metrics_report_interval_ms": str(LOCAL_METRICS_INTERVAL_MS),
    }
    command = [
        str(Path(sys.executable).with_name("sdserve")),
        "serve",
        "--config",
        str(run_config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    ]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            _wait_ready(base_url, process, log_path)
            yield base_url, f"http://127.0.0.1:{metrics_port}/metrics", database_url, config
        finally:
            stop_process(process)


def _wait_ready(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sdserve serve exited with {process.returncode}; see {log_path}")
        try:
            if requests.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"sdserve was not ready within {SERVER_START_TIMEOUT_S} s; see {log_path}")


def stop_process(process: subprocess.Popen) -> None:
    """SIGINT (a clean Serve and Ray shutdown), then SIGTERM, then SIGKILL, each bounded."""
    for sig, wait_s in ((signal.SIGINT, SERVER_STOP_TIMEOUT_S), (signal.SIGTERM, 10)):
        if process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait(10)


# ---- locust -----------------------------------------------------------------------------------


def locust_command(
    host: str,
    keys_file: Path,
    out_dir: Path,
    *,
    users: int,
    spawn_rate: float,
    duration_s: float,
    profile: str = "tiny",
    metrics_urls: list[str] | None = None,
    metrics_settle_s: float = 12.0,
    drain_timeout_s: float = 90.0,
    slo_file: Path = DEFAULT_SLO,
    webhook_host: str = "127.0.0.1",
    webhook_url: str = "",
    step: dict[str, float] | None = None,
    stop_timeout_s: float = 60.0,
) -> list[str]:
    """The headless locust command line of a run; reports land in `out_dir`."""
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(STEP_LOCUSTFILE if step else LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--csv",
        str(out_dir / "locust"),
        "--html",
        str(out_dir / "report.html"),
        "--logfile",
        str(out_dir / "locust.log"),
        "--only-summary",
        "--stop-timeout",
        str(int(stop_timeout_s)),
        "--keys-file",
        str(keys_file),
        "--traffic-profile",
        profile,
        "--metrics-url",
        ",".join(metrics_urls or []),
        "--metrics-settle-s",
        str(metrics_settle_s),
        "--drain-timeout-s",
        str(drain_timeout_s),
        "--summary-file",
        str(out_dir / "summary.json"),
        "--slo-file",
        str(slo_file),
        "--webhook-host",
        webhook_host,
    ]
    if webhook_url:
        command += ["--webhook-url", webhook_url]
    if step:
        command += [
            "--step-users",
            str(int(step["users"])),
            "--step-duration-s",
            str(step["duration_s"]),
            "--step-max-users",
            str(int(step["max_users"])),
        ]
    else:
        command += ["--users", str(users), "--spawn-rate", str(spawn_rate)]
        command += ["--run-time", f"{int(duration_s)}s"]
    return command


def run_locust(
    command: list[str], out_dir: Path, timeout_s: float, webhook_secret: str | None = None
) -> dict[str, Any]:
    """Run locust to its end (bounded) and return the summary it wrote. `webhook_secret`: the
    service's, so the receiver verifies each webhook's signature."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if webhook_secret:
        env[SECRET_VARIABLE] = webhook_secret
    with open(out_dir / "locust.out", "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(process)
            message = f"locust ran past {timeout_s:.0f} s; see {out_dir}/locust.out"
            raise SystemExit(message) from None
    summary_file = out_dir / "summary.json"
    if not summary_file.exists():
        tail = (out_dir / "locust.out").read_text()[-3000:]
        raise SystemExit(f"locust wrote no summary (exit {process.returncode}):\n{tail}")
    return json.loads(summary_file.read_text())


def run_budget_s(duration_s: float, drain_timeout_s: float, settle_s: float, stop_s: float):
    """How long a locust process may take before it is stopped: run, stop, drain, settle."""
    return duration_s + stop_s + drain_timeout_s + settle_s + 60


# ---- the report -------------------------------------------------------------------------------


def print_summary(summary: dict[str, Any]) -> None:
    run, total = summary["run"], summary["total"]
    print(
        f"\n{run['mode']} run on {run['host']} ({run['profile']} profile), "
        f"{run['duration_s']:.0f} s: {total['requests']} requests, {total['rps']:.2f} req/s, "
        f"{total['failures']} unexpected failures"
    )
    print(
        f"{'endpoint':<22} {'requests':>8} {'fail':>5} {'req/s':>7} {'p50':>7} {'p95':>7} "
        f"{'p99':>7}  (ms)"
    )
    for name, e in sorted(summary["endpoints"].items()):
        print(
            f"{name:<22} {e['requests']:>8} {e['failures']:>5} {e['rps']:>7.2f} "
            f"{e['p50_ms']:>7.0f} {e['p95_ms']:>7.0f} {e['p99_ms']:>7.0f}"
        )
    jobs, hooks = summary["jobs"], summary["webhooks"]
    print(
        f"images delivered: {summary['images']['delivered']} ({summary['images']['per_s']:.2f}/s)"
        f"; jobs: {jobs['accepted']} accepted, {jobs['success']} success, {jobs['failed']} "
        f"failed, {jobs['unfinished']} unfinished; webhooks: {hooks['delivered']} of "
        f"{hooks['expected']} delivered"
    )
    service = summary.get("service") or {}
    if "error" in service:
        print(f"service metrics: {service['error']}")
    else:
        batch, queue = service["batch_size_images"], service["queue_wait_s"]
        print(
            f"service: {service['images_generated']} images generated "
            f"({service['images_per_s']}/s); batch size mean {batch['mean']} p50 {batch['p50']} "
            f"p95 {batch['p95']} ({batch['count']} pipeline calls); queue wait p50 "
            f"{queue['p50']} s p95 {queue['p95']} s"
        )
    for failure in summary.get("failures") or []:
        print(f"  failure x{failure['occurrences']}: {failure['name']}: {failure['error']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="", help="a running server; default: serve one here")
    parser.add_argument("--keys-file", type=Path, help="keys JSON (required with --host)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    parser.add_argument("--duration", default="60s", help="e.g. 60s, 5m")
    parser.add_argument("--traffic-profile", default="tiny", choices=sorted(PROFILES))
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        help="Ray metrics endpoint of a node (repeat per node); local runs find their own",
    )
    parser.add_argument("--slo", type=Path, default=DEFAULT_SLO)
    parser.add_argument("--out", type=Path, help="report folder (default reports/<time>)")
    parser.add_argument("--webhook-host", default="127.0.0.1")
    parser.add_argument("--webhook-url", default="", help="URL the service POSTs webhooks to")
    parser.add_argument("--drain-timeout-s", type=float, default=90.0)
    parser.add_argument("--step", action="store_true", help="step-load mode")
    parser.add_argument("--step-users", type=int, default=4)
    parser.add_argument("--step-duration-s", type=float, default=60.0)
    parser.add_argument("--step-max-users", type=int, default=32)
    parser.add_argument("--keep-images", action="store_true", help="keep the local run's PNGs")
    args = parser.parse_args(argv)

    if args.host and not args.keys_file:
        parser.error("--host needs --keys-file (see docs/loadtests.md)")
    if not args.step and args.users < 5:
        parser.error("--users must be at least 5: the webhook, bad-input and burst users take 3")
    duration_s = parse_duration(args.duration)
    slo = load_slo(args.slo)  # fail early on a broken SLO file
    run_dir = args.out or REPORTS / time.strftime("%Y%m%d-%H%M%S")
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    step = None
    if args.step:
        step = {
            "users": args.step_users,
            "duration_s": args.step_duration_s,
            "max_users": args.step_max_users,
        }
        steps = -(-args.step_max_users // args.step_users)
        duration_s = steps * args.step_duration_s
    print(f"reports: {run_dir}")

    def go(host, keys_file, metrics_urls, settle_s, database_url=None, webhook_secret=None):
        command = locust_command(
            host,
            keys_file,
            run_dir,
            users=args.users,
            spawn_rate=args.spawn_rate,
            duration_s=duration_s,
            profile=args.traffic_profile,
            metrics_urls=metrics_urls,
            metrics_settle_s=settle_s,
            drain_timeout_s=args.drain_timeout_s,
            slo_file=args.slo,
            webhook_host=args.webhook_host,
            webhook_url=args.webhook_url,
            step=step,
        )
        print(f"locust: {args.users if not step else 'step-load'} users on {host}...", flush=True)
        budget = run_budget_s(duration_s, args.drain_timeout_s, settle_s, 60)
        # a remote server's secret comes from the environment (SECRET_VARIABLE)
        summary = run_locust(command, run_dir, budget, webhook_secret)
        if database_url:
            from loadtests.accounting import check_ledger

            summary["ledger"] = check_ledger(database_url, summary["images"]["delivered"])
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    if args.host:
        summary = go(args.host.rstrip("/"), args.keys_file.resolve(), args.metrics_url, 12.0)
    else:
        print("starting sdserve with the tiny model (Ray takes a few seconds)...", flush=True)
        webhook_host = urlsplit(args.webhook_url).hostname if args.webhook_url else None
        if not webhook_host and args.webhook_host not in ("", "0.0.0.0"):
            webhook_host = args.webhook_host
        log_path = run_dir / "server.log"
        with local_server(run_dir, args.serve_config, log_path, webhook_host or "127.0.0.1") as (
            base_url,
            metrics_url,
            database_url,
            config,
        ):
            keys = create_keys(database_url, burst_limits(config))
            keys_file = run_dir / "keys.json"
            keys_file.write_text(json.dumps(keys.to_dict(), indent=2) + "\n")
            secret = config["applications"][0]["args"]["settings"]["webhook_secret"]
            summary = go(base_url, keys_file, [metrics_url], 2.0, database_url, secret)
        if not args.keep_images:
            shutil.rmtree(run_dir / "images", ignore_errors=True)

    latest = REPORTS / "latest"
    if run_dir.parent == REPORTS:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)
    print_summary(summary)
    checks, lines = report(summary, slo)
    print(f"\nSLO ({args.slo}):")
    print("\n".join(lines))
    failed = [check.name for check in checks if check.ok is False]
    print(f"\nreports in {run_dir}: summary.json, report.html, locust_stats.csv")
    if failed:
        print(f"SLO FAILED: {', '.join(failed)}")
        return 1
    print("SLO met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
