"""The RRDBNet upscaler: the release layout loads, tiles join without seams, factors other than
the network's own are resized, and files that are not upscalers are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from service.engine.tiny_model import build_tiny_upscaler
from service.engine.upscaler import RRDBNet, Upscaler, UpscalerError


def picture(height=64, width=96, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_the_full_size_network_has_the_release_shapes():
    """ESRGAN/Real-ESRGAN x4: 23 blocks of 64 features, growth 32, 16.7 M parameters; the x2
    model takes the 2x2 pixel-unshuffled image (12 channels)."""
    state = RRDBNet(4).state_dict()
    assert sum(t.numel() for t in state.values()) == 16_697_987
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert RRDBNet(2).state_dict()["conv_first.weight"].shape == (64, 12, 3, 3)


@pytest.mark.parametrize("scale", [2, 4])
def test_the_network_scale_sets_the_size(tmp_path, scale):
    upscaler = Upscaler(build_tiny_upscaler(tmp_path / "x.pth", scale=scale))
    assert upscaler.scale == scale
    (out,) = upscaler.upscale([picture()], scale)
    assert out.shape == (64 * scale, 96 * scale, 3) and out.dtype == np.uint8
    assert out.std() > 0


def test_tiles_join_without_seams(tmp_path):
    weights = build_tiny_upscaler(tmp_path / "x2.pth", scale=2)
    image = picture(160, 200)
    whole = Upscaler(weights, tile=1024).upscale([image], 2)[0]
    # context wider than the tiny network's receptive field (~38 input pixels): no seams
    tiled = Upscaler(weights, tile=64, tile_pad=48).upscale([image], 2)[0]
    assert np.abs(tiled.astype(int) - whole).max() <= 1
    # without context the tile borders show: the comparison above can fail
    seams = Upscaler(weights, tile=64, tile_pad=0).upscale([image], 2)[0]
    assert np.abs(seams.astype(int) - whole).max() > 1


def test_another_factor_is_resized_from_the_networks_output(tmp_path):
    upscaler = Upscaler(build_tiny_upscaler(tmp_path / "x4.pth", scale=4))
    image = picture()
    (four,) = upscaler.upscale([image], 4)
    (two,) = upscaler.upscale([image], 2)
    assert two.shape == (128, 192, 3)
    resized = np.asarray(Image.fromarray(four).resize((192, 128), Image.Resampling.LANCZOS))
    assert np.array_equal(two, resized)
    with pytest.raises(ValueError, match="upscale: a factor of 2, 3 or 4, got 5"):
        upscaler.upscale([image], 5)


def test_pth_and_safetensors_layouts_give_the_same_images(tmp_path):
    pth = Upscaler(build_tiny_upscaler(tmp_path / "a.pth", scale=2, seed=3))
    flat = Upscaler(build_tiny_upscaler(tmp_path / "a.safetensors", scale=2, seed=3))
    image = picture(seed=4)
    assert np.array_equal(pth.upscale([image], 2)[0], flat.upscale([image], 2)[0])


class NotATensor:
    pass


def test_files_that_are_not_upscalers_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UpscalerError, match=f"upscaler could not be loaded from {garbage}"):
        Upscaler(garbage)
    pickled = tmp_path / "code.pth"
    torch.save({"params_ema": NotATensor()}, pickled)  # loading it would need to run code
    with pytest.raises(UpscalerError, match="could not be loaded.*UnpicklingError"):
        Upscaler(pickled)
    other = tmp_path / "other.pth"
    torch.save({"params": {"model.0.weight": torch.zeros(64, 3, 3, 3)}}, other)
    with pytest.raises(UpscalerError, match="not an RRDBNet in the Real-ESRGAN key layout"):
        Upscaler(other)
    with pytest.raises(UpscalerError, match="No such file"):
        Upscaler(tmp_path / "missing.pth")
