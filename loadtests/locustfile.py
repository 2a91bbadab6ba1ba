"""Locust user classes for sdserve's real traffic mix.

    SyncUser      text2img that waits for its images (mixed sizes and samples), then sometimes
                  downloads one, as the snippets on ModelsLab's model pages do
    PollingUser   instant_response, then fetch until the job ends: modelslab-py's way (v6,
                  every 2 s) or the official CLI's (v7, 1 s doubling to 10 s)
    WebhookUser   instant_response with a webhook to the receiver this process runs
    BadInputUser  broken bodies whose clean `status: error` answer (naming the field) is the
                  expected result
    BurstUser     bursts of twice a key's concurrency limit on free and pay-per-use keys; the
                  429 with `retry_after` is the expected result for the requests over it

Run it through `python -m loadtests.run` (which also starts a local server and checks the SLO),
or directly: `python -m locust -f loadtests/locustfile.py --headless -H URL --keys-file F`.
At the end of a run every accepted job is followed until it ends, webhooks are awaited, and a
JSON summary (`--summary-file`) is written with the service's own Prometheus figures.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):  # `locust -f loadtests/locustfile.py`: make `loadtests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gevent  # noqa: E402
import requests  # noqa: E402
from gevent.pool import Group  # noqa: E402
from locust import FastHttpUser, between, events, task  # noqa: E402

from loadtests import prometheus  # noqa: E402
from loadtests.slo import load_slo, traffic_checks  # noqa: E402
from loadtests.traffic import (  # noqa: E402
    BAD_INPUTS,
    HTTP_METHODS,
    PROFILES,
    REQUEST_NAMES,
    JobBook,
    LoadKeys,
    burst_problem,
    check_error_body,
    check_job_body,
    check_rate_limited,
    percentile,
    poll_delays,
)
from loadtests.webhooks import (  # noqa: E402
    HOOK_PATH,
    SECRET_VARIABLE,
    Deliveries,
    WebhookReceiver,
)

log = logging.getLogger("sdserve.loadtest")

TEXT2IMG = "/api/v6/images/text2img"
FETCH_PATHS = {"sdk": "/api/v6/images/fetch/{id}", "cli": "/api/v7/images/fetch/{id}"}
SUBMIT_PATHS = {"sdk": TEXT2IMG, "cli": "/api/v7/images/text-to-image"}
NETWORK_TIMEOUT_S = 180.0  # a sync request may wait the whole sync window behind a queue


class RunState:
    """What the whole locust process shares: keys, profile, jobs, webhooks, step windows."""

    def __init__(self):
        self.keys: LoadKeys | None = None
        self.profile = PROFILES["tiny"]
        self.book = JobBook()
        self.deliveries = Deliveries()
        self.receiver: WebhookReceiver | None = None
        self.webhook_url = ""
        self.slo: dict[str, Any] = {}
        self.metrics_urls: list[str] = []
        self.metrics_before: dict | None = None
        self.metrics_before_at = 0.0
        self.metrics_error: str | None = None
        self.started_wall = ""
        self.started = 0.0
        self.stopped = 0.0
        self._traffic_keys = None
        self._burst_keys = None
        # step-load mode: per-step request samples and the verdicts of finished steps
        self.step_mode = False
        self.step_samples: dict[int, list[tuple[str, str, float, bool]]] = {}
        # every response time of the run by entry name, unrounded (locust keeps 2 digits)
        self.response_times: dict[str, list[float]] = {}
        self.steps: list[dict[str, Any]] = []
        self.stop_stepping = False

    def next_traffic_key(self) -> str:
        if self._traffic_keys is None:
            self._traffic_keys = itertools.cycle(self.keys.traffic)
        return next(self._traffic_keys)

    def next_burst_key(self):
        if self._burst_keys is None:
            self._burst_keys = itertools.cycle(self.keys.burst)
        return next(self._burst_keys)


STATE = RunState()


# ---- options and run events ------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _options(parser):
    group = parser.add_argument_group("sdserve")
    group.add_argument(
        "--keys-file",
        default="",
        env_var="SDSERVE_LOADTEST_KEYS",
        help='JSON: {"traffic": [keys], "burst": [{"plan", "key", "limit"}]}',
    )
    group.add_argument(
        "--traffic-profile",
        default="tiny",
        choices=sorted(PROFILES),
        help="request sizes and steps: tiny (the CPU demo model) or sd2 (real weights on GPUs)",
    )
    group.add_argument(
        "--webhook-host", default="127.0.0.1", help="address the webhook receiver listens on"
    )
    group.add_argument("--webhook-port", type=int, default=0, help="0: a free port")
    group.add_argument(
        "--webhook-url",
        default="",
        help="URL the service is told to POST to (default http://HOST:PORT/hook)",
    )
    group.add_argument(
        "--metrics-url",
        default="",
        help="Ray metrics endpoint(s) of the service, comma-separated; empty: none",
    )
    group.add_argument(
        "--metrics-settle-s",
        type=float,
        default=12.0,
        help="wait before the last scrape (Ray exports every 10 s unless told otherwise)",
    )
    group.add_argument(
        "--drain-timeout-s",
        type=float,
        default=90.0,
        help="after the run, how long to follow unfinished jobs and await webhooks",
    )
    group.add_argument("--summary-file", default="", help="where to write the JSON summary")
    group.add_argument("--slo-file", default="", help="SLO YAML (step-load mode judges steps)")
    group.add_argument("--step-users", type=int, default=4, help="step-load: users added a step")
    group.add_argument("--step-duration-s", type=float, default=60.0, help="step-load: length")
    group.add_argument("--step-max-users", type=int, default=64, help="step-load: last step")


@events.init.add_listener
def _init(environment, **_kwargs):
    options = environment.parsed_options
    if options is None:  # locust used as a library without our options
        return
    if not options.keys_file:
        raise SystemExit("--keys-file is required (see docs/loadtests.md)")
    STATE.keys = LoadKeys.load(options.keys_file)
    STATE.profile = PROFILES[options.traffic_profile]
    STATE.metrics_urls = [url for url in options.metrics_url.split(",") if url.strip()]
    STATE.slo = load_slo(options.slo_file) if options.slo_file else load_slo()
    # The checking classes run a fixed number of users whatever the total, so a small run
    # still has each of them; the rest are split 4:3 between sync and polling users.
    base_users = options.step_users if environment.shape_class else options.num_users
    WebhookUser.fixed_count = max(1, (base_users or 0) // 8)
    STATE.receiver = WebhookReceiver(
        options.webhook_host,
        options.webhook_port,
        _on_webhook_body,
        secret=os.environ.get(SECRET_VARIABLE) or None,
    )
    port = STATE.receiver.start()
    own_host = "127.0.0.1" if options.webhook_host in ("", "0.0.0.0") else options.webhook_host
    STATE.webhook_url = options.webhook_url or f"http://{own_host}:{port}{HOOK_PATH}"
    log.info(
        "webhook receiver on %s:%s, service told %s", options.webhook_host, port, STATE.webhook_url
    )


@events.test_start.add_listener
def _test_start(environment, **_kwargs):
    STATE.started = time.monotonic()
    STATE.started_wall = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if STATE.metrics_urls:
        try:
            STATE.metrics_before = prometheus.scrape(STATE.metrics_urls)
            STATE.metrics_before_at = time.monotonic()
        except Exception as exc:  # the run goes on; the summary says why figures are missing
            STATE.metrics_error = f"scrape at start failed: {exc}"


@events.test_stop.add_listener
def _test_stop(environment, **_kwargs):
    STATE.stopped = time.monotonic()
    options = environment.parsed_options
    if STATE.step_mode:
        finish_open_step(environment)
    drain(environment.host, options.drain_timeout_s)
    service = None
    if STATE.metrics_urls and STATE.metrics_before is not None:
        gevent.sleep(options.metrics_settle_s)
        try:
            after = prometheus.scrape(STATE.metrics_urls)
            # the counters moved between the two scrapes, the drain and settle included
            service = prometheus.service_figures(
                STATE.metrics_before, after, time.monotonic() - STATE.metrics_before_at
            )
        except Exception as exc:
            STATE.metrics_error = f"scrape at end failed: {exc}"
    summary = build_summary(environment, service)
    if options.summary_file:
        Path(options.summary_file).write_text(json.dumps(summary, indent=2) + "\n")
        log.info("summary written to %s", options.summary_file)


@events.quitting.add_listener
def _quitting(environment, **_kwargs):
    if STATE.receiver is not None:
        STATE.receiver.stop()


@events.request.add_listener
def _per_step(request_type, name, response_time, exception=None, **_kwargs):
    if STATE.started:  # as locust counts them: webhooks of the drain included
        STATE.response_times.setdefault(name, []).append(float(response_time or 0))
    if not STATE.step_mode or not STATE.started:
        return
    options = _options_of_runner()
    elapsed = time.monotonic() - STATE.started
    index = int(elapsed // options.step_duration_s)
    warmup = float((STATE.slo.get("step_load") or {}).get("warmup_s", 0))
    if elapsed - index * options.step_duration_s < warmup:
        return
    STATE.step_samples.setdefault(index, []).append(
        (name, request_type, float(response_time or 0), exception is not None)
    )


_ENVIRONMENT = None


def _options_of_runner():
    return _ENVIRONMENT.parsed_options


@events.init.add_listener
def _keep_environment(environment, **_kwargs):
    global _ENVIRONMENT
    _ENVIRONMENT = environment


# ---- webhooks ---------------------------------------------------------------------------------


def _on_webhook_body(payload: Any, signed: bool | None = None) -> None:
    delivery = STATE.deliveries.record(payload, signed)
    if delivery is None:
        return
    job = STATE.book.get(delivery.job_id)
    STATE.book.ended(delivery.job_id, delivery.status)
    problem = delivery.problem
    if job is None:
        problem = f"a webhook for job {delivery.job_id}, which this run did not submit"
    elif job.track_id != delivery.track_id:
        problem = f"track_id {delivery.track_id!r}, sent {job.track_id!r}"
    elif delivery.status == "failed" and not problem:
        problem = f"job failed: {payload.get('message')}"
    latency_ms = (delivery.received_at - job.accepted_at) * 1000 if job else 0.0
    events.request.fire(
        request_type="WEBHOOK",
        name=REQUEST_NAMES["delivery"],
        response_time=latency_ms,
        response_length=0,
        exception=RuntimeError(problem) if problem else None,
        context={},
    )


# ---- users ------------------------------------------------------------------------------------


def _json(response) -> Any:
    try:
        return response.json()
    except Exception:
        return None


class SdserveUser(FastHttpUser):
    """Shared request helpers; one API key per user, taken in turn from the traffic keys."""

    abstract = True
    network_timeout = NETWORK_TIMEOUT_S
    connection_timeout = 30.0

    def on_start(self):
        self.rng = random.Random()
        self.key = STATE.next_traffic_key()

    def submit(self, name: str, path: str, body: dict, *, webhook=False, track_id=None):
        """POST a text2img body; the job (if accepted) goes into the book. Returns the body."""
        samples = int(body.get("samples") or 1)
        with self.client.post(path, json=body, name=name, catch_response=True) as response:
            data = _json(response)
            if response.status_code == 429:
                response.failure("HTTP 429 on a traffic key: raise its plan's concurrency limit")
                return None
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {str(data)[:200]}")
                return None
            problem = check_job_body(data, samples)
            if problem:
                response.failure(problem)
                return None
            STATE.book.accepted(
                data["id"], body["key"], samples, webhook=webhook, track_id=track_id
            )
            if data["status"] != "processing":
                STATE.book.ended(data["id"], data["status"])
            if data["status"] == "failed":
                response.failure(f"job failed: {data.get('message')}")
                return data
            response.success()
            return data

    def follow(self, job_id: int, key: str, style: str, submitted: float) -> str:
        """Poll the job as the official clients do until it ends; its final status."""
        path = FETCH_PATHS[style].format(id=job_id)
        for delay in poll_delays(style):
            gevent.sleep(delay)
            with self.client.post(
                path, json={"key": key}, name=REQUEST_NAMES["fetch"], catch_response=True
            ) as response:
                data = _json(response)
                problem = None if response.status_code == 200 else f"HTTP {response.status_code}"
                if problem is None:
                    job = STATE.book.get(job_id)
                    problem = check_job_body(data, job.samples if job else 1)
                if problem:
                    response.failure(problem)
                    continue
                status = data["status"]
                if status == "processing":
                    response.success()
                    continue
                STATE.book.ended(job_id, status)
                if status == "failed":
                    response.failure(f"job failed: {data.get('message')}")
                else:
                    response.success()
                    self._job_done(submitted, len(data["output"]))
                return status
        return "processing"  # gave up like the client would; the drain follows it further

    def _job_done(self, submitted: float, images: int) -> None:
        events.request.fire(
            request_type="JOB",
            name=REQUEST_NAMES["job"],
            response_time=(time.monotonic() - submitted) * 1000,
            response_length=images,
            exception=None,
            context={},
        )

    def body(self, **extra) -> dict:
        return {"key": self.key, **STATE.profile.draw(self.rng), **extra}


class SyncUser(SdserveUser):
    weight = 4
    wait_time = between(0.2, 1.0)

    @task
    def text2img(self):
        submitted = time.monotonic()
        data = self.submit(REQUEST_NAMES["sync"], TEXT2IMG, self.body())
        if data is None:
            return
        if data["status"] == "processing":  # past the sync window: fetch it like a client
            self.follow(data["id"], self.key, "sdk", submitted)
        elif data["status"] == "success" and self.rng.random() < 0.3:
            self.download(data["output"][0])

    def download(self, url: str) -> None:
        path = urlsplit(url).path
        with self.client.get(path, name=REQUEST_NAMES["image"], catch_response=True) as response:
            kind = response.headers.get("content-type", "")
            if response.status_code != 200 or not kind.startswith("image/png"):
                response.failure(f"HTTP {response.status_code}, content-type {kind!r}")
            else:
                response.success()


class PollingUser(SdserveUser):
    weight = 3
    wait_time = between(0.5, 2.0)

    @task(2)
    def sdk_style(self):
        self._instant_then_poll("sdk")

    @task(1)
    def cli_style(self):
        self._instant_then_poll("cli")

    def _instant_then_poll(self, style: str) -> None:
        submitted = time.monotonic()
        data = self.submit(
            REQUEST_NAMES["instant"], SUBMIT_PATHS[style], self.body(instant_response="yes")
        )
        if data is not None and data["status"] == "processing":
            self.follow(data["id"], self.key, style, submitted)


class WebhookUser(SdserveUser):
    fixed_count = 1  # set from the user count at start: one per 8 users
    wait_time = between(1.0, 3.0)

    @task
    def with_webhook(self):
        track_id = f"lt-{uuid.uuid4().hex[:12]}"
        body = self.body(instant_response="yes", webhook=STATE.webhook_url, track_id=track_id)
        self.submit(REQUEST_NAMES["webhook"], TEXT2IMG, body, webhook=True, track_id=track_id)


class BadInputUser(SdserveUser):
    fixed_count = 1
    wait_time = between(1.0, 3.0)

    def on_start(self):
        super().on_start()
        self.cases = itertools.cycle(BAD_INPUTS)

    @task
    def bad_input(self):
        case = next(self.cases)
        name = REQUEST_NAMES["bad"]
        if case.fields is None:
            request = self.client.post(
                TEXT2IMG,
                data=case.body,
                headers={"Content-Type": "application/json"},
                name=name,
                catch_response=True,
            )
        else:
            body = self.body(**case.fields)
            if case.bad_key:
                body["key"] = "sk-not-a-key-" + uuid.uuid4().hex[:8]
            request = self.client.post(TEXT2IMG, json=body, name=name, catch_response=True)
        with request as response:
            data = _json(response)
            problem = check_error_body(response.status_code, data, case.expect)
            if problem is None:
                response.success()
                return
            if isinstance(data, dict) and isinstance(data.get("id"), int):
                # accepted after all: book it so the accounting at the end stays exact
                STATE.book.accepted(
                    data["id"], self.key, int(data.get("meta", {}).get("n_samples", 1))
                )
            response.failure(f"{case.label}: {problem}")


class BurstUser(SdserveUser):
    """Sends twice a key's limit at once; expects `processing` for those within the limit
    and 429 with retry_after for the rest, then follows its jobs and honours retry_after."""

    fixed_count = 1
    wait_time = between(2.0, 5.0)
    concurrency = 64  # connections of this user's pool: a burst goes out at once

    @task
    def burst(self):
        if not STATE.keys.burst:  # no burst keys given: this user idles
            gevent.sleep(5)
            return
        target = STATE.next_burst_key()
        group = Group()
        sent = time.monotonic()
        outcomes = group.map(lambda _i: self._one(target), range(2 * target.limit))
        accepted = [data for kind, data in outcomes if kind == "accepted"]
        waits = [data for kind, data in outcomes if kind == "limited"]
        if len(accepted) + len(waits) == len(outcomes):  # each answer was itself well-formed
            self._judge_limit(target, len(accepted), len(waits))
        followers = Group()
        for data in accepted:
            followers.spawn(self.follow, data["id"], target.key, "sdk", sent)
        followers.join()
        if waits:
            gevent.sleep(min(max(waits), 30.0))

    @staticmethod
    def _judge_limit(target, accepted: int, limited: int) -> None:
        events.request.fire(
            request_type="CHECK",
            name=REQUEST_NAMES["limit"],
            response_time=0,
            response_length=0,
            exception=burst_problem(target.limit, accepted, limited),
            context={},
        )

    def _one(self, target) -> tuple[str, Any]:
        body = {
            "key": target.key,
            "prompt": self.rng.choice(("burst", "a quick sketch")),
            "instant_response": "yes",
            **STATE.profile.burst,
        }
        with self.client.post(
            TEXT2IMG, json=body, name=REQUEST_NAMES["burst"], catch_response=True
        ) as response:
            data = _json(response)
            if response.status_code == 429:
                problem = check_rate_limited(429, data, response.headers.get("retry-after"))
                if problem:
                    response.failure(problem)
                    return "bad", None
                response.success()
                return "limited", float(data["retry_after"])
            problem = (
                check_job_body(data, 1)
                if response.status_code == 200
                else (f"HTTP {response.status_code}")
            )
            if problem is None and data["status"] != "processing":
                problem = f"status {data['status']!r} for an instant_response request"
            if problem:
                response.failure(f"{target.plan}: {problem}")
                return "bad", None
            STATE.book.accepted(data["id"], target.key, 1)
            response.success()
            return "accepted", data


# ---- the end of a run -------------------------------------------------------------------------


def drain(host: str, timeout_s: float) -> None:
    """Follow every job still processing until it ends, and await webhooks, within the
    timeout. These requests are not counted in the statistics: the run is over."""
    deadline = time.monotonic() + timeout_s
    session = requests.Session()
    while time.monotonic() < deadline:
        pending = STATE.book.unfinished()
        for job in pending:
            try:
                response = session.post(
                    f"{host}/api/v6/images/fetch/{job.job_id}", json={"key": job.key}, timeout=30
                )
                status = response.json().get("status")
            except Exception:
                continue
            if status in ("success", "failed"):
                STATE.book.ended(job.job_id, status)
        awaiting = [
            job
            for job in STATE.book.jobs()
            if job.webhook and STATE.deliveries.get(job.job_id) is None
        ]
        if not STATE.book.unfinished() and not awaiting:
            return
        gevent.sleep(0.5)
    log.warning("drain timed out: %d jobs unfinished", len(STATE.book.unfinished()))


def _endpoint(entry) -> dict[str, Any]:
    # Percentiles of the raw times: locust's own are rounded to 2 digits (15490 ms -> 15000),
    # which would let a p95 just over its threshold pass.
    times = sorted(STATE.response_times.get(entry.name, []))
    return {
        "method": entry.method,
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "rps": round(entry.total_rps, 3),
        "p50_ms": percentile(times, 0.50),
        "p95_ms": percentile(times, 0.95),
        "p99_ms": percentile(times, 0.99),
        "avg_ms": round(entry.avg_response_time, 1),
        "max_ms": entry.max_response_time,
    }


def build_summary(environment, service: dict | None) -> dict[str, Any]:
    stats = environment.stats
    duration = max(STATE.stopped - STATE.started, 1e-9)
    endpoints = {entry.name: _endpoint(entry) for entry in stats.entries.values()}
    http = [e for e in stats.entries.values() if e.method in HTTP_METHODS]
    requests_total = sum(e.num_requests for e in http)
    failures_total = sum(e.num_failures for e in stats.entries.values())
    jobs = STATE.book.summary()
    webhook_jobs = [(j.job_id, j.track_id) for j in STATE.book.jobs() if j.webhook]
    # images/s over the run: the drain after it delivers more, which `delivered` counts
    in_run = sum(
        job.samples
        for job in STATE.book.jobs()
        if job.status == "success" and job.ended_at is not None and job.ended_at <= STATE.stopped
    )
    runner = getattr(environment, "runner", None)
    crashes = list(getattr(runner, "exceptions", {}).values()) if runner else []
    options = environment.parsed_options
    return {
        "run": {
            "host": environment.host,
            "profile": STATE.profile.name,
            "mode": "step" if STATE.step_mode else "constant",
            "users": options.num_users
            if not STATE.step_mode
            else max((step["users"] for step in STATE.steps), default=None),
            "started_at": STATE.started_wall,
            "duration_s": round(duration, 2),
        },
        "total": {
            "requests": requests_total,
            "failures": failures_total,
            "rps": round(requests_total / duration, 3),
            "failure_ratio": round(failures_total / requests_total, 5) if requests_total else 0,
        },
        "endpoints": endpoints,
        "failures": [
            {"name": e.name, "error": str(e.error), "occurrences": e.occurrences}
            for e in stats.errors.values()
        ],
        "images": {
            "delivered": jobs["images_delivered"],
            "delivered_in_run": in_run,
            "per_s": round(in_run / duration, 3),
        },
        # tasks that raised: locust reports no request for them, so they are counted here
        "task_errors": [
            {"error": str(crash["msg"])[:300], "occurrences": crash["count"]} for crash in crashes
        ],
        "jobs": jobs,
        "webhooks": {
            **STATE.deliveries.summary(webhook_jobs),
            "signatures_checked": bool(STATE.receiver and STATE.receiver.secret),
        },
        "service": service
        if service is not None
        else {"error": STATE.metrics_error or "no --metrics-url given"},
        "steps": STATE.steps or None,
    }


# ---- step load ----------------------------------------------------------------------------------


def judge_step(index: int, users: int, environment) -> dict[str, Any]:
    """A finished step's figures over its window, and whether they kept the SLO."""
    options = environment.parsed_options
    step_cfg = STATE.slo.get("step_load") or {}
    warmup = float(step_cfg.get("warmup_s", 0))
    window = max(options.step_duration_s - warmup, 1e-9)
    samples = STATE.step_samples.get(index, [])
    by_name: dict[str, list[tuple[float, bool]]] = {}
    for name, _kind, ms, failed in samples:
        by_name.setdefault(name, []).append((ms, failed))
    endpoints = {}
    for name, values in by_name.items():
        endpoints[name] = {
            "requests": len(values),
            "failures": sum(failed for _, failed in values),
            "p95_ms": percentile(sorted(ms for ms, _ in values), 0.95),
        }
    http_requests = sum(1 for _, kind, _, _ in samples if kind in HTTP_METHODS)
    start = STATE.started + index * options.step_duration_s + warmup
    end = start + window
    images = sum(
        job.samples
        for job in STATE.book.jobs()
        if job.status == "success" and job.ended_at is not None and start <= job.ended_at < end
    )
    checks = traffic_checks(endpoints, STATE.slo)
    failed = [check.name for check in checks if check.ok is False]
    enough = http_requests >= int(step_cfg.get("min_requests", 1))
    if not enough:
        failed.append(f"too few requests ({http_requests})")
    return {
        "step": index,
        "users": users,
        "window_s": round(window, 1),
        "requests": http_requests,
        "rps": round(http_requests / window, 3),
        "images_per_s": round(images / window, 3),
        "endpoints": endpoints,
        "within_slo": not failed,
        "failed": failed,
    }


def users_at_step(index: int, options) -> int:
    """All users during step `index`: the fixed checking users (webhook, bad input, burst)
    plus `--step-users` sync and polling users per step, up to `--step-max-users` of those."""
    fixed = WebhookUser.fixed_count + BadInputUser.fixed_count + BurstUser.fixed_count
    return fixed + min(options.step_users * (index + 1), options.step_max_users)


def finish_open_step(environment) -> None:
    """At test stop: judge the step that was running if it ran its whole length."""
    options = environment.parsed_options
    elapsed = STATE.stopped - STATE.started
    index = int(elapsed // options.step_duration_s)
    judged = {step["step"] for step in STATE.steps}
    for done in range(index):
        if done not in judged:
            STATE.steps.append(judge_step(done, users_at_step(done, options), environment))
