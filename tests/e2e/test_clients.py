"""ModelsLab's own clients, unchanged but for the base URL, against a real sdserve.

The promise to a team moving off the hosted API is that their client code keeps working: here
the official Python SDK (modelslab_py 0.2.3) and the official CLI (modelslab-cli 0.2.2, a Go
binary) generate, poll and download from a real Ray Serve app running the tiny model.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from modelslab_py.core.apis.community import Community
from modelslab_py.core.client import Client
from modelslab_py.schemas.community import Text2Image
from PIL import Image

from service.config import DEMO_API_KEY
from service.store.db import make_engine, make_sessionmaker
from service.store.keys import KeyStore
from tests.conftest import running_app

pytestmark = pytest.mark.slow

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}
CLI = Path(sys.executable).parent / "modelslab"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("clients")
    with running_app(tmp, tiny_model_dir, settings={"sync_window_s": 60}) as (base_url, settings):
        yield base_url, make_sessionmaker(make_engine(settings["database_url"]))


def sdk_client(base_url: str, key: str = DEMO_API_KEY) -> Client:
    # The SDK's only notion of a server is this attribute; its fetch loop sleeps fetch_timeout
    # seconds between polls (60 by default).
    client = Client(api_key=key, fetch_retry=30, fetch_timeout=1)
    client.base_url = base_url + "/api/"
    return client


def png(url: str) -> bytes:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, url
    return response.content


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def size_of(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_python_sdk_generates_and_polls(server):
    base_url, _ = server
    images = Community(sdk_client(base_url))

    done = images.text_to_image(Text2Image(prompt="a lighthouse", samples=2, seed=11, **SMALL))
    assert done["status"] == "success", done
    assert len(done["output"]) == 2
    assert all(u.startswith(base_url + "/images/") for u in done["output"])
    assert [size_of(png(u)) for u in done["output"]] == [(64, 64), (64, 64)]

    # instant_response is an extra field to the SDK's schema (extra="allow"): the job answers
    # `processing`, and the SDK's own fetch loop polls it to `success`.
    queued = images.text_to_image(
        Text2Image(prompt="a lighthouse", seed=11, instant_response="yes", **SMALL)
    )
    assert queued["status"] == "processing", queued
    fetched = images.fetch(str(queued["id"]))
    assert fetched["status"] == "success", fetched
    # Same seed and fields as image 0 of the first request: the same picture, up to the
    # rounding a different batch composition may cause (at most 1/255).
    diff = pixels(png(fetched["output"][0])) - pixels(png(done["output"][0]))
    assert np.abs(diff).max() <= 1


def test_python_sdk_async_client(server):
    base_url, _ = server

    async def generate():
        client = sdk_client(base_url)
        async with client:
            return await Community(client).async_text_to_image(
                Text2Image(prompt="a harbour", seed=3, **SMALL)
            )

    result = asyncio.run(generate())
    assert result["status"] == "success", result
    assert size_of(png(result["output"][0])) == (64, 64)


def test_python_sdk_enterprise_client(server):
    base_url, sessions = server
    admin = Community(sdk_client(base_url), enterprise=True)

    result = admin.text_to_image(Text2Image(prompt="a mill", seed=5, **SMALL))
    assert result["status"] == "success", result
    assert admin.fetch(str(result["id"]))["output"] == result["output"]

    # The SDK posts its management calls under /api/v1/enterprise/images/.
    details = admin.system_details()
    assert details["status"] == "success", details
    assert "stable-diffu" in details["models"]
    assert admin.clear_cache()["status"] == "success"
    assert admin.clear_queue()["status"] == "success"
    update = admin.update()
    assert update["status"] == "error"
    assert "update is not supported" in update["message"]

    user_key, _ = KeyStore(sessions).create("sdk-user", "premium")
    denied = Community(sdk_client(base_url, user_key), enterprise=True).system_details()
    assert denied["status"] == "error", denied
    assert "admin" in denied["message"].lower()


def cli(tmp_path: Path, base_url: str, *args: str) -> subprocess.CompletedProcess:
    if not CLI.exists():
        pytest.fail(f"modelslab-cli is not installed at {CLI} (make install installs it)")
    command = [str(CLI), "--base-url", base_url, "--api-key", DEMO_API_KEY, "--no-update-check"]
    env = {**os.environ, "HOME": str(tmp_path), "NO_COLOR": "1"}
    return subprocess.run(
        [*command, "-o", "json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{") :])


@pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"),
    reason="PyPI ships modelslab-cli's binary for Linux x86-64 only",
)
def test_official_cli_generates_downloads_and_fetches(server, tmp_path):
    base_url, _ = server
    generated = tmp_path / "generated"
    run = cli(
        tmp_path,
        base_url,
        "generate",
        "image",
        "--prompt",
        "a lighthouse",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "11",
        "--samples",
        "2",
        "--output-dir",
        str(generated),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = last_json(run.stdout)
    assert result["status"] == "success"
    assert result["meta"]["seed"] == 11
    served = sorted(png(u) for u in result["output"])
    downloaded = sorted(p.read_bytes() for p in generated.glob("*.png"))
    assert downloaded == served and len(served) == 2

    # `generate fetch` posts to /api/v7/images/fetch/{id} and downloads again.
    again = tmp_path / "again"
    run = cli(
        tmp_path,
        base_url,
        "generate",
        "fetch",
        "--id",
        str(result["id"]),
        "--type",
        "image",
        "--output-dir",
        str(again),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert last_json(run.stdout)["output"] == result["output"]
    assert sorted(p.read_bytes() for p in again.glob("*.png")) == served
