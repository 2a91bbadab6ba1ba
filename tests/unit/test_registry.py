"""The registry reads what the request layer checks against from each model's configs, once,
without loading the model: here, the text encoder's depth that bounds clip_skip."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPTextConfig

from service.config import Settings
from service.registry import ModelConfigError, ModelRegistry
from tests.api.test_routes import write_model_configs


def registry_of(**models) -> ModelRegistry:
    return ModelRegistry(Settings(models={k: str(v) for k, v in models.items()}, demo_key=""))


def test_the_text_encoder_depth_is_the_one_the_engine_loads(tiny_model_dir):
    info = registry_of(**{"stable-diffu": tiny_model_dir}).get("stable-diffu")
    loaded = CLIPTextConfig.from_pretrained(tiny_model_dir / "text_encoder")
    assert info.text_encoder_layers == loaded.num_hidden_layers


def test_a_config_without_the_depth_has_transformers_default(tmp_path):
    write_model_configs(tmp_path / "m")
    (tmp_path / "m" / "text_encoder").mkdir()
    (tmp_path / "m" / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    info = registry_of(**{"stable-diffu": tmp_path / "m"}).get("stable-diffu")
    assert info.text_encoder_layers == CLIPTextConfig().num_hidden_layers


def test_a_model_without_a_text_encoder_config_has_no_known_depth(tmp_path):
    write_model_configs(tmp_path / "missing")
    registry = registry_of(**{"stable-diffu": tmp_path / "missing"})
    assert registry.get("stable-diffu").text_encoder_layers is None


UNET, VAE = "unet/config.json", "vae/config.json"
SCHEDULER, TEXT_ENCODER = "scheduler/scheduler_config.json", "text_encoder/config.json"


@pytest.mark.parametrize(
    ("file", "text", "problem"),
    [
        (UNET, None, "missing"),
        (UNET, "[]", "must be a JSON object, not an array"),
        (UNET, "{}", "sample_size must be a positive integer or [height, width]"),
        (UNET, '{"sample_size": "96"}', "sample_size must be"),
        (UNET, '{"sample_size": [96]}', "sample_size must be"),
        (UNET, '{"sample_size": true}', "sample_size must be"),
        (VAE, "{not json", "not valid JSON (Expecting property name"),
        (VAE, "{}", "block_out_channels must be a list"),
        (VAE, '{"block_out_channels": 4}', "block_out_channels must be a list"),
        (VAE, '{"block_out_channels": []}', "block_out_channels must be a list"),
        (VAE, b"\xff\xfe\x00", "not valid JSON"),
        (SCHEDULER, "null", "must be a JSON object, not null"),
        (SCHEDULER, '{"prediction_type": 1}', "prediction_type must be a string"),
        (TEXT_ENCODER, "{not json", "not valid JSON"),
        (TEXT_ENCODER, '"clip"', "must be a JSON object, not a string"),
        (TEXT_ENCODER, '{"num_hidden_layers": "23"}', "num_hidden_layers must be a positive"),
        (TEXT_ENCODER, '{"num_hidden_layers": 0}', "num_hidden_layers must be a positive"),
        (TEXT_ENCODER, '{"text_config": []}', "text_config an object"),
        (TEXT_ENCODER, "[" * 100_000, "not valid JSON"),
    ],
)
def test_a_broken_config_is_refused_naming_the_model_and_the_file(tmp_path, file, text, problem):
    folder = tmp_path / "b"
    write_model_configs(tmp_path / "good")
    write_model_configs(folder)
    config = folder / file
    if text is None:
        config.unlink()
    else:
        config.parent.mkdir(exist_ok=True)
        config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelConfigError) as refused:
        registry_of(**{"stable-diffu": tmp_path / "good", "b": folder})
    error = refused.value
    assert isinstance(error, ValueError)  # what `sdserve serve`'s preflight reports
    assert (error.model_id, error.file) == ("b", config)
    assert str(error).startswith(f"model 'b': {config}: ")
    assert problem in error.problem


def test_a_config_file_that_is_a_folder_is_refused(tmp_path):
    write_model_configs(tmp_path / "b")
    (tmp_path / "b" / TEXT_ENCODER).mkdir(parents=True)
    with pytest.raises(ModelConfigError, match=f"{tmp_path / 'b' / TEXT_ENCODER}: cannot be read"):
        registry_of(**{"stable-diffu": tmp_path / "b"})


def test_a_full_clip_config_gives_its_text_part(tmp_path):
    write_model_configs(tmp_path / "m")
    (tmp_path / "m" / "text_encoder").mkdir()
    config = {"text_config": {"num_hidden_layers": 7}, "vision_config": {}}
    (tmp_path / "m" / TEXT_ENCODER).write_text(json.dumps(config))
    info = registry_of(**{"stable-diffu": tmp_path / "m"}).get("stable-diffu")
    assert info.text_encoder_layers == 7


def test_the_configs_are_read_once_per_model(tmp_path, monkeypatch):
    write_model_configs(tmp_path / "m")
    registry = registry_of(**{"stable-diffu": tmp_path / "m"})

    def no_reading(*args, **kwargs):
        raise AssertionError("a config was read again")

    monkeypatch.setattr("pathlib.Path.read_text", no_reading)
    assert registry.infos()["stable-diffu"] == registry.get("stable-diffu")
