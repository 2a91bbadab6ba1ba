"""HTTP routes: thin, each hands its body to ImageService. Paths are ModelsLab's."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated

from fastapi import APIRouter, Body, FastAPI, Path, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.api import docs, enterprise, playground
from service.api.errors import ErrorKind, install_error_handlers, route_label
from service.api.protocol import (
    ERROR_EXAMPLE,
    FAILED_EXAMPLE,
    PROCESSING_EXAMPLE,
    SUCCESS_EXAMPLE,
    ErrorResponse,
    FailedResponse,
    FetchRequest,
    KeyedRequest,
    ProcessingResponse,
    SuccessResponse,
    SystemLoadResponse,
    Text2ImgRequest,
    UsageRequest,
    bounded_default_size,
)
from service.api.text2img import ImageService
from service.registry import ModelInfo
from service.store.images import IMAGE_NAME

# Every /api/ route's 4xx and 413 error envelopes are added by service.api.docs.
JOB_RESPONSES = {
    200: {
        "description": "success, processing or failed job; errors use the error envelope",
        "model": SuccessResponse | ProcessingResponse | FailedResponse | ErrorResponse,
        "content": {
            "application/json": {
                "examples": {
                    "success": {"value": SUCCESS_EXAMPLE},
                    "processing": {"value": PROCESSING_EXAMPLE},
                    "failed": {"value": FAILED_EXAMPLE},
                    "error": {"value": ERROR_EXAMPLE},
                }
            }
        },
    },
    429: {"description": "too many requests queued for this key", "model": ErrorResponse},
}


INVALID_KEY_EXAMPLE = {
    "status": "error",
    "message": "Invalid API key",
    "messege": "Invalid API key",
}


def _keyed_responses(example) -> dict:
    """A keyed call that answers `example`, or the error envelope for a bad key."""
    return {
        200: {
            "description": "the answer; a missing or invalid key gets the error envelope",
            "content": {
                "application/json": {
                    "examples": {
                        "success": {"value": example},
                        "error": {"value": INVALID_KEY_EXAMPLE},
                    }
                }
            },
        },
    }


router = APIRouter()


# Job bodies hold JSON types only: handing them back as a JSONResponse skips FastAPI's generic
# encoder, which walked every field of `meta` and was a third of the route's own time.
async def _text2img(request: Request, body: Text2ImgRequest, family: str) -> JSONResponse:
    job = await _service(request).text2img(body, _headers(request), family, route_label(request))
    request.state.metrics_recorded = True  # with the job's status and model, by text2img
    return JSONResponse(job)


async def _fetch(
    request: Request, body: FetchRequest | None, job_id: int | None, family: str
) -> JSONResponse:
    job = await _service(request).fetch(body or FetchRequest(), _headers(request), job_id, family)
    return JSONResponse(job)


def _service(request: Request) -> ImageService:
    return request.app.state.service


def _headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items()}


Text2ImgBody = Annotated[Text2ImgRequest, Body()]
FetchBody = Annotated[FetchRequest | None, Body()]
JobId = Annotated[int, Path(ge=1, le=2**63 - 1, description="The `id` of a text2img response.")]


@router.post("/api/v6/images/text2img", responses=JOB_RESPONSES, tags=["v6"])
async def text2img_v6(request: Request, body: Text2ImgBody):
    """Generate images from a prompt (the main ModelsLab endpoint).

    An optional `Idempotency-Key` header (1-200 visible ASCII characters, unique per API key)
    makes retries safe: the same key with the same body answers with the first request's job
    (its current state) and charges nothing again; with a different body it is an error. Every
    text2img route honours it."""
    return await _text2img(request, body, "v6")


@router.post("/api/v6/images/fetch/{job_id}", responses=JOB_RESPONSES, tags=["v6"])
async def fetch_v6(request: Request, job_id: JobId, body: FetchBody = None):
    """The job's current state: what `fetch_result` points to."""
    return await _fetch(request, body, job_id, "v6")


@router.post("/api/v6/images/fetch", responses=JOB_RESPONSES, tags=["v6"])
async def fetch_v6_by_body(request: Request, body: FetchBody = None):
    """The documented fetch form: `request_id` in the body."""
    return await _fetch(request, body, None, "v6")


@router.post("/api/v7/images/text-to-image", responses=JOB_RESPONSES, tags=["v7"])
async def text2img_v7(request: Request, body: Text2ImgBody):
    """The newer API generation's text-to-image (same fields and bodies as v6)."""
    return await _text2img(request, body, "v7")


@router.post("/api/v7/images/fetch/{job_id}", responses=JOB_RESPONSES, tags=["v7"])
async def fetch_v7(request: Request, job_id: JobId, body: FetchBody = None):
    """A v7 job's current state (the official CLI polls this)."""
    return await _fetch(request, body, job_id, "v7")


@router.post("/api/v3/text2img", responses=JOB_RESPONSES, tags=["v3"])
async def text2img_v3(request: Request, body: Text2ImgBody):
    """Legacy text2img: no model_id, always the default model."""
    body.model_id = None
    return await _text2img(request, body, "v3")


@router.post("/api/v3/fetch/{job_id}", responses=JOB_RESPONSES, tags=["v3"])
async def fetch_v3(request: Request, job_id: JobId, body: FetchBody = None):
    """A v3 job's current state."""
    return await _fetch(request, body, job_id, "v3")


@router.post("/api/v4/dreambooth", responses=JOB_RESPONSES, tags=["v4"])
async def text2img_v4(request: Request, body: Text2ImgBody):
    """Legacy community-models API: same fields as v6."""
    return await _text2img(request, body, "v4")


@router.post("/api/v4/dreambooth/fetch", responses=JOB_RESPONSES, tags=["v4"])
async def fetch_v4(request: Request, body: FetchBody = None):
    """A v4 job's current state: `request_id` in the body."""
    return await _fetch(request, body, None, "v4")


@router.post("/api/v4/dreambooth/fetch/{job_id}", responses=JOB_RESPONSES, tags=["v4"])
async def fetch_v4_by_path(request: Request, job_id: JobId, body: FetchBody = None):
    """A v4 job's current state: what its `fetch_result` points to."""
    return await _fetch(request, body, job_id, "v4")


MODEL_LIST_EXAMPLE = [
    {
        "model_id": "stable-diffu",
        "model_name": "stable-diffu",
        "status": "model_ready",
        "model_category": "stable_diffusion",
        "width": 768,
        "height": 768,
        "price_per_image_usd": "0.0047",
    }
]


@router.post(
    "/api/v4/dreambooth/model_list", responses=_keyed_responses(MODEL_LIST_EXAMPLE), tags=["v4"]
)
async def model_list(request: Request, body: Annotated[KeyedRequest | None, Body()] = None):
    """The models this server serves."""
    service = _service(request)
    await service.authenticate(body or KeyedRequest(), _headers(request))
    settings = service.settings

    def entry(info: ModelInfo) -> dict:
        width, height = bounded_default_size(info.width, info.height, settings)
        return {
            "model_id": info.model_id,
            "model_name": info.model_id,
            "status": "model_ready",
            "model_category": "stable_diffusion",
            "width": width,
            "height": height,
            "price_per_image_usd": str(service.prices.price_per_image(info.model_id)),
            "default_steps": info.default_steps,
            "prediction_type": info.prediction_type,
            "loras": service.registry.lora_ids(),
            "embeddings": service.registry.embedding_ids(),
            "vaes": service.registry.vae_ids(),
        }

    return [entry(service.registry.get(model_id)) for model_id in service.registry.ids()]


@router.post(
    "/api/v3/system_load",
    response_model=SystemLoadResponse | ErrorResponse,
    responses=_keyed_responses({"queue_num": 2, "queue_time": 3.5, "status": "ok"}),
    tags=["v3"],
)
async def system_load(request: Request, body: Annotated[KeyedRequest | None, Body()] = None):
    """Jobs queued or running and the estimated seconds to clear them."""
    service = _service(request)
    await service.authenticate(body or KeyedRequest(), _headers(request))
    return await service.system_load()


@router.post(
    "/api/v6/processing/request_count",
    responses=_keyed_responses(
        {"status": "success", "processing_count": 1, "message": "1 requests processing"}
    ),
    tags=["v6"],
)
async def request_count(request: Request, body: Annotated[KeyedRequest | None, Body()] = None):
    """How many of this key's requests are queued or running."""
    service = _service(request)
    key = await service.authenticate(body or KeyedRequest(), _headers(request))
    count = await service.processing_count(key)
    return {
        "status": "success",
        "processing_count": count,
        "message": f"{count} requests processing",
    }


@router.post("/api/v1/enterprise/images/text2img", responses=JOB_RESPONSES, tags=["enterprise"])
async def text2img_enterprise(request: Request, body: Text2ImgBody):
    """The dedicated-server API (`enterprise=True` in modelslab-py); needs an admin key."""
    service = _service(request)
    await service.authenticate_admin(body, _headers(request))
    job = await service.text2img(body, _headers(request), "enterprise", route_label(request))
    request.state.metrics_recorded = True  # with the job's status and model, by text2img
    return job


@router.post(
    "/api/v1/enterprise/images/fetch/{job_id}", responses=JOB_RESPONSES, tags=["enterprise"]
)
async def fetch_enterprise(request: Request, job_id: JobId, body: FetchBody = None):
    """An enterprise job's current state; needs an admin key."""
    service = _service(request)
    await service.authenticate_admin(body or FetchRequest(), _headers(request))
    return await service.fetch(body or FetchRequest(), _headers(request), job_id, "enterprise")


USAGE_EXAMPLE = {
    "status": "success",
    "usage": [
        {
            "key_id": 3,
            "key": "team-a",
            "plan": "pay_per_use",
            "model_id": "stable-diffu",
            "images": 120,
            "amount_usd": "0.564",
        }
    ],
    "total_images": 120,
    "total_amount_usd": "0.564",
}


@router.post(
    "/api/v1/enterprise/usage", responses=_keyed_responses(USAGE_EXAMPLE), tags=["enterprise"]
)
async def usage(request: Request, body: Annotated[UsageRequest | None, Body()] = None):
    """Delivered images and their price per key and model, as `sdserve usage --json`."""
    service = _service(request)
    body = body or UsageRequest()
    await service.authenticate_admin(body, _headers(request))
    return await service.usage(body.key_name, body.since)


IMAGE_NOT_FOUND = {"status": "error", "message": "Not found", "messege": "Not found"}
IMAGE_RESPONSES = {
    200: {
        "description": "The PNG, or for a `.base64` name the PNG's base64 text.",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "text/plain": {"schema": {"type": "string"}},
        },
    },
    404: {
        "description": "No such image (yet): a future link before its image exists, an expired "
        "`temp` link, or a name that is not an output name.",
        "model": ErrorResponse,
    },
}


@router.get(
    "/images/{name:path}",
    tags=["images"],
    response_class=Response,
    responses=IMAGE_RESPONSES,
)
async def image(request: Request, name: str):
    """An output file; future links answer 404 until their image exists.

    Only output names (`{32 hex}-{i}.png|.base64`, optionally under `temp/`) are ever looked up,
    so no name, encoded or not, reaches outside the image store."""
    data = None
    if IMAGE_NAME.fullmatch(name):
        data = await _read_image(_service(request), name)
    if data is None:
        return JSONResponse(IMAGE_NOT_FOUND, 404)
    if name.endswith(".base64"):
        return PlainTextResponse(data.decode("ascii"))
    # A temp link ends 24 hours after its image was made: no cache may keep it beyond.
    caching = "no-store" if name.startswith("temp/") else "public, max-age=86400"
    return Response(data, media_type="image/png", headers={"Cache-Control": caching})


async def _read_image(service: ImageService, name: str) -> bytes | None:
    return await asyncio.to_thread(service.images.read, name)


@router.get("/healthz", tags=["ops"])
async def healthz():
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request):
    """A generator replica has its models loaded and warmed: traffic can be sent."""
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is not None and not await fleet.ready():
        return JSONResponse({"status": "not_ready"}, status_code=503)
    return {"status": "ok"}


class RequestBodyGate:
    """ASGI middleware: refuses bodies over `limit` bytes without reading more than that, and
    reads every /api/ body as JSON whatever its content-type (many client snippets send
    `data=json.dumps(...)` with no header). Bodies are small: it reads them whole, then replays.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["started_at"] = time.perf_counter()
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if scope["path"].startswith("/api/"):
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        message = f"request body is larger than the limit of {self.limit} bytes"
        body = json.dumps({"status": "error", "message": message, "messege": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": ErrorKind.TOO_LARGE.strict_status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class RouteMetrics:
    """ASGI middleware: every /api/ call counted in requests_total and its duration, by route.
    Generation routes count themselves (with the job's status and model) and errors are counted
    where they are answered (service.api.errors); this counts the rest, the successes."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        status_code = None

        async def noting_status(message):
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        await self.app(scope, receive, noting_status)
        state = scope.get("state") or {}
        service = getattr(scope.get("app").state, "service", None) if scope.get("app") else None
        if service is None or state.get("metrics_recorded") or status_code != 200:
            return
        route = getattr(scope.get("route"), "path", "unmatched")
        elapsed = time.perf_counter() - state.get("started_at", time.perf_counter())
        service.metrics.request_done(route, "none", "success", elapsed)


def create_app(max_body_bytes: int, strict_http_status: bool) -> FastAPI:
    """The FastAPI app; `app.state.service` is set by whoever owns the ImageService."""
    app = FastAPI(
        title="sdserve",
        description="Self-hosted Stable Diffusion 2.0 speaking the ModelsLab API. Every call is "
        "a POST with a JSON body carrying `key`; numbers may be strings and toggles "
        '"yes"/"no". A playground is at `/`, a summary at `/llms.txt`.',
        version="0.1.0",
        docs_url=None,  # served by service.api.docs without a CDN
        redoc_url=None,
    )
    app.include_router(router)
    app.include_router(enterprise.router)
    app.include_router(playground.router)
    app.include_router(docs.router)
    docs.install_api_document(app)
    install_error_handlers(app, strict_http_status)
    app.add_middleware(RouteMetrics)  # inside the gate: it sees the scope the routes see
    app.add_middleware(RequestBodyGate, limit=max_body_bytes)
    return app
