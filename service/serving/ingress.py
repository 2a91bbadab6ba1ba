"""The ingress deployment: the HTTP edge. Owns the database, image store and ImageService;
hands generation to the generator deployment through its handle."""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal

from ray import serve
from ray.serve.handle import DeploymentHandle

from service.api.routes import create_app
from service.api.text2img import ImageService
from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams
from service.metrics import get_metrics
from service.pricing import Plan, PriceList
from service.registry import ModelRegistry
from service.store.db import make_engine, make_sessionmaker, migrate
from service.store.errors import KeyNameTaken
from service.store.images import ImageStore
from service.store.jobs import JobStore
from service.store.keys import KeyStore
from service.store.ledger import Ledger

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 5.0


def build_image_service(settings: Settings, generate, metrics=None) -> ImageService:
    """Everything the HTTP layer stands on, wired from settings (also used by unit tests)."""
    engine = make_engine(settings.database_url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    keys = KeyStore(sessions)
    seeds = []
    if settings.demo_key:
        seeds.append((settings.demo_key, "demo", Plan.PAY_PER_USE, settings.demo_key_balance_usd))
    if settings.admin_key:
        seeds.append((settings.admin_key, "admin", Plan.PREMIUM, Decimal(0)))
    for plaintext, name, plan, balance in seeds:
        try:
            keys.ensure(plaintext, name=name, plan=plan, balance=balance, admin=True)
        except KeyNameTaken:
            # Another value was configured before; keep that key rather than rotate silently.
            log.warning("a key named %r already exists with another value; not replacing it", name)
    return ImageService(
        settings,
        jobs=JobStore(sessions, settings),
        keys=keys,
        ledger=Ledger(sessions),
        prices=PriceList.from_settings(settings),
        images=ImageStore(settings.image_store_url),
        registry=ModelRegistry(settings),
        generate=generate,
        metrics=metrics,
    )


@serve.ingress()
class Ingress:
    def __init__(self, generator: DeploymentHandle, settings: Settings):
        self._generator = generator
        self.settings = settings
        self.service = build_image_service(settings, self._generate, get_metrics())

    async def _generate(self, params: GenerationParams) -> GenerationOutput:
        return await self._generator.generate.remote(params)

    async def _generator_ready(self) -> bool:
        try:
            return await asyncio.wait_for(self._generator.ready.remote(), READY_TIMEOUT_S)
        except Exception:
            return False

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings.max_body_bytes, self.settings.strict_http_status)
        app.state.service = self.service
        app.state.ready = self._generator_ready
        return app
