"""The models this server serves: ModelsLab `model_id` -> a diffusers folder, and what the
ingress needs to know about each without loading it (its native resolution)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from service.config import ModelSpec, Settings


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    path: Path
    width: int  # default size: the spec's, else the model's native size
    height: int
    default_steps: int
    prediction_type: str
    native_width: int  # UNet sample size x VAE scale factor
    native_height: int
    # hidden layers of the CLIP text encoder (clip_skip's bound); None: no config to read
    text_encoder_layers: int | None = None


class ModelRegistry:
    """Served models, LoRAs, embeddings and VAEs, from settings; read by the API, the CLI and the
    playground."""

    def __init__(self, settings: Settings):
        self._models = {
            model_id: _read_model_info(model_id, spec, settings.max_steps)
            for model_id, spec in settings.model_specs().items()
        }
        self._loras = settings.lora_paths()
        self._embeddings = settings.embedding_paths()
        self._vaes = settings.vae_paths()

    def lora_ids(self) -> list[str]:
        return sorted(self._loras)

    def embedding_ids(self) -> list[str]:
        return sorted(self._embeddings)

    def vae_ids(self) -> list[str]:
        return sorted(self._vaes)

    def infos(self) -> dict[str, ModelInfo]:
        return dict(self._models)

    def ids(self) -> list[str]:
        return sorted(self._models)

    def get(self, model_id: str) -> ModelInfo | None:
        return self._models.get(model_id)

    def sizes(self) -> dict[str, tuple[int, int]]:
        return {m.model_id: (m.width, m.height) for m in self._models.values()}

    def paths(self) -> dict[str, Path]:
        return {m.model_id: m.path for m in self._models.values()}


def _read_model_info(model_id: str, spec: ModelSpec, max_steps: int) -> ModelInfo:
    """Native size = UNet sample size x VAE scale factor (96 x 8 = 768 for SD 2.0 768-v)."""
    path = Path(spec.path)
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        vae = json.loads((path / "vae" / "config.json").read_text())
    except FileNotFoundError as exc:
        raise ValueError(
            f"model '{model_id}': {path} is not a diffusers model folder ({exc.filename} missing)"
        ) from None
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
    text_encoder_layers = _text_encoder_layers(path / "text_encoder" / "config.json")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    sample = unet["sample_size"]
    height, width = (sample, sample) if isinstance(sample, int) else sample
    return ModelInfo(
        model_id=model_id,
        path=path,
        width=spec.width or width * scale,
        height=spec.height or height * scale,
        # a spec's own default is validated against max_steps; the generic 30 is capped by it
        default_steps=spec.default_steps or min(30, max_steps),
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        native_width=width * scale,
        native_height=height * scale,
        text_encoder_layers=text_encoder_layers,
    )


# transformers' CLIPTextConfig default, for a config.json that does not spell it out
CLIP_TEXT_DEFAULT_LAYERS = 12


def _text_encoder_layers(config_file: Path) -> int | None:
    """`num_hidden_layers` of the text encoder's config (5 for the tiny model, 23 for SD 2.x),
    read once with the model's other configs; None when the file is missing or unreadable (the
    engine then checks clip_skip when it loads the model)."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    layers = config.get("num_hidden_layers", CLIP_TEXT_DEFAULT_LAYERS)
    if isinstance(config.get("text_config"), dict):  # a full CLIPConfig: its text part
        layers = config["text_config"].get("num_hidden_layers", CLIP_TEXT_DEFAULT_LAYERS)
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else None
