"""Textual-inversion embeddings on the tiny model: the trigger word takes the learned vectors
only in requests that name the embedding, whatever shares their batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from service.config import Settings
from service.engine.continuous import ContinuousBatcher
from service.engine.pipeline import EmbeddingError, Engine
from service.engine.protocol import GenerationParams
from service.engine.tiny_model import build_tiny_embedding, build_tiny_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    model = build_tiny_model(root / "model", seed=0)
    folder = root / "embeddings"
    moody = build_tiny_embedding(model, folder / "moody.pt", vectors=3, seed=1)
    single = root / "single.safetensors"  # diffusers' layout: {token: tensor}, one vector
    save_file({"<glow>": torch.randn(1, 32, generator=torch.Generator().manual_seed(2))}, single)
    wide = root / "wide.safetensors"  # made for another text encoder (768 values, not 32)
    save_file({"emb_params": torch.randn(2, 768)}, wide)
    broken = root / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    embeddings = {"moody": moody, "glow": single, "wide": wide, "broken": broken}
    return Engine({"a": model}, embeddings=embeddings)


def request(prompt="a moody castle", embeddings=(), seed=5, **fields) -> GenerationParams:
    base = dict(model_id="a", width=64, height=64, num_inference_steps=2, seed=seed)
    return GenerationParams(prompt=prompt, embeddings=tuple(embeddings), **{**base, **fields})


def image(engine, params) -> np.ndarray:
    return engine.generate([params])[0].images[0]


def test_the_trigger_word_takes_the_embedding_only_when_asked(engine):
    plain = image(engine, request())
    styled = image(engine, request(embeddings=["moody"]))
    assert not np.array_equal(plain, styled)
    # asked for but not in the prompt: the prompt's own words, unchanged
    no_trigger = image(engine, request("a castle", embeddings=["moody"]))
    assert np.array_equal(no_trigger, image(engine, request("a castle")))
    # loaded now, yet a request that does not name it reads "moody" as a plain word again
    assert np.array_equal(image(engine, request()), plain)
    # one-vector embeddings in diffusers' layout work the same way
    assert not np.array_equal(
        image(engine, request("a glow castle", ["glow"])), image(engine, request("a glow castle"))
    )


def test_a_negative_prompt_trigger_works_too(engine):
    fields = {"prompt": "a castle", "negative_prompt": "moody"}
    assert not np.array_equal(
        image(engine, request(embeddings=["moody"], **fields)), image(engine, request(**fields))
    )


def test_requests_with_and_without_it_share_a_batch_without_leaking(engine):
    alone = image(engine, request(seed=9))
    styled_alone = image(engine, request(seed=8, embeddings=["moody"]))
    outputs = engine.generate([request(seed=9), request(seed=8, embeddings=["moody"])])
    assert np.abs(outputs[0].images[0].astype(int) - alone).max() <= 1
    assert np.abs(outputs[1].images[0].astype(int) - styled_alone).max() <= 1


def test_unfit_unknown_and_unreadable_embeddings_are_clear_errors(engine):
    with pytest.raises(
        EmbeddingError, match="'wide' does not fit this model: its vectors have 768"
    ):
        image(engine, request("a wide castle", ["wide"]))
    with pytest.raises(EmbeddingError, match="'broken' could not be read"):
        image(engine, request(embeddings=["broken"]))
    with pytest.raises(EmbeddingError, match="'nope' is not available; available: broken, glow"):
        image(engine, request(embeddings=["nope"]))
    assert image(engine, request()).shape == (64, 64, 3)  # and it keeps serving


def test_a_bad_embedding_is_found_before_it_joins_a_batch(engine):
    """Embeddings are not in the batch key, so the generator checks each request first: a bad
    one must fail alone, not with the requests it would share a UNet call with."""
    fresh = Engine(engine.model_paths, embeddings=engine.embedding_paths)
    with pytest.raises(EmbeddingError, match="'wide' does not fit this model"):
        fresh.check_request(request("a wide castle", ["wide"]))
    assert fresh.loaded_models() == []  # checked from the model's folder, nothing loaded
    fresh.check_request(request(embeddings=["moody"]))

    batcher = ContinuousBatcher(engine, max_running_images=4)
    with pytest.raises(EmbeddingError, match="'broken' could not be read"):
        batcher.submit(request(embeddings=["broken"]))
    good = batcher.submit(request(seed=9, embeddings=["moody"]))
    batcher.run_until_idle()
    assert good.result(timeout=60).images[0].shape == (64, 64, 3)


def test_the_folder_lists_embedding_files_by_name(tmp_path):
    for name in ("a.pt", "b.safetensors", "c.bin", "notes.txt", "-x.pt"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(Settings(embeddings_dir=str(tmp_path)).embedding_paths()) == ["a", "b", "c"]
    assert Settings().embedding_paths() == {}
