"""The playground at `/`: a plain HTML/CSS/JS page that calls this server's own ModelsLab API,
and the two small JSON documents it needs besides (the form's bounds and the key's plan)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Request
from fastapi.responses import FileResponse

from service.api.docs import request_fields, served_models
from service.api.protocol import KeyedRequest
from service.engine.schedulers import SAG_SCHEDULERS, SCHEDULERS
from service.pricing import Plan, PlanLimits, format_usd

router = APIRouter()

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Revalidate on every load (cheap with the ETag): a new release's page never mixes with old JS.
NO_CACHE = {"Cache-Control": "no-cache"}

# The request fields the page offers; the rest keep their defaults.
FORM_FIELDS = (
    "model_id",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "samples",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "lora_model",
    "lora_strength",
    "embeddings_model",
    "vae",
    "upscale",
    "tomesd",
    "highres_fix",
    "self_attention",
    "safety_checker",
)


@router.get("/", include_in_schema=False)
async def playground_page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE
    )


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> FileResponse:
    path = STATIC_DIR / name
    # Only files directly in static/ with a known type: no traversal, no directory listing.
    if "/" in name or name.startswith(".") or path.suffix not in MEDIA_TYPES or not path.is_file():
        raise HTTPException(404)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)


@router.get("/playground/config", tags=["playground"])
async def playground_config(request: Request) -> dict:
    """The playground form's models, LoRAs, schedulers and field bounds.

    Each field's bounds, default and description are the served OpenAPI document's."""
    service = request.app.state.service
    fields = request_fields(request.app)
    return {
        "default_model_id": service.settings.default_model_id,
        "models": served_models(service),
        "loras": service.registry.lora_ids(),
        "embeddings": service.registry.embedding_ids(),
        "vaes": service.registry.vae_ids(),
        "upscaler": {"configured": bool(service.settings.upscaler)},
        "tomesd": service.settings.tomesd_ratio > 0,
        "sag_schedulers": sorted(SAG_SCHEDULERS),
        "safety_checker": {
            "configured": bool(service.settings.safety_checker),
            "mode": service.settings.safety_checker_mode,
        },
        "schedulers": list(SCHEDULERS),
        "fields": {name: fields[name] for name in FORM_FIELDS if name in fields},
        "free_images_per_month": service.settings.free_images_per_month,
    }


@router.post("/playground/account", tags=["playground"])
async def playground_account(
    request: Request, body: Annotated[KeyedRequest | None, Body()] = None
) -> dict:
    """The key's plan, balance and free images left (never the key itself).

    The page says from it what a request costs: pay_per_use pays price x samples from its
    balance, free spends its monthly allowance, premium pays nothing per image."""
    service = request.app.state.service
    headers = {k.lower(): v for k, v in request.headers.items()}
    key = await service.authenticate(body or KeyedRequest(), headers)
    account = {
        "status": "success",
        "name": key.name,
        "plan": key.plan.value,
        "balance_usd": format_usd(key.balance) if key.plan is Plan.PAY_PER_USE else None,
        "free_images_per_month": None,
        "free_images_left": None,
        "max_concurrent_requests": PlanLimits.from_settings(service.settings).concurrency(key.plan),
    }
    if key.plan is Plan.FREE:
        used = await asyncio.to_thread(service.ledger.free_images_used, key.id)
        allowance = service.settings.free_images_per_month
        account["free_images_per_month"] = allowance
        account["free_images_left"] = max(0, allowance - used)
    return account
