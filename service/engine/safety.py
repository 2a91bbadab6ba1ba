"""The NSFW safety check (`safety_checker: yes`) and what happens to a flagged image.

The checker is diffusers' `StableDiffusionSafetyChecker` (a CLIP vision tower compared with
concept embeddings), loaded from a local folder the operator configures
(`SDSERVE_SAFETY_CHECKER`), e.g. a copy of CompVis/stable-diffusion-safety-checker. SD 2.0 ships
none, so without that setting no check runs and the API says so (`meta.not_applied`).
Nothing here knows about Ray or HTTP: images in, flags and treated images out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from service.engine.protocol import SAFETY_TREATMENTS


class SafetyCheckerError(RuntimeError):
    """The configured checker folder is missing, incomplete or corrupt."""


class SafetyChecker:
    """Flags images with a `StableDiffusionSafetyChecker` and its CLIP image processor.

    `path` is either the checker's own folder (config.json, weights, preprocessor_config.json)
    or a pipeline folder holding `safety_checker/` and `feature_extractor/`.
    """

    def __init__(
        self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> None:
        from diffusers.pipelines.stable_diffusion.safety_checker import (
            StableDiffusionSafetyChecker,
        )
        from transformers import CLIPImageProcessor

        path = Path(path)
        model_dir, processor_dir = path, path
        if (path / "safety_checker" / "config.json").exists():
            model_dir, processor_dir = path / "safety_checker", path / "feature_extractor"
        try:
            self.processor = CLIPImageProcessor.from_pretrained(
                processor_dir, local_files_only=True
            )
            self.model = StableDiffusionSafetyChecker.from_pretrained(
                model_dir, local_files_only=True, dtype=dtype
            )
        except Exception as exc:
            raise SafetyCheckerError(
                f"safety checker could not be loaded from {path}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        self.model.to(device).eval()
        # diffusers warns that it returns black images; here the request's treatment does.
        logging.getLogger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(
            logging.ERROR
        )
        self.device = torch.device(device)
        self.dtype = dtype

    def flags(self, images: list[np.ndarray]) -> list[bool]:
        """Whether each HxWx3 uint8 image shows a concept the checker is made to catch."""
        if not images:
            return []
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixels = inputs.pixel_values.to(self.device, self.dtype)
        # The model blacks out flagged entries of `images` itself; hand it throwaway ones so
        # the treatment stays the request's choice.
        throwaway = [np.zeros((1, 1, 3)) for _ in images]
        with torch.inference_mode():
            _, flagged = self.model(clip_input=pixels, images=throwaway)
        return [bool(flag) for flag in flagged]


def treat(image: np.ndarray, treatment: str) -> np.ndarray:
    """A flagged image made safe to show, the same size as `image`."""
    height, width = image.shape[:2]
    if treatment == "black":
        return np.zeros_like(image)
    picture = Image.fromarray(image)
    if treatment == "blur":
        # A radius of 1/16 of the longer side leaves only colour fields.
        picture = picture.filter(ImageFilter.GaussianBlur(radius=max(width, height) / 16))
    elif treatment == "pixelate":
        block = max(8, max(width, height) // 16)
        small = picture.resize(
            (max(1, width // block), max(1, height // block)), Image.Resampling.BOX
        )
        picture = small.resize((width, height), Image.Resampling.NEAREST)
    elif treatment == "sensitive_content_text":
        picture = _notice(width, height)
    else:
        raise ValueError(
            f"safety_checker_type: unknown treatment {treatment!r}; "
            f"allowed: {', '.join(SAFETY_TREATMENTS)}"
        )
    return np.asarray(picture.convert("RGB"), dtype=np.uint8)


def _notice(width: int, height: int) -> Image.Image:
    """A grey picture that says why the image is not shown."""
    picture = Image.new("RGB", (width, height), (48, 48, 48))
    draw = ImageDraw.Draw(picture)
    text = "Sensitive content"
    font = ImageFont.load_default(size=max(10, width // 14))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    position = ((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top)
    draw.text(position, text, fill=(230, 230, 230), font=font)
    return picture
