"""`sdserve serve`'s listen address: the Serve config's `http_options`, unless the command line
says otherwise."""

from __future__ import annotations

from pathlib import Path

from service.cli import listen_options, load_serve_config

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
