"""A tiny random-weight model with Stable Diffusion 2.0 (768-v)'s architecture and file layout.

Tests and the demo load it through exactly the code that loads real SD 2.0 weights, so nothing
is downloaded: the CLIP tokenizer files are written here and every weight is random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "!"  # SD 2.0's tokenizer pads with "!" (OpenCLIP), not with EOS like SD 1.x
MODEL_MAX_LENGTH = 77

# A few common English merges, enough to exercise real BPE merging; the 512 byte tokens below
# already cover every possible input.
MERGES = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "f</w>"),
    ("e", "r"),
    ("o", "n</w>"),
    ("a", "t</w>"),
)

# SD 2.0 768-v's scheduler_config.json (stabilityai/stable-diffusion-2), verbatim.
SD2_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(161, 172 + 1)) + list(range(174, 255 + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def clip_vocab() -> dict[str, int]:
    """The vocabulary in CLIP's own order: bytes, bytes + `</w>`, merges, then the specials."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: Path) -> dict[str, int]:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs); returns the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
    }
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(
        folder / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": MODEL_MAX_LENGTH,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            **specials,
        },
    )
    return vocab


def build_tiny_model(path: str | Path, seed: int = 0) -> Path:
    """Write a diffusers-format SD2-architecture model folder with random weights seeded by `seed`.

    Same components, configs keys and latent geometry as SD 2.0 768-v (v-prediction, VAE scale
    factor 8, default size 768), only narrow: a few MB, built in a few seconds, deterministic.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path / "tokenizer")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=96,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            sample_size=768,
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=4,
            scaling_factor=0.18215,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=5,
                max_position_embeddings=MODEL_MAX_LENGTH,
                hidden_act="gelu",
                layer_norm_eps=1e-5,
                projection_dim=32,
                bos_token_id=vocab[BOS_TOKEN],
                eos_token_id=vocab[EOS_TOKEN],
                pad_token_id=vocab[PAD_TOKEN],
            )
        )

    unet.save_pretrained(path / "unet", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    _prefix_text_encoder_keys(path / "text_encoder" / "model.safetensors")
    write_pipeline_files(path)
    # safetensors writes owner-only files; a model folder is read by other users (containers).
    for weights in path.rglob("*.safetensors"):
        weights.chmod(0o644)
    (path / TINY_MODEL_MARKER).write_text(
        "Random weights written by `sdserve tiny-model`: it may write here again.\n"
    )
    return path


# What tells `sdserve tiny-model` that a non-empty folder is its own (so, not real weights)
TINY_MODEL_MARKER = "sdserve-tiny-model.txt"


def is_replaceable(path: Path) -> bool:
    """A folder `sdserve tiny-model` may write into: missing, empty, or an earlier tiny model."""
    if not path.exists():
        return True
    return path.is_dir() and (not any(path.iterdir()) or (path / TINY_MODEL_MARKER).is_file())


def write_pipeline_files(path: Path) -> None:
    """The SD 2.0 768-v scheduler config and a StableDiffusionPipeline model_index.json: what
    turns a folder of components into a model from_pretrained loads."""
    DDIMScheduler.from_config(SD2_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    _write_json(
        path / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )


def _prefix_text_encoder_keys(file: Path) -> None:
    """Store weights as `text_model.*` like SD 2.0 does: transformers 4.x and 5.x both load it."""
    weights = load_file(file)
    if not all(key.startswith("text_model.") for key in weights):
        weights = {f"text_model.{key}": value for key, value in weights.items()}
        save_file(weights, file, metadata={"format": "pt"})


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_lora(
    model_dir: str | Path, out_file: str | Path, seed: int = 0, rank: int = 4
) -> Path:
    """A LoRA for the tiny model's UNet attention, with random non-zero weights, in the
    diffusers safetensors layout: enough to show an adapter changing the image."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    out_file = Path(out_file)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        str(out_file.parent),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        weight_name=out_file.name,
    )
    return out_file


def build_tiny_embedding(
    model_dir: str | Path, out_file: str | Path, vectors: int = 2, seed: int = 0
) -> Path:
    """A textual-inversion embedding for the tiny model (random vectors of its text encoder's
    width), in A1111's layout, which most published embeddings use."""
    config = json.loads((Path(model_dir) / "text_encoder" / "config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(vectors, config["hidden_size"], generator=generator)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": weights}, "name": out_file.stem}, out_file)
    return out_file


def build_tiny_vae(
    model_dir: str | Path, out: str | Path, seed: int = 0, layout: str = "folder"
) -> Path:
    """A custom VAE for the tiny model: its VAE architecture with weights drawn from `seed`
    (the model's own are `seed + 1` of `build_tiny_model`'s seed). `layout`: "folder" (a
    diffusers folder), "ldm" (one .safetensors file in the original key layout, as community
    VAEs ship) or "diffusers-file" (one file, diffusers' keys)."""
    from service.engine.checkpoint import vae_to_ldm

    config = AutoencoderKL.load_config(Path(model_dir) / "vae", local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL.from_config(config)
    out = Path(out)
    if layout == "folder":
        vae.save_pretrained(out, safe_serialization=True)
        for weights in out.glob("*.safetensors"):
            weights.chmod(0o644)
        return out
    state = {key: value.contiguous() for key, value in vae.state_dict().items()}
    if layout == "ldm":
        state = vae_to_ldm(state, config)
    elif layout != "diffusers-file":
        raise ValueError(f"layout: 'folder', 'ldm' or 'diffusers-file', got {layout!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, out)
    out.chmod(0o644)
    return out


def build_tiny_upscaler(
    out_file: str | Path,
    scale: int = 2,
    seed: int = 0,
    features: int = 8,
    blocks: int = 1,
    growth: int = 4,
) -> Path:
    """A narrow random-weight RRDBNet upscaler in the Real-ESRGAN release layout: a `.pth` of
    `{"params_ema": tensors}` (read back with weights_only), or the bare tensors as
    `.safetensors`."""
    from service.engine.upscaler import RRDBNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = RRDBNet(scale, features, blocks, growth)
    state = {key: value.contiguous() for key, value in net.state_dict().items()}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix == ".safetensors":
        save_file(state, out_file)
    else:
        torch.save({"params_ema": state}, out_file)
    out_file.chmod(0o644)
    return out_file


def build_tiny_safety_checker(path: str | Path, flags: str = "none", seed: int = 0) -> Path:
    """A tiny random-weight `StableDiffusionSafetyChecker` folder, laid out like
    CompVis/stable-diffusion-safety-checker (config, weights, CLIP image processor config).

    Its verdict is set by the thresholds, not learned: `flags="all"` flags every image (every
    cosine similarity beats a threshold of -1.01), `"none"` no image (none beats 1.01)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    if flags not in ("all", "none"):
        raise ValueError(f"flags: 'all' or 'none', got {flags!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_dim": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 16,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    threshold = -1.01 if flags == "all" else 1.01
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path)
    return path
