"""The playground's server side: the page and its files, nothing fetched from elsewhere, and the
two JSON documents it reads (the form's bounds, the key's plan). The page itself is driven in a
real browser in tests/browser."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from service.api.playground import STATIC_DIR
from service.engine.schedulers import SCHEDULERS
from service.pricing import Plan
from tests.api.test_openapi import KEY, make_client


@pytest.fixture()
def client(tmp_path):
    with make_client(tmp_path, free_images_per_month=3) as client:
        yield client


def test_the_page_and_its_files_are_served(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    local = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
    assert "/static/playground.js" in local and "/static/playground.css" in local
    for url in local:
        response = client.get(url)
        assert response.status_code == 200, url
        if url.startswith("/static/"):
            assert response.headers["cache-control"] == "no-cache", url
    assert client.get("/static/playground.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/favicon.svg").headers["content-type"] == "image/svg+xml"


def test_nothing_is_fetched_from_outside():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        for url in re.findall(r"""(?:src|href)=["']([^"']+)""", text):
            assert url.startswith(("/", "#")), f"{path.name} loads {url}"
        assert not re.search(r"url\(\s*['\"]?https?:", text), path.name
        assert not re.search(r"""(?:fetch|import)\(\s*["'`]https?:""", text), path.name
        if path.suffix == ".svg":
            continue
        # no absolute URL at all: the code snippets are built from location.origin
        assert re.findall(r"https?://", text) == [], path.name


def test_only_known_static_files_are_served(client, tmp_path, monkeypatch):
    """Files that exist beside the page but are no page files stay private."""
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    for name in ("page.js", "secret.py", ".env.js", "sub/inner.js"):
        (static / name).write_text("x")
    (tmp_path / "routes.js").write_text("x")
    monkeypatch.setattr("service.api.playground.STATIC_DIR", static)
    assert client.get("/static/page.js").status_code == 200
    for name in ("secret.py", ".env.js", "sub", "sub%2Finner.js", "..%2Froutes.js", "nope.js"):
        assert client.get(f"/static/{name}").status_code == 404, name


def test_config_has_models_schedulers_and_live_bounds(client):
    config = client.get("/playground/config").json()
    assert config["default_model_id"] == "stable-diffu"
    assert config["models"] == [
        {
            "model_id": "stable-diffu",
            "width": 256,
            "height": 256,
            "default_steps": 30,
            "price_per_image_usd": "0.0047",
            "loras": [],
        }
    ]
    assert config["loras"] == []
    assert config["schedulers"] == list(SCHEDULERS)
    width = config["fields"]["width"]
    assert (width["minimum"], width["maximum"], width["multipleOf"]) == (64, 1024, 8)
    assert config["fields"]["num_inference_steps"]["default"] == 30
    assert config["fields"]["scheduler"]["default"] == "UniPCMultistepScheduler"
    assert all(field["description"] for field in config["fields"].values())


def test_model_list_and_config_agree_on_models(client):
    listed = client.post("/api/v4/dreambooth/model_list", json={"key": KEY}).json()
    config = client.get("/playground/config").json()
    keys = ("model_id", "width", "height", "default_steps", "price_per_image_usd", "loras")
    assert [{k: m[k] for k in keys} for m in listed] == config["models"]


def test_account_of_each_plan(client):
    keys = client.app.state.service.keys
    free, _ = keys.create("free-one", Plan.FREE)
    premium, _ = keys.create("premium-one", Plan.PREMIUM)

    paying = client.post("/playground/account", json={"key": KEY}).json()
    assert paying["status"] == "success" and paying["plan"] == "pay_per_use"
    assert Decimal(paying["balance_usd"]) == Decimal("10")
    assert paying["max_concurrent_requests"] == 10
    assert KEY not in str(paying)

    before = client.post("/playground/account", json={"key": free}).json()
    assert (before["plan"], before["free_images_left"], before["free_images_per_month"]) == (
        "free",
        3,
        3,
    )
    assert before["balance_usd"] is None
    body = client.post(
        "/api/v6/images/text2img",
        json={"key": free, "prompt": "x", "width": 64, "height": 64, "samples": 2},
    ).json()
    assert body["status"] == "success", body
    after = client.post("/playground/account", headers={"Authorization": f"Bearer {free}"}).json()
    assert after["free_images_left"] == 1

    top = client.post("/playground/account", json={"key": premium}).json()
    assert top["plan"] == "premium" and top["balance_usd"] is None


def test_account_with_a_bad_key_is_the_error_envelope(client):
    assert client.post("/playground/account", json={"key": "nope"}).json() == {
        "status": "error",
        "message": "Invalid API key",
        "messege": "Invalid API key",
    }
    missing = client.post("/playground/account", json={}).json()
    assert missing["status"] == "error" and "key is required" in missing["message"]


def test_loras_in_the_lora_folder_are_offered(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "pixel-art.safetensors").write_bytes(b"")
    with make_client(tmp_path, lora_dir=str(loras)) as client:
        config = client.get("/playground/config").json()
        text = client.get("/llms.txt").text
    assert config["loras"] == ["pixel-art"] and config["models"][0]["loras"] == ["pixel-art"]
    assert "- LoRAs (`lora_model`): pixel-art" in text
