"""The models this server serves: ModelsLab `model_id` -> a diffusers folder, and what the
ingress needs to know about each without loading it (its native resolution)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from service.config import Settings


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    path: Path
    width: int
    height: int


class ModelRegistry:
    def __init__(self, settings: Settings):
        self._models = {
            model_id: _read_model_info(model_id, path)
            for model_id, path in settings.model_paths().items()
        }

    def ids(self) -> list[str]:
        return sorted(self._models)

    def get(self, model_id: str) -> ModelInfo | None:
        return self._models.get(model_id)

    def sizes(self) -> dict[str, tuple[int, int]]:
        return {m.model_id: (m.width, m.height) for m in self._models.values()}

    def paths(self) -> dict[str, Path]:
        return {m.model_id: m.path for m in self._models.values()}


def _read_model_info(model_id: str, path: Path) -> ModelInfo:
    """Native size = UNet sample size x VAE scale factor (96 x 8 = 768 for SD 2.0 768-v)."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except FileNotFoundError as exc:
        raise ValueError(
            f"model '{model_id}': {path} is not a diffusers model folder ({exc.filename} missing)"
        ) from None
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample = unet["sample_size"]
    height, width = (sample, sample) if isinstance(sample, int) else sample
    return ModelInfo(model_id, path, width * scale, height * scale)
