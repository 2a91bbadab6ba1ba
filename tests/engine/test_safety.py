"""The safety checker on the tiny random-weight checker, and the treatments of flagged images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from service.engine.protocol import SAFETY_TREATMENTS
from service.engine.safety import SafetyChecker, SafetyCheckerError, treat
from service.engine.tiny_model import build_tiny_safety_checker


def images(count: int, height: int = 64, width: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize("flags", ["all", "none"])
def test_flags_follow_the_checker(tmp_path, flags):
    checker = SafetyChecker(build_tiny_safety_checker(tmp_path / "checker", flags))
    assert checker.flags(images(3)) == [flags == "all"] * 3
    assert checker.flags([]) == []


def test_a_pipeline_folder_with_a_safety_checker_loads_too(tmp_path):
    built = build_tiny_safety_checker(tmp_path / "built", "all")
    pipeline = tmp_path / "sd-1-pipeline"
    (pipeline / "safety_checker").mkdir(parents=True)
    (pipeline / "feature_extractor").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(built / name, pipeline / "safety_checker" / name)
    shutil.copy(built / "preprocessor_config.json", pipeline / "feature_extractor")
    assert SafetyChecker(pipeline).flags(images(1)) == [True]


def test_a_broken_folder_is_a_clear_error(tmp_path):
    built = build_tiny_safety_checker(tmp_path / "checker", "none")
    weights = built / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SafetyCheckerError, match="could not be loaded from .*checker"):
        SafetyChecker(built)
    with pytest.raises(SafetyCheckerError, match="could not be loaded"):
        SafetyChecker(tmp_path / "missing")


def test_every_treatment_keeps_the_size_and_hides_the_picture():
    image = images(1, 120, 200)[0]
    treated = {name: treat(image, name) for name in SAFETY_TREATMENTS}
    for name, out in treated.items():
        assert out.shape == image.shape and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - image).mean() > 20, name  # far from the picture
    assert not treated["black"].any()
    # blur and pixelate keep only coarse colour: far less detail than the random picture
    for name in ("blur", "pixelate"):
        assert np.abs(np.diff(treated[name].astype(int), axis=1)).mean() < 5, name
    blocks = treated["pixelate"][:8, :12]  # 200 px wide -> 12 px blocks
    assert (blocks == blocks[0, 0]).all()
    # the notice says nothing about the picture it replaces
    other = images(2, 120, 200)[1]
    assert np.array_equal(treated["sensitive_content_text"], treat(other, "sensitive_content_text"))
    assert treated["sensitive_content_text"].std() > 5  # it has text on it


def test_an_unknown_treatment_is_refused():
    with pytest.raises(ValueError, match="safety_checker_type: unknown treatment 'sepia'"):
        treat(images(1)[0], "sepia")
