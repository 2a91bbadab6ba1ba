"""The tiny SD2-architecture model: deterministic, SD 2.0's layout, loadable offline."""

# ruff: noqa: E402
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
from transformers import CLIPTokenizer

from service.engine.tiny_model import MODEL_MAX_LENGTH, build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_matches_sd2(tiny):
    index = json.loads((tiny / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny / part).is_dir()
    assert {p.name for p in (tiny / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    scheduler = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["beta_schedule"] == "scaled_linear"
    assert (scheduler["beta_start"], scheduler["beta_end"]) == (0.00085, 0.012)
    assert (scheduler["steps_offset"], scheduler["clip_sample"]) == (1, False)
    assert scheduler["set_alpha_to_one"] is False
    vae = json.loads((tiny / "vae" / "config.json").read_text())
    unet = json.loads((tiny / "unet" / "config.json").read_text())
    assert unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1) == 768
    size = sum(p.stat().st_size for p in tiny.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_build_is_deterministic_per_seed(tiny, tmp_path):
    same = build_tiny_model(tmp_path / "same", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _files(same) == _files(tiny)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (other / weights).read_bytes() != (tiny / weights).read_bytes()


@pytest.mark.parametrize(
    "prompt",
    ["a photo of the cat and the dog", "", "   ", "日本語 🚀 ÉCOLE naïve\t\n\x00 \u200b"],
)
def test_tokenizer_handles_any_unicode(tiny, prompt):
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer", local_files_only=True)
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH
    padded = tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77
    ids = tokenizer(prompt).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]  # every byte has a token: nothing is unknown


def test_text_encoder_ids_match_tokenizer(tiny):
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer", local_files_only=True)
    config = json.loads((tiny / "text_encoder" / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert config["bos_token_id"] == tokenizer.bos_token_id
    assert config["eos_token_id"] == tokenizer.eos_token_id
    assert config["pad_token_id"] == tokenizer.pad_token_id
    assert config["max_position_embeddings"] == 77
    assert config["hidden_act"] == "gelu"
    merged = tokenizer.tokenize("the")
    assert merged == ["the</w>"]
