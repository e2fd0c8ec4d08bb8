"""Liveness, readiness and metrics: no key (keep them off the public ingress, docs/api.md).

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from api.backend import Backend
from api.errors import json_response


def router(backend: Backend) -> APIRouter:
    r = APIRouter(tags=["operations"])
    m = backend.metrics

    @r.get("/health", summary="Liveness: the process serves requests")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/ready", summary="Readiness: Redis and the broker are reachable",
           responses={503: {"description": "A dependency is unreachable"}})
    async def ready() -> Response:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(backend.redis.ping(), 1.0)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unreachable: {type(exc).__name__}"
        producer = backend.producer
        if producer is None:
            checks["broker"] = "unreachable: not connected yet"
        else:
            try:
                await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)
                checks["broker"] = "ok"
            except Exception as exc:
                checks["broker"] = f"unreachable: {type(exc).__name__}"
        ok = all(v == "ok" for v in checks.values())
        return json_response({"ready": ok, "checks": checks, "stream": backend.stream.status},
                             200 if ok else 503)

    if not backend.settings.metrics_port:
        # With CARTWISE_METRICS_PORT set, /metrics is served there only (api/server.py).
        @r.get("/metrics", summary="Prometheus metrics", response_class=Response)
        async def metrics() -> Response:
            return Response(m.render(), media_type=m.content_type)

    return r
