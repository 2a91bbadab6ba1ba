"""Single-file Stable Diffusion checkpoints <-> diffusers model folders, offline.

Community checkpoints are published as one `.safetensors` file in the original LDM/CompVis key
layout (`model.diffusion_model.*` UNet, `first_stage_model.*` VAE, `cond_stage_model.*` text
encoder: OpenCLIP `cond_stage_model.model.*` for SD 2.x, CLIP `cond_stage_model.transformer.*`
for SD 1.x). `import_single_file` turns one into a diffusers folder the engine loads; every
config (UNet/VAE/text encoder shapes, scheduler and so v-prediction, tokenizer) comes from a
local *base model* folder, so nothing reaches a hub. `export_single_file` writes the inverse, the
LDM layout diffusers' own converters read, which lets the tests round-trip without downloads.
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs come from the base folder, never a hub

import contextlib
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x (OpenCLIP ViT-H/14 text tower)
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD 1.x (OpenAI CLIP ViT-L/14)

TextEncoderLayout = Literal["open_clip", "clip"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_MAX_EXAMPLES = 5  # offending keys named in an error message


class CheckpointError(ValueError):
    """A checkpoint cannot be imported or a model folder cannot be exported; says which file
    and why."""


# --------------------------------------------------------------------------------------------
# import: single file -> diffusers folder


def import_single_file(
    checkpoint: str | Path,
    out_dir: str | Path,
    base_model: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Convert a single-file SD checkpoint into a diffusers folder at `out_dir`, offline.

    `base_model` is an existing diffusers folder (the registered SD2 model, or the tiny model in
    tests) that provides model_index.json, the component configs, the tokenizer and the
    scheduler config: the file gives only weights, the base gives architecture and
    prediction type (SD 2.0 768-v's v-prediction is in its scheduler config, not in the file).
    `dtype` defaults to the file's own floating dtype. The folder is written next to `out_dir`,
    checked to load with `from_pretrained`, then moved into place, so a failed import leaves
    nothing half-written. Raises CheckpointError (a ValueError) naming the file and the reason.
    """
    from diffusers import StableDiffusionPipeline

    checkpoint, out_dir, base_model = Path(checkpoint), Path(out_dir), Path(base_model)
    shapes, file_dtype = read_safetensors_header(checkpoint)
    _check_base_model(base_model)
    _check_out_dir(out_dir, base_model, checkpoint, overwrite)
    check_checkpoint_fits(checkpoint, shapes, base_model)

    target_dtype = dtype or file_dtype
    staging = out_dir.parent / f".{out_dir.name}.importing-{uuid.uuid4().hex[:8]}"
    try:
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(checkpoint),
                config=str(base_model),
                local_files_only=True,
                # None loads as float32, the models' own dtype, without a cast warning
                dtype=None if target_dtype == torch.float32 else target_dtype,
            )
        except Exception as exc:
            raise CheckpointError(
                f"{checkpoint}: diffusers could not convert it with base model {base_model}: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        _check_weights(checkpoint, pipe)
        staging.parent.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        del pipe
        # the base's tokenizer files verbatim, not transformers' re-serialization of them
        shutil.rmtree(staging / "tokenizer")
        shutil.copytree(base_model / "tokenizer", staging / "tokenizer")
        _make_readable(staging)
        try:
            StableDiffusionPipeline.from_pretrained(staging, local_files_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{checkpoint}: the converted folder does not load back: "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_safetensors_header(file: Path) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
    """Every tensor's shape and the file's most common floating dtype, from the header only.

    Refuses anything that is not a complete safetensors file: pickled `.ckpt`/`.bin`
    checkpoints can run code when loaded, so they are never opened.
    """
    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    if file.suffix != ".safetensors":
        raise CheckpointError(
            f"{file}: not a .safetensors file; only safetensors checkpoints are imported "
            "(pickled .ckpt/.pt/.bin files can run code when loaded: convert them first)"
        )
    try:
        with safe_open(str(file), framework="pt") as reader:
            slices = {key: reader.get_slice(key) for key in reader.keys()}  # noqa: SIM118
            shapes = {key: tuple(s.get_shape()) for key, s in slices.items()}
            dtypes = Counter(s.get_dtype() for s in slices.values())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"{file}: not a valid safetensors file (corrupt or truncated): {_first_line(exc)}"
        ) from None
    if not shapes:
        raise CheckpointError(f"{file}: the safetensors file holds no tensors")
    floating = [(n, d) for d, n in dtypes.items() if d in _SAFETENSORS_DTYPES]
    file_dtype = _SAFETENSORS_DTYPES[max(floating)[1]] if floating else torch.float32
    return shapes, file_dtype


def check_checkpoint_fits(
    checkpoint: Path, shapes: Mapping[str, tuple[int, ...]], base_model: Path
) -> None:
    """Run diffusers' own LDM -> diffusers key converters over the file's shapes (meta tensors,
    no weights read) and compare with the base model's architecture, so a checkpoint of another
    architecture is refused with the offending keys instead of loading half-initialized."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    problems: list[str] = []
    for name, cls, prefix, convert in (
        ("unet", UNet2DConditionModel, LDM_UNET_PREFIX, convert_ldm_unet_checkpoint),
        ("vae", AutoencoderKL, LDM_VAE_PREFIX, convert_ldm_vae_checkpoint),
    ):
        config = cls.load_config(base_model / name, local_files_only=True)
        if not any(key.startswith(prefix) for key in meta):
            problems.append(f"{name}: no '{prefix}*' weights in the file")
            continue
        with torch.device("meta"):
            expected = cls.from_config(config).state_dict()
        try:
            converted = convert(checkpoint=meta, config=config)
        except Exception as exc:  # the converters index keys they assume exist
            problems.append(f"{name}: layout not understood ({type(exc).__name__}: {exc})")
            continue
        problems += compare_state_dicts(name, converted, expected)
    problems += _check_text_encoder(meta, base_model)
    if problems:
        raise CheckpointError(
            f"{checkpoint} does not fit base model {base_model}: " + "; ".join(problems)
        )


def _check_text_encoder(meta: dict[str, torch.Tensor], base_model: Path) -> list[str]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig.from_pretrained(base_model / "text_encoder", local_files_only=True)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    if any(key.startswith(OPEN_CLIP_PREFIX) for key in meta):
        converted = convert_open_clip_checkpoint(model, meta, prefix=OPEN_CLIP_PREFIX)
    elif any(key.startswith(CLIP_PREFIX) for key in meta):
        converted = convert_ldm_clip_checkpoint(meta)
    else:
        return [f"text_encoder: no '{OPEN_CLIP_PREFIX}*' or '{CLIP_PREFIX}*' weights in the file"]
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {key.removeprefix("text_model."): v for key, v in converted.items()}
    return compare_state_dicts("text_encoder", converted, model.state_dict())


def compare_state_dicts(
    name: str, converted: Mapping[str, torch.Tensor | None], expected: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps `converted` weights (from a file) from loading into a model whose state dict
    is `expected`: other shapes, missing and extra keys, a few named each; empty if it fits."""
    present = {
        key: t
        for key, t in converted.items()
        if t is not None and not key.endswith("position_ids")  # SD 1.x files carry this buffer
    }
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    mismatched = [
        f"{key}: file {tuple(present[key].shape)}, base {tuple(expected[key].shape)}"
        for key in sorted(set(present) & set(expected))
        if present[key].shape != expected[key].shape
    ]
    problems = []
    for what, keys in (
        ("weights with other shapes", mismatched),
        ("weights missing", missing),
        ("weights the base architecture does not have", unexpected),
    ):
        if keys:
            problems.append(f"{name}: {len(keys)} {what} ({_examples(keys)})")
    return problems


def _check_base_model(base_model: Path) -> None:
    if not (base_model / "model_index.json").is_file():
        raise CheckpointError(
            f"base model {base_model}: not a diffusers model folder (no model_index.json)"
        )
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (base_model / component).is_dir():
            raise CheckpointError(f"base model {base_model}: no {component}/ folder")


def _check_out_dir(out_dir: Path, base_model: Path, checkpoint: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output {out_dir}: exists and is not a folder")
    if out_dir.resolve() == base_model.resolve():
        raise CheckpointError(f"output {out_dir}: is the base model folder itself")
    if checkpoint.resolve().is_relative_to(out_dir.resolve()):
        raise CheckpointError(f"output {out_dir}: holds the checkpoint being imported")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(
            f"output {out_dir}: exists and is not empty (pass overwrite=True / --overwrite "
            "to replace it)"
        )


def _make_readable(path: Path) -> None:
    """Give written files the umask's usual modes: safetensors writes weights 0600, which a
    serving container running as another user could not read."""
    umask = _umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        file.chmod(0o666 & ~umask)


def _umask() -> int:
    """The process umask, read without os.umask's set-and-restore race (Linux); else 022."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _check_weights(checkpoint: Path, pipe) -> None:
    """from_single_file leaves a weight it found nowhere on the meta device, silently; and a
    NaN or inf weight would only show later, as black or noise images."""
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        tensors = [*module.named_parameters(), *module.named_buffers()]
        missing = [key for key, tensor in tensors if tensor.is_meta]
        if missing:
            raise CheckpointError(
                f"{checkpoint}: {name}: {len(missing)} weights missing ({_examples(missing)})"
            )
        with torch.no_grad():
            broken = [
                key
                for key, tensor in tensors
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()
            ]
        if broken:
            raise CheckpointError(
                f"{checkpoint}: {name}: {len(broken)} weights hold NaN or inf values "
                f"({_examples(broken)}): the file is corrupt"
            )


# --------------------------------------------------------------------------------------------
# export: diffusers folder -> single file


def export_single_file(
    model_dir: str | Path,
    out_file: str | Path,
    *,
    overwrite: bool = False,
    text_encoder_layout: TextEncoderLayout | None = None,
) -> Path:
    """Write a diffusers SD folder as one LDM-layout `.safetensors` checkpoint.

    The inverse of diffusers' converters (diffusers.loaders.single_file_utils) for any block
    counts: the tiny model and the full SD 2.0 architecture alike. The text encoder is written
    as OpenCLIP (SD 2.x, `hidden_act="gelu"`) or CLIP (SD 1.x, `quick_gelu`) unless
    `text_encoder_layout` says. Weights keep their dtype. Configs are not in the file: importing
    it back needs a base model with the same architecture.
    """
    from diffusers import StableDiffusionPipeline

    model_dir, out_file = Path(model_dir), Path(out_file)
    if out_file.suffix != ".safetensors":
        raise CheckpointError(f"{out_file}: the output name must end in .safetensors")
    if out_file.exists() and not overwrite:
        raise CheckpointError(f"{out_file}: exists (pass overwrite=True to replace it)")
    _check_base_model(model_dir)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    layout = text_encoder_layout or (
        "open_clip" if pipe.text_encoder.config.hidden_act == "gelu" else "clip"
    )
    tensors = {
        **{
            LDM_UNET_PREFIX + key: value
            for key, value in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()
        },
        **{
            LDM_VAE_PREFIX + key: value
            for key, value in vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config).items()
        },
        **text_encoder_to_ldm(pipe.text_encoder.state_dict(), layout),
    }
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        save_file(
            {key: value.detach().contiguous() for key, value in tensors.items()},
            str(partial),
            metadata={"format": "pt"},
        )
        _make_readable(partial)
        partial.replace(out_file)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return out_file


# diffusers resnet names -> LDM ResBlock names (inverse of update_unet_resnet_ldm_to_diffusers)
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM `openaimodel.UNetModel` keys (no prefix).

    LDM numbers the UNet as flat lists: input_blocks[0] is conv_in, then per down level
    `layers_per_block` (resnet[, transformer]) entries and one downsampler entry; output blocks
    have `layers_per_block + 1` entries per level, the upsampler riding on the last one.
    """
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise CheckpointError("unet: per-block layers_per_block has no LDM single-file layout")
    stride = per_block + 1
    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    up_has_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]

    def resnet(rest: str) -> str:
        layer, param = rest.split(".", 1)
        return f"{_UNET_RESNET[layer]}.{param}"

    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (
            r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * stride + int(m[2])}.0.{resnet(m[3])}",
        ),
        (
            r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * stride + int(m[2])}.1.{m[3]}",
        ),
        (
            r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"input_blocks.{1 + int(m[1]) * stride + per_block}.0.op.{m[2]}",
        ),
        (
            r"mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"middle_block.{2 * int(m[1])}.{resnet(m[2])}",
        ),
        (
            r"mid_block\.attentions\.(\d+)\.(.+)",
            lambda m: f"middle_block.{2 * int(m[1]) + 1}.{m[2]}",
        ),
        (
            r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m[1]) * stride + int(m[2])}.0.{resnet(m[3])}",
        ),
        (
            r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)",
            lambda m: f"output_blocks.{int(m[1]) * stride + int(m[2])}.1.{m[3]}",
        ),
        (
            r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: (
                f"output_blocks.{int(m[1]) * stride + per_block}."
                f"{2 if up_has_attention[int(m[1])] else 1}.conv.{m[2]}"
            ),
        ),
    ]
    return _rename("unet", state, fixed, rules)


# diffusers VAE attention names -> LDM AttnBlock names (1x1 convs there, Linear here)
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM `AutoencoderKL` keys (no prefix); the decoder's up
    levels are numbered from the bottom in LDM, and attention projections are 1x1 convs."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    levels = len(config["up_block_types"])

    def resnet(rest: str) -> str:
        return rest.replace("conv_shortcut", "nin_shortcut")

    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (
            r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}",
        ),
        (
            r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.{m[2]}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}",
        ),
        (
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
            lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}",
        ),
        (
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)"
            r"\.(weight|bias)",
            lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}",
        ),
    ]
    renamed = _rename("vae", state, DIFFUSERS_TO_LDM_MAPPING["vae"], rules)
    return {
        key: value[:, :, None, None]
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2
        else value
        for key, value in renamed.items()
    }


# diffusers CLIP encoder-layer names -> OpenCLIP residual-block names
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def text_encoder_to_ldm(
    state: Mapping[str, torch.Tensor], layout: TextEncoderLayout = "open_clip"
) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> the checkpoint's `cond_stage_model.*` keys, prefix
    included.

    SD 1.x stores the transformers CLIP model as is; SD 2.x stores OpenCLIP's text tower, whose
    attention keeps q, k and v as one `in_proj` (rows q, then k, then v). OpenCLIP's
    `text_projection` is not written: CLIPTextModel has none and SD 2.x never uses it.
    """
    state = {
        key.removeprefix("text_model."): value
        for key, value in state.items()
        if not key.endswith("position_ids")  # a buffer, not a weight
    }
    if layout == "clip":
        return {CLIP_PREFIX + key: value for key, value in state.items()}
    if layout != "open_clip":
        raise CheckpointError(f"text_encoder: unknown layout {layout!r}")

    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    in_proj: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in state.items():
        match = re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key)
        if match:
            in_proj.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            rest[key] = value

    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (
            r"encoder\.layers\.(\d+)\.(self_attn\.out_proj|layer_norm[12]|mlp\.fc[12])\.(.+)",
            lambda m: f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}",
        )
    ]
    tensors = _rename("text_encoder", rest, fixed, rules)
    for (layer, param), parts in in_proj.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"text_encoder: layer {layer} lacks one of q/k/v_proj.{param}")
        tensors[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]]
        )
    return {OPEN_CLIP_PREFIX + key: value for key, value in tensors.items()}


def _rename(
    component: str,
    state: Mapping[str, torch.Tensor],
    fixed: Mapping[str, str],
    rules: list[tuple[str, Callable[[re.Match], str]]],
) -> dict[str, torch.Tensor]:
    """Rename every key by the fixed table or the first matching rule; a key no rule knows is
    an error, so an export never drops a weight silently."""
    compiled = [(re.compile(pattern), rename) for pattern, rename in rules]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
            continue
        for pattern, rename in compiled:
            match = pattern.fullmatch(key)
            if match:
                out[rename(match)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{component}: {len(unknown)} weights have no LDM single-file name "
            f"({_examples(unknown)}); this architecture cannot be exported"
        )
    return out


def _examples(keys: list[str]) -> str:
    more = f", … {len(keys) - _MAX_EXAMPLES} more" if len(keys) > _MAX_EXAMPLES else ""
    return ", ".join(keys[:_MAX_EXAMPLES]) + more


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
