"""Custom VAEs on the tiny model: a request's `vae` decodes its latents, in every layout VAEs are
published in, without changing the images of requests that share its batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import AutoencoderKL

from service.config import Settings
from service.engine.continuous import ContinuousBatcher
from service.engine.pipeline import Engine
from service.engine.protocol import GenerationParams
from service.engine.tiny_model import build_tiny_model, build_tiny_vae
from service.engine.vaes import VaeError

MODEL_SEED = 0  # build_tiny_model draws its VAE from seed + 1
OWN_VAE_SEED = MODEL_SEED + 1


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    model = build_tiny_model(root / "model", seed=MODEL_SEED)
    folder = root / "vaes"
    vaes = {
        # the model's own weights, in each layout: must decode exactly as the model does
        "own-folder": build_tiny_vae(model, folder / "own-folder", OWN_VAE_SEED),
        "own-ldm": build_tiny_vae(model, folder / "own-ldm.safetensors", OWN_VAE_SEED, "ldm"),
        "own-file": build_tiny_vae(
            model, folder / "own-file.safetensors", OWN_VAE_SEED, "diffusers-file"
        ),
        # other weights
        "other": build_tiny_vae(model, folder / "other", seed=7),
        "other-ldm": build_tiny_vae(model, folder / "other-ldm.safetensors", 7, "ldm"),
    }
    config = AutoencoderKL.load_config(model / "vae")
    AutoencoderKL.from_config({**config, "latent_channels": 8}).save_pretrained(folder / "eight")
    broken = folder / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    vaes |= {"eight": folder / "eight", "broken": broken}
    return Engine({"a": model}, vaes=vaes)


def request(vae=None, seed=5, **fields) -> GenerationParams:
    base = dict(prompt="a castle", model_id="a", width=64, height=64, num_inference_steps=2)
    return GenerationParams(vae=vae, seed=seed, **{**base, **fields})


def image(engine, params) -> np.ndarray:
    return engine.generate([params])[0].images[0]


def build_tiny_wider_vae(engine, out):
    """A single VAE file of another architecture than the tiny model's VAE."""
    from safetensors.torch import save_file

    config = json.loads((engine.model_paths["a"] / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_config({**config, "block_out_channels": [8, 16, 32, 64]})
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, out)


def test_every_layout_of_the_models_own_vae_decodes_the_same_image(engine):
    plain = image(engine, request())
    for vae_id in ("own-folder", "own-ldm", "own-file"):
        assert np.abs(image(engine, request(vae_id)).astype(int) - plain).max() <= 1, vae_id


def test_another_vae_changes_the_image_and_its_ldm_file_matches_its_folder(engine):
    plain = image(engine, request())
    other = image(engine, request("other"))
    assert not np.array_equal(plain, other)
    assert np.abs(image(engine, request("other-ldm")).astype(int) - other).max() <= 1


def test_requests_with_different_vaes_share_a_batch_without_leaking(engine):
    alone = [image(engine, request(vae, seed=seed)) for vae, seed in ((None, 9), ("other", 8))]
    outputs = engine.generate([request(seed=9), request("other", seed=8, samples=2)])
    assert outputs[0].batch_size == 3  # one UNet call for both
    assert np.abs(outputs[0].images[0].astype(int) - alone[0]).max() <= 1
    assert np.abs(outputs[1].images[0].astype(int) - alone[1]).max() <= 1


def test_unfit_unknown_and_unreadable_vaes_are_clear_errors(engine, tmp_path):
    with pytest.raises(VaeError, match="'eight' does not fit model 'a': it decodes latents of 8"):
        image(engine, request("eight"))
    with pytest.raises(VaeError, match="'broken' could not be loaded for model 'a'") as error:
        image(engine, request("broken"))
    assert str(engine.vaes.paths["broken"]) not in str(error.value)  # no server path
    with pytest.raises(VaeError, match="'nope' is not available; available: broken, eight"):
        image(engine, request("nope"))
    wider = Engine(engine.model_paths, vaes={"wider": tmp_path / "w.safetensors"})
    build_tiny_wider_vae(engine, tmp_path / "w.safetensors")
    with pytest.raises(VaeError, match="'wider' does not fit model 'a'.*weights with other shapes"):
        wider.check_request(request("wider"))
    assert image(engine, request()).shape == (64, 64, 3)  # and it keeps serving


def test_a_bad_vae_is_found_before_it_joins_a_batch(engine):
    fresh = Engine(engine.model_paths, vaes=engine.vaes.paths)
    with pytest.raises(VaeError, match="'eight' does not fit"):
        fresh.check_request(request("eight"))
    assert fresh.loaded_models() == []  # checked against the model's folder, model not loaded
    fresh.check_request(request("other-ldm"))

    batcher = ContinuousBatcher(engine, max_running_images=4)
    with pytest.raises(VaeError, match="'broken' could not be loaded"):
        batcher.submit(request("broken"))
    styled = batcher.submit(request("other", seed=8))
    plain = batcher.submit(request(seed=9))
    batcher.run_until_idle()
    assert (
        np.abs(
            styled.result(timeout=60).images[0].astype(int)
            - image(engine, request("other", seed=8))
        ).max()
        <= 1
    )
    assert (
        np.abs(
            plain.result(timeout=60).images[0].astype(int) - image(engine, request(seed=9))
        ).max()
        <= 1
    )


def test_the_folder_lists_vae_folders_and_files_by_name(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text("{}")
    (tmp_path / "no-config").mkdir()
    for name in ("file.safetensors", "notes.txt", "old.ckpt", ".hidden.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(Settings(vae_dir=str(tmp_path)).vae_paths()) == ["file", "folder"]
    assert Settings().vae_paths() == {}


def test_a_models_vaes_are_dropped_with_it(tiny_model_dir, tmp_path):
    vae = build_tiny_vae(tiny_model_dir, tmp_path / "crisp", seed=3)
    engine = Engine({"a": tiny_model_dir, "b": tiny_model_dir}, vaes={"crisp": vae})
    for model_id in ("a", "b"):
        engine.generate([request("crisp", model_id=model_id)])
    assert engine.vaes.loaded() == [("crisp", "a"), ("crisp", "b")]
    engine.unload("a")
    assert engine.vaes.loaded() == [("crisp", "b")]
