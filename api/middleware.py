"""ASGI middleware of the full app: body size and time limits, and request metrics.

Raw ASGI classes rather than Starlette's BaseHTTPMiddleware: they cost nothing per request
beyond their own work, and they can refuse a body before it is read into memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from api.errors import ApiError
from api.metrics import ApiMetrics

CLOSE = {"Connection": "close"}  # uvicorn closes the connection after such an answer


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) before they are read into memory, and
    bodies that do not arrive within `timeout_s` of the request (408, connection closed), and
    any body once `buffer_bytes` of bodies are in progress (503, connection closed).

    The timeout is what stops a slow sender (slowloris): without it, each half-sent body
    holds a connection and its buffered bytes for as long as the client likes.
    """

    def __init__(self, app: Any, limit: int, timeout_s: float, buffer_bytes: int) -> None:
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        # Body bytes held by requests in progress, all together: many slow or large bodies
        # at once are refused (503) past `buffer_bytes`, so memory stays bounded.
        self.buffer_bytes, self.buffered = buffer_bytes, 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send, ApiError(413, "body_too_large",
                                              f"request body over {self.limit} bytes"))
            return
        seen = 0
        deadline = time.monotonic() + self.timeout_s
        started = complete = False

        async def limited() -> dict:
            nonlocal seen, complete
            if complete:  # after the body: waiting for a disconnect has no deadline
                return await receive()
            left = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except TimeoutError:
                raise ApiError(408, "body_timeout", f"the request body did not arrive within "
                               f"{self.timeout_s:g}s; send it in one go", headers=CLOSE
                               ) from None
            if message["type"] == "http.request":
                complete = not message.get("more_body", False)
                size = len(message.get("body", b""))
                seen += size
                self.buffered += size
                if self.buffered > self.buffer_bytes:
                    raise ApiError(503, "server_busy", "too many request bodies in progress; "
                                   "retry shortly", headers=CLOSE | {"Retry-After": "1"})
                if seen > self.limit:
                    raise ApiError(413, "body_too_large", f"request body over {self.limit} "
                                   "bytes", headers=CLOSE)
            return message

        async def sending(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except ApiError as exc:  # raised outside the routes (inside, the app answers it)
            if not started:
                await self._refuse(send, exc)
        finally:
            self.buffered -= seen

    @staticmethod
    async def _refuse(send: Callable, exc: ApiError) -> None:
        body = orjson.dumps({"error": {"status": exc.status, "reason": exc.reason,
                                       "detail": exc.detail}})
        # Closing the connection drops whatever the client still sends of the body.
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                *((k.lower().encode(), v.encode())
                                  for k, v in (exc.headers | CLOSE).items())]})
        await send({"type": "http.response.body", "body": body})


class Observe:
    """Count and time every request, labelled by route template (bounded cardinality)."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def observed(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                rid = scope.get("cartwise.request_id")
                if rid is not None:
                    message.setdefault("headers", []).append((b"x-request-id", rid.encode()))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            path = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - t0)
