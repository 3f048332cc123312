"""One JSON error shape for every failure, and the handlers that produce it.

Every error body is ``{"error": {"code", "message", "part"}, "request_id"}``: ``part`` names the
request part at fault (``frames[2]``, ``top_k``, ...) so a client can point at it. Domain errors
from ``vvireid.server.service`` map to 4xx/503 by class; anything unexpected becomes a 500 whose body
holds only the request id, while the traceback goes to the server log under that id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from vvireid.indexer.gallery import GalleryUnavailableError
from vvireid.server.service import (
    DecodeBudgetError,
    DuplicateTrackletError,
    FrameTooLargeError,
    GalleryConflictError,
    InvalidFieldError,
    InvalidFrameError,
    NoFramesError,
    NotReadyError,
    OverloadedError,
    QueryTimeoutError,
    ServiceError,
    TooManyFramesError,
    UnknownTrackletError,
)

log = logging.getLogger(__name__)

GALLERY_RETRY_AFTER_S = 5

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    InvalidFrameError: 422,
    NoFramesError: 422,
    TooManyFramesError: 422,  # a declared constraint (maxItems), like every schema violation
    InvalidFieldError: 422,
    FrameTooLargeError: 413,
    DecodeBudgetError: 413,
    UnknownTrackletError: 404,
    DuplicateTrackletError: 409,
    GalleryConflictError: 409,
    NotReadyError: 503,
    OverloadedError: 503,
    QueryTimeoutError: 504,
}

_CODE_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_field",
    503: "unavailable",
}


class ApiError(StarletteHTTPException):
    """An HTTP error raised by routes and middleware, with our ``code`` and ``part``.

    It subclasses Starlette's HTTPException so FastAPI passes it through its body parser
    untouched (a body-size overrun raised while parsing the form stays a 413).
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        part: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.part = part


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(
    request: Request,
    status: int,
    code: str,
    message: str,
    part: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "error": {"code": code, "message": message, "part": part},
        "request_id": request_id_of(request),
    }
    return JSONResponse(body, status_code=status, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    status = next((s for cls, s in STATUS_BY_ERROR.items() if isinstance(exc, cls)), 400)
    headers = None
    if isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
        request.app.state.metrics.rejected.inc()
    return error_response(request, status, exc.code, exc.message, exc.part, headers)


async def _gallery_unavailable(request: Request, exc: GalleryUnavailableError) -> JSONResponse:
    """The gallery's storage (a Milvus server) is down: a retryable 503, not a 500 traceback."""
    log.warning("gallery unavailable: %s", exc)
    return error_response(
        request, 503, "gallery_unavailable", str(exc), None,
        {"Retry-After": str(GALLERY_RETRY_AFTER_S)},
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, ApiError):
        return error_response(
            request, exc.status_code, exc.code, exc.message, exc.part, exc.headers
        )
    code = _CODE_BY_STATUS.get(exc.status_code, "error")
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    return error_response(request, exc.status_code, code, message, None, exc.headers)


def _field_name(loc: tuple) -> str:
    """('body', 'top_k') -> 'top_k'; ('query', 'camera', 0) -> 'camera[0]'."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header", "form")]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "request"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    part = _field_name(tuple(first.get("loc", ())))
    message = "; ".join(f"{_field_name(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errors)
    return error_response(request, 422, "invalid_field", message, part)


def install_error_handlers(app: FastAPI) -> None:
    """Route every expected exception type to the one JSON error shape.

    Unexpected exceptions are not handled here: a handler for ``Exception`` runs in Starlette's
    outermost middleware, which re-raises afterwards, so the server logged each 500 twice.
    ``RequestContextMiddleware`` answers them instead, logging one traceback with the request id.
    """
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(GalleryUnavailableError, _gallery_unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
