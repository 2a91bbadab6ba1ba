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


class ModelConfigError(ValueError):
    """A model folder's config file is missing, not JSON, or not what a diffusers SD model has:
    names the model, the file and the problem."""

    def __init__(self, model_id: str, file: Path, problem: str):
        super().__init__(f"model '{model_id}': {file}: {problem}")
        self.model_id = model_id
        self.file = file
        self.problem = problem


def _read_model_info(model_id: str, spec: ModelSpec, max_steps: int) -> ModelInfo:
    """Native size = UNet sample size x VAE scale factor (96 x 8 = 768 for SD 2.0 768-v).

    Raises ModelConfigError (a ValueError) for a missing UNet or VAE config, and for any config
    it reads (those two, the scheduler's, the text encoder's) that is not a JSON object of the
    expected fields."""
    path = Path(spec.path)
    configs = _Configs(model_id, path)
    unet, unet_file = configs.read("unet/config.json")
    vae, vae_file = configs.read("vae/config.json")
    scheduler, scheduler_file = configs.read("scheduler/scheduler_config.json", required=False)
    text_encoder, text_encoder_file = configs.read("text_encoder/config.json", required=False)

    channels = vae.get("block_out_channels")
    if not isinstance(channels, list) or not 1 <= len(channels) <= _MAX_VAE_BLOCKS:
        raise configs.error(
            vae_file, f"block_out_channels must be a list of 1 to {_MAX_VAE_BLOCKS} channel counts"
        )
    scale = 2 ** (len(channels) - 1)
    sample = unet.get("sample_size")
    if _positive_int(sample):
        height, width = sample, sample
    elif isinstance(sample, list) and len(sample) == 2 and all(map(_positive_int, sample)):
        height, width = sample
    else:
        raise configs.error(unet_file, "sample_size must be a positive integer or [height, width]")
    prediction_type = "epsilon"
    if scheduler is not None:
        prediction_type = scheduler.get("prediction_type", "epsilon")
        if not isinstance(prediction_type, str):
            raise configs.error(scheduler_file, "prediction_type must be a string")
    text_encoder_layers = None
    if text_encoder is not None:
        text_encoder_layers = _text_encoder_layers(text_encoder)
        if text_encoder_layers is None:
            raise configs.error(
                text_encoder_file,
                "num_hidden_layers must be a positive integer (and text_config an object)",
            )
    return ModelInfo(
        model_id=model_id,
        path=path,
        width=spec.width or width * scale,
        height=spec.height or height * scale,
        # a spec's own default is validated against max_steps; the generic 30 is capped by it
        default_steps=spec.default_steps or min(30, max_steps),
        prediction_type=prediction_type,
        native_width=width * scale,
        native_height=height * scale,
        text_encoder_layers=text_encoder_layers,
    )


# a VAE halves the size once per block after the first; SD's has 4 (scale 8)
_MAX_VAE_BLOCKS = 8


class _Configs:
    """Reads one model folder's JSON configs, each refused with the model id and its path."""

    def __init__(self, model_id: str, path: Path):
        self.model_id = model_id
        self.path = path

    def error(self, file: Path, problem: str) -> ModelConfigError:
        return ModelConfigError(self.model_id, file, problem)

    def read(self, name: str, *, required: bool = True) -> tuple[dict | None, Path]:
        """The config as a dict; None for a missing optional one."""
        file = self.path / name
        try:
            text = file.read_bytes()
        except FileNotFoundError:
            if not required:
                return None, file
            raise self.error(
                file, f"missing ({self.path} is not a diffusers model folder)"
            ) from None
        except OSError as exc:  # a folder where the file should be, no permission, ...
            raise self.error(file, f"cannot be read ({exc.strerror or exc})") from None
        try:
            config = json.loads(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise self.error(file, f"not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise self.error(file, f"must be a JSON object, not {_json_type(config)}")
        return config, file


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# transformers' CLIPTextConfig default, for a config.json that does not spell it out
CLIP_TEXT_DEFAULT_LAYERS = 12


def _text_encoder_layers(config: dict) -> int | None:
    """`num_hidden_layers` of the text encoder's config (5 for the tiny model, 23 for SD 2.x);
    None when the config gives one that is not a positive integer."""
    text_config = config.get("text_config")
    if isinstance(text_config, dict):  # a full CLIPConfig: its text part
        config = text_config
    elif text_config is not None:
        return None
    layers = config.get("num_hidden_layers", CLIP_TEXT_DEFAULT_LAYERS)
    return layers if _positive_int(layers) else None
