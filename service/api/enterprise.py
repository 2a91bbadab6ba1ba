"""The dedicated-server management routes (`/api/v1/enterprise/...`): admin keys only.

Each is served at `/api/v1/enterprise/{name}` (documented) and at
`/api/v1/enterprise/images/{name}`, where modelslab-py's `enterprise=True` clients post.

They act on the generator fleet through `app.state.fleet`, which the Ray Serve ingress sets;
without one (the HTTP layer alone) they answer that no generator is attached.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request
from pydantic import Field

from service import __version__
from service.api.errors import ApiError, ErrorKind
from service.api.protocol import KeyedRequest, Text
from service.api.text2img import ImageService
from service.engine.schedulers import SCHEDULERS

router = APIRouter(tags=["enterprise"])


class ModelRequest(KeyedRequest):
    model_id: Text = Field(None, description="A served model id.")


async def _admin(request: Request, body: KeyedRequest | None) -> ImageService:
    service: ImageService = request.app.state.service
    headers = {k.lower(): v for k, v in request.headers.items()}
    await service.authenticate_admin(body or KeyedRequest(), headers)
    return service


def _fleet(request: Request):
    fleet = getattr(request.app.state, "fleet", None)
    if fleet is None:
        raise ApiError(ErrorKind.UNAVAILABLE, "No generator is attached to this server")
    return fleet


def _model_id(service: ImageService, body: ModelRequest | None) -> str:
    model_id = ((body.model_id if body else None) or "").strip()
    available = ", ".join(service.registry.ids())
    if not model_id:
        raise ApiError(ErrorKind.VALIDATION, f"model_id is required; available models: {available}")
    if model_id not in service.registry.ids():
        raise ApiError(
            ErrorKind.VALIDATION,
            f"model_id '{model_id}' is not available; available models: {available}",
        )
    return model_id


def management(name: str, **documented):
    """Register one handler at both paths of a management route; only the first is in OpenAPI."""

    def register(handler):
        router.post(f"/api/v1/enterprise/images/{name}", include_in_schema=False)(handler)
        return router.post(f"/api/v1/enterprise/{name}", **documented)(handler)

    return register


Keyed = Annotated[KeyedRequest | None, Body()]
WithModel = Annotated[ModelRequest | None, Body()]


@management("system_details")
async def system_details(request: Request, body: Keyed = None):
    """The answering generator replica (device, GPU memory, loaded models, queue) and the
    fleet's jobs, models and version."""
    service = await _admin(request, body)
    details = await _fleet(request).details()
    load = await service.system_load()
    return {
        "status": "success",
        "version": __version__,
        "models": service.registry.ids(),
        "loras": service.registry.lora_ids(),
        "embeddings": service.registry.embedding_ids(),
        "vaes": service.registry.vae_ids(),
        "jobs_processing": load["queue_num"],
        "generator": details,
    }


@management("load_model")
async def load_model(request: Request, body: WithModel = None):
    """Load and warm a model on a generator replica, so its first request is not cold."""
    service = await _admin(request, body)
    model_id = _model_id(service, body)
    result = await _fleet(request).load_model(model_id, reload=False)
    return {"status": "success", "message": f"model {model_id} loaded", **result}


@router.post("/api/v6/images/model_reload")
@management("model_reload")
async def model_reload(request: Request, body: WithModel = None):
    """Reload a model from its folder (after its files changed) and warm it."""
    service = await _admin(request, body)
    model_id = _model_id(service, body)
    result = await _fleet(request).load_model(model_id, reload=True)
    return {"status": "success", "message": f"model {model_id} reloaded", **result}


@management("clear_queue")
async def clear_queue(request: Request, body: Keyed = None):
    """Cancel every job not finished yet; their charges are released."""
    service = await _admin(request, body)
    return await service.clear_queue()


@management("clear_cache")
async def clear_cache(request: Request, body: Keyed = None):
    """Unload the pipelines a generator replica holds and free its cached GPU memory."""
    await _admin(request, body)
    return {"status": "success", **await _fleet(request).clear_cache()}


@management("restart_server")
async def restart_server(request: Request, body: Keyed = None):
    """Have Serve replace a generator replica; requests queued on it are retried elsewhere."""
    await _admin(request, body)
    details = await _fleet(request).restart()
    return {"status": "success", "message": "generator replica restarting", "generator": details}


@management("get_all_models")
async def get_all_models(request: Request, body: Keyed = None):
    """The model ids this server serves."""
    service = await _admin(request, body)
    return {"status": "success", "models": service.registry.ids()}


@management("list_schedulers")
async def list_schedulers(request: Request, body: Keyed = None):
    """The scheduler names `scheduler` accepts."""
    await _admin(request, body)
    return {"status": "success", "schedulers": list(SCHEDULERS)}


@management("update")
async def update(request: Request, body: Keyed = None):
    """Not served: modelslab-py's `update()` asks a hosted server to update itself; an sdserve
    deployment is updated by rolling out a new image."""
    await _admin(request, body)
    raise ApiError(
        ErrorKind.UNSUPPORTED,
        "update is not supported by sdserve: update a deployment by rolling out a new image "
        "(docs/deployment.md)",
    )
