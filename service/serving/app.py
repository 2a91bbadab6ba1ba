"""The application builder: one Serve config (`import_path` + `args`) drives `sdserve serve`,
`serve run` and KubeRay's `serveConfigV2` alike."""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application

from service.config import load_settings
from service.ports import free_ports
from service.serving.generator import Generator
from service.serving.ingress import Ingress

log = logging.getLogger(__name__)

# The environment every Ray process of sdserve runs with (set before Ray starts: the proxy and
# replicas read it at import). Ray's high-throughput mode (Ray >= 2.56): HAProxy takes HTTP on
# the Serve port and hands it straight to the ingress replicas' own HTTP servers (no Python
# proxy hop), deployments call each other over gRPC, and replicas run user code and the handle
# router on their main event loop instead of hopping threads. It is what took the full request
# path from ~75 to ~150 requests/s on 2 cores (benchmarks/overhead.py, docs/loadtests.md). Its
# one default we do not take is buffering request-path log lines by the thousand (flushed
# only when full or at an error): an operator reading the logs of a quiet replica must see
# every line as it happens.
RAY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}


# Where sdserve starts Ray itself, on one machine (`sdserve serve`, tests, benchmarks): a stopping
# ingress replica keeps serving this long so HAProxy stops sending to it first. HAProxy on the
# same machine hears of it within a second; Ray's 30 s default, which the image keeps, is for
# proxies on other nodes. It is also what Ctrl-C and each test module wait on shutdown.
SINGLE_NODE_RAY_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}
# HAProxy's own ports, fixed by Ray (9101 and 8404, on all interfaces): a second sdserve on the
# machine (`make test` or `make loadtest` beside `make run`) would fail to start its HAProxy.
# On one machine each sdserve takes free ones instead; a pod has its own.
HAPROXY_PORT_VARIABLES = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
# How often a stopping replica looks whether its requests are done. Ray's 2 s is at least 2 s
# added to every stop (Ctrl-C, scale-down, a restart) of a replica that was already idle; a
# look costs nothing.
SHUTDOWN_POLL_S = 0.25


SERVE_START_ATTEMPTS = 2


def start_serve(http_options: dict[str, Any]) -> None:
    """`serve.start`, and once more from scratch if its HTTP proxy never became ready.

    Ray's HAProxy manager has been seen to hang while starting its first reload (its event
    loop blocked, health checks unanswered; one of four fresh-clone `make test` runs hit
    it): `serve.start` then fails after 60 s with the proxy actor killed, while a fresh start
    comes up at once.
    """
    for attempt in range(1, SERVE_START_ATTEMPTS + 1):
        try:
            serve.start(http_options=http_options)
            return
        except (TimeoutError, RayActorError) as exc:
            if attempt == SERVE_START_ATTEMPTS:
                raise
            log.warning("Serve's HTTP proxy did not start (%s); starting Serve again", exc)
            serve.shutdown()


def single_node_ray_env() -> dict[str, str]:
    ports = free_ports(len(HAPROXY_PORT_VARIABLES))
    named = {name: str(port) for name, port in zip(HAPROXY_PORT_VARIABLES, ports, strict=True)}
    return {**SINGLE_NODE_RAY_ENV, **named}


def apply_ray_env() -> None:
    """RAY_ENV and single_node_ray_env() into this process's environment, unless already set;
    before ray.init, which starts Ray's processes with it."""
    for name, value in {**RAY_ENV, **single_node_ray_env()}.items():
        os.environ.setdefault(name, value)


class AppConfig(BaseModel):
    """The `args` of the Serve config: how the deployments are shaped and placed."""

    model_config = ConfigDict(extra="forbid")

    engine: str = Field(
        "service.engine.pipeline:Engine",
        description="Engine class as module:Name; service.engine.blank:BlankEngine draws "
        "nothing (to measure the serving path alone).",
    )
    batching: Literal["request", "step"] = Field(
        "step",
        description="request: @serve.batch collects requests and runs each group from its "
        "first denoising step to its last; step: requests join the running batch at the next "
        "denoising step (docs/batching.md).",
    )
    max_running_images: int = Field(
        16,
        ge=1,
        description="Step batching: images in one shape bucket's running set, i.e. the most "
        "one UNet forward takes (a larger request runs alone).",
    )
    admission: Literal["oldest_first", "round_robin"] = Field(
        "oldest_first",
        description="Step batching: which shape bucket (model, LoRA set, size) steps next: "
        "the one holding the oldest request, or each in turn.",
    )
    max_batch_size: int = Field(8, ge=1, description="Requests per @serve.batch call.")
    max_batch_images: int = Field(16, ge=1, description="Images per pipeline call.")
    batch_wait_timeout_s: float = Field(
        0.1, ge=0, description="How long a batch waits to fill before it runs."
    )
    generator_replicas: int = Field(1, ge=1, description="Generator replicas (no autoscaling).")
    generator_autoscaling: dict[str, Any] | None = Field(
        None, description="Serve autoscaling_config for the generator; overrides replicas."
    )
    generator_num_gpus: float = Field(0, ge=0, description="GPUs per generator replica.")
    generator_num_cpus: float = Field(1, ge=0, description="CPUs per generator replica.")
    generator_health_check_period_s: float = Field(
        10, gt=0, description="How often Serve checks a generator replica's health."
    )
    generator_max_ongoing_requests: int | None = Field(
        None,
        ge=1,
        description="Default: 4 x max_batch_size (request batching) or 4 x max_running_images "
        "(step batching), so batches can fill.",
    )
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas.")
    ingress_num_cpus: float = Field(0.5, ge=0, description="CPUs per ingress replica.")
    ingress_max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one ingress replica handles at once."
    )
    log_encoding: Literal["JSON", "TEXT"] = Field(
        "JSON", description="Replica log lines as JSON (with Serve's request_id) or text."
    )
    settings: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of any SDSERVE_* setting."
    )

    @model_validator(mode="after")
    def _ongoing_covers_batch(self):
        ongoing = self.generator_max_ongoing_requests
        if self.batching != "request":
            return self
        if ongoing is not None and ongoing < 2 * self.max_batch_size:
            raise ValueError(
                "generator_max_ongoing_requests must be at least twice max_batch_size "
                f"({2 * self.max_batch_size}), or batches can never fill"
            )
        return self

    def generator_ongoing(self) -> int:
        """Requests one generator replica holds: room for full batches plus the next ones."""
        per_batch = self.max_batch_size if self.batching == "request" else self.max_running_images
        return self.generator_max_ongoing_requests or 4 * per_batch


def generator_args(config: AppConfig, settings) -> tuple:
    """The Generator constructor's arguments from the Serve config (also used by benchmarks)."""
    return (
        settings,
        config.max_batch_size,
        config.batch_wait_timeout_s,
        config.max_batch_images,
        config.engine,
        config.batching,
        config.max_running_images,
        config.admission,
    )


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Validate `args` into AppConfig and bind ingress -> generator."""
    config = AppConfig.model_validate(args or {})
    settings = load_settings(**config.settings)

    generator_options: dict[str, Any] = {
        "max_ongoing_requests": config.generator_ongoing(),
        "ray_actor_options": {
            "num_gpus": config.generator_num_gpus,
            "num_cpus": config.generator_num_cpus,
        },
        # Loading and warming a real model takes minutes on a cold node.
        "health_check_timeout_s": 60,
        "health_check_period_s": config.generator_health_check_period_s,
        "logging_config": {"encoding": config.log_encoding},
        "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
    }
    if config.generator_autoscaling:
        generator_options["autoscaling_config"] = config.generator_autoscaling
    else:
        generator_options["num_replicas"] = config.generator_replicas

    generator = serve.deployment(Generator, name="Generator").options(**generator_options)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        logging_config={"encoding": config.log_encoding},
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
    )
    return ingress.bind(
        generator.bind(*generator_args(config, settings)),
        settings,
    )
