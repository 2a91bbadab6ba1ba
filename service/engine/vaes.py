"""Custom VAEs (a request's `vae`): other decoders for a model's latents, from the VAE folder.

A VAE only turns finished latents into pixels, so requests that name different VAEs still share
every UNet step: the engine groups a batch's latents by VAE when it decodes them.

Entries of the folder (`SDSERVE_VAE_DIR`):
- `NAME/`: a diffusers AutoencoderKL folder (config.json and weights);
- `NAME.safetensors`: one standalone VAE file, as community VAEs are published (the original LDM
  key layout, with or without `first_stage_model.`), or diffusers' layout. A file has no config:
  it takes the architecture of the model it decodes for, and is refused if its weights do not fit.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch

from service.engine.checkpoint import compare_state_dicts

log = logging.getLogger(__name__)


class VaeError(ValueError):
    """A `vae` cannot be used: unknown, unreadable, or not fit for the model; names which."""


class VaeLibrary:
    """Loads custom VAEs on first use and keeps the most recently used `max_loaded`.

    A VAE is loaded per model it decodes for (a single file takes that model's architecture),
    on the engine's device and dtype; thread-safe."""

    def __init__(
        self,
        paths: Mapping[str, str | Path],
        device: torch.device,
        dtype: torch.dtype,
        max_loaded: int = 4,
    ) -> None:
        self.paths = {vae_id: Path(path) for vae_id, path in paths.items()}
        self.device = device
        self.dtype = dtype
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[tuple[str, str], torch.nn.Module] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, vae_id: str, model_id: str, model_vae_config: Mapping) -> torch.nn.Module:
        """The VAE `vae_id`, ready to decode latents of the model `model_id` (whose own VAE has
        `model_vae_config`); VaeError if it is unknown, unreadable or does not fit."""
        key = (vae_id, model_id)
        with self._lock:
            vae = self._loaded.get(key)
            if vae is not None:
                self._loaded.move_to_end(key)
                return vae
        vae = self._load(vae_id, model_id, model_vae_config)
        with self._lock:
            self._loaded[key] = vae
            self._loaded.move_to_end(key)
            while len(self._loaded) > self.max_loaded:
                self._loaded.popitem(last=False)
        return vae

    def forget(self, model_id: str) -> None:
        """Drop the VAEs loaded for `model_id` (its pipeline was unloaded)."""
        with self._lock:
            for key in [key for key in self._loaded if key[1] == model_id]:
                del self._loaded[key]

    def loaded(self) -> list[tuple[str, str]]:
        """(vae id, model id) pairs held, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _load(self, vae_id: str, model_id: str, model_vae_config: Mapping) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        path = self.paths.get(vae_id)
        if path is None:
            raise VaeError(
                f"vae {vae_id!r} is not available; available: "
                f"{', '.join(sorted(self.paths)) or 'none'}"
            )
        problems: list[str] = []
        try:
            if path.is_dir():
                vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
            else:
                vae = AutoencoderKL.from_config(dict(model_vae_config))
                state = _read_vae_file(path, model_vae_config)
                problems = compare_state_dicts("vae", state, vae.state_dict())
                if not problems:
                    vae.load_state_dict(state, strict=True)
        except Exception as exc:
            # Clients see the message (a job's message): server paths go to the log only.
            log.error(
                "vae %r could not be loaded for model %r from %s: %s: %s",
                vae_id,
                model_id,
                path,
                type(exc).__name__,
                _first_line(exc),
            )
            raise VaeError(
                f"vae {vae_id!r} could not be loaded for model {model_id!r} "
                f"({type(exc).__name__}; the server log names the file and the cause)"
            ) from exc
        if problems:
            raise VaeError(
                f"vae {vae_id!r} does not fit model {model_id!r} (a single VAE file takes the "
                f"model's VAE architecture): {'; '.join(problems)}"
            )
        wanted = model_vae_config.get("latent_channels", 4)
        if vae.config.latent_channels != wanted:
            raise VaeError(
                f"vae {vae_id!r} does not fit model {model_id!r}: it decodes latents of "
                f"{vae.config.latent_channels} channels, the model makes {wanted}"
            )
        return vae.to(self.device, self.dtype).eval().requires_grad_(False)


def _read_vae_file(path: Path, model_vae_config: Mapping) -> dict[str, torch.Tensor]:
    """A standalone VAE file's weights in diffusers' key layout."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    state = load_file(path)
    if any(key.startswith("decoder.up_blocks.") for key in state):
        return state
    converted = convert_ldm_vae_checkpoint(state, dict(model_vae_config))
    if not converted:
        raise ValueError("no VAE weights found (neither the LDM nor the diffusers key layout)")
    return converted


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def decode_with(vae: torch.nn.Module, latents: torch.Tensor, scaling_factor: float):
    """Pixels in [-1, 1] from latents of a model whose own VAE scales by `scaling_factor`: the
    UNet's latents are in the model's scaled space whichever VAE turns them into pixels."""
    return vae.decode(latents.to(vae.dtype) / scaling_factor, return_dict=False)[0]
