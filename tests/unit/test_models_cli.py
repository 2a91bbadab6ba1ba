"""`sdserve models list|import` through the real CLI entry point, with settings from SDSERVE_*
environment variables as in a deployment, against temporary folders."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from service.cli import main
from service.engine.tiny_model import build_tiny_embedding, build_tiny_vae


@pytest.fixture(scope="module")
def checkpoint(tiny_model_dir, tmp_path_factory) -> Path:
    from service.engine.checkpoint import export_single_file

    return export_single_file(
        tiny_model_dir, tmp_path_factory.mktemp("ckpt") / "community.safetensors"
    )


@pytest.fixture
def env(monkeypatch, tmp_path):
    """Set SDSERVE_* variables for one test; work in tmp_path (default out is models/<ID>)."""
    monkeypatch.chdir(tmp_path)

    def set_env(**values):
        for name, value in values.items():
            text = value if isinstance(value, str) else json.dumps(value)
            monkeypatch.setenv(f"SDSERVE_{name.upper()}", text)

    return set_env


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def list_json(capsys) -> dict:
    code, out, _ = run(capsys, "models", "list", "--json")
    document = json.loads(out)
    document["code"] = code
    return document


def test_list_shows_defaults_prices_status_and_loras(env, capsys, tiny_model_dir, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(loras / "style.safetensors"))
    (loras / "broken.safetensors").write_bytes((loras / "style.safetensors").read_bytes()[:-4])
    env(
        models={
            "stable-diffu": str(tiny_model_dir),
            "small": {
                "path": str(tiny_model_dir),
                "width": 512,
                "height": 512,
                "default_steps": 20,
            },
            "gone": str(tmp_path / "nowhere"),
        },
        prices_usd={"small": "0.01"},
        lora_dir=str(loras),
    )

    code, out, _ = run(capsys, "models", "list")
    assert code == 1  # a configured folder is missing
    lines = out.splitlines()
    assert lines[0].split() == [
        "MODEL_ID", "SIZE", "NATIVE", "STEPS", "PREDICTION", "PRICE_USD", "STATUS", "PATH"
    ]  # fmt: skip
    assert lines[1].split()[:8] == [
        "stable-diffu", "*", "768x768", "768x768", "30", "v_prediction", "0.0047", "ok"
    ]  # fmt: skip
    assert lines[2].split()[:7] == [
        "small", "512x512", "768x768", "20", "v_prediction", "0.01", "ok"
    ]  # fmt: skip
    assert "missing: no such folder" in lines[3]
    lora_lines = {line.split()[0]: line for line in lines if line.startswith(("style", "broken"))}
    assert lora_lines["style"].split()[:2] == ["style", "ok"]
    assert "truncated or padded safetensors file" in lora_lines["broken"]

    document = list_json(capsys)
    assert document["code"] == 1
    assert document["default_model_id"] == "stable-diffu"
    small = next(m for m in document["models"] if m["id"] == "small")
    assert small | {"path": None} == {
        "id": "small",
        "default": False,
        "path": None,
        "width": 512,
        "height": 512,
        "native_width": 768,
        "native_height": 768,
        "default_steps": 20,
        "prediction_type": "v_prediction",
        "price_per_image_usd": "0.01",
        "status": "ok",
    }
    assert [lora["id"] for lora in document["loras"]] == ["broken", "style"]


def test_list_shows_the_embeddings(env, capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "embeddings"
    build_tiny_embedding(tiny_model_dir, folder / "moody.pt", vectors=3)
    (folder / "broken.pt").write_bytes(b"not a checkpoint")
    env(models={"stable-diffu": str(tiny_model_dir)}, embeddings_dir=str(folder))
    document = list_json(capsys)
    assert document["embeddings_dir"] == str(folder)
    entries = {item["id"]: item for item in document["embeddings"]}
    assert entries["moody"] | {"path": None} == {
        "id": "moody", "path": None, "vectors": 3, "width": 32, "status": "ok"
    }  # fmt: skip
    assert entries["broken"]["status"].startswith("embeddings_model 'broken' could not be read")
    _, out, _ = run(capsys, "models", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["moody"][:4] == ["moody", "3", "32", "ok"]


def test_list_shows_the_vaes(env, capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "vaes"
    build_tiny_vae(tiny_model_dir, folder / "crisp", seed=3)
    build_tiny_vae(tiny_model_dir, folder / "ft.safetensors", seed=3, layout="ldm")
    (folder / "cut.safetensors").write_bytes((folder / "ft.safetensors").read_bytes()[:500])
    env(models={"stable-diffu": str(tiny_model_dir)}, vae_dir=str(folder))
    document = list_json(capsys)
    assert document["vae_dir"] == str(folder)
    entries = {item["id"]: (item["kind"], item["status"]) for item in document["vaes"]}
    assert entries == {
        "crisp": ("folder", "ok"),
        "ft": ("file", "ok"),
        "cut": ("file", "not a safetensors file (corrupt or truncated)"),
    }
    _, out, _ = run(capsys, "models", "list")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["crisp"][:3] == ["crisp", "folder", "ok"]


def test_list_names_the_file_of_each_broken_folder_and_shows_the_others(
    env, capsys, tiny_model_dir, tmp_path
):
    """One broken folder does not hide the others; each problem names its file."""
    breakage = {
        "unet-array": ("unet/config.json", "[]", "must be a JSON object, not an array"),
        "te-json": ("text_encoder/config.json", "{not json", "not valid JSON (Expecting"),
        "vae-field": ("vae/config.json", '{"latent_channels": 4}', "block_out_channels must"),
        "index-json": ("model_index.json", "{", "not valid JSON"),
        "index-array": ("model_index.json", "[]", "must be a JSON object"),
        "te-missing": ("text_encoder/config.json", None, "missing"),
        "scheduler": ("scheduler/scheduler_config.json", None, "missing"),
    }
    models = {"stable-diffu": str(tiny_model_dir)}
    for model_id, (file, text, _) in breakage.items():
        folder = tmp_path / model_id
        shutil.copytree(tiny_model_dir, folder)
        if text is None:
            (folder / file).unlink()
        else:
            (folder / file).write_text(text)
        models[model_id] = str(folder)
    env(models=models)

    document = list_json(capsys)
    assert document["code"] == 1
    status = {m["id"]: m["status"] for m in document["models"]}
    assert status.pop("stable-diffu") == "ok"
    for model_id, (file, _, problem) in breakage.items():
        assert status[model_id].startswith(f"invalid: {tmp_path / model_id / file}: "), model_id
        assert problem in status[model_id], model_id

    code, out, err = run(capsys, "models", "list")  # the table, too, lists every folder
    assert code == 1 and err == ""
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert "ok" in rows["stable-diffu"].split()
    assert all(f"invalid: {tmp_path / model_id}" in rows[model_id] for model_id in breakage)


def test_list_shows_every_problem_of_a_folder(env, capsys, tiny_model_dir, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model_index.json").unlink()
    shutil.rmtree(folder / "tokenizer")
    for weights in (folder / "vae").glob("*.safetensors"):
        weights.unlink()
    env(models={"stable-diffu": str(folder)})
    [model] = list_json(capsys)["models"]
    assert model["status"] == (
        f"invalid: {folder / 'model_index.json'}: missing; {folder / 'tokenizer'}: no such "
        f"folder; {folder / 'vae'}: no weights (*.safetensors or *.bin)"
    )


def test_list_exits_0_when_every_model_is_servable(env, capsys, tiny_model_dir):
    env(models={"stable-diffu": str(tiny_model_dir)})
    code, out, _ = run(capsys, "models", "list")
    assert code == 0
    assert "no lora_dir configured" in out


def test_import_writes_the_folder_and_prints_the_models_setting(
    env, capsys, tiny_model_dir, checkpoint, tmp_path
):
    env(models={"stable-diffu": str(tiny_model_dir)})
    code, out, err = run(capsys, "models", "import", str(checkpoint), "--id", "community")
    assert code == 0, err
    assert (tmp_path / "models" / "community" / "model_index.json").is_file()
    assert "768x768, v_prediction" in out

    # the printed value, set as the environment, serves both models
    line = next(line for line in out.splitlines() if "SDSERVE_MODELS=" in line)
    value = shlex.split(line.strip())[0].removeprefix("SDSERVE_MODELS=")
    assert json.loads(value) == {
        "stable-diffu": str(tiny_model_dir),
        "community": "models/community",
    }
    env(models=value)
    document = list_json(capsys)
    assert document["code"] == 0
    assert {m["id"]: m["status"] for m in document["models"]} == {
        "stable-diffu": "ok",
        "community": "ok",
    }


def test_import_refusals_are_clear_errors(env, capsys, tiny_model_dir, checkpoint, tmp_path):
    env(models={"stable-diffu": str(tiny_model_dir)})
    out_dir = tmp_path / "taken"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    args = ["models", "import", str(checkpoint), "--id", "x", "--out", str(out_dir)]

    code, _, err = run(capsys, *args)
    assert code == 1 and "exists and is not empty" in err and "--overwrite" in err

    code, _, err = run(capsys, *args, "--base-model", "nope")
    assert code == 1
    assert "--base-model 'nope' is neither a configured model id (stable-diffu) nor a folder" in err

    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not really a pickle")
    code, _, err = run(capsys, "models", "import", str(pickled), "--id", "x")
    assert code == 1 and f"error: {pickled}: not a .safetensors file" in err

    # --overwrite, with the base given as a folder
    code, _, err = run(capsys, *args, "--overwrite", "--base-model", str(tiny_model_dir))
    assert code == 0, err
    assert not (out_dir / "keep.txt").exists()
    assert (out_dir / "unet" / "config.json").is_file()
