"""Errors to HTTP responses, in one place.

Routes under ``/v1`` answer in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; the
LoRAX routes (``/``, ``/generate``, ``/generate_stream``, ``/info``, ``/health``) in LoRAX's
``{"error": "...", "error_type": "validation|generation|overloaded|incomplete_generation"}``.
Status codes: 400 bad input (422 on LoRAX routes, as LoRAX does), 401/403 auth, 404 unknown model,
adapter or document collection (another tenant's private collection reads the same), 408 request timeout, 409 name taken, 413 body too large, 429 overloaded (retry makes sense),
424 a generation failed (LoRAX), 500 anything unexpected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramix.errors import (
    AccessDenied,
    AdapterExists,
    AdapterNotFound,
    CollectionNotFound,
    ConfigError,
    DocumentError,
    InvalidAdapter,
    LoramixError,
    MergeError,
    MixError,
    Overloaded,
    RoutingError,
    Unauthorized,
)
from loramix.serve.engine import GenerationFailed, RequestTimeout

__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers", "is_openai_path", "openai_error",
           "status_of"]

log = logging.getLogger("loramix.serve")

_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 408: "timeout_error", 409: "invalid_request_error",
                413: "invalid_request_error", 422: "invalid_request_error", 424: "server_error",
                429: "rate_limit_error", 500: "server_error"}


@dataclass
class ApiError(Exception):
    """An HTTP-level refusal raised by a route (a path outside the allowed folders, n > 1, ...)."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


def status_of(exc: BaseException) -> tuple[int, str | None]:
    """(HTTP status, OpenAI ``code``) for an exception."""
    if isinstance(exc, ApiError):
        return exc.status, exc.code
    if isinstance(exc, Unauthorized):
        return 401, "invalid_api_key"
    if isinstance(exc, AccessDenied):
        return 403, "forbidden"
    if isinstance(exc, AdapterNotFound):
        return 404, "model_not_found"
    if isinstance(exc, CollectionNotFound):
        return 404, "collection_not_found"
    if isinstance(exc, AdapterExists):
        return 409, "adapter_exists"
    if isinstance(exc, Overloaded):
        return 429, "overloaded"
    if isinstance(exc, RequestTimeout):
        return 408, "timeout"
    if isinstance(exc, GenerationFailed):
        return 500, "generation_failed"
    if isinstance(exc, InvalidAdapter | ConfigError | MergeError | RoutingError | MixError | DocumentError):
        return 400, None
    if isinstance(exc, LoramixError):
        return 500, None
    return 500, None


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1")


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _OPENAI_TYPE.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def lorax_error(status: int, message: str) -> dict[str, Any]:
    kind = {429: "overloaded", 424: "generation", 500: "incomplete_generation"}.get(status, "validation")
    return {"error": message, "error_type": kind}


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return openai_error(status, message, param, code) if is_openai_path(path) else lorax_error(status, message)


def error_response(path: str, exc: BaseException) -> JSONResponse:
    status, code = status_of(exc)
    if status == 500:
        log.exception("internal error on %s", path, exc_info=exc)
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    if not is_openai_path(path):  # LoRAX's statuses
        status = 422 if status == 400 else 424 if isinstance(exc, GenerationFailed) else status
    param = exc.param if isinstance(exc, ApiError) else None
    headers = {"retry-after": "1"} if status == 429 else {"www-authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in exc.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        param = param or (".".join(loc) or None)
        parts.append(f"{'.'.join(loc) or 'body'}: {e.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to the right shape for the route that raised it."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        path = request.url.path
        status = 400 if is_openai_path(path) else 422
        return JSONResponse(error_body(path, status, message, param), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, exc.status_code, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(LoramixError)
    async def _loramix(request: Request, exc: LoramixError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        return error_response(request.url.path, exc)
