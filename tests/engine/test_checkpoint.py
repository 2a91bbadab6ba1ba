"""Single-file checkpoints: a tiny model exported to the LDM layout and imported back onto a base
model with other weights (another seed) is the same model, down to the last bit of every image;
files that cannot be imported are refused with the file and the reason."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from service.engine.checkpoint import (
    LDM_UNET_PREFIX,
    LDM_VAE_PREFIX,
    CheckpointError,
    check_checkpoint_fits,
    export_single_file,
    import_single_file,
    text_encoder_to_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.tiny_model import build_tiny_model

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("checkpoint")
    source = build_tiny_model(root / "source", seed=5)
    base = build_tiny_model(root / "base", seed=6)  # same architecture, other weights
    checkpoint = export_single_file(source, root / "source.safetensors")
    imported = import_single_file(checkpoint, root / "imported", base)
    return SimpleNamespace(
        root=root, source=source, base=base, checkpoint=checkpoint, imported=imported
    )


def load(folder: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def assert_same_weights(a: StableDiffusionPipeline, b: StableDiffusionPipeline, components=None):
    for name in components or COMPONENTS:
        state_a, state_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert state_a.keys() == state_b.keys(), name
        for key, tensor in state_a.items():
            assert tensor.dtype == state_b[key].dtype, f"{name}.{key}"
            assert torch.equal(tensor, state_b[key]), f"{name}.{key}"


def config_of(pipe: StableDiffusionPipeline, name: str) -> dict:
    config = getattr(pipe, name).config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {key: value for key, value in config.items() if key != "_name_or_path"}


def test_the_file_has_the_ldm_layout(models):
    tensors = load_file(models.checkpoint)
    pipe = load(models.source)
    prefixes = {
        LDM_UNET_PREFIX: len(pipe.unet.state_dict()),
        LDM_VAE_PREFIX: len(pipe.vae.state_dict()),
        # per layer, q/k/v_proj weight and bias (6 tensors) become in_proj weight and bias (2)
        "cond_stage_model.model.": len(pipe.text_encoder.state_dict()) - 4 * 5,
    }
    for prefix, count in prefixes.items():
        assert sum(key.startswith(prefix) for key in tensors) == count, prefix
    assert len(tensors) == sum(prefixes.values())
    # q, k, v as OpenCLIP's one in_proj, in that order; VAE attention as 1x1 convs
    attn = pipe.text_encoder.state_dict()
    in_proj = tensors["cond_stage_model.model.transformer.resblocks.4.attn.in_proj_weight"]
    assert torch.equal(in_proj[32:64], attn["encoder.layers.4.self_attn.k_proj.weight"])
    assert tensors["first_stage_model.decoder.mid.attn_1.v.weight"].shape == (32, 32, 1, 1)
    # 2 down levels x layers_per_block 2: the downsampler is input_blocks.3, the up level with
    # cross-attention carries its upsampler at index 2
    assert f"{LDM_UNET_PREFIX}input_blocks.3.0.op.weight" in tensors
    assert f"{LDM_UNET_PREFIX}output_blocks.2.2.conv.weight" in tensors
    assert f"{LDM_UNET_PREFIX}input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" in tensors


def test_imported_weights_and_configs_equal_the_source_not_the_base(models):
    source, imported, base = load(models.source), load(models.imported), load(models.base)
    assert_same_weights(source, imported)
    for name in (*COMPONENTS, "scheduler"):
        assert config_of(imported, name) == config_of(source, name), name
    assert not torch.equal(
        base.unet.state_dict()["conv_in.weight"], source.unet.state_dict()["conv_in.weight"]
    )
    assert imported.scheduler.config.prediction_type == "v_prediction"  # from the base's config
    assert (models.imported / "tokenizer" / "vocab.json").read_bytes() == (
        models.base / "tokenizer" / "vocab.json"
    ).read_bytes()


@pytest.fixture(scope="module")
def engine(models):
    return Engine({"source": models.source, "imported": models.imported, "base": models.base})


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_imported_folder_gives_the_same_images_as_the_source(engine, scheduler):
    """Exact equality, not a tolerance: the weights are bit-identical and go through the same
    CPU code, so any difference at all would mean the conversion changed something."""

    def image(model_id: str) -> np.ndarray:
        params = GenerationParams(
            prompt="a lighthouse at dusk",
            model_id=model_id,
            width=64,
            height=64,
            num_inference_steps=2,
            seed=11,
            scheduler=scheduler,
        )
        return engine.generate([params])[0].images[0]

    source = image("source")
    assert np.array_equal(image("imported"), source)
    assert not np.array_equal(image("base"), source)


def test_exporting_the_imported_folder_gives_back_the_same_file(models):
    again = export_single_file(models.imported, models.root / "again.safetensors")
    first, second = load_file(models.checkpoint), load_file(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_an_sd1_style_clip_text_encoder_imports_too(models, tmp_path):
    checkpoint = export_single_file(
        models.source, tmp_path / "clip.safetensors", text_encoder_layout="clip"
    )
    assert any(
        k.startswith("cond_stage_model.transformer.text_model.") for k in load_file(checkpoint)
    )
    imported = import_single_file(checkpoint, tmp_path / "imported", models.base)
    assert_same_weights(load(models.source), load(imported))


def test_the_full_sd2_architecture_maps_to_the_names_diffusers_reads(tmp_path):
    """No weights: SD 2.0 768-v's configs on the meta device, exported names checked by
    diffusers' own converters and against names in the published v2 checkpoints."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=768,
        )
        text_config = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
        )
        text_encoder = CLIPTextModel(text_config)
    unet.save_config(tmp_path / "unet")
    vae.save_config(tmp_path / "vae")
    text_config.save_pretrained(tmp_path / "text_encoder")
    shapes = {
        **{
            LDM_UNET_PREFIX + k: tuple(v.shape)
            for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()
        },
        **{
            LDM_VAE_PREFIX + k: tuple(v.shape)
            for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()
        },
        **{k: tuple(v.shape) for k, v in text_encoder_to_ldm(text_encoder.state_dict()).items()},
    }
    # the published SD 2.x files hold 686 UNet and 248 VAE tensors
    assert sum(k.startswith(LDM_UNET_PREFIX) for k in shapes) == 686
    assert sum(k.startswith(LDM_VAE_PREFIX) for k in shapes) == 248
    for key, shape in {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
    }.items():
        assert shapes[key] == shape, key
    check_checkpoint_fits(Path("sd2.safetensors"), shapes, tmp_path)  # raises if not


# -- refusals ---------------------------------------------------------------------------------


def refused(models, checkpoint: Path, match: str) -> str:
    """Import must raise CheckpointError matching `match` and leave no folder behind."""
    out = models.root / "refused"
    with pytest.raises(CheckpointError, match=match) as error:
        import_single_file(checkpoint, out, models.base)
    assert not out.exists()
    assert not list(models.root.glob(".*importing*")), "a failed import left files behind"
    return str(error.value)


def test_a_pickled_checkpoint_is_refused_unopened(models):
    ckpt = models.root / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    message = refused(models, ckpt, "not a .safetensors file")
    assert str(ckpt) in message


def test_corrupt_and_truncated_files_are_refused(models):
    garbage = models.root / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    refused(models, garbage, "not a valid safetensors file")
    data = models.checkpoint.read_bytes()
    truncated = models.root / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 1000])
    message = refused(models, truncated, r"corrupt or truncated")
    assert str(truncated) in message
    # well-formed, but with NaNs where weights should be
    tensors = load_file(models.checkpoint)
    tensors[f"{LDM_VAE_PREFIX}decoder.conv_out.bias"][0] = float("nan")
    poisoned = models.root / "nan.safetensors"
    save_file(tensors, poisoned)
    refused(models, poisoned, r"vae: 1 weights hold NaN or inf values \(decoder.conv_out.bias\)")


def test_a_checkpoint_of_another_shape_is_refused_with_the_weights_named(models):
    tensors = load_file(models.checkpoint)
    key = f"{LDM_UNET_PREFIX}input_blocks.1.0.in_layers.2.weight"  # down block 0 resnet 0 conv1
    tensors[key] = torch.cat([tensors[key], tensors[key]])
    wrong = models.root / "wrong-shape.safetensors"
    save_file(tensors, wrong)
    message = refused(models, wrong, "does not fit base model")
    assert "down_blocks.0.resnets.0.conv1.weight: file (64, 32, 3, 3), base (32, 32, 3, 3)" in (
        message
    )


def test_a_checkpoint_without_a_component_is_refused(models):
    tensors = {
        k: v
        for k, v in load_file(models.checkpoint).items()
        if not k.startswith("cond_stage_model.")
        and k != f"{LDM_UNET_PREFIX}middle_block.1.proj_out.bias"
    }
    partial = models.root / "partial.safetensors"
    save_file(tensors, partial)
    message = refused(models, partial, "does not fit base model")
    assert "text_encoder: no 'cond_stage_model.model.*'" in message
    assert "unet: 1 weights missing (mid_block.attentions.0.proj_out.bias)" in message


def test_an_existing_output_folder_is_kept_unless_overwrite(models, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists and is not empty"):
        import_single_file(models.checkpoint, out, models.base)
    assert (out / "notes.txt").read_text() == "mine"

    import_single_file(models.checkpoint, out, models.base, overwrite=True)
    assert not (out / "notes.txt").exists()
    assert_same_weights(load(models.source), load(out), ["unet"])

    with pytest.raises(CheckpointError, match="is the base model folder itself"):
        import_single_file(models.checkpoint, models.base, models.base, overwrite=True)
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        import_single_file(models.checkpoint, tmp_path / "x", tmp_path / "taken" / "unet")
