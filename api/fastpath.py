"""The two hot GET routes, served without FastAPI's routing and dependency machinery.

They are most of the traffic, and FastAPI's per-request work costs several times the Redis
read behind it (bench/api_latency.py, docs/api.md "Performance"). Same answers
(api/services/answers.py), same key check, rate limit, metrics and CORS; anything unusual
(a parameter to validate, an origin not allowed) goes on to the full app, which owns every
validation error's exact shape.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from api.backend import Backend
from api.errors import STORE_DOWN, STORE_ERRORS, ApiError, new_request_id, problem
from cartwise.contract import MAX_ID_LEN
from models import serving

log = logging.getLogger("cartwise.api")
_SUGGESTIONS = re.compile(r"^/v1/(items|users)/([^/]+)/suggestions$")
_ROUTES = {"items": "/v1/items/{item_id}/suggestions", "users": "/v1/users/{user_id}/suggestions"}
_CHOICES = {"items": ("kind", serving.ITEM_KINDS, "cross_sell"),
            "users": ("placement", serving.PLACEMENTS, "product")}


class FastPath:
    """ASGI app in front of the full one: answers valid hot lookups itself."""

    def __init__(self, app: Any, backend: Backend, origins: list[str]) -> None:
        self.app, self.backend = app, backend
        self.origins = {o.encode() for o in origins}
        self.max_k = backend.settings.max_k

    def _parse(self, kind: str, ident: str, query: bytes) -> tuple[str, int] | None:
        if not 0 < len(ident) <= MAX_ID_LEN:
            return None
        name, allowed, choice = _CHOICES[kind]
        k = 10
        seen = set()
        for pair in query.decode("latin-1").split("&") if query else ():
            key, _, value = pair.partition("=")
            if key in seen:
                return None
            seen.add(key)
            if key == "k" and value.isdigit() and 0 < len(value) <= 3:
                k = int(value)
                if not 1 <= k <= self.max_k:
                    return None
            elif key == name and value in allowed:
                choice = value
            else:
                return None
        return choice, k

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        # Outermost: everything else, lifespan included, goes on to the full app.
        match = (_SUGGESTIONS.match(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "GET" else None)
        parsed = match and self._parse(match[1], match[2], scope.get("query_string", b""))
        if not parsed:
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is not None and origin not in self.origins:
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        given = headers.get(b"x-request-id")
        rid = new_request_id(given.decode("latin-1") if given else None)
        key = headers.get(b"x-api-key")
        extra: dict[str, str] = {}
        b = self.backend
        try:
            b.authorize(key.decode("latin-1") if key else None, "read")
            choice, k = parsed
            if match[1] == "items":
                body = await b.answers.item(match[2], choice, k, rid=rid)
            else:
                body = await b.answers.user(match[2], choice, k, rid)
            status, payload = 200, body | {"request_id": rid}
        except ApiError as exc:
            status, extra = exc.status, exc.headers
            payload = problem(rid, exc.status, exc.reason, exc.detail, exc.field)
        except STORE_ERRORS as exc:
            log.warning("request %s: store unavailable: %r", rid, exc)
            status, payload, extra = 503, problem(rid, *STORE_DOWN), {"Retry-After": "1"}
        except Exception:
            log.exception("request %s failed", rid)
            status = 500
            payload = problem(rid, 500, "internal_error",
                              f"unexpected error; quote request id {rid}")
        data = orjson.dumps(payload)
        out = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode()), (b"x-request-id", rid.encode())]
        out += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
        if origin is not None:
            out += [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                    (b"access-control-expose-headers", b"X-Request-ID, Retry-After")]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": data})
        b.metrics.observe("GET", _ROUTES[match[1]], status, time.perf_counter() - t0)
