"""What the server says about itself: the OpenAPI document (with this server's own bounds and
defaults), `/docs` and `/redoc` without a CDN, and `/llms.txt`.

The request model's Field descriptions and `json_schema_extra` are the one source: the document
patches in the live settings, and llms.txt and the playground read the patched document.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

from service.pricing import format_usd

router = APIRouter()

REQUEST_SCHEMA = "Text2ImgRequest"
ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"
FAVICON_URL = "/static/favicon.svg"

# Swagger UI and ReDoc ship inside the fastapi-offline wheel; served from here, /docs works on a
# network that reaches no CDN. Without the package the pages fall back to FastAPI's CDN URLs.
_OFFLINE_SPEC = importlib.util.find_spec("fastapi_offline")
DOCS_ASSETS_DIR = (
    Path(_OFFLINE_SPEC.origin).parent / "static" if _OFFLINE_SPEC and _OFFLINE_SPEC.origin else None
)
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
}


def _asset_url(name: str) -> str | None:
    if DOCS_ASSETS_DIR is None or not (DOCS_ASSETS_DIR / name).is_file():
        return None
    return f"/static/docs/{name}"


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    assets = {}
    if js := _asset_url("swagger-ui-bundle.js"):
        assets["swagger_js_url"] = root + js
    if css := _asset_url("swagger-ui.css"):
        assets["swagger_css_url"] = root + css
    return get_swagger_ui_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - API reference",
        swagger_favicon_url=root + FAVICON_URL,
        **assets,
    )


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    assets = {}
    if js := _asset_url("redoc.standalone.js"):
        assets["redoc_js_url"] = root + js
    return get_redoc_html(
        openapi_url=root + request.app.openapi_url,
        title=f"{request.app.title} - API reference",
        redoc_favicon_url=root + FAVICON_URL,
        with_google_fonts=False,
        **assets,
    )


@router.get("/static/docs/{name}", include_in_schema=False)
async def docs_asset(name: str) -> FileResponse:
    if name not in DOCS_ASSETS or _asset_url(name) is None:
        raise HTTPException(404)
    return FileResponse(
        DOCS_ASSETS_DIR / name,
        media_type=DOCS_ASSETS[name],
        headers={"Cache-Control": "public, max-age=86400"},
    )


# ---- the OpenAPI document ---------------------------------------------------------------------


def install_api_document(app: FastAPI) -> None:
    """Make `app.openapi()` describe this server: its settings' bounds and defaults, and the
    error envelope where FastAPI would show its own validation-error body."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title,
            version=app.version,
            openapi_version=app.openapi_version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
            servers=app.servers,
        )
        _errors_use_the_envelope(document)
        service = getattr(app.state, "service", None)
        if service is None:
            return document  # not cached: the live values are not known yet
        _live_request_bounds(document, service)
        app.openapi_schema = document
        return document

    app.openapi = openapi


def _envelope(description: str) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}},
    }


API_ERRORS = {
    "4XX": _envelope(
        "With SDSERVE_STRICT_HTTP_STATUS: request (422), key (401/403), credit (402) and "
        'not-found (404) errors. By default these answer HTTP 200 with `status: "error"`.'
    ),
    "413": _envelope("The body is larger than SDSERVE_MAX_BODY_BYTES."),
    "503": _envelope(
        "The database is unreachable: nothing was written or charged; retry after "
        "`retry_after` seconds (also the Retry-After header)."
    ),
}


def _errors_use_the_envelope(document: dict) -> None:
    """Every error leaves this server as the ModelsLab envelope, never FastAPI's `detail` list:
    each /api/ route lists it, whoever wrote the route."""
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if path.startswith("/api/"):
                responses.pop("422", None)
                for status, response in API_ERRORS.items():
                    responses.setdefault(status, copy.deepcopy(response))
                ok = responses.get("200", {})
                if ok.get("description") == "Successful Response":
                    ok["description"] = (
                        "The answer; a bad key or request gets the error envelope "
                        '(`status: "error"`, HTTP 200)'
                    )
            elif "HTTPValidationError" in str(responses.get("422", "")):
                responses["422"] = _envelope("A path or query parameter is invalid.")
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    # ValidationError may have pulled in helper schemas of its own.
    text = str(document.get("paths", {}))
    for name in [n for n in schemas if n.startswith("ValidationError")]:
        if f"/{name}'" not in text:
            schemas.pop(name)


def _live_request_bounds(document: dict, service) -> None:
    settings = service.settings
    fields = document["components"]["schemas"][REQUEST_SCHEMA]["properties"]
    for name in ("width", "height"):
        fields[name].update(minimum=settings.min_size, maximum=settings.max_size)
    fields["samples"]["maximum"] = settings.max_samples
    fields["num_inference_steps"]["maximum"] = settings.max_steps
    fields["model_id"]["default"] = settings.default_model_id
    fields["model_id"]["examples"] = service.registry.ids()
    default_model = service.registry.get(settings.default_model_id)
    if default_model is not None:  # per-model defaults: the default model's
        fields["num_inference_steps"]["default"] = default_model.default_steps
        fields["width"]["examples"] = [default_model.width]
        fields["height"]["examples"] = [default_model.height]
    if loras := service.registry.lora_ids():
        fields["lora_model"]["examples"] = [loras[0]]


def request_fields(app: FastAPI) -> dict[str, dict]:
    """The text2img request's fields as the served document describes them."""
    document = app.openapi()
    return copy.deepcopy(document["components"]["schemas"][REQUEST_SCHEMA]["properties"])


def served_models(service) -> list[dict]:
    """Each served model with its default size and steps, its price and the LoRAs it takes
    (the public part of model_list)."""
    models = []
    for model_id in service.registry.ids():
        info = service.registry.get(model_id)
        models.append(
            {
                "model_id": model_id,
                "width": info.width,
                "height": info.height,
                "default_steps": info.default_steps,
                "price_per_image_usd": format_usd(service.prices.price_per_image(model_id)),
                "loras": service.registry.lora_ids(),
            }
        )
    return models


# ---- llms.txt ---------------------------------------------------------------------------------


@router.get("/llms.txt", response_class=PlainTextResponse, tags=["about"])
async def llms_txt(request: Request) -> PlainTextResponse:
    """A short plain-text summary of this API and its models, for language models and humans
    (the llms.txt convention)."""
    return PlainTextResponse(render_llms_txt(request.app), media_type="text/plain")


def render_llms_txt(app: FastAPI) -> str:
    service = app.state.service
    settings = service.settings
    base = settings.public_base_url.rstrip("/")
    document = app.openapi()
    lines = [
        "# sdserve",
        "",
        "> Self-hosted Stable Diffusion 2.0 text-to-image service that speaks the ModelsLab API. "
        f"Code written for the hosted API works by changing its base URL to {base}/api/.",
        "",
        "Every API call is a POST with a JSON body carrying the API key as `key` (or an "
        "`Authorization: Bearer` header). Numbers may be sent as strings and toggles as "
        '"yes"/"no". Every answer has `status`: `success` (`output` lists image URLs), '
        "`processing` (POST `fetch_result` with the key until the status changes; "
        "`future_links` are the final URLs), `failed` (generation failed, nothing charged) or "
        "`error` (`message` names the field and the rule). These answer HTTP 200; a key with "
        "too many requests in flight gets HTTP 429 and `retry_after`. An `Idempotency-Key` "
        "header on text2img makes a retry return the first job instead of charging again.",
        "",
        "## Models",
        "",
    ]
    for model in served_models(service):
        default = " (default)" if model["model_id"] == settings.default_model_id else ""
        lines.append(
            f"- `{model['model_id']}`{default}: {model['width']}x{model['height']}, "
            f"{model['default_steps']} steps by default, "
            f"{model['price_per_image_usd']} USD per image"
        )
    loras = service.registry.lora_ids()
    lines.append(f"- LoRAs (`lora_model`): {', '.join(loras) if loras else 'none installed'}")
    lines += ["", "## Endpoints", ""]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            text = (operation.get("description") or operation.get("summary") or "").strip()
            summary = " ".join(text.split("\n\n")[0].split())
            lines.append(f"- {method.upper()} {base}{path}: {summary}".rstrip(": "))
    lines += ["", "## text2img request fields", ""]
    required = {"key", "prompt"}
    for name, field in document["components"]["schemas"][REQUEST_SCHEMA]["properties"].items():
        facts = [_type_name(field)]
        if name in required:
            facts.append("required")
        low, high = field.get("minimum"), field.get("maximum")
        if low is not None and high is not None:
            facts.append(f"{_json(low)}-{_json(high)}")
        elif high is not None:
            facts.append(f"at most {_json(high)}")
        if "multipleOf" in field:
            facts.append(f"multiple of {_json(field['multipleOf'])}")
        if field.get("default") is not None:
            facts.append(f"default {_json(field['default'])}")
        lines.append(f"- `{name}` ({', '.join(facts)}): {field.get('description', '')}")
    lines += [
        "",
        "## Pricing",
        "",
        "- pay_per_use keys: a prepaid USD balance, debited price x samples when a request is "
        "accepted; a failed job is refunded",
        f"- free keys: {settings.free_images_per_month} images a calendar month, 0 USD",
        "- premium keys: no per-image charge",
        "",
        "## Docs",
        "",
        f"- [OpenAPI document]({base}{app.openapi_url}): every route, field, bound and body",
        f"- [API reference]({base}/docs): the same, readable",
        f"- [Playground]({base}/): try a request, copy it as Python, JavaScript, cURL or PHP",
        "",
    ]
    return "\n".join(lines)


def _type_name(field: dict) -> str:
    types = [t.get("type") for t in field.get("anyOf", [field]) if t.get("type") != "null"]
    return "/".join(t for t in types if t) or "any"


def _json(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # the OpenAPI models turn 8 into 8.0
    return str(value)
