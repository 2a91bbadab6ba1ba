"""The image-generation engine: diffusers' SD2 components driven by our own denoising loop.

diffusers' `StableDiffusionPipeline.__call__` runs one prompt setting at a time. Here one UNet
forward per step serves every image of every request in the batch, while each request keeps
its own scheduler and one `torch.Generator` per image, so a request's image does not depend on
what else shares its batch. No Ray and no HTTP here: plain data in, numpy images out.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are always local files

import contextlib
import gc
import inspect
import itertools
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from service.engine.highres import first_pass_size, second_pass_start
from service.engine.linear_steps import LinearStepper, is_linear
from service.engine.optimize import OptimizationConfig, apply_optimizations, runner_for
from service.engine.protocol import GenerationOutput, GenerationParams
from service.engine.schedulers import (
    HIGHRES_SCHEDULERS,
    add_noise,
    build_scheduler,
    validate_scheduler_options,
)
from service.engine.self_attention_guidance import (
    SAG_SCALE,
    SAG_SCHEDULERS,
    AttentionCapture,
    degrade,
    predict_x0_and_eps,
)
from service.engine.token_merging import TokenMerging
from service.engine.vaes import VaeLibrary, decode_with

log = logging.getLogger(__name__)

CLIP_MAX_TOKENS = 77  # CLIP's context, BOS and EOS included


class ModelLoadError(RuntimeError):
    """A model folder is missing, incomplete or corrupt."""


class LoraError(ValueError):
    """A LoRA is unknown or does not fit the model it was asked for."""


class EmbeddingError(ValueError):
    """A textual-inversion embedding is unknown, unreadable, or does not fit the model."""


class EncodedPrompt(NamedTuple):
    """A request's text conditioning, each (1, tokens, dim)."""

    cond: torch.Tensor
    uncond: torch.Tensor | None  # None when guidance_scale <= 1: no CFG, as in diffusers
    truncated: bool  # the prompt was longer than CLIP's 77 tokens


@dataclass
class RequestState:
    """One request in flight: its scheduler, generators, latents and text embeddings.

    The denoising loop only ever advances a list of these, which is what lets requests at
    different steps share a UNet forward later (step-level continuous batching).
    """

    params: GenerationParams
    scheduler: SchedulerMixin
    generators: list[torch.Generator]
    timesteps: torch.Tensor  # on the CPU, where the scheduler indexes its tables with them
    cond_embeds: torch.Tensor  # (samples, tokens, dim)
    uncond_embeds: torch.Tensor | None  # None without CFG
    latents: torch.Tensor | None = None  # (samples, 4, height / 8, width / 8)
    step_kwargs: dict = field(default_factory=dict)
    step: int = 0
    prompt_truncated: bool = False
    # (width, height) of the pass being denoised, and of a second pass still to come (highres
    # fix: service/engine/highres.py)
    size: tuple[int, int] = (0, 0)
    second_pass_size: tuple[int, int] | None = None
    # `timesteps` as the UNet takes them (float, on the engine's device), copied once per pass
    # so that a step reads its timestep without a host-to-device copy
    unet_timesteps: torch.Tensor | None = None
    # steps the scheduler on a CPU twin so the device is never waited on (linear_steps.py);
    # None: the scheduler steps the latents directly
    stepper: LinearStepper | None = None

    @property
    def samples(self) -> int:
        return self.params.samples

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)


class Engine:
    """Loads diffusers-format SD models by id and generates batches of requests with them."""

    max_prompt_tokens: int = CLIP_MAX_TOKENS

    def __init__(
        self,
        models: Mapping[str, str | Path],
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        generator_device: str = "cpu",
        vae_batch_size: int = 1,
        loras: Mapping[str, str | Path] | None = None,
        embeddings: Mapping[str, str | Path] | None = None,
        vaes: Mapping[str, str | Path] | None = None,
        max_loaded_models: int | None = None,
        optimizations: OptimizationConfig | None = None,
        token_merging_ratio: float | None = 0.5,
    ) -> None:
        """`models` maps model ids to diffusers folders; nothing is loaded until first use.

        Generators live on `generator_device` (CPU by default), so a seed gives the same initial
        noise on any hardware. `vae_batch_size` bounds how many images one VAE decode takes.
        `loras` maps LoRA ids to safetensors files, `embeddings` textual-inversion ids to their
        files, `vaes` custom VAE ids to folders or files (service/engine/vaes.py);
        `max_loaded_models` bounds the pipelines held at once (least recently used ones
        are unloaded first). `optimizations` switches the optimized path
        (service/engine/optimize.py); off when None. `token_merging_ratio` is the share of
        tokens merged away for requests with `tomesd` (service/engine/token_merging.py; None:
        such requests are refused).
        """
        self.model_paths = {model_id: Path(path) for model_id, path in models.items()}
        self.lora_paths = {lora_id: Path(path) for lora_id, path in (loras or {}).items()}
        self.embedding_paths = {name: Path(path) for name, path in (embeddings or {}).items()}
        self._embedding_cache: dict[str, torch.Tensor] = {}
        self.max_loaded_models = max_loaded_models
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.generator_device = torch.device(generator_device)
        self.vae_batch_size = vae_batch_size
        self.vaes = VaeLibrary(vaes or {}, self.device, self.dtype)
        self.token_merging = TokenMerging(token_merging_ratio) if token_merging_ratio else None
        # engine optimizations: latents stay fp32 on the optimized path, only the nets run bf16
        self.optimizations = (optimizations or OptimizationConfig()).resolved(self.device)
        self.latent_dtype = self.optimizations.latent_dtype(self.dtype)
        self._pipes: OrderedDict[str, StableDiffusionPipeline] = OrderedDict()
        self._load_lock = threading.Lock()

    def model_ids(self) -> list[str]:
        """The model ids this engine can serve."""
        return list(self.model_paths)

    def load(self, model_id: str) -> StableDiffusionPipeline:
        """Load a model (once) the same way for real weights and the tiny test model; the
        least recently used pipeline is unloaded first when `max_loaded_models` is reached."""
        # A loaded model does not wait behind another model's load (tens of seconds from a
        # volume): the step loop asks for its pipeline at every step.
        pipe = self._pipes.get(model_id)
        if pipe is not None:
            with contextlib.suppress(KeyError):  # unloaded meanwhile: this caller still has it
                self._pipes.move_to_end(model_id)
            return pipe
        with self._load_lock:
            if model_id in self._pipes:
                self._pipes.move_to_end(model_id)
                return self._pipes[model_id]
            path = self._path(model_id)
            if self.max_loaded_models:
                while len(self._pipes) >= self.max_loaded_models:
                    self._unload_locked(next(iter(self._pipes)))
            try:
                # `dtype`: diffusers 0.42 deprecates `torch_dtype`.
                pipe = StableDiffusionPipeline.from_pretrained(
                    path, local_files_only=True, dtype=self.dtype
                )
            except Exception as exc:
                # The message reaches clients (a job's message, its webhook): the folder and the
                # loader's own text, which names server paths, go to the log only.
                log.error(
                    "model_id %r could not be loaded from %s: %s: %s",
                    model_id,
                    path,
                    type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "",
                )
                raise ModelLoadError(
                    f"model_id {model_id!r} could not be loaded ({type(exc).__name__}; the "
                    "server log names the folder and the cause)"
                ) from exc
            pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            apply_optimizations(pipe, self.optimizations, self.device)
            self._pipes[model_id] = pipe
            return pipe

    def loaded_models(self) -> list[str]:
        """Loaded model ids, least recently used first."""
        return list(self._pipes)

    def unload(self, model_id: str) -> bool:
        """Drop a pipeline and give its memory back; False if it was not loaded."""
        with self._load_lock:
            return self._unload_locked(model_id)

    def _unload_locked(self, model_id: str) -> bool:
        pipe = self._pipes.pop(model_id, None)
        if pipe is None:
            return False
        self.vaes.forget(model_id)
        del pipe
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    def activate_loras(
        self, pipe: StableDiffusionPipeline, loras: tuple[tuple[str, float], ...]
    ) -> None:
        """Make exactly `loras` (at their strengths) active on `pipe`, and nothing else.

        Adapters stay loaded once used; a batch without LoRAs disables them all, so no
        adapter leaks from one batch into the next.
        """
        loaded = {name for names in pipe.get_list_adapters().values() for name in names}
        for lora_id, _ in loras:
            if lora_id in loaded:
                continue
            path = self.lora_paths.get(lora_id)
            if path is None:
                raise LoraError(
                    f"lora_model {lora_id!r} is not available; "
                    f"available: {', '.join(sorted(self.lora_paths)) or 'none'}"
                )
            try:
                pipe.load_lora_weights(
                    str(path.parent), weight_name=path.name, adapter_name=lora_id
                )
            except Exception as exc:
                # A failed load can leave a half-registered adapter behind: remove it.
                with contextlib.suppress(Exception):
                    pipe.delete_adapters(lora_id)
                raise LoraError(
                    f"lora_model {lora_id!r} does not fit this model: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
            loaded.add(lora_id)
        if loras:
            pipe.enable_lora()
            pipe.set_adapters([lora_id for lora_id, _ in loras], [w for _, w in loras])
        elif loaded:
            pipe.disable_lora()

    def default_size(self, model_id: str) -> tuple[int, int]:
        """(width, height) the model was trained at: UNet sample size × VAE scale factor."""
        if model_id in self._pipes:
            pipe = self._pipes[model_id]
            unet_config, vae_config = pipe.unet.config, pipe.vae.config
        else:
            path = self._path(model_id)
            unet_config = json.loads((path / "unet" / "config.json").read_text())
            vae_config = json.loads((path / "vae" / "config.json").read_text())
        scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        size = unet_config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        return width * scale, height * scale

    def warmup(self, model_id: str, width: int | None = None, height: int | None = None) -> None:
        """Load the model and run one 1-step image (default size) so first requests are fast."""
        default_width, default_height = self.default_size(model_id)
        params = GenerationParams(
            prompt="warmup",
            model_id=model_id,
            width=width or default_width,
            height=height or default_height,
            num_inference_steps=1,
        )
        self.generate([params])

    def generate(self, batch: list[GenerationParams]) -> list[GenerationOutput]:
        """Generate every request of a batch with one UNet forward per denoising step.

        All requests must share `batch_key()`. Outputs are in request order.
        """
        self._check_batch(batch)
        first = batch[0]
        choice = validate_scheduler_options(
            first.scheduler,
            first.use_karras_sigmas,
            first.algorithm_type,
            first.num_inference_steps,
        )
        pipe = self.load(first.model_id)
        self.activate_loras(pipe, tuple(tuple(lora) for lora in first.loras))
        start = time.perf_counter()
        with torch.inference_mode():
            states = self.start_requests(pipe, batch)
            while not all(state.done for state in states):
                self.denoise_step(pipe, [state for state in states if not state.done])
            images = self.decode_states(pipe, states)
        seconds = time.perf_counter() - start

        outputs, offset = [], 0
        extra = {"scheduler": choice.name}
        if choice.notes:
            extra["scheduler_notes"] = list(choice.notes)
        for state in states:
            outputs.append(
                GenerationOutput(
                    images=images[offset : offset + state.samples],
                    seed=state.params.seed,
                    prompt_truncated=state.prompt_truncated,
                    batch_size=len(images),
                    inference_seconds=seconds,
                    extra=dict(extra),
                )
            )
            offset += state.samples
        return outputs

    def start_requests(
        self, pipe: StableDiffusionPipeline, batch: list[GenerationParams]
    ) -> list[RequestState]:
        """Turn requests into states ready for their first denoising step."""
        prompts = self.encode_prompts(pipe, batch)
        states = []
        for params, (cond, uncond, truncated) in zip(batch, prompts, strict=True):
            scheduler = self._scheduler(pipe, params)
            first_pass = None
            if params.highres_fix:
                native = self.default_size(params.model_id)
                first_pass = first_pass_size(params.width, params.height, *native)
            generators = [
                torch.Generator(self.generator_device).manual_seed(params.seed + i)
                for i in range(params.samples)
            ]
            step_parameters = inspect.signature(scheduler.step).parameters
            step_kwargs: dict = {}
            if "generator" in step_parameters:
                step_kwargs["generator"] = generators
            if "eta" in step_parameters:
                step_kwargs["eta"] = 0.0  # DDIM without extra noise, as diffusers' default
            states.append(
                RequestState(
                    params=params,
                    scheduler=scheduler,
                    generators=generators,
                    timesteps=scheduler.timesteps,
                    cond_embeds=cond.expand(params.samples, -1, -1),
                    uncond_embeds=None if uncond is None else uncond.expand(params.samples, -1, -1),
                    step_kwargs=step_kwargs,
                    prompt_truncated=truncated,
                    size=first_pass or (params.width, params.height),
                    second_pass_size=(params.width, params.height) if first_pass else None,
                    unet_timesteps=self._unet_timesteps(scheduler.timesteps),
                )
            )
        self.prepare_latents(pipe, states)
        for state in states:
            self._attach_stepper(state)
        return states

    def _attach_stepper(self, state: RequestState) -> None:
        state.stepper = None
        config = self.optimizations
        if config.enabled and config.linear_steps and is_linear(state.scheduler, state.step_kwargs):
            state.stepper = LinearStepper(state.latents, len(state.timesteps))

    def _scheduler(self, pipe: StableDiffusionPipeline, params: GenerationParams):
        scheduler = build_scheduler(
            pipe.scheduler.config,
            params.scheduler,
            params.use_karras_sigmas,
            params.algorithm_type,
        )
        # Timesteps stay on the CPU: a scheduler that indexes its tables with a device tensor
        # (or compares one in an `if`, as DDIM does) waits for the device every step, which
        # leaves the GPU idle while Python prepares the next step.
        scheduler.set_timesteps(params.num_inference_steps, device="cpu")
        return scheduler

    def _unet_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.to(self.device, torch.float32)

    def _start_second_pass(self, pipe: StableDiffusionPipeline, state: RequestState) -> None:
        """Highres fix: the first pass's latents upscaled to the requested size and noised back
        to part-way through a fresh schedule, which the following steps denoise."""
        width, height = state.second_pass_size
        scale = pipe.vae_scale_factor
        latents = torch.nn.functional.interpolate(
            state.latents, size=(height // scale, width // scale), mode="bicubic"
        )
        scheduler = self._scheduler(pipe, state.params)
        start = second_pass_start(state.params.num_inference_steps) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        noise = randn_tensor(
            latents.shape, generator=state.generators, device=self.device, dtype=latents.dtype
        )
        state.latents = add_noise(scheduler, latents, noise, timesteps[:1])
        state.scheduler, state.timesteps, state.step = scheduler, timesteps, 0
        state.unet_timesteps = self._unet_timesteps(timesteps)
        self._attach_stepper(state)
        state.size, state.second_pass_size = (width, height), None

    def activate_embeddings(
        self, pipe: StableDiffusionPipeline, names: tuple[str, ...]
    ) -> dict[str, str]:
        """Load the named textual-inversion embeddings into `pipe` (once each) and return
        name -> the added token that stands for its vectors.

        Each is added under a token of its own (`<sdserve-embN>`, lower case for CLIP's
        tokenizer), never under its trigger word, so a prompt that happens to contain the word
        is unchanged unless its request names the embedding."""
        loaded: dict[str, str] = pipe.__dict__.setdefault("_sdserve_embeddings", {})
        for name in names:
            if name in loaded:
                continue
            width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
            vectors = self._embedding_vectors(name, width)
            token = f"<sdserve-emb{len(loaded)}>"
            pipe.load_textual_inversion(vectors, token=token, tokenizer=pipe.tokenizer)
            loaded[name] = token
        return {name: loaded[name] for name in names}

    def _embedding_vectors(self, name: str, width: int) -> torch.Tensor:
        """An embedding's vectors (read once), checked against a text encoder `width`."""
        vectors = self._embedding_cache.get(name)
        if vectors is None:
            path = self.embedding_paths.get(name)
            if path is None:
                raise EmbeddingError(
                    f"embeddings_model {name!r} is not available; "
                    f"available: {', '.join(sorted(self.embedding_paths)) or 'none'}"
                )
            vectors = self._embedding_cache[name] = read_embedding(path, name)
        if vectors.shape[-1] != width:
            raise EmbeddingError(
                f"embeddings_model {name!r} does not fit this model: its vectors have "
                f"{vectors.shape[-1]} values, the text encoder takes {width}"
            )
        return vectors

    def _text_width(self, model_id: str) -> int:
        """The text encoder's embedding width, from the loaded model or its folder."""
        pipe = self._pipes.get(model_id)  # other threads may load or unload meanwhile
        if pipe is not None:
            return pipe.text_encoder.get_input_embeddings().weight.shape[1]
        config = self._path(model_id) / "text_encoder" / "config.json"
        return int(json.loads(config.read_text())["hidden_size"])

    def _vae_config(self, model_id: str) -> Mapping:
        """The model's own VAE config, from the loaded model or its folder."""
        pipe = self._pipes.get(model_id)
        if pipe is not None:
            return pipe.vae.config
        return json.loads((self._path(model_id) / "vae" / "config.json").read_text())

    def _with_embeddings(
        self, pipe: StableDiffusionPipeline, text: str, tokens: dict[str, str]
    ) -> str:
        """`text` with each trigger word (an embedding's id, as a whole word) replaced by the
        tokens of that embedding's vectors."""
        for name, token in tokens.items():
            text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", token, text)
        return pipe.maybe_convert_prompt(text, pipe.tokenizer) if tokens else text

    def encode_prompts(
        self, pipe: StableDiffusionPipeline, batch: list[GenerationParams]
    ) -> list[EncodedPrompt]:
        """Each request's text conditioning; every distinct (text, clip_skip) is encoded once."""
        needed: dict[int, set[str]] = {}
        texts_of: list[tuple[str, str]] = []
        for params in batch:
            tokens = self.activate_embeddings(pipe, params.embeddings)
            prompt = self._with_embeddings(pipe, params.prompt, tokens)
            negative = self._with_embeddings(pipe, params.negative_prompt, tokens)
            texts_of.append((prompt, negative))
            texts = needed.setdefault(params.clip_skip, set())
            texts.add(prompt)
            if params.guidance_scale > 1:
                texts.add(negative)
        embeddings: dict[tuple[str, int], torch.Tensor] = {}
        truncated: dict[str, bool] = {}
        for clip_skip, texts in needed.items():
            ordered = sorted(texts)
            embeds, cut = self._encode_texts(pipe, ordered, clip_skip)
            for i, text in enumerate(ordered):
                embeddings[text, clip_skip] = embeds[i : i + 1]
                truncated[text] = cut[i]
        return [
            EncodedPrompt(
                embeddings[prompt, params.clip_skip],
                embeddings[negative, params.clip_skip] if params.guidance_scale > 1 else None,
                truncated[prompt],
            )
            for params, (prompt, negative) in zip(batch, texts_of, strict=True)
        ]

    def prepare_latents(self, pipe: StableDiffusionPipeline, states: list[RequestState]) -> None:
        """Draw each image's initial noise from its own generator, scaled for its scheduler."""
        scale = pipe.vae_scale_factor
        for state in states:
            width, height = state.size
            shape = (state.samples, pipe.unet.config.in_channels, height // scale, width // scale)
            noise = randn_tensor(
                shape, generator=state.generators, device=self.device, dtype=self.latent_dtype
            )
            state.latents = noise * state.scheduler.init_noise_sigma

    def denoise_step(self, pipe: StableDiffusionPipeline, states: list[RequestState]) -> None:
        """Advance every request by one step: one UNet forward over all images of all requests.

        Rows are [unconditional rows of the CFG requests] + [conditional rows of all requests],
        each with its own timestep, so requests could even be at different steps. Requests in
        passes of different sizes (highres fix) take one forward per size.
        """
        by_size: dict[tuple[int, int], list[RequestState]] = {}
        for state in states:
            by_size.setdefault(state.size, []).append(state)
        if len(by_size) > 1:
            for group in by_size.values():
                self.denoise_step(pipe, group)
            return
        inputs, timesteps = [], []
        for state in states:
            t = state.timesteps[state.step]
            inputs.append(state.scheduler.scale_model_input(state.latents, t))
            timesteps.append(state.unet_timesteps[state.step].reshape(1).expand(state.samples))
        cfg = [i for i, state in enumerate(states) if state.uncond_embeds is not None]
        n_uncond = sum(states[i].samples for i in cfg)
        # first row of each request's unconditional rows (CFG only) and of its conditional ones
        uncond_first = itertools.accumulate((states[i].samples for i in cfg), initial=0)
        uncond_start = dict(zip(cfg, uncond_first, strict=False))  # accumulate yields one more
        cond_start = list(itertools.accumulate((s.samples for s in states), initial=n_uncond))
        # SAG reads the attention of a request's unconditional rows, or conditional without CFG
        sag = {
            i: uncond_start.get(i, cond_start[i])
            for i, state in enumerate(states)
            if state.params.self_attention
        }
        capture = None
        hooks: list = []
        if sag:
            rows = [r for i, first in sag.items() for r in range(first, first + states[i].samples)]
            capture = AttentionCapture(pipe.unet, rows)
            hooks.append(capture.installed())
        all_timesteps = torch.cat([timesteps[i] for i in cfg] + timesteps)
        if states[0].params.tomesd:  # its merge cells follow each row's timestep, read on the CPU
            rows = [states[i] for i in cfg] + states
            cpu_rows = torch.cat([s.timesteps[s.step].float().expand(s.samples) for s in rows])
            hooks += self._merging_hooks(pipe, states, inputs[0], cpu_rows)

        # The runner (service/engine/optimize.py) calls the stock, compiled or graphed UNet;
        # with hooks (token merging, SAG's attention capture) it runs the eager one.
        noise_pred = runner_for(pipe).unet(
            torch.cat([inputs[i] for i in cfg] + inputs),
            all_timesteps,
            torch.cat(
                [states[i].uncond_embeds for i in cfg] + [state.cond_embeds for state in states]
            ),
            hooks=hooks,
        )

        noise = list(noise_pred[n_uncond:].split([state.samples for state in states]))
        # One guidance op per distinct scale, the scale a Python float: a tensor of per-row
        # scales would be a host-to-device copy, which waits for the GPU.
        by_scale: dict[float, list[int]] = {}
        for i in cfg:
            by_scale.setdefault(states[i].params.guidance_scale, []).append(i)
        for scale, members in by_scale.items():
            uncond = torch.cat(
                [noise_pred[uncond_start[i] : uncond_start[i] + states[i].samples] for i in members]
            )
            guided = uncond + scale * (torch.cat([noise[i] for i in members]) - uncond)
            for i, rows in zip(
                members, guided.split([states[i].samples for i in members]), strict=True
            ):
                noise[i] = rows
        if sag:
            self._self_attention_guidance(pipe, states, sag, noise, noise_pred, capture)

        for state, state_noise in zip(states, noise, strict=True):
            t = state.timesteps[state.step]
            if state.stepper is not None:
                state.latents = state.stepper.step(
                    state.scheduler, state_noise, t, **state.step_kwargs
                )
            else:
                state.latents = state.scheduler.step(
                    state_noise, t, state.latents, **state.step_kwargs, return_dict=False
                )[0]
            state.step += 1
            if state.done and state.second_pass_size is not None:
                self._start_second_pass(pipe, state)

    def _self_attention_guidance(
        self,
        pipe: StableDiffusionPipeline,
        states: list[RequestState],
        sag: dict[int, int],
        noise: list[torch.Tensor],
        noise_pred: torch.Tensor,
        capture: AttentionCapture,
    ) -> None:
        """One UNet pass over the SAG requests' degraded latents (service/engine/
        self_attention_guidance.py), then each one's guided noise is pushed away from it."""
        degraded, embeds, times, sources = [], [], [], []
        offset = 0
        for i, first in sag.items():
            state = states[i]
            t = state.timesteps[state.step]
            source = noise_pred[first : first + state.samples]
            x0, eps = predict_x0_and_eps(state.scheduler, state.latents, source, t)
            probs = capture.probs[offset : offset + state.samples]
            offset += state.samples
            degraded.append(degrade(state.scheduler, x0, eps, probs, capture.grid, t))
            uncond = state.uncond_embeds
            embeds.append(uncond if uncond is not None else state.cond_embeds)
            times.append(t.float().reshape(1).expand(state.samples))
            sources.append(source)
        all_times = torch.cat(times)
        predicted = runner_for(pipe).unet(
            torch.cat(degraded),
            all_times.to(self.device),
            torch.cat(embeds),
            hooks=self._merging_hooks(pipe, states, degraded[0], all_times),
        )
        for (i, _), source, rows in zip(
            sag.items(), sources, predicted.split([states[i].samples for i in sag]), strict=True
        ):
            noise[i] = noise[i] + SAG_SCALE * (source - rows)

    def _merging_hooks(
        self,
        pipe: StableDiffusionPipeline,
        states: list[RequestState],
        sample: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> list:
        """Token merging's hooks for a UNet call over `states` (all share `tomesd`: it is in
        the batch key), or none; `_check_batch` refused `tomesd` on an engine without it."""
        if not states[0].params.tomesd or self.token_merging is None:
            return []
        return [self.token_merging.applied(pipe.unet, tuple(sample.shape[-2:]), timesteps)]

    def decode_states(
        self, pipe: StableDiffusionPipeline, states: list[RequestState]
    ) -> list[np.ndarray]:
        """Every image of the finished `states`, in order, each request decoded by its own
        `vae` (the model's when it names none); requests that share a VAE decode together."""
        groups: dict[str | None, list[int]] = {}
        for i, state in enumerate(states):
            groups.setdefault(state.params.vae, []).append(i)
        per_state: list[list[np.ndarray]] = [[] for _ in states]
        for vae_id, members in groups.items():
            vae = None
            if vae_id is not None:
                model_id = states[members[0]].params.model_id
                vae = self.vaes.get(vae_id, model_id, pipe.vae.config)
            images = self.decode(pipe, torch.cat([states[i].latents for i in members]), vae)
            offset = 0
            for i in members:
                per_state[i] = images[offset : offset + states[i].samples]
                offset += states[i].samples
        return [image for images in per_state for image in images]

    def decode(
        self,
        pipe: StableDiffusionPipeline,
        latents: torch.Tensor,
        vae: torch.nn.Module | None = None,
    ) -> list[np.ndarray]:
        """VAE-decode latents into HxWx3 uint8 arrays, `vae_batch_size` images at a time, with
        the model's VAE (the optimized one, when configured) or a custom `vae`."""
        if vae is None:
            decode = runner_for(pipe).decode
        else:
            scaling = pipe.vae.config.scaling_factor

            def decode(chunk: torch.Tensor) -> torch.Tensor:
                return decode_with(vae, chunk, scaling)

        images = []
        for chunk in latents.split(self.vae_batch_size):
            decoded = decode(chunk)
            pixels = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
            images.extend((pixels * 255).round().astype(np.uint8))
        return images

    def _encode_texts(
        self, pipe: StableDiffusionPipeline, texts: list[str], clip_skip: int
    ) -> tuple[torch.Tensor, list[bool]]:
        """CLIP embeddings of `texts` (truncated to 77 tokens) and which ones were truncated.

        `clip_skip` is ModelsLab's/A1111's: 1 is the last layer, N uses hidden_states[-N]
        followed by the final layer norm. Unlike diffusers, it applies to negative prompts too.
        """
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        layers = text_encoder.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip: must be between 1 and {layers}, got {clip_skip}")
        max_length = tokenizer.model_max_length
        lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]
        tokens = tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        )
        attention_mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            attention_mask = tokens.attention_mask.to(self.device)
        output = text_encoder(
            tokens.input_ids.to(self.device),
            attention_mask=attention_mask,
            output_hidden_states=clip_skip > 1,
        )
        if clip_skip == 1:
            embeds = output[0]
        else:
            # transformers 5 flattened CLIPTextModel; 4.x nests it under `text_model`.
            text_model = getattr(text_encoder, "text_model", text_encoder)
            embeds = text_model.final_layer_norm(output.hidden_states[-clip_skip])
        return embeds.to(self.dtype), [n > max_length for n in lengths]

    def check_request(self, params: GenerationParams) -> None:
        """ValueError naming the field if `params` cannot be generated (what `generate` checks
        of each request, its embeddings and custom VAE against the model), without loading the
        model (a custom VAE is loaded here). The generator checks each request before it joins
        a batch, so that one bad request fails alone: neither is part of the batch key."""
        self._check_batch([params])
        if params.embeddings:
            width = self._text_width(params.model_id)
            for name in params.embeddings:
                self._embedding_vectors(name, width)
        if params.vae is not None:
            self.vaes.get(params.vae, params.model_id, self._vae_config(params.model_id))

    def _check_batch(self, batch: list[GenerationParams]) -> None:
        if not batch:
            raise ValueError("batch: at least one request is required")
        key = batch[0].batch_key()
        if any(params.batch_key() != key for params in batch):
            raise ValueError("batch: all requests in a batch must share batch_key()")
        self._path(batch[0].model_id)
        for params in batch:
            for name in ("width", "height"):
                value = getattr(params, name)
                if value <= 0 or value % 8:
                    raise ValueError(f"{name}: must be a positive multiple of 8, got {value}")
            if params.samples < 1:
                raise ValueError(f"samples: must be at least 1, got {params.samples}")
            if params.tomesd and self.token_merging is None:
                raise ValueError("tomesd: token merging is off on this engine")
            if params.self_attention and params.scheduler not in SAG_SCHEDULERS:
                raise ValueError(
                    f"self_attention: needs a scheduler with integer timesteps "
                    f"({', '.join(sorted(SAG_SCHEDULERS))}), got {params.scheduler}"
                )
            if params.highres_fix and params.scheduler not in HIGHRES_SCHEDULERS:
                raise ValueError(
                    f"highres_fix: needs a scheduler that can re-noise latents, not "
                    f"{params.scheduler}"
                )
            if not 0 <= params.seed <= 2**64 - params.samples:
                raise ValueError(f"seed: must be in 0..2**64 - samples, got {params.seed}")

    def _path(self, model_id: str) -> Path:
        try:
            return self.model_paths[model_id]
        except KeyError:
            raise ValueError(
                f"model_id: unknown model {model_id!r}; available: {', '.join(self.model_paths)}"
            ) from None


def read_embedding(path: Path, name: str) -> torch.Tensor:
    """The (vectors, width) tensor of a textual-inversion file: diffusers' one-entry layout
    (`{token: tensor}`, also SD2 trainers' `{"emb_params": tensor}`) or A1111's
    (`string_to_param`), as .safetensors, or as .pt/.bin read without unpickling code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(data, dict) and "string_to_param" in data:
            data = data["string_to_param"]
        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
        if not isinstance(data, torch.Tensor):
            raise ValueError("expected one tensor, or A1111's string_to_param")
    except Exception as exc:
        raise EmbeddingError(
            f"embeddings_model {name!r} could not be read: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return data.reshape(-1, data.shape[-1]).float()
