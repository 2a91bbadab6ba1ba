"""How far FP8 (e4m3) linears move SD 2.0's noise prediction, group by group, and what share of
the linears' FLOPs each group is: the measurement behind which linears
`service/engine/fp8.convert_linears` converts.

One guided UNet forward (2 rows: unconditional and prompt, the text encoder's embeddings, a
mid-schedule timestep) of the full-size architecture with random weights, in fp32 on the CPU;
each group of linears alone in FP8, then `convert_linears`' choice, then the same in a bf16
UNet against fp32 (what the correctness check in sd2_bench.py compares). Numbers only: no
timing on a CPU means anything for a GPU's FP8 tensor cores.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/fp8_sensitivity.py \
        --out benchmarks/results/fp8-sensitivity-cpu.json
"""

# ruff: noqa: E402
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn as nn

from service.engine.fp8 import FP8_ATTRIBUTE, convert_linears, restore_linears, to_float8

PROMPT = "a photograph of an astronaut riding a horse"
# Name suffixes of the linears inside the transformer blocks (fused projections).
GROUPS = (
    "proj_in",
    "proj_out",
    "attn1.to_qkv",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_kv",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)


def components(tiny: bool) -> tuple[nn.Module, torch.Tensor]:
    """A UNet (fused projections, fp32) and the 2-row text embeddings for it."""
    from transformers import CLIPTokenizer

    from service.engine.tiny_model import build_tiny_model, write_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="sdserve-fp8-"))
    if tiny:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(
            build_tiny_model(folder / "tiny"), local_files_only=True, safety_checker=None
        )
        unet, text_encoder, tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
    else:
        from service.engine.sd2_configs import sd2_components

        write_tokenizer(folder / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        parts = sd2_components("cpu")
        unet, text_encoder = parts["unet"], parts["text_encoder"]
    tokens = tokenizer(
        ["", PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        embeddings = text_encoder(tokens.input_ids)[0]
    unet.eval().fuse_qkv_projections()
    return unet, embeddings


def linear_flops(unet: nn.Module, run) -> dict[str, int]:
    """FLOPs of each transformer-block linear in one forward, by module name."""
    flops: dict[str, int] = {}
    handles = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and "attentions." in name:

            def hook(mod, args, _out, name=name):
                rows = args[0].numel() // mod.in_features
                flops[name] = flops.get(name, 0) + 2 * rows * mod.in_features * mod.out_features

            handles.append(module.register_forward_hook(hook))
    try:
        run(unet)
    finally:
        for handle in handles:
            handle.remove()
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32, help="latent side (px / 8)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (for tests)")
    parser.add_argument("--out", type=Path, help="JSON results path")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    unet, embeddings = components(args.tiny)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, unet.config.in_channels, args.latent, args.latent, generator=generator)
    sample = sample.repeat(2, 1, 1, 1)
    timestep = torch.full((2,), 500.0)

    def run(model: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        with torch.inference_mode():
            out = model(
                sample.to(dtype), timestep, encoder_hidden_states=embeddings.to(dtype)
            ).sample
        return out.float()

    reference = run(unet)

    def error(output: torch.Tensor) -> float:
        return round(float((output - reference).norm() / reference.norm()), 5)

    flops = linear_flops(unet, run)
    total = sum(flops.values())
    modules = dict(unet.named_modules())
    groups = {}
    for suffix in GROUPS:
        names = [name for name in flops if name.endswith(suffix)]
        for name in names:
            to_float8(modules[name])
        groups[suffix] = {
            "modules": len(names),
            "flop_share": round(sum(flops[n] for n in names) / total, 4),
            "rel_err": error(run(unet)),
        }
        restore_linears(unet)
        print(f"{suffix:16s} {groups[suffix]}", flush=True)

    converted = convert_linears(unet)
    chosen = [name for name in flops if hasattr(modules[name], FP8_ATTRIBUTE)]
    fp32_with_fp8 = error(run(unet))
    restore_linears(unet)
    unet.to(torch.bfloat16)
    bf16 = error(run(unet, torch.bfloat16))
    convert_linears(unet)
    bf16_with_fp8 = error(run(unet, torch.bfloat16))
    result = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": {"torch": torch.__version__},
        "model": "tiny" if args.tiny else "sd2 (full size, random weights)",
        "latent": args.latent,
        "linear_tflop_per_guided_forward": round(total / 1e12, 4),
        "groups": groups,
        "convert_linears": {
            "modules": converted,
            "flop_share": round(sum(flops[n] for n in chosen) / total, 4),
            "rel_err_fp32_unet": fp32_with_fp8,
            "rel_err_bf16_unet": bf16_with_fp8,
        },
        "bf16_unet_rel_err": bf16,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result["convert_linears"]), "bf16 alone", bf16)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
