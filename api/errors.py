"""One error model for every answer that is not a success (docs/api.md, "Errors").

Every error body is `{"error": {"status", "reason", "detail", "field"?}, "request_id"}`:
routes raise ApiError, and the handlers below turn FastAPI's, Starlette's and the store's
exceptions into the same shape, so no client ever sees a stack trace.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from redis.exceptions import RedisClusterException
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.schemas import ErrorBody

log = logging.getLogger("cartwise.api")

STORE_DOWN = (503, "store_unavailable", "suggestion store unreachable; retry shortly")
# A cluster client that reaches no node raises RedisClusterException, not a RedisError.
STORE_ERRORS = (aioredis.RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
# Rules and experiment writes go to the config topic before Redis (ConfigService.publish).
CONFIG_NOT_SAVED = {"model": ErrorBody, "description": "broker_unavailable: the broker did not "
                    "acknowledge the write to the config topic; nothing was applied, retry"}
# Statuses every route may answer, documented once for the whole app.
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Malformed request"},
    401: {"model": ErrorBody, "description": "Missing or unknown API key"},
    403: {"model": ErrorBody, "description": "API key lacks the role"},
    413: {"model": ErrorBody, "description": "Body or batch too large"},
    422: {"model": ErrorBody, "description": "A parameter or field is invalid"},
    429: {"model": ErrorBody, "description": "Rate limited; see Retry-After"},
}


class ApiError(Exception):
    """A 4xx/5xx answer with a stable reason code and the field at fault."""

    def __init__(self, status: int, reason: str, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.field = status, reason, detail, field
        self.headers = headers or {}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    """orjson straight into a raw Response: no per-request pydantic validation."""
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


_RID_PREFIX = uuid.uuid4().hex[:12]
_rid_counter = itertools.count()


def new_request_id(given: str | None) -> str:
    """The caller's X-Request-ID when it is sane, else a fresh, process-unique one."""
    if given and len(given) <= 64 and given.isprintable():
        return given
    return f"{_RID_PREFIX}{next(_rid_counter):08x}"


def request_id(request: Request) -> str:
    """This request's id, made once and kept in the scope (the Observe middleware echoes it)."""
    rid = request.scope.get("cartwise.request_id")
    if rid is None:
        rid = request.scope["cartwise.request_id"] = new_request_id(
            request.headers.get("x-request-id"))
    return rid


def problem(rid: str | None, status: int, reason: str, detail: str,
            field: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, "reason": reason, "detail": detail}
    if field:
        out["field"] = field
    body: dict[str, Any] = {"error": out}
    if rid is not None:
        body["request_id"] = rid
    return body


def error_body(request: Request, status: int, reason: str, detail: str,
               field: str | None = None) -> dict[str, Any]:
    return problem(request_id(request), status, reason, detail, field)


def install(app: FastAPI) -> None:
    """Route every exception an app may raise to the one error shape."""

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return json_response(error_body(request, exc.status, exc.reason, exc.detail, exc.field),
                             exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ())]
        field = ".".join(loc) or None
        detail = f"{field}: {first.get('msg', 'invalid')}" if field else "invalid request"
        reason = "invalid_body" if loc[:1] == ["body"] else "invalid_parameter"
        ctype = request.headers.get("content-type", "")
        if loc == ["body"] and not ctype.startswith("application/json"):
            detail = "send the body as JSON, with Content-Type: application/json"
        return json_response(error_body(request, 422, reason, detail, field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_response(error_body(request, exc.status_code, reason, str(exc.detail)),
                             exc.status_code, getattr(exc, "headers", None))

    async def on_store_down(request: Request, exc: Exception) -> Response:
        log.warning("request %s: store unavailable: %r", request_id(request), exc)
        return json_response(error_body(request, *STORE_DOWN), 503, {"Retry-After": "1"})

    for kind in STORE_ERRORS:
        app.add_exception_handler(kind, on_store_down)

    @app.exception_handler(ClientDisconnect)
    async def on_gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left (or a body timeout closed the connection): nobody reads this.
        log.debug("request %s: client disconnected", request_id(request))
        return json_response(error_body(request, 400, "client_disconnected",
                                        "the connection closed before the body was read"), 400)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        # Never a stack trace to the client; the server logs it (uvicorn, after this handler).
        rid = request_id(request)
        log.error("request %s failed: %r", rid, exc)
        return json_response(error_body(request, 500, "internal_error",
                                        f"unexpected error; quote request id {rid}"), 500)
