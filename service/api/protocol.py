"""The ModelsLab wire format: request fields as clients really send them, and response bodies.

Clients send numbers as strings, toggles as "yes"/"no", seeds as null/-1/""/"0"; the request
model coerces all of these. Bounds that an operator can change are checked against `Settings`
in `Text2ImgRequest.to_params`, so every error names the field and the rule in one place.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Collection, Mapping
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, model_validator

from service.config import DEFAULT_MODEL_ID, Settings
from service.engine.protocol import SAFETY_TREATMENTS, GenerationParams
from service.engine.schedulers import (
    ALGORITHM_TYPES,
    HIGHRES_SCHEDULERS,
    SAG_SCHEDULERS,
    SCHEDULERS,
    canonical_scheduler_name,
    validate_scheduler_options,
)
from service.registry import ModelInfo

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
MIN_GUIDANCE, MAX_GUIDANCE = 1, 20
MAX_CLIP_SKIP = 8  # and at most the model's text-encoder depth
# Text that is stored in a bounded column is bounded here first, so that no request can reach
# the column's limit (a database error, HTTP 500 on PostgreSQL): jobs.track_id is String(256),
# jobs.model_id and api_keys.name String(128); jobs.webhook is Text, bounded as URLs are.
MAX_TRACK_ID_LENGTH = 256
MAX_MODEL_ID_LENGTH = 128
MAX_KEY_NAME_LENGTH = 128
MAX_WEBHOOK_LENGTH = 2048
# `vae` values that mean the model's own VAE (unless a custom VAE has that id); "none", "null"
# and "" mean it always, as they leave every text field unset
MODEL_VAE_NAMES = ("default", "auto")
BLANK_TEXT = ("", "null", "none")
# Integer fields whose bounds come from the settings or the model (Text2ImgRequest._malformed)
SERVER_BOUNDED_FIELDS = ("width", "height", "samples", "num_inference_steps", "clip_skip")
RANDOM_SEED_VALUES = (None, "", -1, "-1", 0, "0")
_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n", ""}

# Fields clients send that change the picture in the hosted API but that this service does not
# apply yet: accepted, and listed in meta["not_applied"] so nobody is misled.
NOT_APPLIED_FIELDS = (
    "enhance_prompt",
    "multi_lingual",
    "panorama",
    "ip_adapter_id",
    "ip_adapter_scale",
    "ip_adapter_image",
)


def _blank_to_none(value: Any) -> Any:
    """null, "", "null" and "none" (any case, any surrounding spaces): the field is not set."""
    if value is None or (isinstance(value, str) and value.strip().lower() in BLANK_TEXT):
        return None
    return value


def _coerce_int(value: Any) -> int | None:
    value = _blank_to_none(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError("must be an integer")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                raise ValueError("must be an integer") from None
            if math.isfinite(number) and number.is_integer():
                return int(number)
    raise ValueError("must be an integer")


def _coerce_guidance(value: Any) -> float | None:
    value = _blank_to_none(value)
    if value is None:
        return None
    bounds = f"between {MIN_GUIDANCE} and {MAX_GUIDANCE}"
    if isinstance(value, bool):
        raise ValueError(f"must be a number {bounds}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"must be a number {bounds}") from None
    if not math.isfinite(number):
        raise ValueError(f"must be a finite number {bounds}")
    return number


def _coerce_bool(value: Any) -> bool | None:
    value = _blank_to_none(value)  # "null" / "none" as strings, as for the number fields
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False if text else None
    raise ValueError('must be "yes" or "no"')


def _coerce_upscale(value: Any) -> int | None:
    """`upscale`: "yes" is 2x (the hosted API's meaning), a number is the factor."""
    value = _blank_to_none(value)
    if value is None or isinstance(value, bool):
        return None if value is None else (2 if value else 1)
    if isinstance(value, str):
        text = value.strip().lower().removesuffix("x")
        if text in _TRUE - {"1"}:
            return 2
        if text in _FALSE:
            return 1
        value = text
    try:
        factor = _coerce_int(value)
    except ValueError:
        factor = None
    if factor in (0, 1, 2, 3, 4):
        return max(factor, 1)
    raise ValueError('must be "no", "yes" (2x) or a factor of 2, 3 or 4')


def _coerce_text(value: Any) -> str | None:
    """Text as sent (numbers as their text); blank-like spellings are not set."""
    value = _blank_to_none(value)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: JSON allows them, nothing else does
            raise ValueError("must be valid Unicode text") from None
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError("must be a string")


def _coerce_name(value: Any) -> str | None:
    """Keys, ids and names: text that also goes into indexed text columns, so no NUL."""
    text = _coerce_text(value)
    if text is not None and "\x00" in text:
        raise ValueError("must not contain NUL characters")
    return text


def _bounded_name(limit: int) -> BeforeValidator:
    """A name stored in a column of `limit` characters."""

    def coerce(value: Any) -> str | None:
        text = _coerce_name(value)
        if text is not None and len(text) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return text

    return BeforeValidator(coerce)


def _coerce_seed(value: Any) -> int | None:
    if value in RANDOM_SEED_VALUES or (isinstance(value, str) and value.strip() in ("", "-1", "0")):
        return None
    rule = f"must be an integer between 1 and {MAX_SEED}, or null/-1 for random"
    try:
        seed = _coerce_int(value)
    except ValueError:
        raise ValueError(rule) from None
    if seed is None or seed == -1 or seed == 0:
        return None
    if not 0 < seed <= MAX_SEED:
        raise ValueError(rule)
    return seed


Int = Annotated[int | None, BeforeValidator(_coerce_int)]
Guidance = Annotated[float | None, BeforeValidator(_coerce_guidance)]
Toggle = Annotated[bool | None, BeforeValidator(_coerce_bool)]
Text = Annotated[str | None, BeforeValidator(_coerce_text)]
Name = Annotated[str | None, BeforeValidator(_coerce_name)]
ModelId = Annotated[str | None, _bounded_name(MAX_MODEL_ID_LENGTH)]
TrackId = Annotated[str | None, _bounded_name(MAX_TRACK_ID_LENGTH)]
WebhookUrl = Annotated[str | None, _bounded_name(MAX_WEBHOOK_LENGTH)]
KeyName = Annotated[str | None, _bounded_name(MAX_KEY_NAME_LENGTH)]
UpscaleFactor = Annotated[int | None, BeforeValidator(_coerce_upscale)]
Seed = Annotated[int | None, BeforeValidator(_coerce_seed)]


def _setting_default(name: str) -> Any:
    """A setting's default, for the static schema (the served document shows live values)."""
    return Settings.model_fields[name].default


_MIN_SIZE, _MAX_SIZE = _setting_default("min_size"), _setting_default("max_size")
_MAX_STEPS, _MAX_SAMPLES = _setting_default("max_steps"), _setting_default("max_samples")


class RequestError(ValueError):
    """A request field broke a rule; the message names the field and the rule."""


class KeyedRequest(BaseModel):
    """Every ModelsLab body carries the API key; unknown fields are ignored (and logged)."""

    model_config = ConfigDict(extra="allow")

    key: Name = Field(
        None,
        description="API key. Also accepted as an `Authorization: Bearer` or a `key:` header.",
        json_schema_extra={"examples": ["YOUR_API_KEY"]},
    )

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class Text2ImgRequest(KeyedRequest):
    """`POST /api/v6/images/text2img` and its v3/v4/v7 twins."""

    # The schema says what clients must send; the check itself is to_params', so that a missing
    # prompt gets the ModelsLab error envelope rather than FastAPI's 422.
    model_config = ConfigDict(extra="allow", json_schema_extra={"required": ["prompt"]})

    model_id: ModelId = Field(
        None,
        description="A served model (`POST /api/v4/dreambooth/model_list` lists them); omitted: "
        "the server's default model. The v3 route always uses the default model.",
        json_schema_extra={
            "default": DEFAULT_MODEL_ID,
            "examples": [DEFAULT_MODEL_ID],
            "maxLength": MAX_MODEL_ID_LENGTH,
        },
    )
    prompt: Text = Field(
        None,
        description="Required, non-empty: what to draw. Truncated to the text encoder's 77 CLIP "
        "tokens (`meta.prompt_truncated` says so).",
        json_schema_extra={"minLength": 1, "examples": ["a lighthouse at dusk, oil painting"]},
    )
    negative_prompt: Text = Field(
        None,
        description="What not to draw.",
        json_schema_extra={"default": "", "examples": ["blurry, low quality"]},
    )
    width: Int = Field(
        None,
        description="Image width in pixels: a multiple of 8 between `minimum` and `maximum` "
        f"(SDSERVE_MIN_SIZE and SDSERVE_MAX_SIZE, {_MIN_SIZE} and {_MAX_SIZE} by default). "
        "Omitted: the model's default width, its native one (768 for SD 2.0 768-v) unless "
        "SDSERVE_MODELS sets another.",
        json_schema_extra={
            "minimum": _MIN_SIZE,
            "maximum": _MAX_SIZE,
            "multipleOf": 8,
            "examples": [768],
        },
    )
    height: Int = Field(
        None,
        description="Image height in pixels: a multiple of 8 between `minimum` and `maximum` "
        f"(SDSERVE_MIN_SIZE and SDSERVE_MAX_SIZE, {_MIN_SIZE} and {_MAX_SIZE} by default). "
        "Omitted: the model's default height, its native one (768 for SD 2.0 768-v) unless "
        "SDSERVE_MODELS sets another.",
        json_schema_extra={
            "minimum": _MIN_SIZE,
            "maximum": _MAX_SIZE,
            "multipleOf": 8,
            "examples": [768],
        },
    )
    samples: Int = Field(
        None,
        description="Images to generate, 1 to `maximum` (SDSERVE_MAX_SAMPLES, "
        f"{_MAX_SAMPLES} by default); image i uses seed + i. Each counts against the key's plan.",
        json_schema_extra={"default": 1, "minimum": 1, "maximum": _MAX_SAMPLES},
    )
    num_inference_steps: Int = Field(
        None,
        description="Denoising steps, 1 to `maximum` (SDSERVE_MAX_STEPS, "
        f"{_MAX_STEPS} by default). Omitted: the model's `default_steps` (30 unless "
        "SDSERVE_MODELS sets another).",
        json_schema_extra={"default": 30, "minimum": 1, "maximum": _MAX_STEPS},
    )
    guidance_scale: Guidance = Field(
        None,
        description="Classifier-free guidance: how closely the image follows the prompt, "
        f"{MIN_GUIDANCE}-{MAX_GUIDANCE}.",
        json_schema_extra={"default": 7.5, "minimum": MIN_GUIDANCE, "maximum": MAX_GUIDANCE},
    )
    seed: Seed = Field(
        None,
        description=f'Seed, 1 to {MAX_SEED}; null, -1, "" or 0 pick a random one. The seed '
        "used is in `meta.seed`; image i uses seed + i, so a seed repeats its images.",
        json_schema_extra={"minimum": -1, "maximum": MAX_SEED, "examples": [12345]},
    )
    scheduler: Name = Field(
        None,
        description="A diffusers scheduler class name (the `Scheduler` suffix and letter case "
        f"are optional): {', '.join(SCHEDULERS)}.",
        json_schema_extra={
            "default": "UniPCMultistepScheduler",
            # the default first: Swagger UI's "try it out" uses the first example
            "examples": sorted(SCHEDULERS, key=lambda name: name != "UniPCMultistepScheduler"),
        },
    )
    use_karras_sigmas: Toggle = Field(
        None,
        description='Karras sigmas where the scheduler supports them: "yes"/"no", true/false '
        'or "1"/"0".',
        json_schema_extra={"default": True},
    )
    algorithm_type: Name = Field(
        None,
        description='"none", or "dpmsolver+++" (SDE DPM++ 2M) with DPMSolverMultistepScheduler; '
        "the diffusers names dpmsolver++, sde-dpmsolver++, dpmsolver and sde-dpmsolver too.",
        json_schema_extra={"default": "none", "examples": ["none", "dpmsolver+++"]},
    )
    clip_skip: Int = Field(
        None,
        description=f"CLIP text-encoder layers to skip from the end, 1-{MAX_CLIP_SKIP}, and at "
        "most the model's text-encoder depth.",
        json_schema_extra={"default": 1, "minimum": 1, "maximum": MAX_CLIP_SKIP},
    )
    lora_model: Name = Field(
        None,
        description="Comma-separated LoRA ids, from the server's LoRA folder (SDSERVE_LORA_DIR; "
        "`model_list` lists them). Omitted: no LoRA.",
        json_schema_extra={"examples": [None]},
    )
    lora_strength: Name = Field(
        None,
        description="One strength for every LoRA, or one per `lora_model` id, each 0.1-1.",
        json_schema_extra={"examples": [None]},
    )
    embeddings_model: Name = Field(
        None,
        description="Comma-separated textual-inversion embedding ids, from the server's "
        "embeddings folder (SDSERVE_EMBEDDINGS_DIR; `model_list` lists them). Each id, written "
        "as a word in `prompt` or `negative_prompt`, stands for its learned vectors. An id the "
        "server does not have is not applied, and `meta.not_applied` says so.",
        json_schema_extra={"examples": [None]},
    )
    vae: Name = Field(
        None,
        description="A custom VAE id, from the server's VAE folder (SDSERVE_VAE_DIR; "
        "`model_list` lists them), that turns the latents into the image instead of the "
        "model's own VAE. Omitted, null or \"default\": the model's VAE. An id the server "
        "does not have: the model's VAE, and `meta.not_applied` says so.",
        json_schema_extra={"examples": [None]},
    )
    tomesd: Toggle = Field(
        None,
        description='"yes": token merging (ToMe) in the UNet\'s highest-resolution '
        "self-attention: faster at large sizes, slightly different images "
        "(SDSERVE_TOMESD_RATIO of those tokens are merged, 0.5 by default). "
        '"no" or omitted: the full attention.',
        json_schema_extra={"default": False},
    )
    self_attention: Toggle = Field(
        None,
        description='"yes": self-attention guidance (SAG): sharper detail for one more UNet '
        "pass per step over this request's images. Needs a scheduler with integer timesteps "
        "(DDIM, DDPM, PNDM, DPMSolverMultistep/Singlestep, UniPC, DEIS, LCM); with another one "
        "the request is served without it and `meta.not_applied` says so.",
        json_schema_extra={"default": False},
    )
    highres_fix: Toggle = Field(
        None,
        description='"yes": for sizes above the model\'s native pixel count, a first pass at '
        "that count and the same aspect ratio, then its latents upscaled to the requested size "
        "and 60 % of the schedule denoised again: no repeated subjects at large sizes. At or "
        "below the native size there is nothing to fix, and `meta.not_applied` says so.",
        json_schema_extra={"default": False},
    )
    upscale: UpscaleFactor = Field(
        None,
        description='"yes" (2x), or a factor of 2, 3 or 4: the images are upscaled by the '
        "server's upscaler (SDSERVE_UPSCALER) after they are made, so a 512x512 request gives "
        '1024x1024 images at 2x. "no" or omitted: the requested size. Without a configured '
        "upscaler the request is served at its size and `meta.not_applied` says so.",
        json_schema_extra={"examples": ["no"]},
    )
    safety_checker: Toggle = Field(
        None,
        description='"yes": the images are checked by the server\'s safety checker '
        "(SDSERVE_SAFETY_CHECKER) and a flagged one is replaced as `safety_checker_type` says; "
        "`nsfw_content_detected` and `meta.nsfw_flags` give the verdicts. Without a configured "
        "checker the request is served and `meta.not_applied` says the check did not run.",
        json_schema_extra={"default": False},
    )
    safety_checker_type: Name = Field(
        None,
        description="What a flagged image becomes: sensitive_content_text (a grey notice, the "
        "default), blur, pixelate or black.",
        json_schema_extra={"examples": ["sensitive_content_text"]},
    )
    base64: Toggle = Field(
        None,
        description='"yes": output URLs end in `.base64` and serve the PNG as base64 text.',
        json_schema_extra={"default": False},
    )
    temp: Toggle = Field(
        None,
        description='"yes": output links expire after 24 hours.',
        json_schema_extra={"default": False},
    )
    webhook: WebhookUrl = Field(
        None,
        description="http(s) URL that receives a POST of the fetch body (plus `track_id`) when "
        "the job ends; retried with backoff, `webhook_status` says how it went.",
        json_schema_extra={"examples": [None], "maxLength": MAX_WEBHOOK_LENGTH},
    )
    track_id: TrackId = Field(
        None,
        description="Any id of yours, echoed in the webhook body.",
        json_schema_extra={"examples": [None], "maxLength": MAX_TRACK_ID_LENGTH},
    )
    instant_response: Toggle = Field(
        None,
        description='"yes": answer `processing` at once, with `future_links` and `fetch_result`; '
        "otherwise wait for the images up to SDSERVE_SYNC_WINDOW_S (60 s by default).",
        json_schema_extra={"default": False},
    )

    # Fields whose bounds come from the settings or the model: a value that is no integer is
    # set aside here and refused in to_params, with the same rule as an out-of-range one.
    _malformed: frozenset[str] = PrivateAttr(default=frozenset())

    @model_validator(mode="wrap")
    @classmethod
    def _set_aside_malformed_bounded_numbers(cls, data: Any, handler) -> Text2ImgRequest:
        if not isinstance(data, dict):  # e.g. an instance already validated
            return handler(data)
        malformed = set()
        for name in SERVER_BOUNDED_FIELDS:
            try:
                _coerce_int(data.get(name))
            except ValueError:
                malformed.add(name)
        request = handler({name: value for name, value in data.items() if name not in malformed})
        request._malformed = frozenset(malformed)
        return request

    def _loras(self, available: Collection[str], problems: list[str]) -> tuple:
        """(lora_id, strength) pairs from the comma-separated `lora_model` and `lora_strength`;
        one strength applies to every LoRA, none means 1.0."""
        ids = [part.strip() for part in (self.lora_model or "").split(",") if part.strip()]
        if not ids:
            return ()
        unknown = [lora_id for lora_id in ids if lora_id not in available]
        if unknown:
            names = ", ".join(sorted(available)) or "none"
            problems.append(f"lora_model '{unknown[0]}' is not available; available LoRAs: {names}")
        if len(set(ids)) != len(ids):
            problems.append("lora_model must not name the same LoRA twice")
        strengths = _parse_strengths(self.lora_strength)
        if strengths is not None and not strengths:
            strengths = [1.0]
        if strengths is None or len(strengths) not in (1, len(ids)):
            problems.append(
                "lora_strength must be one number, or one per lora_model, each between 0.1 and 1"
            )
            return ()
        if any(not 0.1 <= value <= 1 for value in strengths):
            problems.append("lora_strength must be between 0.1 and 1 for each LoRA")
        if len(strengths) == 1:
            strengths = strengths * len(ids)
        return tuple(zip(ids, strengths, strict=True))

    def _embeddings(self, available: Collection[str], not_applied: list[str]) -> tuple[str, ...]:
        """The embeddings the server has; an unknown id is dropped and reported not applied
        (the ModelsLab contract: never an error)."""
        ids = [part.strip() for part in (self.embeddings_model or "").split(",") if part.strip()]
        ids = list(dict.fromkeys(ids))
        names = ", ".join(sorted(available)) or "none"
        for unknown in (name for name in ids if name not in available):
            not_applied.append(
                f"embeddings_model '{unknown}' (not available; available embeddings: {names})"
            )
        return tuple(name for name in ids if name in available)

    def _vae(self, available: Collection[str], not_applied: list[str]) -> str | None:
        """A custom VAE the server has, else None (the model's own); an unknown id is reported
        not applied (the ModelsLab contract: never an error)."""
        vae_id = (self.vae or "").strip()
        if not vae_id or (vae_id.lower() in MODEL_VAE_NAMES and vae_id not in available):
            return None
        if vae_id not in available:
            names = ", ".join(sorted(available)) or "none"
            not_applied.append(f"vae '{vae_id}' (not available; available VAEs: {names})")
            return None
        return vae_id

    def to_params(
        self,
        settings: Settings,
        models: Mapping[str, ModelInfo],
        loras: Collection[str] = (),
        embeddings: Collection[str] = (),
        vaes: Collection[str] = (),
    ) -> tuple[GenerationParams, dict]:
        """Check every rule and resolve defaults; returns the engine params and the options
        that stay with the ingress (base64, temp, webhook, track_id, not-applied fields)."""
        problems: list[str] = []

        def bounded(
            name: str, value: int | None, default: int, low: int, high: int, why: str = ""
        ) -> int:
            if name in self._malformed or (value is not None and not low <= value <= high):
                problems.append(f"{name} must be an integer between {low} and {high}{why}")
            return default if value is None else value

        model_id = (self.model_id or "").strip() or settings.default_model_id
        model = models.get(model_id)
        if model is None:
            available = ", ".join(sorted(models))
            problems.append(
                f"model_id '{model_id}' is not available; available models: {available}"
            )
            default_w, default_h, default_steps = 512, 512, 30
        else:
            default_w, default_h, default_steps = model.width, model.height, model.default_steps
        default_w, default_h = bounded_default_size(default_w, default_h, settings)

        prompt = (self.prompt or "").strip()
        if not prompt:
            problems.append("prompt must be a non-empty string")

        sizes = {}
        for name, value, default in (
            ("width", self.width, default_w),
            ("height", self.height, default_h),
        ):
            size = default if value is None else value
            if name in self._malformed or not (
                settings.min_size <= size <= settings.max_size and size % 8 == 0
            ):
                problems.append(
                    f"{name} must be a multiple of 8 between {settings.min_size} and "
                    f"{settings.max_size}"
                )
            sizes[name] = size

        samples = bounded("samples", self.samples, 1, 1, settings.max_samples)
        # The generic default (30) must not exceed an operator's lower max_steps.
        default_steps = min(default_steps, settings.max_steps)
        steps = bounded(
            "num_inference_steps", self.num_inference_steps, default_steps, 1, settings.max_steps
        )
        # The engine refuses a clip_skip deeper than the text encoder; refused here instead of
        # failing the job after queueing.
        layers = model.text_encoder_layers if model is not None else None
        if layers is not None and layers < MAX_CLIP_SKIP:
            why = f" (the text encoder of '{model_id}' has {layers} layers)"
            clip_skip = bounded("clip_skip", self.clip_skip, 1, 1, max(layers, 1), why)
        else:
            clip_skip = bounded("clip_skip", self.clip_skip, 1, 1, MAX_CLIP_SKIP)

        guidance = 7.5 if self.guidance_scale is None else self.guidance_scale
        if not MIN_GUIDANCE <= guidance <= MAX_GUIDANCE:
            problems.append(
                f"guidance_scale must be a number between {MIN_GUIDANCE} and {MAX_GUIDANCE}"
            )

        scheduler = "UniPCMultistepScheduler"
        scheduler_ok = True
        if self.scheduler and self.scheduler.strip():
            try:
                scheduler = canonical_scheduler_name(self.scheduler.strip())
            except ValueError:
                scheduler_ok = False
                problems.append(f"scheduler must be one of: {', '.join(SCHEDULERS)}")

        # any letter case, as scheduler names (the engine lowercases it too)
        algorithm_type = (self.algorithm_type or "").strip().lower() or None
        if algorithm_type == "none":
            algorithm_type = None
        if algorithm_type and algorithm_type not in ALGORITHM_TYPES:
            scheduler_ok = False
            problems.append(f"algorithm_type must be one of: none, {', '.join(ALGORITHM_TYPES)}")

        # The engine builds the scheduler with these same rules; checking them here makes a
        # combination it cannot build an error now instead of a failed job after queueing.
        karras = True if self.use_karras_sigmas is None else self.use_karras_sigmas
        scheduler_notes: list[str] = []
        steps_ok = "num_inference_steps" not in self._malformed and 1 <= steps <= settings.max_steps
        if scheduler_ok and steps_ok:
            try:
                choice = validate_scheduler_options(scheduler, karras, algorithm_type, steps)
            except ValueError as error:
                problems.append(str(error))
            else:
                if self.use_karras_sigmas and not choice.use_karras_sigmas:
                    scheduler_notes.append(f"use_karras_sigmas ({scheduler} has no sigma schedule)")
                if algorithm_type and choice.algorithm_type is None:
                    scheduler_notes.append(f"algorithm_type ({scheduler} does not take one)")
                    algorithm_type = None
                karras = choice.use_karras_sigmas

        lora_pairs = self._loras(loras, problems)
        unknown_ids: list[str] = []
        embedding_ids = self._embeddings(embeddings, unknown_ids)
        vae_id = self._vae(vaes, unknown_ids)

        treatment = (self.safety_checker_type or "").strip().lower() or SAFETY_TREATMENTS[0]
        if treatment not in SAFETY_TREATMENTS:
            problems.append(f"safety_checker_type must be one of: {', '.join(SAFETY_TREATMENTS)}")
        check = bool(settings.safety_checker) and (
            bool(self.safety_checker) or settings.safety_checker_mode == "always"
        )

        webhook = (self.webhook or "").strip() or None
        if webhook and not webhook.startswith(("http://", "https://")):
            problems.append("webhook must be an http:// or https:// URL")

        if problems:
            raise RequestError("; ".join(problems))

        above_native = model is not None and (
            sizes["width"] * sizes["height"] > model.native_width * model.native_height
        )
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=(self.negative_prompt or "").strip(),
            model_id=model_id,
            width=sizes["width"],
            height=sizes["height"],
            samples=samples,
            num_inference_steps=steps,
            guidance_scale=float(guidance),
            seed=self.seed if self.seed is not None else secrets.randbelow(MAX_SEED) + 1,
            scheduler=scheduler,
            use_karras_sigmas=karras,
            algorithm_type=algorithm_type,
            clip_skip=clip_skip,
            loras=lora_pairs,
            embeddings=embedding_ids,
            vae=vae_id,
            safety_checker=check,
            safety_checker_type=treatment,
            upscale=(self.upscale or 1) if settings.upscaler else 1,
            tomesd=bool(self.tomesd) and settings.tomesd_ratio > 0,
            self_attention=bool(self.self_attention) and scheduler in SAG_SCHEDULERS,
            highres_fix=bool(self.highres_fix) and above_native and scheduler in HIGHRES_SCHEDULERS,
        )
        not_applied = [
            name for name in NOT_APPLIED_FIELDS if _is_set((self.model_extra or {}).get(name))
        ]
        not_applied += scheduler_notes
        not_applied += unknown_ids
        if self.safety_checker and not check:
            not_applied.append("safety_checker (no safety checker model is configured)")
        if self.highres_fix and not above_native and model is not None:
            not_applied.append(
                f"highres_fix ({sizes['width']}x{sizes['height']} is not above the model's "
                f"native {model.native_width}x{model.native_height})"
            )
        if self.highres_fix and above_native and scheduler not in HIGHRES_SCHEDULERS:
            not_applied.append(f"highres_fix ({scheduler} cannot re-noise latents)")
        if self.self_attention and scheduler not in SAG_SCHEDULERS:
            not_applied.append(
                f"self_attention (needs a scheduler with integer timesteps, not {scheduler})"
            )
        if self.tomesd and not settings.tomesd_ratio:
            not_applied.append("tomesd (token merging is off on this server)")
        if (self.upscale or 1) > 1 and not settings.upscaler:
            not_applied.append("upscale (no upscaler model is configured)")
        options = {
            "base64": bool(self.base64),
            "temp": bool(self.temp),
            "webhook": webhook,
            "track_id": self.track_id,
            "instant_response": bool(self.instant_response),
            "not_applied": not_applied,
        }
        return params, options


def _parse_strengths(text: str | None) -> list[float] | None:
    if text is None or not text.strip():
        return []
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def bounded_default_size(width: int, height: int, settings: Settings) -> tuple[int, int]:
    """A model's default size within the operator's bounds (multiples of 8): like its default
    steps, a request that omits width/height is never refused for them."""
    smallest, largest = -(-settings.min_size // 8) * 8, settings.max_size // 8 * 8
    if smallest > largest:
        return width, height
    return min(max(width, smallest), largest), min(max(height, smallest), largest)


def _is_set(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE | set(BLANK_TEXT)
    return bool(value)


class FetchRequest(KeyedRequest):
    """`POST /api/v6/images/fetch` (and the `{id}` forms, where the id is in the path)."""

    request_id: Int = Field(None, description="The `id` of a text2img response.")


class UsageRequest(KeyedRequest):
    """`POST /api/v1/enterprise/usage`: delivered images and their price per key and model."""

    key_name: KeyName = Field(
        None,
        description="Only this key (its name).",
        json_schema_extra={"maxLength": MAX_KEY_NAME_LENGTH},
    )
    since: date | None = Field(None, description="Only images settled on or after this UTC date.")


# ---- responses --------------------------------------------------------------------------------


_EXAMPLE_BASE = "http://127.0.0.1:8000"
_EXAMPLE_LINK = f"{_EXAMPLE_BASE}/images/6f1c2a9e4b7d4f0e9a1b2c3d4e5f6a7b-0.png"
_EXAMPLE_META = {
    "prompt": "a lighthouse at dusk, oil painting",
    "model_id": "stable-diffu",
    "negative_prompt": "blurry",
    "scheduler": "UniPCMultistepScheduler",
    "W": 768,
    "H": 768,
    "width": 768,
    "height": 768,
    "guidance_scale": 7.5,
    "seed": 12345,
    "steps": 30,
    "n_samples": 1,
    "clip_skip": 1,
    "base64": "no",
    "track_id": None,
    "not_applied": [],
}

# One example body per `status`, shown in the OpenAPI document.
SUCCESS_EXAMPLE = {
    "status": "success",
    "generationTime": 1.84,
    "id": 42,
    "output": [_EXAMPLE_LINK],
    "proxy_links": [_EXAMPLE_LINK],
    "nsfw_content_detected": False,
    "webhook_status": "",
    "tip": "",
    "meta": _EXAMPLE_META,
}
PROCESSING_EXAMPLE = {
    "status": "processing",
    "id": 42,
    "eta": 2.75,
    "message": "Request is processing; fetch it later",
    "messege": "Request is processing; fetch it later",
    "fetch_result": f"{_EXAMPLE_BASE}/api/v6/images/fetch/42",
    "output": [],
    "future_links": [_EXAMPLE_LINK],
    "webhook_status": "",
    "tip": "",
    "meta": _EXAMPLE_META,
}
FAILED_EXAMPLE = {
    "status": "failed",
    "id": 42,
    "message": "Image generation failed: RuntimeError: CUDA error: out of memory",
    "messege": "Image generation failed: RuntimeError: CUDA error: out of memory",
    "output": [],
    "webhook_status": "",
    "track_id": None,
}
ERROR_EXAMPLE = {
    "status": "error",
    "message": "width must be a multiple of 8 between 256 and 1024",
    "messege": "width must be a multiple of 8 between 256 and 1024",
}


class ErrorResponse(BaseModel):
    """A request, key, credit or rate-limit error. HTTP 200 like the hosted API (429 for rate
    limits), or its 4xx code when SDSERVE_STRICT_HTTP_STATUS is set."""

    model_config = ConfigDict(json_schema_extra={"examples": [ERROR_EXAMPLE]})

    status: Literal["error"] = "error"
    message: str = Field(description="Names the field and the rule, or the key/credit problem.")
    messege: str = Field(description="The hosted API's spelling; half the clients read this one.")
    retry_after: float | None = Field(None, description="Seconds to wait (rate limits only).")


class SuccessResponse(BaseModel):
    """The job's images exist; each was charged once."""

    model_config = ConfigDict(json_schema_extra={"examples": [SUCCESS_EXAMPLE]})

    status: Literal["success"] = "success"
    generationTime: float = Field(  # noqa: N815 - wire name
        description="Seconds from the start of generation to the images being stored."
    )
    id: int = Field(description="The job id: `fetch/{id}` reads it again.")
    output: list[str] = Field(description="One URL per image (`.png`, or `.base64`).")
    proxy_links: list[str] = Field(description="The same URLs (the hosted API's CDN copies).")
    nsfw_content_detected: bool = False
    webhook_status: str = Field("", description='"", "success" or "failed".')
    tip: str = ""
    meta: dict[str, Any] = Field(
        description="The resolved request: W, H, seed, steps, scheduler, n_samples, model_id, "
        "prompt_truncated, not_applied, ..."
    )


class ProcessingResponse(BaseModel):
    """Accepted but not finished: past the sync window, or `instant_response`."""

    model_config = ConfigDict(json_schema_extra={"examples": [PROCESSING_EXAMPLE]})

    status: Literal["processing"] = "processing"
    id: int = Field(description="The job id.")
    eta: float = Field(description="Rough seconds until the images exist.")
    message: str
    messege: str
    fetch_result: str = Field(description="POST here (with the key) until status changes.")
    output: list[str] = []
    future_links: list[str] = Field(description="The final image URLs; 404 until they exist.")
    webhook_status: str = ""
    tip: str = ""
    meta: dict[str, Any]


class FailedResponse(BaseModel):
    """Generation failed; the job was not charged."""

    model_config = ConfigDict(json_schema_extra={"examples": [FAILED_EXAMPLE]})

    status: Literal["failed"] = "failed"
    id: int
    message: str = Field(description="Why, without internals.")
    messege: str
    output: list[str] = []
    webhook_status: str = ""
    track_id: str | None = None


class SystemLoadResponse(BaseModel):
    queue_num: int
    queue_time: float
    status: Literal["ok"] = "ok"
