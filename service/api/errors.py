"""One error type for the API, its kinds, and the ModelsLab error envelope.

The hosted API answers request, auth and credit errors with HTTP 200 and `status: "error"`;
clients branch on that string. Rate limits are 429 either way. `strict_http_status` switches
the others to their 4xx codes for operators who prefer them.
"""

from __future__ import annotations

import enum
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.store.db import rolled_back

log = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_S = 5.0


class ErrorKind(enum.Enum):
    """Each kind's value is (strict HTTP status, label used in logs and metrics)."""

    VALIDATION = (422, "validation")
    AUTH = (401, "auth")
    FORBIDDEN = (403, "forbidden")
    CREDIT = (402, "credit")
    NOT_FOUND = (404, "not_found")
    TOO_LARGE = (413, "too_large")
    RATE_LIMIT = (429, "rate_limit")
    UNAVAILABLE = (503, "unavailable")
    GENERATION = (424, "generation")
    UNSUPPORTED = (501, "unsupported")
    INTERNAL = (500, "internal")

    @property
    def strict_status(self) -> int:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]


class ApiError(Exception):
    def __init__(self, kind: ErrorKind, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after


def error_body(message: str, **extra) -> dict:
    return {"status": "error", "message": message, "messege": message, **extra}


def error_response(error: ApiError, strict: bool) -> JSONResponse:
    headers = {}
    extra = {}
    if error.retry_after is not None:
        extra["retry_after"] = error.retry_after
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    if error.kind is ErrorKind.RATE_LIMIT:
        status = 429
    elif strict or error.kind in (ErrorKind.INTERNAL, ErrorKind.UNAVAILABLE):
        status = error.kind.strict_status
    else:
        status = 200
    return JSONResponse(error_body(error.message, **extra), status_code=status, headers=headers)


# FastAPI's detail when reading the body fails other than by a JSON syntax error
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"
BODY_NOT_PARSED = (
    "request body could not be parsed: JSON nested too deeply, a number too long, "
    "or text that is not UTF-8"
)


def describe_validation_error(exc: RequestValidationError) -> str:
    """Turn pydantic's errors into the ModelsLab style: `field rule; field rule`."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            parts.append("request body is not valid JSON")
            continue
        if not loc or kind in ("model_attributes_type", "dict_type"):
            parts.append("request body must be a JSON object")
            continue
        if loc == ["path", "job_id"]:
            parts.append(
                "the request id in the path must be an integer from 1 to 2^63-1 "
                "(the `id` of a text2img response)"
            )
            continue
        msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc)} {msg}")
    return "; ".join(dict.fromkeys(parts)) or "request body is invalid"


def route_label(request: Request) -> str:
    """The matched route's path template: a bounded set of values, fit for a metric label."""
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def _record(request: Request, error: ApiError) -> None:
    service = getattr(request.app.state, "service", None)
    if service is None:
        return
    started = getattr(request.state, "started_at", None)
    elapsed = time.perf_counter() - started if started is not None else 0.0
    route = route_label(request)
    status = "rate_limited" if error.kind is ErrorKind.RATE_LIMIT else "error"
    service.metrics.error(route, error.kind.label)
    service.metrics.request_done(route, "none", status, elapsed)
    request.state.metrics_recorded = True


def install_error_handlers(app: FastAPI, strict: bool) -> None:
    """Every error leaves the server as the ModelsLab envelope, counted in the metrics;
    500s never leak internals."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        _record(request, exc)
        return error_response(exc, strict)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        error = ApiError(ErrorKind.VALIDATION, describe_validation_error(exc))
        _record(request, error)
        return error_response(error, strict)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            kind, message = ErrorKind.NOT_FOUND, "Not found"
        elif exc.status_code == 405:
            return JSONResponse(error_body("Method not allowed: use POST"), status_code=405)
        elif exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            # JSON the parser gives up on: a bad body like any other, as malformed JSON is
            error = ApiError(ErrorKind.VALIDATION, BODY_NOT_PARSED)
            _record(request, error)
            return error_response(error, strict)
        else:
            kind, message = ErrorKind.VALIDATION, str(exc.detail)
        # Unknown paths are real 404s even in ModelsLab mode: no client branches on them.
        response = error_response(ApiError(kind, message), strict=True)
        return response

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError):
        first_line = str(exc).splitlines()[0] if str(exc) else repr(exc)
        if rolled_back(exc):  # what is left after the store's own tries
            log.error("database transaction rolled back: %s", first_line)
            reason = "the database rolled this request back to resolve a conflict"
        else:
            log.error("database unreachable: %s", first_line)
            reason = "the database cannot be reached"
        error = ApiError(
            ErrorKind.UNAVAILABLE,
            f"Service temporarily unavailable: {reason}; retry shortly",
            retry_after=DATABASE_RETRY_AFTER_S,
        )
        _record(request, error)
        return error_response(error, strict)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error", exc_info=exc)
        error = ApiError(ErrorKind.INTERNAL, "Internal server error")
        _record(request, error)
        return error_response(error, strict)
