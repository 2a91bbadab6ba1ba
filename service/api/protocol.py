"""The ModelsLab wire format: request fields as clients really send them, and response bodies.

Clients send numbers as strings, toggles as "yes"/"no", seeds as null/-1/""/"0"; the request
model coerces all of these. Bounds that an operator can change are checked against `Settings`
in `Text2ImgRequest.to_params`, so every error names the field and the rule in one place.
"""

from __future__ import annotations

import logging
import math
import secrets
from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from service.config import Settings
from service.engine.protocol import GenerationParams
from service.engine.schedulers import SCHEDULERS, canonical_scheduler_name

log = logging.getLogger(__name__)

MAX_SEED = 2**32 - 1
RANDOM_SEED_VALUES = (None, "", -1, "-1", 0, "0")
_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n", ""}

# Fields clients send that change the picture in the hosted API but that this service does not
# apply yet: accepted, and listed in meta["not_applied"] so nobody is misled.
NOT_APPLIED_FIELDS = (
    "enhance_prompt",
    "multi_lingual",
    "panorama",
    "self_attention",
    "upscale",
    "highres_fix",
    "tomesd",
    "vae",
    "embeddings_model",
    "ip_adapter_id",
    "ip_adapter_scale",
    "ip_adapter_image",
)


def _blank_to_none(value: Any) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
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


def _coerce_float(value: Any) -> float | None:
    value = _blank_to_none(value)
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def _coerce_bool(value: Any) -> bool | None:
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


def _coerce_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError("must be a string")


def _coerce_seed(value: Any) -> int | None:
    if value in RANDOM_SEED_VALUES or (isinstance(value, str) and value.strip() in ("", "-1", "0")):
        return None
    seed = _coerce_int(value)
    if seed is None or seed == -1 or seed == 0:
        return None
    if not 0 < seed <= MAX_SEED:
        raise ValueError(f"must be an integer between 1 and {MAX_SEED}, or null/-1 for random")
    return seed


Int = Annotated[int | None, BeforeValidator(_coerce_int)]
Float = Annotated[float | None, BeforeValidator(_coerce_float)]
Toggle = Annotated[bool | None, BeforeValidator(_coerce_bool)]
Text = Annotated[str | None, BeforeValidator(_coerce_text)]
Seed = Annotated[int | None, BeforeValidator(_coerce_seed)]


class RequestError(ValueError):
    """A request field broke a rule; the message names the field and the rule."""


class KeyedRequest(BaseModel):
    """Every ModelsLab body carries the API key; unknown fields are ignored (and logged)."""

    model_config = ConfigDict(extra="allow")

    key: Text = Field(
        None, description="API key (also accepted as `Authorization: Bearer` or `key:` header)."
    )

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class Text2ImgRequest(KeyedRequest):
    """`POST /api/v6/images/text2img` and its v3/v4/v7 twins."""

    model_id: Text = Field(None, description="A served model; default `stable-diffu`.")
    prompt: Text = Field(None, description="What to draw; truncated to 77 CLIP tokens.")
    negative_prompt: Text = Field(None, description="What not to draw.")
    width: Int = Field(None, description="Multiple of 8; default: the model's native size.")
    height: Int = Field(None, description="Multiple of 8; default: the model's native size.")
    samples: Int = Field(None, description="Images to generate, 1-4 (default 1).")
    num_inference_steps: Int = Field(None, description="Denoising steps, 1-50 (default 30).")
    guidance_scale: Float = Field(None, description="Classifier-free guidance, 1-20 (default 7.5).")
    seed: Seed = Field(None, description='null, -1, "" or 0 for random; image i uses seed+i.')
    scheduler: Text = Field(None, description="A diffusers scheduler class name.")
    use_karras_sigmas: Toggle = Field(None, description='"yes"/"no" (default "yes").')
    algorithm_type: Text = Field(None, description='"dpmsolver+++" with DPMSolverMultistep.')
    clip_skip: Int = Field(None, description="CLIP layers to skip from the end, 1-8 (default 1).")
    lora_model: Text = Field(None, description="Comma-separated LoRA ids.")
    lora_strength: Text = Field(None, description="Comma-separated strengths, 0.1-1 each.")
    safety_checker: Toggle = Field(None, description="Needs a configured checker model.")
    safety_checker_type: Text = Field(
        None, description="blur, pixelate, black, sensitive_content_text."
    )
    base64: Toggle = Field(None, description='"yes": output URLs serve the base64 text of the PNG.')
    temp: Toggle = Field(None, description='"yes": output links expire after 24 hours.')
    webhook: Text = Field(None, description="URL that receives a POST when the job ends.")
    track_id: Text = Field(None, description="Echoed in responses and webhooks.")
    instant_response: Toggle = Field(None, description='"yes": answer `processing` at once.')

    def to_params(
        self, settings: Settings, model_sizes: dict[str, tuple[int, int]]
    ) -> tuple[GenerationParams, dict]:
        """Check every rule and resolve defaults; returns the engine params and the options
        that stay with the ingress (base64, temp, webhook, track_id, not-applied fields)."""
        problems: list[str] = []

        def bounded(name: str, value: int | None, default: int, low: int, high: int) -> int:
            if value is None:
                return default
            if not low <= value <= high:
                problems.append(f"{name} must be an integer between {low} and {high}")
            return value

        model_id = (self.model_id or "").strip() or settings.default_model_id
        if model_id not in model_sizes:
            available = ", ".join(sorted(model_sizes))
            problems.append(
                f"model_id '{model_id}' is not available; available models: {available}"
            )
            default_w, default_h = 512, 512
        else:
            default_w, default_h = model_sizes[model_id]

        prompt = (self.prompt or "").strip()
        if not prompt:
            problems.append("prompt must be a non-empty string")

        sizes = {}
        for name, value, default in (
            ("width", self.width, default_w),
            ("height", self.height, default_h),
        ):
            size = default if value is None else value
            if not (settings.min_size <= size <= settings.max_size and size % 8 == 0):
                problems.append(
                    f"{name} must be a multiple of 8 between {settings.min_size} and "
                    f"{settings.max_size}"
                )
            sizes[name] = size

        samples = bounded("samples", self.samples, 1, 1, settings.max_samples)
        steps = bounded("num_inference_steps", self.num_inference_steps, 30, 1, settings.max_steps)
        clip_skip = bounded("clip_skip", self.clip_skip, 1, 1, 8)

        guidance = 7.5 if self.guidance_scale is None else self.guidance_scale
        if not 1 <= guidance <= 20:
            problems.append("guidance_scale must be a number between 1 and 20")

        scheduler = "UniPCMultistepScheduler"
        if self.scheduler and self.scheduler.strip():
            try:
                scheduler = canonical_scheduler_name(self.scheduler.strip())
            except ValueError:
                problems.append(f"scheduler must be one of: {', '.join(SCHEDULERS)}")

        algorithm_type = (self.algorithm_type or "").strip() or None
        if algorithm_type and algorithm_type.lower() == "none":
            algorithm_type = None
        if algorithm_type and algorithm_type not in ALGORITHM_TYPES:
            problems.append(f"algorithm_type must be one of: none, {', '.join(ALGORITHM_TYPES)}")

        if self.lora_model and self.lora_model.strip():
            problems.append(
                f"lora_model '{self.lora_model.strip()}' is not available; this server has no LoRAs"
            )

        webhook = (self.webhook or "").strip() or None
        if webhook and not webhook.startswith(("http://", "https://")):
            problems.append("webhook must be an http:// or https:// URL")

        if problems:
            raise RequestError("; ".join(problems))

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
            use_karras_sigmas=True if self.use_karras_sigmas is None else self.use_karras_sigmas,
            algorithm_type=algorithm_type,
            clip_skip=clip_skip,
        )
        not_applied = [
            name for name in NOT_APPLIED_FIELDS if _is_set((self.model_extra or {}).get(name))
        ]
        if self.safety_checker:
            not_applied.append("safety_checker (no safety checker model is configured)")
        options = {
            "base64": bool(self.base64),
            "temp": bool(self.temp),
            "webhook": webhook,
            "track_id": self.track_id,
            "instant_response": bool(self.instant_response),
            "not_applied": not_applied,
        }
        return params, options


ALGORITHM_TYPES = ("dpmsolver+++", "dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


def _is_set(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE | {"null", "none"}
    return bool(value)


class FetchRequest(KeyedRequest):
    """`POST /api/v6/images/fetch` (and the `{id}` forms, where the id is in the path)."""

    request_id: Int = Field(None, description="The `id` of a text2img response.")


class UsageRequest(KeyedRequest):
    """`POST /api/v1/enterprise/usage`: delivered images and their price per key and model."""

    key_name: Text = Field(None, description="Only this key (its name).")
    since: date | None = Field(None, description="Only images settled on or after this UTC date.")


# ---- responses --------------------------------------------------------------------------------


class ErrorResponse(BaseModel):
    status: Literal["error"] = "error"
    message: str
    messege: str = Field(description="The hosted API's spelling; half the clients read this one.")
    retry_after: float | None = Field(None, description="Seconds to wait (rate limits only).")


class SuccessResponse(BaseModel):
    status: Literal["success"] = "success"
    generationTime: float  # noqa: N815 - wire name
    id: int
    output: list[str]
    proxy_links: list[str]
    nsfw_content_detected: bool = False
    webhook_status: str = ""
    tip: str = ""
    meta: dict[str, Any]


class ProcessingResponse(BaseModel):
    status: Literal["processing"] = "processing"
    id: int
    eta: float
    message: str
    messege: str
    fetch_result: str
    output: list[str] = []
    future_links: list[str]
    webhook_status: str = ""
    tip: str = ""
    meta: dict[str, Any]


class FailedResponse(BaseModel):
    status: Literal["failed"] = "failed"
    id: int
    message: str
    messege: str
    output: list[str] = []
    webhook_status: str = ""
    track_id: str | None = None


class SystemLoadResponse(BaseModel):
    queue_num: int
    queue_time: float
    status: Literal["ok"] = "ok"
