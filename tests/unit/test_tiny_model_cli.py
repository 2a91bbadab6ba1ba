"""`sdserve tiny-model DIR`: writes the random-weight demo model, never over someone's weights."""

from __future__ import annotations

from service.cli import main
from service.engine.tiny_model import TINY_MODEL_MARKER


def test_it_writes_into_a_new_folder_and_again_over_its_own(tmp_path, capsys):
    folder = tmp_path / "tiny"
    assert main(["tiny-model", str(folder)]) == 0
    assert (folder / "model_index.json").is_file() and (folder / TINY_MODEL_MARKER).is_file()
    assert main(["tiny-model", str(folder), "--seed", "1"]) == 0  # an earlier tiny model
    assert "written to" in capsys.readouterr().out


def test_it_refuses_a_folder_of_other_files_and_a_file(tmp_path, capsys):
    real = tmp_path / "stable-diffusion-2"
    (real / "unet").mkdir(parents=True)
    weights = real / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"real weights")
    assert main(["tiny-model", str(real)]) == 2
    said = capsys.readouterr().err
    assert f"tiny-model: {real} holds other files" in said and "--overwrite" in said
    assert weights.read_bytes() == b"real weights"

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main(["tiny-model", str(a_file)]) == 2
    assert f"tiny-model: {a_file} is a file, not a folder" in capsys.readouterr().err

    assert main(["tiny-model", str(real), "--overwrite"]) == 0
    assert weights.read_bytes() != b"real weights"
