"""The FastAPI application factory.

``create_app(settings)`` builds a fresh app (no module-level app, so tests and the CLI each pass
their own settings). The lifespan loads the model and the index in a background thread: the
process answers ``/healthz`` at once and ``/readyz`` turns 200 when loading is done, so an
orchestrator can tell "starting" from "dead". A load failure is logged, reported by ``/readyz``
and handed to ``app.state.on_load_failure`` (the CLI uses it to stop the server and exit non-zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio.to_thread
import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from vvireid.server.errors import ApiError, install_error_handlers
from vvireid.server.guard import (
    Admission,
    GuardMiddleware,
    http_protocol,
    security_headers,
    send_error,
)
from vvireid.server.memory import configure_allocator
from vvireid.server.metrics import ServerMetrics
from vvireid.server.routes import STATIC_DIR, api_key_problem, router
from vvireid.server.settings import ServerSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("server.access")

REQUEST_ID_HEADER = "x-request-id"
# Swagger UI and ReDoc files, shipped by the fastapi-offline package (MIT; no CDN at run time).
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

DESCRIPTION = """\
Query a gallery of person tracklets with a tracklet seen by a visible (day) or infrared (night)
camera. Upload the frames of one tracklet to `POST /v1/query` (multipart, field `frames`,
repeated); the answer ranks gallery tracklets by similarity. By default the search is
cross-modal: an infrared query searches visible tracklets and vice versa.

Errors share one shape: `{"error": {"code", "message", "part"}, "request_id"}`.
Gallery writes (`POST /v1/gallery`, `DELETE /v1/gallery/{id}`) need the `X-API-Key` header.
"""


class BodyTooLargeError(ApiError):
    """Raised from ``receive`` when a body (chunked or lying about its length) passes the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413, "request_too_large",
            f"request body above the limit of {limit} bytes (max_request_bytes); send fewer or "
            "smaller frames", part="body",
        )


class RequestContextMiddleware:
    """Request id, body-size limit, metrics and the access log, as one pure ASGI layer.

    The size limit is enforced twice: a ``Content-Length`` above it is refused before a byte of
    body is read, and the bytes actually received are counted, which catches chunked bodies.
    """

    def __init__(self, app: ASGIApp, *, max_body: int, metrics: ServerMetrics) -> None:
        self.app = app
        self.max_body = max_body
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = self._request_id(scope)
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = request_id, started
        status = 500
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLargeError(self.max_body)
            return message

        async def tagged_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                state["response_started"] = True
                status = message["status"]
                headers = [*message.get("headers", []), *security_headers(scope["path"])]
                headers.append((REQUEST_ID_HEADER.encode(), request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            if self._declared_length(scope) > self.max_body:
                await self._reject_too_large(scope, tagged_send)
            else:
                await self.app(scope, counting_receive, tagged_send)
        except Exception:
            # The one place a 500 is logged: one traceback, under the request id.
            log.exception("request %s (%s %s) failed", request_id, scope["method"], scope["path"])
            if status == 500 and not started_response(scope):
                await send_error(
                    scope, tagged_send, 500, "internal_error",
                    "internal server error; the server log has the details under request id "
                    f"{request_id}", None,
                )
            status = 500
        finally:
            self._record(scope, status, time.perf_counter() - started)

    @staticmethod
    def _request_id(scope: Scope) -> str:
        """The client's X-Request-ID if it is a sane token, else a fresh one."""
        for name, value in scope.get("headers", []):
            if name == REQUEST_ID_HEADER.encode():
                candidate = value.decode("latin-1")
                if _CLIENT_REQUEST_ID.fullmatch(candidate):
                    return candidate
        return uuid.uuid4().hex

    @staticmethod
    def _declared_length(scope: Scope) -> int:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    async def _reject_too_large(self, scope: Scope, send: Send) -> None:
        error = BodyTooLargeError(self.max_body)
        await send_error(scope, send, 413, error.code, error.message, "body")

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        # The route template, not the raw path, keeps label cardinality bounded.
        label = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.inc(route=label, method=scope["method"], status=str(status))
        self.metrics.latency.observe(seconds, route=label)
        state = scope.get("state", {})
        access_log.info(
            "%s %s %d %.1f ms id=%s%s", scope["method"], scope["path"], status, seconds * 1000.0,
            state.get("request_id"), f" ({state['detail']})" if state.get("detail") else "",
        )


def started_response(scope: Scope) -> bool:
    return bool(scope.get("state", {}).get("response_started"))


def _load_engine(app: FastAPI, settings: ServerSettings) -> None:
    """Background loader: put the engine on app.state, or record why it failed."""
    from vvireid.server.service import QueryEngine

    try:
        if settings.checkpoint is None or (settings.index is None and settings.backend == "faiss"):
            raise ValueError(
                "no model to serve: give --checkpoint and --index "
                "(or VVIREID_CHECKPOINT and VVIREID_INDEX)"
            )
        engine = QueryEngine.load(
            settings.checkpoint,
            settings.gallery_location(),
            settings=settings,
            on_batch=lambda size, _s: app.state.metrics.batch_size.observe(size),
        )
    except Exception as exc:  # noqa: BLE001 - any failure must reach /readyz and the CLI
        log.error("cannot start serving: %s", exc, exc_info=not isinstance(exc, ValueError))
        app.state.load_error = str(exc)
        callback: Callable[[str], None] | None = app.state.on_load_failure
        if callback is not None:
            callback(str(exc))
        return
    if app.state.closing:
        engine.close()
        return
    app.state.engine = engine
    app.state.metrics.ready.set(1)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: ServerSettings = app.state.settings
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.thread_pool_size
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app.state.closing = False
    loader = threading.Thread(
        target=_load_engine, args=(app, settings), name="vvireid-loader", daemon=True
    )
    loader.start()
    try:
        yield
    finally:
        app.state.closing = True
        await asyncio.get_running_loop().run_in_executor(None, loader.join)
        engine = app.state.engine
        app.state.engine = None
        if engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, engine.close)


def _gauge_from_engine(app: FastAPI, read: Callable[[Any], float]) -> Callable[[], float]:
    def sample() -> float:
        engine = app.state.engine
        return float(read(engine)) if engine is not None else 0.0

    return sample


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """Build the query server app; model and index load when its lifespan starts.

    Raises:
        SettingsError: the API key file cannot be read.
    """
    settings = settings or ServerSettings.from_env()
    configure_allocator()
    app = FastAPI(
        title="vvireid query server",
        version="1.0",
        description=DESCRIPTION,
        lifespan=_lifespan,
        docs_url=None,  # served from local files by routes.py (no CDN, no inline script)
        redoc_url=None,
    )
    metrics = ServerMetrics()
    app.state.settings = settings
    app.state.api_key = settings.resolved_api_key()
    app.state.metrics = metrics
    app.state.engine = None
    app.state.load_error = None
    app.state.on_load_failure = None
    metrics.queue_depth.set_function(_gauge_from_engine(app, lambda e: e.queue_depth))
    metrics.gallery_size.set_function(_gauge_from_engine(app, len))
    metrics.ready.set(0)
    install_error_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.mount("/static-docs", StaticFiles(directory=DOCS_ASSETS), name="static-docs")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    # Added last = outermost: the request id exists before the guard can answer.
    app.add_middleware(
        GuardMiddleware,
        admission=Admission(
            settings.max_in_flight, settings.queue_size, settings.admission_timeout_s
        ),
        body_timeout_s=settings.body_timeout_s,
        check_key=lambda key: api_key_problem(app.state.api_key, key),
        on_reject=metrics.rejected.inc,
    )
    app.add_middleware(
        RequestContextMiddleware, max_body=settings.max_request_bytes, metrics=metrics
    )
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the limits that depend on the settings and the model filled in.

    It is the contract schemathesis checks: a form field is absent rather than null, ``frames``
    is required with 1..max_frames items, and ``min_probability`` is listed only when the model
    has a calibration. Cached once the model is loaded (until then it is rebuilt per call).
    """
    engine = app.state.engine
    if app.openapi_schema is None or engine is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        settings: ServerSettings = app.state.settings
        forms = [
            form for name, form in schema.get("components", {}).get("schemas", {}).items()
            if name.startswith("Body_")
        ]
        for form in forms:
            properties = form.get("properties", {})
            for name, prop in properties.items():
                properties[name] = _without_null(prop)
            top_k = properties.get("top_k")
            if top_k is not None:
                for option in top_k.get("anyOf", [top_k]):
                    if option.get("type") == "integer":
                        option["maximum"] = settings.max_top_k
            frames = properties.get("frames")
            if frames is not None and frames.get("type") == "array":
                frames.update(minItems=1, maxItems=settings.max_frames)
                form["required"] = sorted({*form.get("required", []), "frames"})
            if engine is not None and getattr(engine, "calibration", None) is None:
                properties.pop("min_probability", None)
        metrics = schema["paths"].get("/metrics", {}).get("get")
        if metrics is not None and settings.metrics_key is None:
            metrics.pop("security", None)  # this server's /metrics is open
            metrics.get("responses", {}).pop("401", None)
        if engine is None:
            return schema
        app.openapi_schema = schema
    return app.openapi_schema


def _without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A form field cannot be null, only absent: drop FastAPI's ``{"type": "null"}`` option."""
    options = [o for o in prop.get("anyOf", []) if o.get("type") != "null"]
    if "anyOf" not in prop or len(options) == len(prop["anyOf"]):
        return prop
    rest = {k: v for k, v in prop.items() if k != "anyOf"}
    return {**options[0], **rest} if len(options) == 1 else {**rest, "anyOf": options}


def uvicorn_config(app: FastAPI, settings: ServerSettings, **options: Any) -> Any:
    """The uvicorn configuration that goes with the app: slow-client timeouts, no access log
    of its own (the middleware writes one line per request)."""
    import uvicorn

    values: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_level": settings.log_level,
        "access_log": False, "timeout_graceful_shutdown": 10,
        "timeout_keep_alive": settings.keep_alive_s,
        "http": http_protocol(settings.header_timeout_s),
    }
    values.update(options)
    return uvicorn.Config(app, **values)
