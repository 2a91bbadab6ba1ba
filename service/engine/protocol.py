"""What the engine is asked to do and what it gives back.

These types are the only thing the serving layer knows about the engine: plain data that
crosses the Ray object store, with no torch or diffusers inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SAFETY_TREATMENTS = ("sensitive_content_text", "blur", "pixelate", "black")
"""What an image the safety checker flags becomes (`safety_checker_type`); the first is the
default."""


@dataclass(frozen=True)
class GenerationParams:
    """One text-to-image request, already validated and with defaults applied.

    `seed` is always resolved (never random here): image i of the request uses `seed + i`.
    `clip_skip` follows the ModelsLab/A1111 convention: 1 means the text encoder's last layer.
    """

    prompt: str
    negative_prompt: str = ""
    model_id: str = "stable-diffu"
    width: int = 768
    height: int = 768
    samples: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    scheduler: str = "UniPCMultistepScheduler"
    use_karras_sigmas: bool = True
    algorithm_type: str | None = None
    clip_skip: int = 1
    # LoRA adapters as (lora_id, strength) pairs, in request order
    loras: tuple[tuple[str, float], ...] = ()
    # Textual-inversion embeddings by id; an id in the prompt or negative prompt is replaced by
    # its learned vectors. Only the text encoding changes, so they are not in the batch key.
    embeddings: tuple[str, ...] = ()
    # Check the images with the configured safety checker; a flagged image becomes what
    # `safety_checker_type` says (service/engine/safety.py). Not part of the batch key.
    safety_checker: bool = False
    safety_checker_type: str = "sensitive_content_text"
    # A custom VAE id (service/engine/vaes.py) that decodes this request's latents instead of
    # the model's own VAE. Only the decode changes, so it is not in the batch key.
    vae: str | None = None
    # Upscale the images by this factor after decoding (1: no); the generator does it, with
    # the configured upscaler (service/engine/upscaler.py). Not part of the batch key.
    upscale: int = 1
    # Token merging (ToMe, service/engine/token_merging.py) in the UNet's self-attention: it
    # changes the UNet's computation, so it is part of the batch key.
    tomesd: bool = False
    # Self-attention guidance (service/engine/self_attention_guidance.py): one more UNet pass
    # per step over this request's degraded latents; the shared forward is unchanged, so it is
    # not part of the batch key.
    self_attention: bool = False
    # Highres fix: a first pass at the model's native pixel count, then the latents upscaled
    # to the requested size and partly re-denoised (service/engine/highres.py). Its first
    # pass has another latent shape, so it is part of the batch key.
    highres_fix: bool = False

    @classmethod
    def from_dict(cls, data: dict) -> GenerationParams:
        """Back from the JSON a job row keeps (lists become tuples again)."""
        loras = tuple((str(lora_id), float(weight)) for lora_id, weight in data.get("loras", ()))
        embeddings = tuple(str(name) for name in data.get("embeddings", ()))
        return cls(**{**data, "loras": loras, "embeddings": embeddings})

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call (same latents shape, timesteps)."""
        return (
            self.model_id,
            self.width,
            self.height,
            self.num_inference_steps,
            self.scheduler,
            self.use_karras_sigmas,
            self.algorithm_type,
            self.loras,  # adapters change the UNet: different sets never share a call
            self.tomesd,
            self.highres_fix,
        )


@dataclass
class GenerationOutput:
    """The images of one request, as HxWx3 uint8 arrays, and how they were made."""

    images: list[np.ndarray]
    seed: int
    prompt_truncated: bool = False
    batch_size: int = 1  # images in the pipeline call this request was part of
    inference_seconds: float = 0.0  # wall time of that pipeline call
    extra: dict = field(default_factory=dict)


class TextToImageEngine(Protocol):
    """What the generator deployment needs of an engine (`AppConfig.engine` names the class).

    Constructed as `cls(models, device=..., dtype=..., loras=..., embeddings=..., vaes=...,
    max_loaded_models=..., optimizations=...)`, `models`, `loras`, `embeddings` and `vaes`
    mapping ids to folders and files.
    """

    def load(self, model_id: str) -> object: ...

    def unload(self, model_id: str) -> bool: ...

    def loaded_models(self) -> list[str]: ...

    def warmup(self, model_id: str) -> None: ...

    def generate(self, batch: list[GenerationParams]) -> list[GenerationOutput]: ...
