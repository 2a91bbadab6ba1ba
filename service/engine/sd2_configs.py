"""Stable Diffusion 2.0 768-v at full size, from its public configs, with random weights.

The configs are the facts of `stabilityai/stable-diffusion-2`'s unet/, vae/ and text_encoder/
config.json (diffusers and transformers defaults omitted). Benchmarks build this architecture
without downloading anything: same shapes, same FLOPs, same memory traffic as the real model;
random weights make the images noise, which costs exactly as much to compute.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from service.engine.tiny_model import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    PAD_TOKEN,
    write_pipeline_files,
    write_tokenizer,
)

SD2_UNET_CONFIG = {
    "act_fn": "silu",
    # diffusers' name; SD2 has 5/10/20/20 heads of 64 channels each.
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "use_linear_projection": True,
}

SD2_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# OpenCLIP ViT-H/14's text tower as transformers' CLIPTextModel: 23 of its 24 layers (SD2 uses
# the penultimate layer's output). Token ids come from the project's local tokenizer.
SD2_TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "vocab_size": 49408,
}

# Parameter counts of the three components (a check that the configs are the real ones).
SD2_PARAMETERS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}

# Issue 9's cost model, counted by `count_flops` (torch's FlopCounterMode) at 768×768.
UNET_TFLOP_PER_GUIDED_STEP_768 = 4.30
VAE_DECODE_TFLOP_768 = 5.75


def sd2_components(device: str | torch.device = "cpu", seed: int = 0) -> dict[str, torch.nn.Module]:
    """UNet, VAE and text encoder of SD 2.0 768-v with random weights, built on `device`.

    On the `meta` device nothing is allocated: that is how FLOPs are counted on a laptop.
    """
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD2_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**SD2_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_ENCODER_CONFIG))
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def build_sd2_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> Path:
    """Write a diffusers folder of the full-size SD 2.0 768-v architecture with random weights.

    Weights are drawn on `device` (a GPU draws 1.3 B of them in a second) and stored in `dtype`,
    the way SD 2.0's fp16 variant is shipped; loading it then takes the real loading path.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path / "tokenizer")
    components = sd2_components(device, seed)
    components["text_encoder"].config.update(
        {
            "bos_token_id": vocab[BOS_TOKEN],
            "eos_token_id": vocab[EOS_TOKEN],
            "pad_token_id": vocab[PAD_TOKEN],
        }
    )
    for name, module in components.items():
        module.to(dtype).save_pretrained(path / name, safe_serialization=True)
        del module
    components.clear()
    write_pipeline_files(path)
    return path


def count_flops(
    unet: torch.nn.Module, vae: torch.nn.Module, height: int = 768, width: int = 768
) -> dict[str, float]:
    """FLOPs of one guided UNet step (2 rows) and one VAE decode at `height`×`width`.

    Run on meta-device modules (`sd2_components("meta")`): shapes only, no memory, a few seconds.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(unet.parameters()).device
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = height // scale, width // scale
    cross_dim = unet.config.cross_attention_dim
    with torch.inference_mode(), torch.device(device):
        counter = FlopCounterMode(display=False)
        with counter:
            unet(
                torch.empty(2, unet.config.in_channels, h, w),
                torch.empty(2),
                encoder_hidden_states=torch.empty(2, MODEL_MAX_LENGTH, cross_dim),
            )
        unet_flops = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            vae.decode(torch.empty(1, vae.config.latent_channels, h, w))
        vae_flops = counter.get_total_flops()
    return {"unet_per_guided_step": float(unet_flops), "vae_decode": float(vae_flops)}


def flops_per_image(counted: dict[str, float], steps: int) -> float:
    """FLOPs of one guided image: `steps` UNet steps (2 rows each) and one VAE decode."""
    return steps * counted["unet_per_guided_step"] + counted["vae_decode"]
