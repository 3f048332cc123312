"""Protection against hostile or overloading clients, before any route code runs.

What is bounded, and where:

- **Time to send the request headers**: ``header_timeout_s`` from connecting (or from the end of
  the previous response on a keep-alive connection) to the end of the headers. uvicorn has no
  such limit, so :func:`http_protocol` subclasses its h11 protocol; a client that is too slow gets
  408 and the connection is closed.
- **Idle keep-alive connections**: uvicorn's ``timeout_keep_alive`` (``keep_alive_s``).
- **Time to send the body**: ``body_timeout_s`` from the first read of the body to its last
  byte (:class:`GuardMiddleware`); a slower client gets 408.
- **Work admitted at once**: model routes (query, gallery add) take one of ``max_in_flight``
  slots once their body has arrived, before any frame is decoded (a slow upload holds no slot).
  A request that finds ``queue_size`` others already waiting gets 503 at once; one that waits
  ``admission_timeout_s`` without a slot gets 503 then. Both carry ``Retry-After``.
  ``max_in_flight <= queue_size`` (a settings rule), so an admitted request always finds room in
  the batch queue.
- **Unauthorised writes** are refused from the headers, before a byte of body is read.

Every response also gets the security headers (CSP without inline scripts, no framing, nosniff).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from vvireid.server.errors import ApiError

log = logging.getLogger(__name__)

# Pages that load only their own scripts and styles; images may be thumbnails, previews of
# picked files (blob:) or data: icons. Nothing may frame the page.
CSP_PAGE = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# Swagger UI and ReDoc set inline styles (scripts stay 'self' only); ReDoc runs a blob: worker.
CSP_DOCS = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]

_MODEL_ROUTES = re.compile(r"(POST /v1/query|POST /query|POST /v1/gallery)")
_WRITE_ROUTES = re.compile(r"(POST /v1/gallery|DELETE /v1/gallery/.+)")


class AdmissionRejectedError(Exception):
    """No slot for this request: the caller answers 503 with ``Retry-After``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    """At most ``limit`` requests in flight, at most ``max_waiting`` waiting, each for at most
    ``timeout_s``: under overload every request is answered quickly, 200 or 503."""

    def __init__(self, limit: int, max_waiting: int, timeout_s: float) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.in_flight = 0
        self.waiting = 0
        self._free = asyncio.Condition()

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.timeout_s))

    async def acquire(self) -> None:
        """Take a slot, or raise :class:`AdmissionRejectedError`."""
        async with self._free:
            if self.in_flight < self.limit and not self.waiting:
                self.in_flight += 1
                return
            if self.waiting >= self.max_waiting:
                raise AdmissionRejectedError(
                    f"server busy: {self.in_flight} requests running and {self.waiting} waiting "
                    f"(queue_size {self.max_waiting}); retry shortly", self.retry_after_s,
                )
            self.waiting += 1
            try:
                await asyncio.wait_for(
                    self._free.wait_for(lambda: self.in_flight < self.limit), self.timeout_s
                )
            except asyncio.TimeoutError:
                if self.in_flight < self.limit:
                    self._free.notify(1)  # this waiter may have taken a wake-up meant for a slot
                raise AdmissionRejectedError(
                    f"server busy: no slot within {self.timeout_s:g} s "
                    f"(admission_timeout_s; {self.limit} requests in flight); retry shortly",
                    self.retry_after_s,
                ) from None
            finally:
                self.waiting -= 1
            self.in_flight += 1

    async def release(self) -> None:
        async with self._free:
            self.in_flight -= 1
            self._free.notify(1)


class GuardMiddleware:
    """The API-key check for writes, admission and the body read timeout."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        admission: Admission,
        body_timeout_s: float,
        check_key: Callable[[str | None], ApiError | None],
        on_reject: Callable[[], None],
    ) -> None:
        self.app = app
        self.admission = admission
        self.body_timeout_s = body_timeout_s
        self.check_key = check_key
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # behind a proxy prefix (--root-path)
            path = path[len(root):]
        route = f"{scope['method']} {path}"
        if _WRITE_ROUTES.fullmatch(route):
            problem = self.check_key(_header(scope, b"x-api-key"))
            if problem is not None:
                await send_error(scope, send, problem.status_code, problem.code,
                                 problem.message, problem.part, problem.headers)
                return
        timed = self._timed_receive(receive)
        if not _MODEL_ROUTES.fullmatch(route):
            await self.app(scope, timed, send)
            return
        admitted = False

        async def admitting_receive() -> Message:
            """The body's last chunk is handed over only once the request has a slot.

            Admission waits for the whole body, so a client that uploads slowly holds no slot
            (its upload is bounded by body_timeout_s instead) and decoding starts at once.
            """
            nonlocal admitted
            message = await timed()
            last = message["type"] == "http.request" and not message.get("more_body", False)
            if last and not admitted:
                try:
                    await self.admission.acquire()
                except AdmissionRejectedError as exc:
                    self.on_reject()
                    raise ApiError(503, "overloaded", str(exc),
                                   headers={"Retry-After": str(exc.retry_after_s)}) from None
                admitted = True
            return message

        try:
            await self.app(scope, admitting_receive, send)
        finally:
            if admitted:
                await self.admission.release()

    def _timed_receive(self, receive: Receive) -> Callable[[], Awaitable[Message]]:
        """``receive`` that gives up once the body has taken ``body_timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        done = False

        async def timed() -> Message:
            nonlocal deadline, done
            if done:  # after the body: waiting for a disconnect is not bounded here
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ApiError(
                    408, "body_timeout",
                    f"request body not received within {self.body_timeout_s:g} s "
                    "(body_timeout_s)", part="body",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        return timed


def security_headers(path: str) -> list[tuple[bytes, bytes]]:
    """Headers every response carries; the API docs pages get their own CSP."""
    csp = CSP_DOCS if path in ("/docs", "/redoc") else CSP_PAGE
    return [*SECURITY_HEADERS, (b"content-security-policy", csp.encode())]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_error(
    scope: Scope, send: Send, status: int, code: str, message: str, part: str | None,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer with the API's JSON error shape from ASGI code (outside FastAPI's handlers)."""
    request_id = scope.get("state", {}).get("request_id")
    body = json.dumps(
        {"error": {"code": code, "message": message, "part": part}, "request_id": request_id}
    ).encode()
    raw: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def http_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol plus a deadline on receiving each request's headers."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are complete
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            body = b"request headers not received in time\n"
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n"
                + body
            )
            self.transport.close()

    return HeaderTimeoutProtocol
