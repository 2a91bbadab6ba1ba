"""The text-to-image request lifecycle, independent of HTTP framework and of Ray.

accept (auth, validate, reserve, job row) -> generate (injected) -> store images -> settle
-> webhook. A request waits up to the sync window for its images; past it, or with
`instant_response`, it answers `processing` and the job finishes in the background.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import date

from sqlalchemy.exc import OperationalError

from service.api.errors import ApiError, ErrorKind
from service.api.protocol import FetchRequest, KeyedRequest, RequestError, Text2ImgRequest
from service.api.webhooks import WebhookPolicy, WebhookRefused, WebhookSender
from service.config import Settings
from service.engine.protocol import GenerationOutput, GenerationParams
from service.metrics import Metrics, NoMetrics, resolution_bucket
from service.pricing import PriceList, micros_to_usd
from service.registry import ModelRegistry
from service.store.errors import (
    ConcurrencyLimitExceeded,
    DuplicateRequest,
    IdempotencyKeyReused,
    InsufficientCredit,
    InvalidApiKey,
    KeyNotFound,
)
from service.store.images import ImageStore, output_names
from service.store.jobs import JobRecord, JobStatus, JobStore
from service.store.keys import KeyRecord, KeyStore, hash_key
from service.store.ledger import Ledger, usage_document

log = logging.getLogger(__name__)

GenerateFn = Callable[[GenerationParams], Awaitable[GenerationOutput]]

MAX_JOB_ID = 2**63 - 1
# Recording a generated job's end is tried again over a database blip (a dropped connection,
# SQLite's "database is locked"): the images exist, and failing the job would discard them.
SETTLE_ATTEMPTS = 4
SETTLE_BACKOFF_S = 0.25
# ... and after that, whether a commit whose answer was lost had landed, for about 5 minutes.
RECONCILE_ATTEMPTS = 12
RECONCILE_FIRST_DELAY_S = 1.0
RECONCILE_MAX_DELAY_S = 30.0
KEY_CACHE_TTL_S = 5.0
KEY_CACHE_SIZE = 10_000

# Each API generation answers with fetch links of its own family.
FETCH_PATHS = {
    "v6": "/api/v6/images/fetch/{id}",
    "v7": "/api/v7/images/fetch/{id}",
    "v3": "/api/v3/fetch/{id}",
    "v4": "/api/v4/dreambooth/fetch/{id}",
    "enterprise": "/api/v1/enterprise/images/fetch/{id}",
}


class ImageStoreError(RuntimeError):
    """Images could not be written; the job fails and is refunded."""


class ImageService:
    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobStore,
        keys: KeyStore,
        ledger: Ledger,
        prices: PriceList,
        images: ImageStore,
        registry: ModelRegistry,
        generate: GenerateFn,
        metrics: Metrics | NoMetrics | None = None,
    ):
        self.settings = settings
        self.jobs = jobs
        self.keys = keys
        self.ledger = ledger
        self.prices = prices
        self.images = images
        self.registry = registry
        self._generate = generate
        self.metrics = metrics or NoMetrics()
        self._base_url = settings.public_base_url.rstrip("/")
        self._image_base = (settings.image_url_base or f"{self._base_url}/images").rstrip("/")
        self._running: dict[int, asyncio.Task] = {}
        # requests past the max_inflight_jobs check whose job row is being written: they count
        # against the bound too, or a burst passes the check before any of them has started
        self._admitting = 0
        self._webhooks: set[asyncio.Task] = set()
        self._background: set[asyncio.Task] = set()
        self._known_keys: dict[str, tuple[KeyRecord, float]] = {}
        # who runs a job: its heartbeats say this process is alive (see maintain)
        self.owner = job_owner(socket.gethostname(), os.getpid())

    # ---- auth ---------------------------------------------------------------------------------

    async def authenticate(
        self, body: KeyedRequest, headers: dict[str, str], *, may_cache: bool = False
    ) -> KeyRecord:
        """The key's record, or an "Invalid API key" error.

        `may_cache` lets a key known valid a moment ago skip the database: only for text2img,
        whose job creation re-reads and locks the key row (so a revoked key is still refused
        at once there) and bills against the balance stored, never the cached one.
        """
        plaintext = body.key or _key_from_headers(headers)
        if not plaintext:
            raise ApiError(ErrorKind.AUTH, "Invalid API key: key is required")
        plaintext = plaintext.strip()
        now = time.monotonic()
        digest = hash_key(plaintext)  # the cache never holds a key itself
        if may_cache:
            cached = self._known_keys.get(digest)
            if cached is not None and cached[1] > now:
                return cached[0]
        try:
            record = await asyncio.to_thread(self.keys.authenticate, plaintext)
        except InvalidApiKey as exc:  # expired
            record, refusal = None, exc.message
        else:
            refusal = "Invalid API key"
        if record is None:
            self._known_keys.pop(digest, None)
            raise ApiError(ErrorKind.AUTH, refusal)
        if len(self._known_keys) >= KEY_CACHE_SIZE:
            self._known_keys.clear()
        self._known_keys[digest] = (record, now + KEY_CACHE_TTL_S)
        return record

    async def authenticate_admin(self, body: KeyedRequest, headers: dict[str, str]) -> KeyRecord:
        key = await self.authenticate(body, headers)
        if not key.admin:
            raise ApiError(ErrorKind.FORBIDDEN, "This endpoint needs an admin API key")
        return key

    async def usage(self, key_name: str | None, since: date | None) -> dict:
        try:
            rows = await asyncio.to_thread(self.ledger.usage, key_name, since)
        except KeyNotFound:
            raise ApiError(ErrorKind.NOT_FOUND, f"No API key named '{key_name}'") from None
        return {"status": "success", **usage_document(rows)}

    # ---- text2img -----------------------------------------------------------------------------

    async def text2img(
        self, body: Text2ImgRequest, headers: dict[str, str], family: str, route: str = ""
    ) -> dict:
        started = time.perf_counter()
        key = await self.authenticate(body, headers, may_cache=True)
        if body.ignored_fields():
            log.info("ignored unknown fields: %s", ", ".join(body.ignored_fields()))
        try:
            params, options = body.to_params(
                self.settings,
                self.registry.infos(),
                self.registry.lora_ids(),
                self.registry.embedding_ids(),
                self.registry.vae_ids(),
            )
        except RequestError as exc:
            raise ApiError(ErrorKind.VALIDATION, str(exc)) from None
        if options["webhook"]:
            try:
                self.webhook_policy().parse(options["webhook"])
            except WebhookRefused as exc:
                raise ApiError(ErrorKind.VALIDATION, str(exc)) from None
        idempotency_key = _idempotency_key(headers)
        fingerprint = _fingerprint(body) if idempotency_key else None
        self.metrics.stage("validation", params.model_id, time.perf_counter() - started)

        inflight = len(self._running) + self._admitting
        if inflight >= self.settings.max_inflight_jobs:
            self.metrics.rate_limit(key.plan.value)
            raise ApiError(
                ErrorKind.RATE_LIMIT,
                f"Server busy: {inflight} jobs are queued or running; retry later",
                retry_after=self._eta(params) * 2,
            )
        job_uuid = str(uuid.uuid4())
        file_prefix = uuid.uuid4().hex
        names = output_names(file_prefix, params.samples, options["base64"], options["temp"])
        meta = self._meta(params, options, current_request_id() or job_uuid, file_prefix)
        self._admitting += 1
        try:
            job = await asyncio.to_thread(
                self.jobs.create,
                request_id=job_uuid,
                key=key,
                model_id=params.model_id,
                samples=params.samples,
                params=asdict(params),
                meta=meta,
                output_names=names,
                unit_price=self.prices.price_per_image(params.model_id),
                webhook=options["webhook"],
                track_id=options["track_id"],
                owner=self.owner,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            )
        except DuplicateRequest as duplicate:  # a retry: the first job, nothing charged again
            body = await self.job_body(duplicate.job.id, family, duplicate.job)
            self.metrics.request_done(
                route, params.model_id, body["status"], time.perf_counter() - started
            )
            return body
        except IdempotencyKeyReused as exc:
            raise ApiError(ErrorKind.VALIDATION, str(exc)) from None
        except ConcurrencyLimitExceeded as exc:
            self.metrics.rate_limit(key.plan.value)
            raise ApiError(
                ErrorKind.RATE_LIMIT,
                f"Too many requests: at most {exc.limit} requests of this key may be queued "
                "or running at once",
                retry_after=self._eta(params),
            ) from None
        except InsufficientCredit as exc:
            raise ApiError(ErrorKind.CREDIT, str(exc)) from None
        except InvalidApiKey as exc:  # revoked or expired between authenticate and create
            raise ApiError(ErrorKind.AUTH, exc.message) from None
        finally:
            self._admitting -= 1

        task = self._start(job, params, key)  # no await since the finally: the count holds

        if options["instant_response"]:
            body = self._processing_body(job, family, "Request accepted; fetch the result later")
        else:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.settings.sync_window_s)
            except TimeoutError:
                body = self._processing_body(job, family, "Request is processing; fetch it later")
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this request itself was cancelled (client gone)
                body = await self._answer(job, family)  # cancelled by clear_queue
            except Exception:
                body = await self._answer(job, family)  # the job row says how it failed
            else:
                body = await self._answer(job, family, task.result())
        self.metrics.request_done(
            route, params.model_id, body["status"], time.perf_counter() - started
        )
        return body

    def _start(self, job: JobRecord, params: GenerationParams, key: KeyRecord) -> asyncio.Task:
        task = asyncio.create_task(self._run(job, params, key))
        self._running[job.id] = task
        self.metrics.set_inflight(len(self._running))
        task.add_done_callback(lambda t, job_id=job.id: self._job_ended(job_id, t))
        return task

    def _job_ended(self, job_id: int, task: asyncio.Task) -> None:
        self._running.pop(job_id, None)
        self.metrics.set_inflight(len(self._running))
        if not task.cancelled():
            task.exception()  # logged by _run; retrieved, so asyncio does not log it again

    def _meta(self, params: GenerationParams, options: dict, request_id: str, prefix: str) -> dict:
        return {
            "prompt": params.prompt,
            "model_id": params.model_id,
            "negative_prompt": params.negative_prompt,
            "scheduler": params.scheduler,
            "W": params.width,
            "H": params.height,
            "width": params.width,
            "height": params.height,
            "guidance_scale": params.guidance_scale,
            "seed": params.seed,
            "steps": params.num_inference_steps,
            "n_samples": params.samples,
            "use_karras_sigmas": "yes" if params.use_karras_sigmas else "no",
            "algorithm_type": params.algorithm_type or "none",
            "lora": ",".join(lora_id for lora_id, _ in params.loras) or None,
            "lora_strength": ",".join(f"{w:g}" for _, w in params.loras) or None,
            "clip_skip": params.clip_skip,
            "embeddings_model": ",".join(params.embeddings) or None,
            "vae": params.vae,
            "upscale": params.upscale if params.upscale > 1 else "no",
            "tomesd": "yes" if params.tomesd else "no",
            "self_attention": "yes" if params.self_attention else "no",
            "highres_fix": "yes" if params.highres_fix else "no",
            "safety_checker": "yes" if params.safety_checker else "no",
            "safety_checker_type": params.safety_checker_type if params.safety_checker else None,
            "base64": "yes" if options["base64"] else "no",
            "temp": "yes" if options["temp"] else "no",
            "instant_response": "yes" if options["instant_response"] else "no",
            "track_id": options["track_id"],
            "webhook": options["webhook"],
            "file_prefix": prefix,
            "request_id": request_id,
            "not_applied": options["not_applied"],
        }

    async def _run(
        self, job: JobRecord, params: GenerationParams, key: KeyRecord
    ) -> JobRecord | None:
        """Generate, store, settle; on any failure mark the job failed (which releases its
        reservation). Exactly one of the two happens, whatever else runs concurrently.
        Returns the finished job, or None if something else ended it first."""
        started = time.perf_counter()
        resolution = resolution_bucket(params.width, params.height)
        ended_here = False  # the webhook goes out from whoever ended the job, once
        try:
            output = await self._generate(params)
            # storing and settling in one trip to a thread: each trip costs the event loop
            # a hand-over, which adds up at hundreds of requests a second
            settled = await asyncio.to_thread(self._deliver, job, output, started)
            ended_here = settled is not None
        except EndNotRecorded:
            # The job stays processing with its reservation; its heartbeat stops with this
            # task, so the sweep takes it over once the database answers (same seed and names).
            # Unless its last commit landed after all: _reconcile finds out.
            log.warning("job %s: generated, but its end could not be recorded", job.id)
            self._in_background(self._reconcile(job, params, key, started))
            raise
        except Exception as exc:
            log.exception("job %s failed", job.id)
            message = f"Image generation failed: {_short_reason(exc)}"
            try:
                failed_here = await asyncio.to_thread(
                    self.jobs.fail, job.id, message, owner=self.owner
                )
            except OperationalError:
                log.warning(
                    "job %s: its failure could not be recorded; it stays processing for the "
                    "sweep to take over",
                    job.id,
                )
                raise
            if failed_here:  # else ended elsewhere, and counted by whoever ended it
                ended_here = True
                await asyncio.to_thread(self._withdraw, job)  # a partial write
                elapsed = time.perf_counter() - started
                self.metrics.job_done(params.model_id, resolution, "failed", elapsed)
            raise
        else:
            if settled:  # None: ended elsewhere, and counted by whoever ended it
                self._count_success(params, key, started, settled.charged_micros or 0)
            return settled
        finally:
            if job.webhook and ended_here:
                self._notify(job.id)

    def _count_success(
        self, params: GenerationParams, key: KeyRecord, started: float, charged_micros: int
    ) -> None:
        """`charged_micros`: what the ledger settled, at the price the job was reserved at."""
        self.metrics.billed(params.model_id, key.plan.value, micros_to_usd(charged_micros))
        resolution = resolution_bucket(params.width, params.height)
        elapsed = time.perf_counter() - started
        self.metrics.job_done(params.model_id, resolution, "success", elapsed)

    async def _reconcile(
        self, job: JobRecord, params: GenerationParams, key: KeyRecord, started: float
    ) -> None:
        """After EndNotRecorded: the last commit may have landed with its answer lost. Once the
        database answers, a success of this very attempt is announced here (metrics, webhook),
        since nobody else will; a job still processing is the sweep's to take over."""
        delay = RECONCILE_FIRST_DELAY_S
        for _ in range(RECONCILE_ATTEMPTS):
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONCILE_MAX_DELAY_S)
            try:
                current = await asyncio.to_thread(self.jobs.get, job.id)
            except OperationalError:
                continue
            if (
                current is not None
                and current.status is JobStatus.SUCCESS
                and current.owner == self.owner
                and current.attempts == job.attempts
            ):
                log.info("job %s: its end had been recorded after all", job.id)
                charged = await asyncio.to_thread(self.ledger.settled_charge, job.id)
                self._count_success(params, key, started, charged)
                if job.webhook:
                    self._notify(job.id)
            return
        log.warning("job %s: the database never answered whether its end was recorded", job.id)

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _deliver(
        self, job: JobRecord, output: GenerationOutput, started: float
    ) -> JobRecord | None:
        """Write the images, then mark the job successful and settle (in a worker thread)."""
        stored = time.perf_counter()
        try:
            self._store_images(job.output_names, output.images)
        except OSError as exc:  # its text names server paths: keep it in the log only
            log.exception("job %s: image store write failed", job.id)
            raise ImageStoreError("the image store could not be written") from exc
        self.metrics.stage("storage", job.model_id, time.perf_counter() - stored)
        updates = {
            "seed": output.seed,
            "batch_size": output.batch_size,
            "inference_seconds": round(output.inference_seconds, 4),
            "prompt_truncated": output.prompt_truncated,
        }
        if "nsfw_flags" in output.extra:
            updates["nsfw_flags"] = output.extra["nsfw_flags"]
        elapsed = round(time.perf_counter() - started, 4)
        finished = self._finish(job, elapsed, updates)
        if finished is None:
            # Failed and refunded meanwhile (clear_queue, or a take-over that gave up): what
            # was not charged must not be served at the links the client already holds. A job
            # another replica took over keeps them: that replica writes the same images.
            current = self.jobs.get(job.id)
            if current is None or current.status is JobStatus.FAILED:
                self._withdraw(job)
        return finished

    def _finish(self, job: JobRecord, elapsed: float, updates: dict) -> JobRecord | None:
        """`jobs.finish`, tried again while the database errs; EndNotRecorded if it still does.

        A commit can succeed and still raise (the connection dropped before its answer): then
        the next try finds the job ended, by this replica, as a success, and that is this end.
        """
        delay = SETTLE_BACKOFF_S
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                finished = self.jobs.finish(
                    job.id, generation_time=elapsed, meta_updates=updates, owner=self.owner
                )
            except OperationalError as exc:
                log.warning(
                    "job %s: recording its end failed (attempt %d of %d): %s",
                    job.id,
                    attempt,
                    SETTLE_ATTEMPTS,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
                if attempt == SETTLE_ATTEMPTS:
                    raise EndNotRecorded(job.id) from exc
                time.sleep(delay)
                delay *= 2
                continue
            if finished is None and attempt > 1:
                current = self.jobs.get(job.id)
                if (
                    current is not None
                    and current.status is JobStatus.SUCCESS
                    and current.owner == self.owner
                ):
                    return current
            return finished
        raise AssertionError("unreachable")

    def _withdraw(self, job: JobRecord) -> None:
        """Remove the images of a job that ended failed; a store error is logged, not raised
        over the job's own outcome."""
        try:
            self.images.delete(job.output_names)
        except Exception:
            log.exception("job %s: its images could not be removed from the store", job.id)

    def _store_images(self, names: list[str], images: list) -> None:
        if len(images) != len(names):
            raise RuntimeError(f"generator returned {len(images)} images, expected {len(names)}")
        for name, image in zip(names, images, strict=True):
            self.images.write(name, image)

    # ---- fetch --------------------------------------------------------------------------------

    async def fetch(
        self, body: FetchRequest, headers: dict[str, str], job_id: int | None, family: str
    ) -> dict:
        key = await self.authenticate(body, headers)
        job_id = job_id if job_id is not None else body.request_id
        if job_id is None:
            raise ApiError(ErrorKind.VALIDATION, "request_id is required")
        if not 1 <= job_id <= MAX_JOB_ID:  # beyond the id column: no such job, say so
            raise ApiError(ErrorKind.NOT_FOUND, f"Request id {job_id} not found")
        job = await asyncio.to_thread(self.jobs.get, job_id)
        # Another key's job is reported exactly like a missing one.
        if job is None or job.key_hash != key.key_hash:
            raise ApiError(ErrorKind.NOT_FOUND, f"Request id {job_id} not found")
        return await self.job_body(job_id, family, job)

    async def job_body(self, job_id: int, family: str, job: JobRecord | None = None) -> dict:
        job = job or await asyncio.to_thread(self.jobs.get, job_id)
        if job.status is JobStatus.SUCCESS:
            urls = self.urls(job.output_names)
            return {
                "status": "success",
                "generationTime": job.generation_time,
                "id": job.id,
                "output": urls,
                "proxy_links": urls,
                "nsfw_content_detected": any(job.meta.get("nsfw_flags") or ()),
                "webhook_status": job.webhook_status,
                "tip": "",
                "meta": job.meta,
            }
        if job.status is JobStatus.FAILED:
            return {
                "status": "failed",
                "id": job.id,
                "message": job.message,
                "messege": job.message,
                "output": [],
                "webhook_status": job.webhook_status,
                "track_id": job.track_id,
            }
        return self._processing_body(job, family, "Request is processing")

    async def _answer(self, job: JobRecord, family: str, ended: JobRecord | None = None) -> dict:
        """The answer to a request that waited for its job. The job row exists, so when the
        database cannot say how it ended the client still gets its id and fetch link: the job
        is finished (and charged once) when the database is back, and fetching tells."""
        try:
            return await self.job_body(job.id, family, ended)
        except OperationalError:
            return self._processing_body(
                job,
                family,
                "Request is processing; the database is briefly unreachable: "
                "fetch the result later",
            )

    def _processing_body(self, job: JobRecord, family: str, message: str) -> dict:
        return {
            "status": "processing",
            "id": job.id,
            "eta": self._eta(GenerationParams.from_dict(job.params)),
            "message": message,
            "messege": message,
            "fetch_result": self._base_url + FETCH_PATHS[family].format(id=job.id),
            "output": [],
            "future_links": self.urls(job.output_names),
            "webhook_status": job.webhook_status,
            "tip": "",
            "meta": job.meta,
        }

    def urls(self, names: list[str]) -> list[str]:
        return [f"{self._image_base}/{name}" for name in names]

    def _eta(self, params: GenerationParams) -> float:
        pixels = params.width * params.height / (768 * 768)
        per_image = params.num_inference_steps * self.settings.eta_seconds_per_step * pixels
        return round(max(1.0, per_image * params.samples), 2)

    # ---- load ---------------------------------------------------------------------------------

    async def system_load(self) -> dict:
        processing = await asyncio.to_thread(self.jobs.processing)
        queue_time = sum(self._eta(GenerationParams.from_dict(job.params)) for job in processing)
        return {"queue_num": len(processing), "queue_time": round(queue_time, 2), "status": "ok"}

    async def processing_count(self, key: KeyRecord) -> int:
        return await asyncio.to_thread(self.jobs.count_processing, key.key_hash)

    # ---- webhooks -----------------------------------------------------------------------------

    def webhook_policy(self) -> WebhookPolicy:
        """Which webhook URLs this server may POST to (see service.api.webhooks)."""
        return WebhookPolicy(self.settings.webhook_allowed_hosts)

    async def _deliver_webhook(self, job_id: int) -> None:
        """POST the fetch body (failure: status failed) a bounded number of times with backoff;
        a 2xx within the timeout counts as delivered. Never affects the job itself.

        A job still processing is not announced: its run stopped before it could end (the
        database was unreachable, the process is stopping) and whoever takes it over notifies.
        """
        settings = self.settings
        sender = WebhookSender(
            self.webhook_policy(),
            attempts=settings.webhook_attempts,
            timeout_s=settings.webhook_timeout_s,
            backoff_s=settings.webhook_backoff_s,
            secret=settings.webhook_secret,
        )
        try:
            job = await self._job_for_webhook(job_id)
            if job is None or job.status is JobStatus.PROCESSING or not job.webhook:
                return
            payload = await self.job_body(job_id, "v6", job)
            payload["track_id"] = job.track_id
            status = await sender.deliver(job.webhook, payload, label=f"for job {job_id}")
            await asyncio.to_thread(self.jobs.set_webhook_status, job_id, status)
        except Exception:
            log.exception("webhook for job %s could not be handled", job_id)

    async def _job_for_webhook(self, job_id: int) -> JobRecord | None:
        """The job row, read again a few times while the database cannot be reached."""
        delay = self.settings.webhook_backoff_s
        for attempt in range(1, self.settings.webhook_attempts + 1):
            try:
                return await asyncio.to_thread(self.jobs.get, job_id)
            except OperationalError:
                if attempt == self.settings.webhook_attempts:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        return None

    # ---- jobs of dead processes -----------------------------------------------------------------

    async def maintain(self) -> None:
        """Forever: keep this replica's jobs alive and take over those of dead replicas; prune
        the image store now and then."""
        next_prune = time.monotonic()
        pruning: asyncio.Task | None = None
        while True:
            try:
                await self.maintain_once()
            except Exception:
                log.exception("job maintenance failed; retrying")
            # Beside the heartbeats, not between them: walking a large bucket can outlast
            # `orphan_after_s`, and a replica that misses its beats has its jobs taken over.
            if time.monotonic() >= next_prune and (pruning is None or pruning.done()):
                next_prune = time.monotonic() + self.settings.image_prune_interval_s
                pruning = asyncio.create_task(self._prune_in_background())
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _prune_in_background(self) -> None:
        try:
            await asyncio.to_thread(self.prune_images)
        except Exception:
            log.exception("pruning the image store failed; retrying later")

    def prune_images(self) -> int:
        """Delete expired `temp` images, interrupted writes, and images past the retention."""
        days = self.settings.image_retention_days
        removed = self.images.prune(None if days is None else days * 86400)
        if removed:
            log.info("pruned %d files from the image store", removed)
        return removed

    async def maintain_once(self) -> tuple[list[int], list[int]]:
        """One round: heartbeat the running jobs, then re-dispatch (or fail and refund, after
        `max_job_attempts`) every processing job whose owner stopped beating. Returns the ids
        re-dispatched and failed."""
        lost = await asyncio.to_thread(self.jobs.heartbeat, self.owner, list(self._running))
        await self._stop_lost_jobs(lost)
        # No more than this replica has room for (max_inflight_jobs): the rest are left to
        # other replicas, or to the next rounds here.
        room = self.settings.max_inflight_jobs - len(self._running)
        if room <= 0:
            return [], []
        claimed, failed = await asyncio.to_thread(
            self.jobs.claim_orphans,
            self.owner,
            self.settings.orphan_after_s,
            self.settings.max_job_attempts,
            room,
        )
        for job in claimed:
            key = await asyncio.to_thread(self.keys.by_hash, job.key_hash)
            if key is None:  # the key row is gone: nothing to bill, nothing to run
                ended = await asyncio.to_thread(self.jobs.fail, job.id, "API key no longer exists")
                if ended and job.webhook:
                    self._notify(job.id)
                continue
            log.warning(
                "re-dispatching job %s (attempt %s) after its server died", job.id, job.attempts
            )
            self._start(job, GenerationParams.from_dict(job.params), key)
        for job_id in failed:
            job = await asyncio.to_thread(self.jobs.get, job_id)
            if job is None:
                continue
            await asyncio.to_thread(self._withdraw, job)  # what a dead attempt wrote
            if job.webhook:
                self._notify(job.id)
        return [job.id for job in claimed], failed

    async def _stop_lost_jobs(self, job_ids: list[int]) -> None:
        """Stop generating jobs that ended elsewhere (clear_queue on another replica) or were
        taken over: their outcome is no longer this replica's, and the GPU time is another
        request's. A job that ended here as a success is left alone (its webhook may be going
        out)."""
        for job_id in job_ids:
            task = self._running.get(job_id)
            if task is None or task.done():
                continue
            current = await asyncio.to_thread(self.jobs.get, job_id)
            if current is None or current.status is JobStatus.SUCCESS:
                continue
            if current.status is JobStatus.FAILED or current.owner != self.owner:
                log.info("job %s ended or moved elsewhere; stopping its generation", job_id)
                task.cancel()

    def _notify(self, job_id: int) -> None:
        hook = asyncio.create_task(self._deliver_webhook(job_id))
        self._webhooks.add(hook)
        hook.add_done_callback(self._webhooks.discard)

    async def clear_queue(self) -> dict:
        """End every job still processing as failed (releasing its charge) and stop this
        replica's work on them; a job that finishes meanwhile keeps its success."""
        cancelled = []
        for job in await asyncio.to_thread(self.jobs.processing):
            if await asyncio.to_thread(self.jobs.fail, job.id, "Cancelled by clear_queue"):
                cancelled.append(job.id)
                # what any attempt already wrote (one whose end was never recorded, say): a
                # refunded job's links must not serve; a replica still generating it withdraws
                # its images again as they arrive
                await asyncio.to_thread(self._withdraw, job)
                task = self._running.get(job.id)
                if task is not None:
                    task.cancel()
                if job.webhook:  # ended here, whichever replica was running it
                    self._notify(job.id)
        return {"status": "success", "cancelled": len(cancelled), "ids": cancelled}

    async def drain(self) -> None:
        """Wait for running jobs and webhook deliveries (tests and graceful shutdown)."""
        pending = list(self._running.values()) + list(self._webhooks)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


OWNER_LENGTH = 64  # jobs.owner's column


def job_owner(hostname: str, pid: int) -> str:
    """This process's name in the jobs it runs: host, pid and a random tag, within the column.
    Kubernetes pod names run to 63 characters; the host is cut, never the unique tail."""
    tail = f"-{pid}-{uuid.uuid4().hex[:8]}"
    return hostname[: OWNER_LENGTH - len(tail)] + tail


class EndNotRecorded(Exception):
    """A job generated and stored, whose end the database could not record."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id}: the database could not record its end")


def current_request_id() -> str | None:
    """Ray Serve's id of the HTTP request being handled (also its X-Request-Id header and the
    request_id of its JSON log lines), so meta, logs and headers name a request alike."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside Serve
        return None


IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,200}")


def _idempotency_key(headers: dict[str, str]) -> str | None:
    """The request's `Idempotency-Key` header, checked; None when absent."""
    value = headers.get("idempotency-key")
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(value):
        raise ApiError(
            ErrorKind.VALIDATION,
            "Idempotency-Key header must be 1-200 visible ASCII characters (no spaces)",
        )
    return value


def _fingerprint(body: Text2ImgRequest) -> str:
    """SHA-256 of the request's fields (the key aside), as sent: a random seed is not yet
    drawn, so a retry of the same body has the same fingerprint."""
    fields = body.model_dump(exclude={"key"}, mode="json")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _key_from_headers(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return headers.get("key") or None


def _short_reason(exc: BaseException) -> str:
    """A message fit for a client: the error's type and first line, never a traceback."""
    cause = exc
    # Ray wraps replica errors; the innermost cause says what happened.
    while getattr(cause, "cause", None) is not None and cause.cause is not cause:
        cause = cause.cause
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}"[:300] if text else type(cause).__name__
