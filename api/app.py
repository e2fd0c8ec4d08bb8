"""The HTTP service's app factory (docs/api.md). The parts:

- api/backend.py: connections, keys and background tasks of one process;
- api/services/: what answers are made of (config documents, catalog cache, answers,
  audiences, the workers' progress);
- api/routers/: routes per domain (suggestions, shoppers, rules and experiments, ingest,
  operations, pages, and inspect: the stored documents, for the inspect page);
- api/errors.py: the one error model; api/middleware.py: body limits and request metrics;
- api/fastpath.py: the hot lookups without FastAPI's per-request work;
- api/server.py: uvicorn with connection limits and timeouts, and the metrics port.

Responses are serialised with orjson and returned as raw Responses; the pydantic models in
api/schemas.py document them in the OpenAPI spec without costing a validation per request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from api import errors
from api.backend import Backend
from api.fastpath import FastPath
from api.middleware import BodyLimit, Observe
from api.routers import ingest, inspect, operations, pages, rules, shoppers, suggestions
from cartwise.runtime import tune_gc
from cartwise.settings import Settings

API_VERSION = "1"


def create_asgi(settings: Settings | None = None) -> FastPath:
    """What `cartwise api` serves: the full app behind the fast path for hot lookups."""
    app = create_app(settings)
    return FastPath(app, app.state.backend, app.state.backend.settings.cors_origin_list)


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or Settings.from_env()
    backend = Backend(s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        tune_gc()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(
        title="cartwise",
        version=API_VERSION,
        summary="Live cross-sell suggestions for online shops, and an event collector.",
        description="Each route states the key it needs (X-API-Key header): read, ingest or "
                    "admin; a key of a higher role also works. Errors, limits and keys: "
                    "docs/api.md.",
        lifespan=lifespan,
        docs_url=None,  # served offline by api/routers/pages.py
        redoc_url=None,
        responses=errors.COMMON_ERRORS,
    )
    app.state.backend = backend
    errors.install(app)
    for module in (inspect, suggestions, shoppers, rules, ingest, operations):
        app.include_router(module.router(backend))
    app.include_router(pages.router(s))
    pages.mount(app, s)

    app.add_middleware(Observe, metrics=backend.metrics)
    app.add_middleware(CORSMiddleware, allow_origins=s.cors_origin_list,
                       allow_methods=["GET", "POST"],
                       allow_headers=["X-API-Key", "Content-Type", "X-Request-ID"],
                       expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    app.add_middleware(BodyLimit, limit=s.max_body_bytes, timeout_s=s.body_timeout_s,
                       buffer_bytes=s.body_buffer_bytes)
    return app
