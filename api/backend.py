"""Connections, keys and background tasks of one API process; the services hang off it.

The Backend owns what has a lifetime (the Redis pool, the Kafka producer, the refresh and
stream-watch tasks) and the key check; what answers are made of lives in api/services/.

No `from __future__ import annotations`: FastAPI reads the key check's signature at runtime,
and it names a local value.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from aiokafka import AIOKafkaProducer
from fastapi import Request, Security
from fastapi.security import APIKeyHeader

from api.auth import ROLES, KeyRing, RateLimiter, allows
from api.errors import ApiError
from api.metrics import ApiMetrics
from api.server import MetricsPort
from api.services.answers import Answers
from api.services.catalog import CACHE_REFRESH_S, CatalogCache
from api.services.config import ConfigService
from api.services.stream import StreamWatch
from cartwise.redisconn import connect_async
from cartwise.settings import Settings
from streams.store import Store

log = logging.getLogger("cartwise.api")

# One OpenAPI security scheme per role, so /docs says which key each route needs.
SCHEMES = {role: f"{role.capitalize()}Key" for role in ROLES}
SCHEME_TEXT = {
    "read": "A key with role 'read' (or 'ingest' or 'admin'): storefront lookups; public, it "
            "ships in page code.",
    "ingest": "A key with role 'ingest' (or 'admin'): sending events; semi-public, like an "
              "analytics write key.",
    "admin": "A key with role 'admin': back office, rules, experiments, shoppers; secret.",
}


class Backend:
    """Connections and shared state of one API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect_async(settings, max_connections=256, socket_timeout=2.0,
                                   socket_connect_timeout=2.0)
        self.store = Store(self.redis, settings.prefix)  # the workers' reads, shared
        self.keys = self.store.keys
        self.keyring = KeyRing(settings.api_keys)
        self.auth = settings.api_auth != "off"
        if self.auth and not len(self.keyring):
            raise ValueError("no API keys configured: set CARTWISE_API_KEYS (make one with "
                             "`cartwise api-key ROLE`) or CARTWISE_API_AUTH=off for local "
                             "development")
        self.limiter = RateLimiter({"read": settings.rate_read, "ingest": settings.rate_ingest,
                                    "admin": settings.rate_admin,
                                    "events": settings.rate_events},
                                   min_burst={"events": float(settings.max_batch)})
        self.metrics = ApiMetrics()
        self.producer: AIOKafkaProducer | None = None
        self.config = ConfigService(settings, self.store, lambda: self.producer)
        self.catalog = CatalogCache(self.redis, self.store, self.keys)
        self.answers = Answers(settings, self.redis, self.store, self.config, self.catalog,
                               self.metrics)
        self.stream = StreamWatch(settings, self.store, self.metrics)
        self._tasks: list[asyncio.Task] = []
        self.metrics_port = (MetricsPort(self.metrics, settings.api_host, settings.metrics_port)
                             if settings.metrics_port else None)

    async def start(self) -> None:
        if self.metrics_port is not None:
            self.metrics_port.start()
        try:
            await self.config.load()
        except Exception as exc:  # Redis not up yet: the refresh loop keeps trying
            log.warning("rules not loaded yet: %r", exc)
        self._tasks = [asyncio.create_task(self._start_producer()),
                       asyncio.create_task(self._refresh()),
                       asyncio.create_task(self.stream.run())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.metrics_port is not None:
            self.metrics_port.stop()
        if self.producer is not None:
            await self.producer.stop()
        await self.redis.aclose()

    async def _refresh(self) -> None:
        """Keep config and the catalog copies fresh off the request path: a request then
        waits on Redis only for facts or a category it has never seen."""
        while True:
            await asyncio.sleep(CACHE_REFRESH_S)
            try:
                await self.catalog.refresh()
                await self.config.load()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: requests will say so; keep trying
                log.debug("cache refresh failed: %r", exc)

    async def _start_producer(self) -> None:
        """Connect to the broker in the background: reads work while it is unreachable."""
        delay = 0.5
        while True:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.settings.bootstrap, acks="all", linger_ms=2,
                request_timeout_ms=int(self.settings.produce_timeout_s * 1000))
            try:
                await producer.start()
            except asyncio.CancelledError:
                await producer.stop()
                raise
            except Exception as exc:
                await producer.stop()
                log.warning("broker not reachable yet (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(10.0, delay * 2)
                continue
            self.producer = producer
            return

    # -- keys ---------------------------------------------------------------------------------

    def require(self, needed: str) -> Callable[..., Awaitable[str]]:
        """A route dependency: the caller's key must have role `needed` or above."""
        header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name=SCHEMES[needed],
                              description=SCHEME_TEXT[needed])

        async def check(request: Request, key: Annotated[str | None, Security(header)]) -> str:
            role = self.authorize(key, needed)
            request.scope["cartwise.key"] = key
            return role

        return check

    def authorize(self, key: str | None, needed: str) -> str:
        """The key's role, if it may use a route needing `needed` now; else an ApiError."""
        if not self.auth:
            return "anonymous"
        if not key:
            raise ApiError(401, "missing_api_key", "send an API key in the X-API-Key header",
                           "header.X-API-Key")
        found = self.keyring.role_of(key)
        if found is None:
            raise ApiError(401, "unknown_api_key", "this API key is not configured",
                           "header.X-API-Key")
        role, digest = found
        if not allows(role, needed):
            raise ApiError(403, "forbidden", f"a '{role}' key cannot use this route; it needs "
                           f"'{needed}'", "header.X-API-Key")
        self._take(digest, role, role, 1.0)
        return role

    def charge_events(self, key: str | None, count: int) -> None:
        """Take `count` events from the key's event budget (POST /v1/events): the ingest
        limit counts events, not requests, so a batch of 500 costs 500."""
        if not self.auth or not key:
            return
        found = self.keyring.role_of(key)
        if found is not None:
            self._take(f"{found[1]}:events", "events", found[0], float(count))

    def _take(self, who: str, bucket: str, role: str, cost: float) -> None:
        wait = self.limiter.take(who, bucket, time.monotonic(), cost)
        if wait > 0:
            self.metrics.rate_limited.labels(role).inc()
            what = "event" if bucket == "events" else f"'{role}'"
            raise ApiError(429, "rate_limited", f"over the {what} rate limit; retry in "
                           f"{wait:.2f}s", headers={"Retry-After": str(max(1, round(wait)))})
