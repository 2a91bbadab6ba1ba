"""`sdserve serve`'s listen address (the Serve config's `http_options`, unless the command line
says otherwise) and the checks it makes before starting Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.cli import listen_options, load_serve_config, main

REPO = Path(__file__).resolve().parents[2]


def test_the_serve_config_sets_the_address_and_flags_override_it(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("http_options:\n  host: 0.0.0.0\n  port: 9001\n  request_timeout_s: 60\n")
    _, http_options = load_serve_config(str(config))
    assert listen_options(http_options, None, None) == {
        "host": "0.0.0.0",
        "port": 9001,
        "request_timeout_s": 60,
    }
    overridden = listen_options(http_options, "127.0.0.1", 8123)
    assert (overridden["host"], overridden["port"]) == ("127.0.0.1", 8123)
    assert listen_options({}, None, None) == {"host": "127.0.0.1", "port": 8000}
    assert listen_options(http_options, None, 0)["port"] == 0  # any free port


def test_the_projects_serve_config_listens_where_the_readme_says():
    _, http_options = load_serve_config(str(REPO / "serve_config.yaml"))
    assert listen_options(http_options, None, None) == {"host": "127.0.0.1", "port": 8000}


@pytest.fixture()
def serve_here(tmp_path, monkeypatch, capsys):
    """`sdserve serve` in an empty folder with a model folder of configs only and SQLite; Ray
    must not start. Returns a function: env overrides (and args) -> (exit status, stderr)."""
    import ray

    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "vae").mkdir()
    (model / "unet" / "config.json").write_text(json.dumps({"sample_size": 32}))
    (model / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 16]}))
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("SDSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("SDSERVE_MODELS", json.dumps({"stable-diffu": str(model)}))
    monkeypatch.setenv("SDSERVE_DATABASE_URL", f"sqlite:///{tmp_path}/db.sqlite")
    monkeypatch.setenv("SDSERVE_IMAGE_STORE_URL", str(tmp_path / "images"))

    def ray_must_not_start(*_args, **_kwargs):
        raise AssertionError("Ray started before the configuration was checked")

    monkeypatch.setattr(ray, "init", ray_must_not_start)

    def run(*args: str, **env: str) -> tuple[int, str]:
        with monkeypatch.context() as case:
            for name, value in env.items():
                case.setenv(name, value)
            status = main(["serve", "--port", "8059", *args])
        return status, capsys.readouterr().err

    return run


def test_what_replicas_would_fail_on_stops_serve_before_ray_starts(serve_here, tmp_path):
    (tmp_path / "a-file").write_text("")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "unet" / "config.json").write_text("{}")
    (tmp_path / "typo.yaml").write_text("applications:\n- args:\n    generator_replica: 1\n")
    cases = [
        (
            {"SDSERVE_DATABASE_URL": "postgresql+psycopg://u@127.0.0.1:1/db"},
            (),
            "SDSERVE_DATABASE_URL: the database cannot be opened: OperationalError",
        ),
        (
            {"SDSERVE_IMAGE_STORE_URL": str(tmp_path / "a-file" / "images")},
            (),
            "SDSERVE_IMAGE_STORE_URL: ",
        ),
        (
            {"SDSERVE_MODELS": json.dumps({"stable-diffu": str(broken)})},
            (),
            "SDSERVE_MODELS: model 'stable-diffu': ",
        ),
        ({"SDSERVE_MODELS": '{"stable-diffu": "x",}'}, (), "SDSERVE_MODELS: not valid JSON"),
        (
            {"SDSERVE_LORA_DIR": str(tmp_path / "no-loras")},
            (),
            f"SDSERVE_LORA_DIR: lora_dir {tmp_path / 'no-loras'} is not a folder",
        ),
        ({}, ("--config", "missing.yaml"), "--config: missing.yaml does not exist"),
        ({}, ("--config", "typo.yaml"), "generator_replica: Extra inputs are not permitted"),
    ]
    for env, args, said in cases:
        status, err = serve_here(*args, **env)
        assert status == 2 and said in err, (env, args, err)
        assert "Traceback" not in err


def test_the_checks_leave_a_working_setup_migrated_and_its_store_clean(serve_here, tmp_path):
    """Past the checks the next step is Ray: the stand-in for ray.init is what stops it."""
    with pytest.raises(AssertionError, match="Ray started"):
        serve_here()
    assert (tmp_path / "db.sqlite").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["temp"]
