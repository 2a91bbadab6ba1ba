"""Headless Debian Chromium, driven by Playwright, against the real server: Ray Serve, the
diffusers pipeline on the tiny model, SQLite and image files.

Chromium is Debian's (`make browser` installs it): Playwright's own browser download cannot work
here. A missing browser fails these tests rather than skipping them, so CI cannot go green
without having looked at the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from service.config import DEMO_API_KEY
from service.pricing import Plan
from tests.conftest import running_app

CHROMIUM = Path("/usr/bin/chromium")
# As root and on a closed network: no sandbox, and none of Chromium's background traffic.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


@dataclass
class Server:
    base_url: str
    settings: dict
    demo_key: str = DEMO_API_KEY

    def create_key(self, name: str, plan: Plan, balance: Decimal = Decimal(0)) -> str:
        """A key made directly in the server's database, as `sdserve keys create` would."""
        from service.store.db import make_engine, make_sessionmaker
        from service.store.keys import KeyStore

        engine = make_engine(self.settings["database_url"])
        try:
            plaintext, _ = KeyStore(make_sessionmaker(engine)).create(name, plan, balance)
        finally:
            engine.dispose()
        return plaintext


@pytest.fixture(scope="module")
def browser():
    """Chromium for one test module. Playwright's sync API keeps an event loop running in this
    thread while it is started, so it must stop before other tests call asyncio.run()."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: `make browser` installs Debian's chromium", pytrace=False
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from service.engine.tiny_model import (
        build_tiny_embedding,
        build_tiny_safety_checker,
        build_tiny_upscaler,
        build_tiny_vae,
    )

    tmp = tmp_path_factory.mktemp("browser")
    build_tiny_embedding(tiny_model_dir, tmp / "embeddings" / "moody.pt", vectors=2)
    build_tiny_vae(tiny_model_dir, tmp / "vaes" / "crisp.safetensors", seed=5, layout="ldm")
    settings = {
        "sync_window_s": 60,
        "free_images_per_month": 5,
        "embeddings_dir": str(tmp / "embeddings"),
        "vae_dir": str(tmp / "vaes"),
        "upscaler": str(build_tiny_upscaler(tmp / "x2.pth", scale=2)),
        # flags every image it is asked to check
        "safety_checker": str(build_tiny_safety_checker(tmp / "checker", flags="all")),
    }
    with running_app(tmp, tiny_model_dir, settings=settings) as (base_url, app_settings):
        yield Server(base_url, app_settings)


@pytest.fixture()
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def _new_page(browser, server, viewport):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(30_000)
    outside: list[str] = []
    page.on(
        "request",
        lambda request: (
            None
            if request.url.startswith((server.base_url, "data:", "blob:"))
            else outside.append(request.url)
        ),
    )
    return context, page, outside


@pytest.fixture()
def page(browser, server):
    """A desktop-sized page in a fresh profile; fails if it fetched anything from elsewhere."""
    context, page, outside = _new_page(browser, server, DESKTOP)
    yield page
    context.close()
    assert outside == [], f"the page fetched from outside this server: {outside}"


@pytest.fixture()
def phone_page(browser, server):
    context, page, outside = _new_page(browser, server, PHONE)
    yield page
    context.close()
    assert outside == [], f"the page fetched from outside this server: {outside}"
