"""The ingress deployment: the HTTP edge. Owns the database, image store and ImageService;
hands generation to the generator deployment through its handle."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from service.api.routes import create_app
from service.api.text2img import ImageService
from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams
from service.metrics import get_metrics
from service.pricing import Plan, PriceList
from service.registry import ModelRegistry
from service.serving.generator import ReplicaUnusable
from service.serving.logs import route_service_logs_through_serve
from service.store.db import make_engine, make_sessionmaker, migrate
from service.store.errors import KeyNameTaken
from service.store.images import ImageStore
from service.store.jobs import JobStore
from service.store.keys import KeyStore, KeyValueTaken
from service.store.ledger import Ledger

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 5.0
IO_THREADS = 32
REPLICA_ATTEMPTS = 3
REPLICA_RETRY_DELAY_S = 1.0
# A replica that refuses as unusable stays routable until it fails 3 health checks (10 s
# apart by default); its replacement then loads and warms its models.
UNUSABLE_RETRY_S = 180.0
UNUSABLE_RETRY_DELAY_S = 5.0
CANCEL_TIMEOUT_S = 10.0
# A replica that died, was replaced mid-request, or refused the request as unusable: the
# request never ran to completion there, so it is safe to send it again (seeds make the result
# the same).
REPLICA_GONE = (RayActorError, ActorUnavailableError, ReplicaUnusable)


def build_image_service(settings: Settings, generate, metrics=None) -> ImageService:
    """Everything the HTTP layer stands on, wired from settings (also used by unit tests)."""
    engine = make_engine(settings.database_url)
    migrate(engine)
    sessions = make_sessionmaker(engine)
    keys = KeyStore(sessions)
    seeds = []
    if settings.demo_key:
        demo = (settings.demo_key, "demo", Plan.PAY_PER_USE, settings.demo_key_balance_usd)
        seeds.append(("SDSERVE_DEMO_KEY", *demo))
    if settings.admin_key:
        seeds.append(("SDSERVE_ADMIN_KEY", settings.admin_key, "admin", Plan.PREMIUM, Decimal(0)))
    for setting, plaintext, name, plan, balance in seeds:
        # A changed value rotates the named key in place (its old value stops working; the
        # store logs it); an unchanged one leaves the key as it is, revoked or not.
        try:
            key = keys.ensure(plaintext, name=name, plan=plan, balance=balance, admin=True)
        except KeyValueTaken as exc:
            log.error("%s: not seeding the key named %r: %s", setting, name, exc)
            continue
        except KeyNameTaken:
            log.error(
                "%s: not seeding it: the name %r belongs to a key made otherwise (another plan "
                "or admin flag), which keeps it; this value works nowhere",
                setting,
                name,
            )
            continue
        if key.revoked:
            log.warning(
                "%s: the key named %r (id %d) is revoked and this is still its value: it stays "
                "revoked; configure a new value to rotate it into use",
                setting,
                name,
                key.id,
            )
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


class GeneratorFleet:
    """The generator deployment as the ingress sees it: generation routed by model, retried
    when a replica dies under it, and the per-replica operations of the enterprise routes.

    Requests for one model that arrive within `window_s` of each other travel in one Ray call
    (up to `max_per_call`): a Serve call costs both replicas milliseconds of CPU, more than
    the ingress's own work per request. The call streams each request's answer back as it is
    ready, so a short request never waits for a long one it travelled with; a failure fails
    only its own request.
    """

    def __init__(self, handle: DeploymentHandle, *, max_per_call: int = 1, window_s: float = 0):
        self._handle = handle
        self._max_per_call = max_per_call
        self._window_s = window_s
        self._gathering: dict[str, _Call] = {}
        self._sent: set[asyncio.Task] = set()

    def _for_model(self, model_id: str, stream: bool = False) -> DeploymentHandle:
        if stream:
            return self._handle.options(multiplexed_model_id=model_id, stream=True)
        return self._handle.options(multiplexed_model_id=model_id)

    async def generate(self, params: GenerationParams) -> GenerationOutput:
        if self._max_per_call <= 1:
            return await _with_replica_retries(
                lambda: self._for_model(params.model_id).generate.remote(params), _answer
            )
        loop = asyncio.get_running_loop()
        call = self._gathering.get(params.model_id)
        if call is None:
            call = self._gathering[params.model_id] = _Call(params.model_id)
            loop.call_later(self._window_s, self._send, call)
        request = _Request(params, loop.create_future(), uuid.uuid4().hex)
        call.waiting.append(request)
        if len(call.waiting) >= self._max_per_call:
            self._send(call)
        try:
            return await request.answer
        except asyncio.CancelledError:
            # clear_queue, or the job moved elsewhere: stop its work on the generator
            if call.task is not None and not call.task.done():
                if all(r.answer.done() for r in call.waiting):
                    call.task.cancel()  # nothing of the call is still wanted: stop it whole
                else:
                    self._in_background(self._cancel_on_generators([request.token]))
            raise

    async def _cancel_on_generators(self, tokens: list[str]) -> None:
        """Cancel requests of a shared call that others of it still run: the call streams on,
        so the replica holding them is told directly (every replica is, being rare)."""
        try:
            await self._handle.broadcast("cancel_requests", tokens).results_async(
                timeout_s=CANCEL_TIMEOUT_S, return_exceptions=True
            )
        except Exception:
            log.exception("cancelling %d requests on the generators failed", len(tokens))

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._sent.add(task)
        task.add_done_callback(self._sent.discard)

    def _send(self, call: _Call) -> None:
        if call.task is not None:
            return  # already sent when it filled up, before its window ended
        if self._gathering.get(call.model_id) is call:
            del self._gathering[call.model_id]
        call.task = asyncio.get_running_loop().create_task(self._run(call))
        self._sent.add(call.task)
        call.task.add_done_callback(self._sent.discard)

    async def _run(self, call: _Call) -> None:
        def send():
            # a retry carries only the requests still waiting; none left, nothing to send
            call.live = [r for r in call.waiting if not r.answer.done()]
            if not call.live:
                return None
            stream = self._for_model(call.model_id, stream=True)
            return stream.generate_stream.remote(
                [r.params for r in call.live], [r.token for r in call.live]
            )

        async def answer_each(stream) -> None:
            gone: BaseException | None = None
            async for index, result in stream:
                answer = call.live[index].answer
                if answer.done():
                    continue
                if isinstance(result, REPLICA_GONE):
                    gone = result  # its replica went bad under it: sent again, below
                elif isinstance(result, BaseException):
                    answer.set_exception(result)
                else:
                    answer.set_result(result)
            if gone is not None:
                raise gone

        try:
            await _with_replica_retries(send, answer_each)
        except asyncio.CancelledError:
            for request in call.waiting:
                request.answer.cancel()
            raise
        except Exception as exc:
            for request in call.live:
                if not request.answer.done():
                    request.answer.set_exception(exc)
            return
        for request in call.live:  # the stream ended without them: never left unanswered
            if not request.answer.done():
                request.answer.set_exception(
                    RuntimeError("the generator's answer stream ended early")
                )

    async def ready(self) -> bool:
        try:
            return await asyncio.wait_for(self._handle.ready.remote(), READY_TIMEOUT_S)
        except Exception:
            return False

    async def details(self) -> dict:
        return await self._handle.details.remote()

    async def load_model(self, model_id: str, reload: bool) -> dict:
        return await self._for_model(model_id).load_model.remote(model_id, reload)

    async def clear_cache(self) -> dict:
        return await self._handle.clear_cache.remote()

    async def restart(self) -> dict:
        return await self._handle.request_restart.remote()


@dataclass
class _Request:
    """One request of a generator call: its answer, and the token the generator knows it by."""

    params: GenerationParams
    answer: asyncio.Future
    token: str


class _Call:
    """Requests gathered for one generator call."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.waiting: list[_Request] = []
        self.live: list[_Request] = []
        self.task: asyncio.Task | None = None


async def _answer(response):
    return await response


async def _with_replica_retries(send, consume):
    """`consume(send())`, again (a new call) while the replica it went to died or refused as
    unusable; `send()` giving None: nothing left to send. Cancelled, it cancels the call
    itself: Serve does not stop a request whose caller stopped waiting."""
    loop = asyncio.get_running_loop()
    unusable_until: float | None = None
    for attempt in itertools.count(1):
        response = send()
        if response is None:
            return None
        try:
            return await consume(response)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except REPLICA_GONE as exc:
            response.cancel()  # a replica only unreachable for a while must not run it too
            if isinstance(exc, ReplicaUnusable):
                # Serve routes to a bad replica until it has failed 3 health checks, and
                # replaces it after: the request waits that out rather than fail.
                unusable_until = unusable_until or loop.time() + UNUSABLE_RETRY_S
                if loop.time() >= unusable_until:
                    raise
                delay = UNUSABLE_RETRY_DELAY_S
            else:
                if attempt >= REPLICA_ATTEMPTS:
                    raise
                delay = REPLICA_RETRY_DELAY_S * attempt
            log.warning(
                "generator replica lost or unusable (%s); sending again, attempt %d",
                type(exc).__name__,
                attempt + 1,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


@serve.ingress()
class Ingress:
    def __init__(self, generator: DeploymentHandle, settings: Settings):
        route_service_logs_through_serve()
        self.fleet = GeneratorFleet(
            generator,
            max_per_call=settings.generator_call_max_requests,
            window_s=settings.generator_call_window_s,
        )
        self.settings = settings
        self.service = build_image_service(settings, self.fleet.generate, get_metrics())

    def __serve_build_asgi_app__(self):
        app = create_app(self.settings.max_body_bytes, self.settings.strict_http_status)
        app.state.service = self.service
        app.state.fleet = self.fleet
        service = self.service

        @contextlib.asynccontextmanager
        async def lifespan(_app):
            # Database and storage calls run in threads; the default pool (cores + 4) is
            # too small for a few hundred jobs in flight.
            asyncio.get_running_loop().set_default_executor(
                ThreadPoolExecutor(IO_THREADS, thread_name_prefix="sdserve-io")
            )
            # Heartbeats for this replica's jobs, and take-over of dead replicas' jobs.
            maintenance = asyncio.create_task(service.maintain())
            yield
            maintenance.cancel()

        app.router.lifespan_context = lifespan
        return app
