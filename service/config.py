"""Every setting of the service, read once from the environment (prefix `SDSERVE_`).

No other module reads environment variables. Deployments receive a `Settings` object from the
application builder, so a Serve config file can override any field through its `args`.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_ID = "stable-diffu"
DEFAULT_MAX_CONCURRENT_REQUESTS = {"free": 5, "pay_per_use": 10, "premium": 15}
DEMO_API_KEY = "sdserve-demo-key"
# Output files are `{uuid}-{i}.png` with a one- or two-digit i (service/store/images.py).
MAX_SAMPLES_LIMIT = 99
# What service/serving/generator.py resolve_device and the engine take: torch.device names.
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
# A job beats once per round and a round sleeps heartbeat_interval_s after the previous one
# ended: a job that missed no more than one beat must not look orphaned.
ORPHAN_AFTER_HEARTBEATS = 2


class ModelSpec(BaseModel):
    """One served model: its diffusers folder and per-model defaults."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="diffusers model folder (model_index.json, unet/, vae/, ...).")
    price_per_image_usd: Decimal | None = Field(
        None, description="Overrides prices_usd and the default price."
    )
    default_steps: int | None = Field(None, ge=1, description="num_inference_steps default.")
    width: int | None = Field(None, description="Default width; else the model's native size.")
    height: int | None = Field(None, description="Default height; else the model's native size.")


EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
EMBEDDING_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # usable as a trigger word


class Settings(BaseSettings):
    """Runtime settings of the ingress and the generator."""

    # No setting means anything by inf or nan (a timeout of inf never ends, nan compares false).
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", extra="forbid", allow_inf_nan=False)

    # models
    models: dict[str, str | ModelSpec] = Field(
        default_factory=lambda: {DEFAULT_MODEL_ID: "models/tiny-sd2"},
        description="model_id -> diffusers folder, or a ModelSpec object (JSON in SDSERVE_MODELS).",
    )
    lora_dir: str | None = Field(
        None, description="Folder of LoRA adapters: each NAME.safetensors is lora_model NAME."
    )
    embeddings_dir: str | None = Field(
        None,
        description="Folder of textual-inversion embeddings: each NAME.safetensors (or .pt, "
        ".bin) is embeddings_model NAME, and NAME in a prompt is its trigger word.",
    )
    vae_dir: str | None = Field(
        None,
        description="Folder of custom VAEs: each NAME/ (a diffusers AutoencoderKL folder) or "
        "NAME.safetensors (a standalone VAE file) is vae NAME.",
    )
    max_loaded_models: int = Field(
        3, ge=1, description="Pipelines a generator replica holds at once (LRU beyond that)."
    )
    preload_models: list[str] | None = Field(
        None, description="Models loaded and warmed at replica start; default: the default one."
    )
    default_model_id: str = Field(DEFAULT_MODEL_ID, description="Used when model_id is omitted.")
    device: str = Field(
        "auto", description="auto, cpu, cuda or cuda:N; 'auto' picks cuda when available, else cpu."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="'auto' is bfloat16 on cuda with the optimized path (float16 without it) "
        "and float32 on cpu.",
    )
    warmup: bool = Field(True, description="Run one tiny generation per model at replica start.")

    # engine optimizations (service/engine/optimize.py; gains measured by benchmarks/sd2_bench.py)
    optimize: Literal["auto", "on", "off"] = Field(
        "auto", description="The optimized engine path; 'auto' is on for cuda, off for cpu."
    )
    compile: bool = Field(True, description="torch.compile (Inductor) the UNet when optimizing.")
    compile_mode: Literal[
        "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"
    ] = Field("default", description="Inductor mode; the max-autotune ones start much slower.")
    compile_cache_dir: str | None = Field(
        None, description="Persistent Inductor/Triton cache folder (fast warm starts)."
    )
    cuda_graphs: bool = Field(True, description="Replay the UNet as CUDA graphs per batch bucket.")
    triton_kernels: bool = Field(True, description="Fused GroupNorm+SiLU Triton kernel.")
    triton_unet: bool = Field(
        True,
        description="The Triton kernel in the UNet too; off: torch.compile fuses the UNet's "
        "norms itself and only the VAE decoder uses the kernel.",
    )
    channels_last: bool = Field(True, description="NHWC convolutions in the UNet and VAE.")
    cudnn_benchmark: bool = Field(
        False, description="cuDNN picks each convolution's algorithm by timing them (cuda)."
    )
    compile_vae: bool = Field(
        False, description="torch.compile the VAE decoder too (one compile per decode shape)."
    )
    inductor_tuning: bool = Field(
        False,
        description="Compile the UNet with 1x1 convolutions as matmuls, coordinate-descent "
        "kernel tuning and frozen weights (a longer compile; benchmarks/sd2_tuning.py measures "
        "the gain).",
    )
    fp8_linears: bool = Field(
        False,
        description="The UNet's transformer linears as FP8 (e4m3) matmuls, on GPUs with FP8 "
        "tensor cores (compute capability 8.9+); images move slightly (benchmarks/README.md).",
    )
    attention: Literal["sdpa", "flash", "efficient", "cudnn", "math", "classic"] = Field(
        "sdpa",
        description="'sdpa' lets torch pick the kernel; flash, efficient and math pin one; "
        "cudnn prefers cuDNN's, falling back to flash for a shape it does not take.",
    )
    batch_buckets: list[int] = Field(
        default_factory=lambda: [2, 4, 8, 16, 32],
        description="UNet rows (2 per guided image) batches are padded to for CUDA graphs: at "
        "least one bucket, each of at least 2 rows.",
    )
    vae_batch_size: int = Field(
        1, ge=1, description="Images one VAE decode takes (more: faster decodes, more memory)."
    )
    max_compiled_sizes: int = Field(
        2, ge=0, description="Latent sizes compiled and graphed per model; others run eager."
    )

    # request bounds (operator-configurable; README, "The API")
    min_size: int = Field(
        256, ge=1, description="Smallest width/height in pixels (rounded up to a multiple of 8)."
    )
    max_size: int = Field(
        1024,
        ge=8,
        description="Largest width/height in pixels (rounded down to a multiple of 8); at least "
        "one multiple of 8 must lie between min_size and max_size.",
    )
    max_steps: int = Field(50, ge=1, description="Largest num_inference_steps.")
    max_samples: int = Field(
        4,
        description=f"Largest number of images per request (1 to {MAX_SAMPLES_LIMIT}: output "
        "file names give each image a two-digit index).",
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1, description="Requests with larger bodies are refused."
    )

    # storage
    database_url: str = Field(
        "sqlite:///data/sdserve.db", description="SQLAlchemy URL (SQLite file or PostgreSQL)."
    )
    image_store_url: str = Field(
        "data/images", description="fsspec URL of the folder images are written to."
    )
    image_url_base: str | None = Field(
        None,
        description="Where clients download images from, instead of this server's /images/ "
        "route: a CDN or public bucket in front of image_store_url (e.g. "
        "https://cdn.example.com/outputs); each image is at {image_url_base}/{name}.",
    )
    image_retention_days: float | None = Field(
        None,
        gt=0,
        description="Delete output images older than this many days (their links then answer "
        "404). Unset: keep them. `temp` images go after 24 hours either way.",
    )
    image_prune_interval_s: float = Field(
        3600.0, gt=0, description="How often each ingress replica prunes the image store."
    )
    public_base_url: str = Field(
        "http://127.0.0.1:8000",
        description="Base of every URL the API returns (an http:// or https:// URL); "
        "`sdserve serve` defaults it to http://{host}:{port} of where it listens.",
    )

    # keys, plans and prices
    demo_key: str | None = Field(
        DEMO_API_KEY,
        description="A pay-per-use admin key created at start if missing (for the demo); "
        "set to empty to create none.",
    )
    admin_key: str | None = Field(
        None,
        description="A premium admin key named 'admin' created at start if missing "
        "(deployments set it from a Secret); a new value rotates the key in place at the next "
        "start (docs/deployment.md, API keys).",
    )
    demo_key_balance_usd: Decimal = Field(Decimal("10"), description="Demo key's first balance.")
    default_price_per_image_usd: Decimal = Field(
        Decimal("0.0047"), description="Price of one image of a model without its own price."
    )
    prices_usd: dict[str, Decimal] = Field(
        default_factory=dict, description="model_id -> USD per image (JSON in SDSERVE_PRICES_USD)."
    )
    free_images_per_month: int = Field(25, description="Images a free-plan key gets per month.")
    max_concurrent_requests: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_CONCURRENT_REQUESTS),
        description="Per plan: requests a key may have queued or running at once (plans not "
        "named keep their default).",
    )
    gpu_hour_price_usd: Decimal = Field(
        Decimal("2.50"), description="What one GPU-hour costs the operator (cost to serve)."
    )

    # request lifecycle
    sync_window_s: float = Field(
        60.0,
        ge=0,
        description="How long text2img waits for images before answering 'processing' (0: "
        "answer 'processing' at once, as with instant_response).",
    )
    eta_seconds_per_step: float = Field(
        0.05, gt=0, description="Rough per-step time used for the `eta` of processing responses."
    )
    webhook_timeout_s: float = Field(
        30.0, gt=0, description="Per-attempt timeout of a webhook POST."
    )
    webhook_secret: str | None = Field(
        None,
        description="Signs every webhook POST: X-Sdserve-Signature: t=<unix time>,v1=<hex "
        "HMAC-SHA256 of '<t>.<body>'>, for receivers to verify. Unset: unsigned.",
    )
    webhook_attempts: int = Field(3, ge=1, description="Webhook POST attempts before giving up.")
    webhook_backoff_s: float = Field(
        1.0, ge=0, description="First retry delay; doubles per attempt (0: retry at once)."
    )
    max_inflight_jobs: int = Field(
        256, ge=1, description="Jobs one ingress replica runs at once; beyond that: 429."
    )
    generator_call_max_requests: int = Field(
        8,
        ge=1,
        description="Requests for one model that the ingress sends to the generator in one "
        "Ray call (1: one call per request). Each still batches on its own there.",
    )
    generator_call_window_s: float = Field(
        0.002,
        ge=0,
        description="How long a request waits for others to share its generator call.",
    )
    heartbeat_interval_s: float = Field(
        5.0, gt=0, description="How often an ingress replica marks its running jobs alive."
    )
    orphan_after_s: float = Field(
        30.0,
        gt=0,
        description="A processing job without a heartbeat this long is taken over; at least "
        f"{ORPHAN_AFTER_HEARTBEATS} x heartbeat_interval_s.",
    )
    max_job_attempts: int = Field(
        3, ge=1, description="Attempts of a job whose server died before it is failed."
    )
    step_stall_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A generator whose step loop finished no step for this long while it had "
        "work fails its health check, so Serve replaces it (a hung device). Above the longest "
        "warm-up: a compile with an empty cache.",
    )
    strict_http_status: bool = Field(
        False, description="Answer errors with 4xx codes instead of ModelsLab's HTTP 200."
    )

    # webhooks and safety
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, IP addresses and CIDR networks (JSON list) a webhook may reach "
        "although they are loopback, private, link-local, CGNAT or metadata addresses, e.g. "
        '["127.0.0.1"] for a receiver on this machine. Empty: webhooks reach public addresses '
        "only.",
    )

    safety_checker: str | None = Field(
        None,
        description="Folder of a StableDiffusionSafetyChecker (e.g. a copy of "
        "CompVis/stable-diffusion-safety-checker) that checks images of requests with "
        "safety_checker=yes. Unset: no check runs, and responses say so.",
    )
    safety_checker_mode: Literal["request", "always"] = Field(
        "request",
        description="'request': check the images of requests that ask for it; 'always': "
        "check every image, whatever the request says (needs safety_checker).",
    )

    tomesd_ratio: float = Field(
        0.5,
        ge=0,
        le=0.75,
        description="Share of the tokens of the UNet's highest-resolution self-attention merged "
        "away for requests with tomesd=yes (ToMe); 0 turns token merging off (such requests "
        "are served without it, and responses say so).",
    )
    upscaler: str | None = Field(
        None,
        description="An RRDBNet upscaler file in the Real-ESRGAN release layout (e.g. "
        "RealESRGAN_x2plus.pth or RealESRGAN_x4plus.pth) that serves upscale=yes|2|3|4. Unset: "
        "images keep the requested size, and responses say upscale was not applied.",
    )
    upscaler_tile: int = Field(
        512,
        ge=64,
        description="Input pixels per side of one upscaler tile (each with 32 pixels of "
        "context); bounds the upscaler's memory whatever the image size.",
    )

    @field_validator("max_concurrent_requests", mode="after")
    @classmethod
    def _plans_not_named_keep_their_limit(cls, limits: dict[str, int]) -> dict[str, int]:
        return {**DEFAULT_MAX_CONCURRENT_REQUESTS, **limits}

    @model_validator(mode="after")
    def _money_and_plans_are_usable(self) -> Settings:
        """The checks the stores make when a replica builds them, made here so that a bad
        value stops `sdserve serve` (or a Serve deploy) at once instead of each replica."""
        from service.pricing import PlanLimits, PriceList

        unknown = sorted(set(self.prices_usd) - set(self.models))
        if unknown:
            raise ValueError(
                f"prices_usd names model(s) {', '.join(map(repr, unknown))} that are not in "
                f"models (it would price nothing); models: {', '.join(sorted(self.models))}"
            )
        amounts = {
            "default_price_per_image_usd": self.default_price_per_image_usd,
            **{f"prices_usd.{model_id}": usd for model_id, usd in self.prices_usd.items()},
            **{
                f"models.{model_id}.price_per_image_usd": spec.price_per_image_usd
                for model_id, spec in self.model_specs().items()
                if spec.price_per_image_usd is not None
            },
            "demo_key_balance_usd": self.demo_key_balance_usd,
        }
        for name, usd in amounts.items():
            _exact_usd(name, usd)
        if self.gpu_hour_price_usd < 0:
            raise ValueError(
                f"gpu_hour_price_usd must not be negative, got {self.gpu_hour_price_usd} USD"
            )
        PlanLimits.from_settings(self)
        PriceList.from_settings(self)
        return self

    @model_validator(mode="after")
    def _sizes_have_a_multiple_of_8(self) -> Settings:
        smallest, largest = -(-self.min_size // 8) * 8, self.max_size // 8 * 8
        if self.min_size > self.max_size:
            raise ValueError(
                f"min_size {self.min_size} is above max_size {self.max_size}: no width or "
                "height would be accepted"
            )
        if smallest > largest:
            raise ValueError(
                f"min_size {self.min_size} to max_size {self.max_size} holds no multiple of 8: "
                "no width or height would be accepted"
            )
        return self

    @model_validator(mode="after")
    def _model_sizes_are_multiples_of_8(self) -> Settings:
        for model_id, spec in self.models.items():
            for name in ("width", "height"):
                size = getattr(spec, name, None)
                if size is not None and (size < 8 or size % 8):
                    raise ValueError(
                        f"models.{model_id}.{name} must be a positive multiple of 8, got {size}"
                    )
        return self

    @model_validator(mode="after")
    def _orphans_are_jobs_that_missed_heartbeats(self) -> Settings:
        least = ORPHAN_AFTER_HEARTBEATS * self.heartbeat_interval_s
        if self.orphan_after_s < least:
            raise ValueError(
                f"orphan_after_s {self.orphan_after_s:g} must be at least "
                f"{ORPHAN_AFTER_HEARTBEATS} x heartbeat_interval_s ({least:g}): else the jobs of a "
                "live replica are taken over as orphans between its heartbeats"
            )
        return self

    @model_validator(mode="after")
    def _default_steps_within_max_steps(self) -> Settings:
        for model_id, spec in self.models.items():
            steps = getattr(spec, "default_steps", None)
            if steps is not None and steps > self.max_steps:
                raise ValueError(
                    f"models.{model_id}.default_steps {steps} is above max_steps {self.max_steps}"
                )
        return self

    @model_validator(mode="after")
    def _default_and_preloaded_models_are_served(self) -> Settings:
        for model_id in [self.default_model_id, *(self.preload_models or ())]:
            if model_id not in self.models:
                raise ValueError(
                    f"model {model_id!r} (default_model_id / preload_models) is not one of "
                    f"models: {', '.join(sorted(self.models))}"
                )
        return self

    @model_validator(mode="after")
    def _always_needs_a_checker(self) -> Settings:
        if self.safety_checker_mode == "always" and not self.safety_checker:
            raise ValueError("safety_checker_mode 'always' needs safety_checker (a folder)")
        return self

    @field_validator("max_samples")
    @classmethod
    def _samples_fit_the_output_names(cls, value: int) -> int:
        if not 1 <= value <= MAX_SAMPLES_LIMIT:
            raise ValueError(
                f"max_samples must be between 1 and {MAX_SAMPLES_LIMIT} (output file names give "
                f"each image a two-digit index), got {value}"
            )
        return value

    @field_validator("image_url_base", "public_base_url")
    @classmethod
    def _is_an_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(
                f"{value!r} is not an http:// or https:// URL with a host (e.g. "
                "http://localhost:8000)"
            )
        return value

    @field_validator("device")
    @classmethod
    def _device_is_one_the_engine_runs_on(cls, value: str) -> str:
        if not DEVICE.fullmatch(value):
            raise ValueError(
                f"device must be auto, cpu, cuda or cuda:N (N: a GPU index), got {value!r}"
            )
        return value

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_hold_a_guided_image(cls, buckets: list[int]) -> list[int]:
        if not buckets or min(buckets) < 2:
            raise ValueError(
                "batch_buckets needs at least one bucket, each of at least 2 rows (a batch "
                f"dimension of 1 would be specialised by torch.compile), got {buckets}"
            )
        return buckets

    @field_validator("webhook_allowed_hosts")
    @classmethod
    def _allowed_hosts_are_hosts_or_networks(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            text = entry.strip().strip("[]")
            if not text or any(c in text for c in " /:@?#") and not _is_network(text):
                raise ValueError(f"{entry!r} is neither a host name nor an IP address or network")
        return [entry.strip().lower() for entry in entries]

    def engine_optimizations(self) -> dict:
        """Keyword arguments of `OptimizationConfig.for_device` from the settings above."""
        options = {
            "compile": self.compile,
            "compile_mode": self.compile_mode,
            "compile_cache_dir": self.compile_cache_dir,
            "cuda_graphs": self.cuda_graphs,
            "triton_kernels": self.triton_kernels,
            "triton_unet": self.triton_unet,
            "channels_last": self.channels_last,
            "cudnn_benchmark": self.cudnn_benchmark,
            "compile_vae": self.compile_vae,
            "inductor_tuning": self.inductor_tuning,
            "fp8_linears": self.fp8_linears,
            "attention": self.attention,
            "batch_buckets": tuple(self.batch_buckets),
            "max_compiled_sizes": self.max_compiled_sizes,
        }
        if self.optimize != "auto":
            options["enabled"] = self.optimize == "on"
        return options

    def check_folders(self) -> None:
        """ValueError naming the first of lora_dir, embeddings_dir and vae_dir that is set but
        is no folder here. Not a validator: the Serve application is built on the Ray head,
        which need not mount the folders the generator replicas read (helm/, k8s/), so this
        is for the machine that runs the generators (`sdserve serve`'s checks before Ray)."""
        for name in ("lora_dir", "embeddings_dir", "vae_dir"):
            folder = getattr(self, name)
            if folder and not Path(folder).is_dir():
                raise ValueError(f"{name} {folder} is not a folder (unset it to serve none)")

    def model_specs(self) -> dict[str, ModelSpec]:
        return {
            model_id: spec if isinstance(spec, ModelSpec) else ModelSpec(path=spec)
            for model_id, spec in self.models.items()
        }

    def model_paths(self) -> dict[str, Path]:
        return {model_id: Path(spec.path) for model_id, spec in self.model_specs().items()}

    def lora_paths(self) -> dict[str, Path]:
        """lora_model id -> safetensors file, from the LoRA folder."""
        if not self.lora_dir or not Path(self.lora_dir).is_dir():
            return {}
        return {path.stem: path for path in sorted(Path(self.lora_dir).glob("*.safetensors"))}

    def embedding_paths(self) -> dict[str, Path]:
        """embeddings_model id -> embedding file, from the embeddings folder."""
        if not self.embeddings_dir or not Path(self.embeddings_dir).is_dir():
            return {}
        files = sorted(Path(self.embeddings_dir).iterdir())
        return {
            path.stem: path
            for path in files
            if path.suffix in EMBEDDING_SUFFIXES and EMBEDDING_ID.fullmatch(path.stem)
        }

    def vae_paths(self) -> dict[str, Path]:
        """vae id -> folder or file, for every usable entry of the VAE folder."""
        if not self.vae_dir or not Path(self.vae_dir).is_dir():
            return {}
        entries = {}
        for path in sorted(Path(self.vae_dir).iterdir()):
            if path.name.startswith(".") or not EMBEDDING_ID.fullmatch(path.stem):
                continue
            if path.is_dir() and (path / "config.json").is_file():
                entries[path.name] = path
            elif path.is_file() and path.suffix == ".safetensors":
                entries[path.stem] = path
        return entries

    def models_to_preload(self) -> list[str]:
        return (
            list(self.preload_models)
            if self.preload_models is not None
            else [self.default_model_id]
        )


def _exact_usd(name: str, usd: Decimal) -> int:
    """Micro-dollars of a money setting; ValueError naming the setting otherwise."""
    from service.pricing import usd_to_micros

    try:
        micros = usd_to_micros(usd)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if micros < 0:
        raise ValueError(f"{name} must not be negative, got {usd} USD")
    return micros


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


# SDSERVE_* variables read by other programs than the service (locust, the chart's test pod).
NOT_SETTINGS = frozenset(
    {"SDSERVE_LOADTEST_KEYS", "SDSERVE_LOADTEST_WEBHOOK_SECRET", "SDSERVE_URL"}
)
_warned: set[str] = set()


def load_settings(**overrides) -> Settings:
    """Settings from the environment, with explicit overrides (from a Serve config) on top."""
    _warn_of_unknown_variables(os.environ)
    return Settings(**overrides)


def known_variables() -> frozenset[str]:
    """Every SDSERVE_* name something reads: the settings and NOT_SETTINGS."""
    return frozenset(f"SDSERVE_{name.upper()}" for name in Settings.model_fields) | NOT_SETTINGS


def _warn_of_unknown_variables(environ) -> None:
    """pydantic-settings ignores an SDSERVE_* name that is no setting: a typo (SDSERVE_MODEL)
    would silently serve the defaults. Said once per process and name."""
    known = known_variables()
    for name in sorted(environ):
        if not name.startswith("SDSERVE_") or name in known or name in _warned:
            continue
        _warned.add(name)
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        logging.getLogger(__name__).warning("%s is not an sdserve setting: ignored%s", name, hint)
