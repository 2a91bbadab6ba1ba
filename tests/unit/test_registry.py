"""The registry reads what the request layer checks against from each model's configs, once,
without loading the model: here, the text encoder's depth that bounds clip_skip."""

from __future__ import annotations

import json

from transformers import CLIPTextConfig

from service.config import Settings
from service.registry import ModelRegistry
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


def test_a_model_without_a_readable_text_encoder_config_has_no_known_depth(tmp_path):
    write_model_configs(tmp_path / "missing")
    write_model_configs(tmp_path / "broken")
    (tmp_path / "broken" / "text_encoder").mkdir()
    (tmp_path / "broken" / "text_encoder" / "config.json").write_text("{not json")
    registry = registry_of(**{"stable-diffu": tmp_path / "missing", "b": tmp_path / "broken"})
    assert registry.get("stable-diffu").text_encoder_layers is None
    assert registry.get("b").text_encoder_layers is None


def test_the_configs_are_read_once_per_model(tmp_path, monkeypatch):
    write_model_configs(tmp_path / "m")
    registry = registry_of(**{"stable-diffu": tmp_path / "m"})

    def no_reading(*args, **kwargs):
        raise AssertionError("a config was read again")

    monkeypatch.setattr("pathlib.Path.read_text", no_reading)
    assert registry.infos()["stable-diffu"] == registry.get("stable-diffu")
