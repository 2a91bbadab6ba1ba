"""Several models and LoRA adapters on one engine: right weights for every request, nothing
leaking from one batch into the next, bounded pipelines held at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from service.engine.pipeline import Engine, LoraError, ModelLoadError
from service.engine.protocol import GenerationParams
from service.engine.tiny_model import build_tiny_lora, build_tiny_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    model_a = build_tiny_model(root / "model-a", seed=0)
    model_b = build_tiny_model(root / "model-b", seed=1)
    style = build_tiny_lora(model_a, root / "loras" / "style.safetensors", seed=3)
    detail = build_tiny_lora(model_a, root / "loras" / "detail.safetensors", seed=4)
    # a LoRA whose shapes fit no tiny model: every lora_A gets twice the input features
    misfit = root / "loras" / "misfit.safetensors"
    tensors = load_file(style)
    save_file(
        {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in tensors.items()},
        misfit,
    )
    broken = root / "broken"
    build_tiny_model(broken, seed=2)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    return {
        "models": {"a": model_a, "b": model_b, "broken": broken},
        "loras": {"style": style, "detail": detail, "misfit": misfit},
    }


def request(model="a", loras=(), seed=42, **fields) -> GenerationParams:
    base = dict(
        prompt="a red house",
        model_id=model,
        width=64,
        height=64,
        num_inference_steps=2,
        seed=seed,
        loras=tuple(loras),
    )
    return GenerationParams(**{**base, **fields})


def image(engine: Engine, params: GenerationParams) -> np.ndarray:
    return engine.generate([params])[0].images[0]


@pytest.fixture(scope="module")
def engine(assets):
    return Engine(assets["models"], loras=assets["loras"])


def test_two_models_give_different_images(engine):
    assert not np.array_equal(image(engine, request("a")), image(engine, request("b")))
    assert np.array_equal(image(engine, request("a")), image(engine, request("a")))


def test_lora_changes_the_image_and_strength_zero_is_the_base(engine):
    base = image(engine, request())
    styled = image(engine, request(loras=[("style", 1.0)]))
    half = image(engine, request(loras=[("style", 0.5)]))
    zero = image(engine, request(loras=[("style", 0.0)]))
    assert not np.array_equal(base, styled)
    assert not np.array_equal(styled, half)
    assert np.array_equal(zero, base)
    # no adapter leaks into the next request without LoRAs
    assert np.array_equal(image(engine, request()), base)


def test_several_loras_in_one_request(engine):
    one = image(engine, request(loras=[("style", 1.0)]))
    both = image(engine, request(loras=[("style", 1.0), ("detail", 0.7)]))
    assert not np.array_equal(one, both)
    assert np.array_equal(image(engine, request(loras=[("style", 1.0)])), one)


def test_requests_with_different_lora_sets_never_share_a_call(engine):
    with pytest.raises(ValueError):
        engine.generate([request(), request(loras=[("style", 1.0)])])


def test_unknown_and_misfit_loras_are_clear_errors_and_leave_the_model_clean(engine):
    base = image(engine, request())
    with pytest.raises(LoraError, match="lora_model 'nope' is not available"):
        image(engine, request(loras=[("nope", 1.0)]))
    with pytest.raises(LoraError, match="lora_model 'misfit' does not fit this model"):
        image(engine, request(loras=[("misfit", 1.0)]))
    assert np.array_equal(image(engine, request()), base)
    assert not np.array_equal(image(engine, request(loras=[("style", 1.0)])), base)


def test_corrupt_model_is_a_clear_error_and_others_keep_working(engine, caplog):
    with pytest.raises(ModelLoadError, match="model_id 'broken' could not be loaded") as error:
        image(engine, request("broken"))
    folder = str(engine.model_paths["broken"])
    assert folder not in str(error.value)  # a job's message: no server path
    assert folder in caplog.text  # the operator's log names it
    assert image(engine, request("a")).shape == (64, 64, 3)


def test_an_lru_of_one_alternates_two_models_correctly(assets, engine):
    reference = {m: image(engine, request(m)) for m in ("a", "b")}
    small = Engine(assets["models"], max_loaded_models=1)
    for model in ("a", "b", "a", "b"):
        assert np.array_equal(image(small, request(model)), reference[model])
        assert small.loaded_models() == [model]
    assert small.unload("b") and small.loaded_models() == []


def test_a_loaded_model_does_not_wait_behind_another_models_load(assets, monkeypatch):
    import threading
    import time

    from service.engine import pipeline as pipeline_module

    engine = Engine(assets["models"])
    pipe_a = engine.load("a")
    real = pipeline_module.StableDiffusionPipeline.from_pretrained
    release = threading.Event()

    def slow_from_pretrained(path, *args, **kwargs):
        release.wait(timeout=30)  # model b on a slow volume
        return real(path, *args, **kwargs)

    monkeypatch.setattr(
        pipeline_module.StableDiffusionPipeline, "from_pretrained", slow_from_pretrained
    )
    loading = threading.Thread(target=engine.load, args=("b",))
    loading.start()
    time.sleep(0.2)  # b's load holds the load lock now
    started = time.perf_counter()
    assert engine.load("a") is pipe_a
    waited = time.perf_counter() - started
    release.set()
    loading.join()
    assert waited < 1.0, f"the lookup of a loaded model waited {waited:.1f} s"
    assert engine.loaded_models() == ["a", "b"]
