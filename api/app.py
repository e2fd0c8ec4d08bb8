"""The HTTP service: FastAPI routes over Redis reads and a Kafka producer (docs/api.md).

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime,
and some of their annotations name local values.

Reads never score anything: the workers keep ready lists in Redis and models/serving.py only
selects, filters by the live catalog and fills short answers with trending items. Responses
are serialised with orjson and returned as raw Responses; the pydantic models in
api/schemas.py document them in the OpenAPI spec without costing a validation per request.
"""


import asyncio
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from api.auth import KeyRing, RateLimiter, allows
from api.metrics import ApiMetrics
from api.schemas import (
    CATALOG_SCHEMA,
    EVENT_SCHEMA,
    EXPERIMENT_BODY,
    RULES_BODY,
    CartRequest,
    CatalogPage,
    ErrorBody,
    IngestResponse,
    Suggestions,
    Trending,
    batch_body,
)
from cartwise.contract import (
    MAX_ID_LEN,
    ContractError,
    dlq_headers,
    prepare_catalog,
    prepare_event,
)
from cartwise.lag import StallDetector
from cartwise.lag import collect as collect_lag
from cartwise.runtime import tune_gc
from cartwise.settings import Settings
from models import serving
from models.audience import RELATED_PER_KIND, rank_audience, related_items
from models.config import ModelConfig
from models.experiments import (
    MAX_EXPERIMENTS,
    RANKINGS,
    Experiment,
    ExperimentError,
    Strategy,
    choose,
    parse_counters,
)
from models.experiments import report as experiment_report
from models.feedback import FEATURES, combine, features, rerank
from models.ranking import rank_for_cart
from models.rules import NO_RULES, LadderStep, Rules, RulesError, ladder, order_by_price
from models.rules import apply as apply_rules
from models.segments import rfm
from streams.store import Store
from streams.topics import ensure_topics

log = logging.getLogger("cartwise.api")
STATIC = FsPath(__file__).parent / "static"
TRENDING_READ = 60  # trending entries read per set: enough to fill k after filtering
TRENDING_TTL_S = 1.0  # how stale a process's copy of the trending sets may be
CACHE_REFRESH_S = 0.5  # how often the catalog version, rules and trending sets are checked
MAX_AUDIENCE = 1000  # shoppers per audience request
AUDIENCE_READ = 200  # newest shoppers read per related item and channel
SHOWN_TTL_S = 2 * 86400  # a day's frequency-cap counts outlive the day by one day


def parse_span(text: str) -> float | None:
    """'7d' or '36h' in seconds; None if malformed or over 90 days."""
    m = re.fullmatch(r"(\d{1,4}(?:\.\d{1,3})?)([dh])", text.strip())
    if not m:
        return None
    seconds = float(m[1]) * (86400.0 if m[2] == "d" else 3600.0)
    return seconds if 0 < seconds <= 90 * 86400.0 else None


def utc_day(now: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(time.time() if now is None else now))
CATALOG_CACHE_MAX = 200_000
API_VERSION = "1"
CONFIG = ModelConfig()  # the model settings the workers run with (their defaults)


class ApiError(Exception):
    """A 4xx/5xx answer with a stable reason code and the field at fault."""

    def __init__(self, status: int, reason: str, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.field = status, reason, detail, field
        self.headers = headers or {}


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def request_id(request: Request) -> str:
    rid = request.scope.get("cartwise.request_id")
    if rid is None:
        rid = request.scope["cartwise.request_id"] = new_request_id(
            request.headers.get("x-request-id"))
    return rid


_RID_PREFIX = uuid.uuid4().hex[:12]
_rid_counter = itertools.count()


def new_request_id(given: str | None) -> str:
    """The caller's X-Request-ID when it is sane, else a fresh, process-unique one."""
    if given and len(given) <= 64 and given.isprintable():
        return given
    return f"{_RID_PREFIX}{next(_rid_counter):08x}"


def problem(rid: str, status: int, reason: str, detail: str,
            field: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, "reason": reason, "detail": detail}
    if field:
        out["field"] = field
    return {"error": out, "request_id": rid}


def error_body(request: Request, status: int, reason: str, detail: str,
               field: str | None = None) -> dict[str, Any]:
    return problem(request_id(request), status, reason, detail, field)


STORE_DOWN = (503, "store_unavailable", "suggestion store unreachable; retry shortly")
STORE_ERRORS = (aioredis.RedisError, OSError, asyncio.TimeoutError)
# Rules and experiment writes go to the config topic before Redis (Backend.publish_config).
CONFIG_NOT_SAVED = {"model": ErrorBody, "description": "broker_unavailable: the broker did not "
                    "acknowledge the write to the config topic; nothing was applied, retry"}


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413) before they are read into memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope: dict, send: Callable) -> None:
        body = orjson.dumps({"error": {"status": 413, "reason": "body_too_large",
                                       "detail": f"request body over {self.limit} bytes"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class Backend:
    """Connections and shared state of one API process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = aioredis.Redis.from_url(settings.redis_url, max_connections=256,
                                             socket_timeout=2.0, socket_connect_timeout=2.0)
        self.store = Store(self.redis, settings.prefix)  # the workers' reads, shared
        self.keys = self.store.keys
        self.keyring = KeyRing(settings.api_keys)
        self.auth = settings.api_auth != "off"
        if self.auth and not len(self.keyring):
            raise ValueError("no API keys configured: set CARTWISE_API_KEYS (make one with "
                             "`cartwise api-key ROLE`) or CARTWISE_API_AUTH=off for local "
                             "development")
        self.limiter = RateLimiter({"read": settings.rate_read, "ingest": settings.rate_ingest,
                                    "admin": settings.rate_admin})
        self.producer: AIOKafkaProducer | None = None
        self._producer_task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        self._stream_task: asyncio.Task | None = None
        self.stream: dict[str, Any] = {"status": "unknown", "detail": "not checked yet"}
        self.metrics = ApiMetrics()
        # category (None: shop-wide) -> (read at, ranked (item, score), catalog facts)
        self._trending: dict[str | None, tuple[float, list, dict]] = {}
        self._catalog: dict[str, dict | None] = {}  # item -> facts (None: not in the catalog)
        self._catalog_generation = 0  # bumped whenever the copy above is dropped
        self.rules: Rules = NO_RULES
        self.segments = settings.segments  # validated here: bad thresholds stop the start
        self._rules_raw: bytes | None = None
        if settings.ranking not in RANKINGS:
            raise ValueError(f"CARTWISE_RANKING must be one of {list(RANKINGS)}, not "
                             f"{settings.ranking!r}")
        self.default_strategy = Strategy(ranking=settings.ranking)
        self.experiments: dict[str, Experiment] = {}
        self._experiments_raw: bytes | None = None
        self.reranker: dict[str, Any] = combine([], settings.reranker_min_examples)
        self._background: set[asyncio.Task] = set()  # served documents being written
        # Rules and experiment writes of this process, one at a time: the config topic and
        # Redis then see them in the same order.
        self._config_lock = asyncio.Lock()
        self._config_topic_ready = False  # created (compacted) by this process, or found

    async def start(self) -> None:
        try:
            await self.load_rules()
            await self.load_experiments()
            await self.load_reranker()
        except Exception as exc:  # Redis not up yet: the refresh loop keeps trying
            log.warning("rules not loaded yet: %r", exc)
        self._producer_task = asyncio.create_task(self._start_producer())
        self._refresh_task = asyncio.create_task(self._refresh_caches())
        self._stream_task = asyncio.create_task(self._watch_stream())

    async def _watch_stream(self) -> None:
        """Check the workers' progress (cartwise lag) and flag stalled partitions.

        Reported in /ready's body and as metrics, but it does not make this process unready:
        suggestions are still served while a worker is stuck, only staler. Alert on
        cartwise_stream_stalled instead (docs/operations.md).
        """
        detector = StallDetector(self.settings.stall_after_s)
        while True:
            try:
                rows = await asyncio.to_thread(collect_lag, self.settings)
                stalled = detector.update(time.monotonic(), rows)
                for row in rows:
                    labels = (row.topic, str(row.partition))
                    self.metrics.stream_lag.labels(*labels).set(row.lag)
                    self.metrics.stream_stalled.labels(*labels).set(0)
                for row, _ in stalled:
                    self.metrics.stream_stalled.labels(row.topic, str(row.partition)).set(1)
                # Progress committed, yet no generation: Redis lost the state (the workers stop).
                lost = (any((row.committed or 0) > 0 for row in rows)
                        and not await self.redis.exists(self.store.keys.generation))
                self.metrics.state_lost.set(1 if lost else 0)
                self.stream = {
                    "status": "state_lost" if lost else "stalled" if stalled else "ok",
                    "max_lag": max((row.lag for row in rows), default=0),
                    "stalled": [{"topic": row.topic, "partition": row.partition,
                                 "lag": row.lag, "no_progress_s": round(idle)}
                                for row, idle in stalled],
                    "checked_at": time.time()}
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stream = {"status": "unknown", "detail": f"{type(exc).__name__}: {exc}"[:200],
                               "checked_at": time.time()}
            await asyncio.sleep(self.settings.stall_check_s)

    async def _refresh_caches(self) -> None:
        """Keep the catalog and trending copies fresh off the request path.

        Catalog facts are dropped when the workers bump the catalog version (checked every
        CACHE_REFRESH_S); trending sets in use are re-read every TRENDING_TTL_S. A request
        then waits on Redis only for facts or a category it has never seen.
        """
        version = None
        while True:
            await asyncio.sleep(CACHE_REFRESH_S)
            try:
                now_version = await self.redis.get(self.keys.catalog_version)
                if now_version != version:
                    version = now_version
                    self._catalog_generation += 1
                    self._catalog.clear()
                await self.load_rules()
                await self.load_experiments()
                await self.load_reranker()
                stale = [c for c, (at, _, _) in self._trending.items()
                         if time.monotonic() - at >= TRENDING_TTL_S]
                if stale:
                    await self._read_trending(stale)
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

    async def stop(self) -> None:
        for task in (self._producer_task, self._refresh_task, self._stream_task):
            if task is not None:
                task.cancel()
        if self.producer is not None:
            await self.producer.stop()
        await self.redis.aclose()

    def require(self, needed: str) -> Callable[..., Awaitable[str]]:
        header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description=f"An API key with role '{needed}' or above")

        async def check(request: Request, key: Annotated[str | None, Security(header)]) -> str:
            return self.authorize(key, needed)

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
        wait = self.limiter.take(digest, role, time.monotonic())
        if wait > 0:
            self.metrics.rate_limited.labels(role).inc()
            raise ApiError(429, "rate_limited", f"over the '{role}' rate limit; retry in "
                           f"{wait:.2f}s", headers={"Retry-After": str(max(1, round(wait)))})
        return role

    async def load_rules(self) -> None:
        """Pick up a rules change made through any API process (checked every CACHE_REFRESH_S)."""
        raw = await self.redis.get(self.keys.rules)
        if raw == self._rules_raw:
            return
        try:
            doc = orjson.loads(raw) if raw else None
            # The stored time of the change, not this read's (an API restart, a second
            # process or a document restored by `cartwise rebuild` reads it again).
            when = doc.get("updated_at") if isinstance(doc, dict) else None
            when = when if isinstance(when, int | float) and not isinstance(when, bool) else None
            self.rules = Rules.parse(doc, now=when) if raw else NO_RULES
        except (ValueError, RulesError) as exc:
            # Only PUT /v1/rules writes the key, after validating; keep the last good rules.
            log.error("stored rules are not usable, keeping the previous ones: %s", exc)
        self._rules_raw = raw

    async def publish_config(self, key: bytes, raw: bytes) -> None:
        """Put a rules or experiments document on the compacted config topic, keyed `key`,
        and wait for the broker's acknowledgement (acks=all): `cartwise rebuild` restores
        from there what Redis lost (docs/operations.md).

        Called before the Redis write, so the log is never behind Redis: a document Redis
        holds was acknowledged by the broker first. When the produce fails, nothing is
        written to Redis and the caller gets 503 `broker_unavailable` naming the broker.
        (A produce that timed out may still land in the log later: the log can be ahead of
        Redis by a document the client was told to retry, never behind.)
        """
        s = self.settings
        what = key.decode()
        brokers = ",".join(s.bootstrap)
        producer = self.producer
        if producer is None:
            raise ApiError(503, "broker_unavailable", f"{what} not saved: the broker "
                           f"({brokers}) is not reachable yet; the stored {what} are "
                           "unchanged, retry shortly",
                           headers={"Retry-After": "1"})
        try:
            if not self._config_topic_ready:
                # Created here too, not only by the workers: a topic the broker auto-creates
                # on the first send would not be compacted.
                await asyncio.wait_for(asyncio.to_thread(
                    ensure_topics, s, s.produce_timeout_s, (s.config_topic,)),
                    s.produce_timeout_s)
                self._config_topic_ready = True
            await asyncio.wait_for(producer.send_and_wait(s.config_topic, raw, key=key),
                                   s.produce_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout or a Kafka error: Redis is left as it was
            log.warning("writing %s to %s failed: %r", what, s.config_topic, exc)
            why = (f"no answer within {s.produce_timeout_s:g}s"
                   if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__)
            raise ApiError(503, "broker_unavailable", f"{what} not saved: the broker "
                           f"({brokers}) did not acknowledge the write to {s.config_topic} "
                           f"({why}); the stored {what} are unchanged, retry",
                           headers={"Retry-After": "1"}) from None

    async def save_rules(self, rules: Rules) -> None:
        raw = orjson.dumps(rules.to_dict())
        async with self._config_lock:
            await self.publish_config(b"rules", raw)  # first: the log is never behind Redis
            await self.redis.set(self.keys.rules, raw)
        self.rules, self._rules_raw = rules, raw

    async def load_experiments(self) -> None:
        """Pick up experiment changes made through any API process (every CACHE_REFRESH_S)."""
        raw = await self.redis.get(self.keys.experiments)
        if raw == self._experiments_raw:
            return
        try:
            docs = orjson.loads(raw) if raw else {}
            self.experiments = {i: Experiment.parse(i, d) for i, d in docs.items()}
        except (ValueError, ExperimentError) as exc:
            log.error("stored experiments are not usable, keeping the previous ones: %s", exc)
        self._experiments_raw = raw

    async def save_experiments(self, experiments: dict[str, Experiment]) -> None:
        raw = orjson.dumps({i: {k: v for k, v in e.to_dict().items() if k != "id"}
                            for i, e in experiments.items()})
        async with self._config_lock:
            await self.publish_config(b"experiments", raw)  # first, as in save_rules
            await self.redis.set(self.keys.experiments, raw)
        self.experiments, self._experiments_raw = experiments, raw

    async def load_reranker(self) -> None:
        """The partitions' re-rankers, combined (models/feedback.py, combine)."""
        raws = await self.redis.mget([self.keys.reranker(p)
                                      for p in range(self.settings.partitions)])
        self.reranker = combine((orjson.loads(r) for r in raws if r),
                                self.settings.reranker_min_examples)

    def strategy(self, user_id: str | None
                 ) -> tuple[dict[str, str] | None, Strategy, Rules, bool]:
        """The shopper's experiment variant (None outside any), its strategy, the rules it
        applies and whether the re-ranker orders the answer."""
        chosen = choose(self.experiments, user_id, time.time())
        if chosen is None:
            experiment, strategy = None, self.default_strategy
        else:
            exp, variant = chosen
            experiment, strategy = {"id": exp.id, "variant": variant.name}, variant.strategy
        rules = self.rules if strategy.rules else NO_RULES
        reranked = strategy.ranking == "auto" and bool(self.reranker["active"])
        return experiment, strategy, rules, reranked

    def order(self, entries: list[dict], catalog: dict, anchor: dict | None, placement: str,
              existing: bool, evidence: dict[str, dict], reranked: bool
              ) -> tuple[list[dict], dict[str, list[float]]]:
        """Each entry's features, taken in the plain order; the re-ranker's order if asked."""
        top = max((e["score"] or 0.0 for e in entries), default=0.0)
        xs = [features(e, n, top, catalog.get(e["item_id"]), anchor, placement, existing,
                       evidence.get(e["item_id"])) for n, e in enumerate(entries)]
        by_item = {e["item_id"]: x for e, x in zip(entries, xs, strict=True)}
        if reranked and entries:
            entries = rerank(entries, xs, self.reranker["weights"], self.reranker["intercept"])
        return entries, by_item

    def remember(self, rid: str, user_id: str | None, placement: str,
                 experiment: dict[str, str] | None, entries: list[dict],
                 xs: dict[str, list[float]], catalog: dict, anchor: dict | None,
                 existing: bool) -> None:
        """Keep what was served under `rid` for the workers (docs/experiments.md), off the
        request path. Entries added after ordering (pins, fillers) get features where they
        ended up."""
        ttl = self.settings.served_ttl_s
        if ttl <= 0 or not entries:
            return
        top = max((e["score"] or 0.0 for e in entries), default=0.0)
        # Four decimals are plenty for the model and keep a record under 1.5 KB: the API keeps
        # requests/s x TTL of them (docs/redis.md).
        doc = {"u": user_id, "p": placement,
               "e": experiment["id"] if experiment else None,
               "v": experiment["variant"] if experiment else None,
               "x": {e["item_id"]: [round(v, 4) for v in xs.get(e["item_id"]) or features(
                   e, n, top, catalog.get(e["item_id"]), anchor, placement, existing)]
                   for n, e in enumerate(entries)}}
        task = asyncio.create_task(self._remember(self.keys.served(rid), orjson.dumps(doc), ttl))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _remember(self, key: str, raw: bytes, ttl: float) -> None:
        try:
            await self.redis.set(key, raw, ex=max(1, int(ttl)))
        except Exception as exc:  # feedback for this answer is lost, the answer was not
            self.metrics.served_lost.inc()
            log.debug("served document not written: %r", exc)

    async def shown_today(self, user_id: str) -> dict[str, int]:
        got = await self.redis.hgetall(self.keys.shown(user_id, utc_day()))
        return {k.decode(): int(v) for k, v in got.items()}

    async def count_shown(self, user_id: str, entries: list[dict]) -> None:
        key = self.keys.shown(user_id, utc_day())
        pipe = self.redis.pipeline(transaction=False)
        for e in entries:
            pipe.hincrby(key, e["item_id"], 1)
        pipe.expire(key, SHOWN_TTL_S)
        await pipe.execute()

    async def audience(self, item_id: str, k: int) -> dict[str, Any]:
        """Ranked shoppers for an item (docs/audiences.md): three pipelined reads."""
        keys = self.keys
        raw = await self.redis.get(keys.item(item_id))
        doc = orjson.loads(raw) if raw else None
        heads = list(dict.fromkeys(
            e["item_id"] for kind, n in RELATED_PER_KIND.items()
            for e in (doc or {}).get(kind, ())[:n] if e["item_id"] != item_id))
        docs = await self.store.item_lists(heads)
        related = related_items(item_id, doc, docs)
        pipe = self.redis.pipeline(transaction=False)
        for r in related:
            pipe.zrevrange(keys.audience("buy", r.item_id), 0, AUDIENCE_READ - 1,
                           withscores=True)
            pipe.zrevrange(keys.audience("view", r.item_id), 0, AUDIENCE_READ - 1,
                           withscores=True)
        got = await pipe.execute()
        touches = {r.item_id: ([(u.decode(), ts) for u, ts in got[2 * n]],
                               [(u.decode(), ts) for u, ts in got[2 * n + 1]])
                   for n, r in enumerate(related)}
        now = time.time()
        # Rank more than asked, then drop those whose profile says they bought it already.
        ranked = rank_audience(related, touches, now, 2 * k + 20)
        owners: set[str] = set()
        if ranked:
            profiles = await self.redis.mget([keys.profile(e["user_id"]) for e in ranked])
            owners = {e["user_id"] for e, p in zip(ranked, profiles, strict=True)
                      if p and item_id in orjson.loads(p).get("bought", ())}
        shoppers = [e for e in ranked if e["user_id"] not in owners][:k]
        return {"item_id": item_id, "shoppers": shoppers,
                "related": [{"item_id": r.item_id, "strength": round(r.strength, 6),
                             "kind": r.kind} for r in related[:10]],
                "known_item": doc is not None, "served_at": now}

    # -- Redis reads ------------------------------------------------------------------------

    async def facts(self, items: list[str]) -> dict[str, dict | None]:
        """Catalog facts of `items`, as of at most CACHE_REFRESH_S ago.

        Every answer filters by stock and shows prices, for ten or more items: reading them
        from Redis per request would cost more than the lookup itself.
        """
        cache = self._catalog
        out: dict[str, dict | None] = {}
        missing = []
        for i in items:
            if i in cache:
                out[i] = cache[i]
            else:
                missing.append(i)
        if missing:
            generation = self._catalog_generation
            got = await self.store.catalog_facts(missing)
            out.update(got)
            # Read before a catalog change was noticed: answer with it, but do not keep it.
            if generation == self._catalog_generation:
                if len(cache) + len(missing) > CATALOG_CACHE_MAX:
                    cache.clear()
                cache.update(got)
        return out

    async def _read_trending(self, categories: list[str | None]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for c in categories:
            pipe.zrevrange(self.keys.trending(c), 0, TRENDING_READ - 1, withscores=True)
        got = await pipe.execute()
        ranked_sets = [[(i.decode(), s) for i, s in ranked] for ranked in got]
        ids = list(dict.fromkeys(i for ranked in ranked_sets for i, _ in ranked))
        facts = await self.facts(ids)
        if len(self._trending) > 10_000:
            self._trending.clear()
        now = time.monotonic()
        for c, ranked in zip(categories, ranked_sets, strict=True):
            self._trending[c] = (now, ranked, {i: facts[i] for i, _ in ranked})

    async def trending_sets(self, categories: list[str | None]
                            ) -> tuple[list[tuple[list, str | None]], dict[str, dict | None]]:
        """Trending (item, score) lists per category (None: shop-wide), with catalog facts.

        A per-process copy, re-read in the background: trending moves slowly, and every
        cold-start answer needs it, so reading it per request would make cold starts slow.
        """
        missing = [c for c in categories if c not in self._trending]
        if missing:
            await self._read_trending(missing)
        sets, catalog = [], {}
        for c in categories:
            _, ranked, facts = self._trending.get(c, (0.0, [], {}))
            sets.append((ranked, c))
            catalog.update(facts)
        return sets, catalog

    async def fill(self, entries: list[dict], catalog: dict[str, dict | None], k: int,
                   exclude: set[str], categories: list[str | None],
                   first: Callable[[list, dict], list] | None = None,
                   price_cap: float | None = None, rules: Rules | None = None,
                   enabled: bool = True) -> tuple[list[dict], str | None]:
        """Top up a short answer from trending sets (category first, then shop-wide)."""
        if len(entries) >= k or not enabled:
            return entries, None
        sets, facts = await self.trending_sets(list(dict.fromkeys([*categories, None])))
        for i, f in facts.items():
            catalog.setdefault(i, f)
        if first is not None:
            sets = [(first(ranked, catalog), c) for ranked, c in sets if c is not None] + sets
        rules = self.rules if rules is None else rules
        if not rules.empty:
            sets = [([(i, sc) for i, sc in ranked if rules.permits(i, catalog.get(i))], c)
                    for ranked, c in sets]
        if price_cap is not None:
            sets = [([(i, sc) for i, sc in ranked
                      if ((catalog.get(i) or {}).get("price") or 0.0) <= price_cap], c)
                    for ranked, c in sets]
        entries, used = serving.fill(entries, sets, catalog, k, exclude)
        if used:
            self.metrics.fallback.labels(used.partition(":")[0]).inc()
        return entries, used


    # -- answers (shared by the FastAPI routes and the fast path) -----------------------------

    def body(self, entries: list[dict], catalog: dict, fallback: str | None,
             doc: dict | None, **extra: Any) -> dict[str, Any]:
        exp = extra.get("experiment")
        self.metrics.answers.labels(exp["id"] if exp else "", exp["variant"] if exp else "",
                                    extra.get("ranking") or "plain").inc()
        return {"items": serving.enrich(entries, catalog), "fallback": fallback,
                "model": doc.get("model") if doc else None,
                "as_of": doc.get("as_of") if doc else None,
                "generated_at": doc.get("generated_at") if doc else None,
                "served_at": time.time(), **extra}

    def shopper_policy(self, user_id: str | None, raw: bytes | None, rules: Rules
                       ) -> tuple[LadderStep | None, float | None, dict[str, Any] | None]:
        """The price-ladder step, average order and a summary for this shopper (docs/rules.md).

        `raw` is their cw:profile document, read by the caller in the same round trip as the
        list. A shopper with no profile has 0 orders: a step starting at 0 applies, if any.
        """
        if not rules.needs_profile or user_id is None:
            return None, None, None
        orders = orjson.loads(raw)["orders"] if raw else []
        amounts = [a for _, a in orders if a is not None]
        average = sum(amounts) / len(amounts) if amounts else None
        quadrant = rfm(orders, time.time(), self.segments).quadrant
        step = rules.step(len(orders))
        return step, average, {
            "orders": len(orders), "quadrant": quadrant,
            "step": step.min_orders if step else None,
            "budget": quadrant in rules.budget_quadrants,
            "average_order": round(average, 2) if average is not None else None}

    async def item_answer(self, item_id: str, kind: str, k: int,
                          user_id: str | None = None, rid: str | None = None) -> dict[str, Any]:
        experiment, strategy, rules, reranked = self.strategy(user_id)
        if user_id is not None and rules.needs_profile:  # one round trip for both
            raw, profile = await self.redis.mget(self.keys.item(item_id),
                                                 self.keys.profile(user_id))
        else:
            raw, profile = await self.redis.get(self.keys.item(item_id)), None
        doc = orjson.loads(raw) if raw else None
        step, average, shopper = self.shopper_policy(user_id, profile, rules)
        if shopper and shopper["budget"] and kind == "upsell":
            kind = "cross_sell"  # a budget-limited shopper is offered complements instead
        source = "alternatives" if kind == "upsell" else kind
        listed = doc.get(source, []) if doc else []
        # Pins belong next to an item's complements; the other kinds answer other questions.
        pinned = rules.wanted([item_id], False) if kind == "cross_sell" else []
        room = k if rules.empty and not reranked else k + serving.HEADROOM
        wanted = ([e["item_id"] for e in listed] if kind == "upsell"
                  else serving.candidates(listed, room))
        catalog = await self.facts([item_id, *wanted, *pinned])
        anchor = catalog.get(item_id)
        if kind == "upsell":
            entries = serving.upsell(item_id, doc, anchor, catalog, room)
        else:
            entries = serving.in_stock(listed, catalog, room, {item_id})
        existing = bool(shopper and shopper["orders"])
        entries, xs = self.order(entries, catalog, anchor, "product", existing,
                                 {e["item_id"]: e for e in listed}, reranked)
        if not rules.empty:
            entries = ladder(entries, step, catalog, average)
            entries = apply_rules(entries, rules, catalog, k,
                                  [item_id] if kind == "cross_sell" else [], {item_id})
            entries = order_by_price(entries, step, catalog)
        entries = entries[:k]
        category = (anchor or {}).get("category")
        first = ((lambda ranked, cat: serving.upsell_trending(ranked, anchor, cat))
                 if kind == "upsell" else None)
        cap = step.cap(average) if step else None
        entries, fallback = await self.fill(entries, catalog, k, {item_id}, [category], first,
                                            cap, rules, strategy.fill)
        if rid is not None:
            self.remember(rid, user_id, "product", experiment, entries, xs, catalog, anchor,
                          existing)
        extra = {"shopper": shopper} if shopper else {}
        return self.body(entries, catalog, fallback, doc, item_id=item_id, kind=kind,
                         experiment=experiment, ranking="reranker" if reranked else "plain",
                         **extra)

    async def user_answer(self, user_id: str, placement: str, k: int,
                          rid: str | None = None) -> dict[str, Any]:
        experiment, strategy, rules, reranked = self.strategy(user_id)
        if rules.needs_profile:  # one round trip for both
            raw, profile = await self.redis.mget(self.keys.user(user_id),
                                                 self.keys.profile(user_id))
        else:
            raw, profile = await self.redis.get(self.keys.user(user_id)), None
        doc = orjson.loads(raw) if raw else None
        listed = serving.for_placement(doc.get("items", []) if doc else [], placement)
        step, average, shopper = self.shopper_policy(user_id, profile, rules)
        if shopper and shopper["budget"]:
            # Substitutes are where the dearer tiers are: complements instead (SPEC 1).
            listed = [e for e in listed if e.get("kind") != "alternatives"]
        ctx = (doc or {}).get("context") or {}
        recent = ctx.get("recent") or []
        anchors = list(dict.fromkeys([*recent[:1], *reversed(list(ctx.get("cart") or {}))]))
        existing = bool(ctx.get("bought"))
        room = k if rules.empty and not reranked else k + serving.HEADROOM
        catalog = await self.facts(list(dict.fromkeys(
            [*serving.candidates(listed, room), *recent[:1], *rules.wanted(anchors, existing)])))
        anchor = catalog.get(recent[0]) if recent else None
        exclude = serving.user_exclusions(doc, catalog)
        # The worker ranked `listed` from the context stored beside it (revisits included on
        # purpose); the exclusions are for the trending fillers and what the rules add.
        entries, xs = self.order(serving.in_stock(listed, catalog, room), catalog, anchor,
                                 placement, existing, {}, reranked)
        if not rules.empty:
            shown = await self.shown_today(user_id) if rules.frequency_cap else {}
            entries = ladder(entries, step, catalog, average)
            entries = apply_rules(entries, rules, catalog, k, anchors, held=exclude,
                                  existing_customer=existing, shown=shown)
            entries = order_by_price(entries, step, catalog)
            exclude = exclude | {i for i, n in shown.items() if n >= rules.frequency_cap}
        entries = entries[:k]
        categories = [(catalog.get(recent[0]) or {}).get("category")] if recent else []
        cap = step.cap(average) if step else None
        entries, fallback = await self.fill(entries, catalog, k, exclude, categories,
                                            price_cap=cap, rules=rules, enabled=strategy.fill)
        if rules.frequency_cap:
            await self.count_shown(user_id, entries)
        if rid is not None:
            self.remember(rid, user_id, placement, experiment, entries, xs, catalog, anchor,
                          existing)
        extra = {"shopper": shopper} if shopper else {}
        return self.body(entries, catalog, fallback, doc, user_id=user_id, placement=placement,
                         experiment=experiment, ranking="reranker" if reranked else "plain",
                         **extra)


def create_asgi(settings: Settings | None = None) -> "FastPath":
    """What `cartwise api` serves: the full app behind the fast path for hot lookups."""
    app = create_app(settings)
    return FastPath(app, app.state.backend, app.state.backend.settings.cors_origin_list)


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or Settings.from_env()
    backend = Backend(s)
    segments = backend.segments

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
        lifespan=lifespan,
        redoc_url=None,
        responses={
            400: {"model": ErrorBody, "description": "Malformed request"},
            401: {"model": ErrorBody, "description": "Missing or unknown API key"},
            403: {"model": ErrorBody, "description": "API key lacks the role"},
            413: {"model": ErrorBody, "description": "Body or batch too large"},
            422: {"model": ErrorBody, "description": "A parameter or field is invalid"},
            429: {"model": ErrorBody, "description": "Rate limited; see Retry-After"},
        },
    )
    app.state.backend = backend
    m = backend.metrics
    read = Depends(backend.require("read"))
    ingest = Depends(backend.require("ingest"))
    admin = Depends(backend.require("admin"))
    k_param = Query(ge=1, le=s.max_k, description="How many suggestions")
    id_path = Path(min_length=1, max_length=MAX_ID_LEN)

    # -- errors -------------------------------------------------------------------------------

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

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> Response:
        # Never a stack trace to the client; the server logs it (uvicorn, after this handler).
        rid = request_id(request)
        log.error("request %s failed: %r", rid, exc)
        return json_response(error_body(request, 500, "internal_error",
                                        f"unexpected error; quote request id {rid}"), 500)

    # -- suggestions --------------------------------------------------------------------------

    @app.get("/v1/items/{item_id}/suggestions", response_model=Suggestions,
             tags=["suggestions"], summary="Suggestions for an item page")
    async def item_suggestions(
        request: Request,
        item_id: Annotated[str, id_path],
        kind: Annotated[Literal["cross_sell", "alternatives", "next", "upsell"],
                        Query(description="cross_sell: goes with it; alternatives: instead "
                                          "of it; next: what shoppers picked right after it; "
                                          "upsell: a dearer alternative")] = "cross_sell",
        k: Annotated[int, k_param] = 10,
        user_id: Annotated[str | None, Query(
            min_length=1, max_length=MAX_ID_LEN,
            description="The shopper looking, for the merchant's price ladder "
                        "(docs/rules.md)")] = None,
        _: str = read,
    ) -> Response:
        rid = request_id(request)
        body = await backend.item_answer(item_id, kind, k, user_id, rid)
        return json_response(body | {"request_id": rid})

    @app.get("/v1/users/{user_id}/suggestions", response_model=Suggestions,
             tags=["suggestions"], summary="A shopper's \"you may also need\" list")
    async def user_suggestions(
        request: Request,
        user_id: Annotated[str, id_path],
        k: Annotated[int, k_param] = 10,
        placement: Annotated[Literal["product", "cart", "home"],
                             Query(description="Where the list is shown: a cart shows only "
                                               "complements")] = "product",
        _: str = read,
    ) -> Response:
        rid = request_id(request)
        body = await backend.user_answer(user_id, placement, k, rid)
        return json_response(body | {"request_id": rid})

    @app.get("/v1/users/{user_id}/profile", tags=["shoppers"],
             summary="A shopper's RFM segment, interest cluster and orders (admin)",
             responses={404: {"model": ErrorBody, "description": "Nothing known of this "
                                                                "shopper yet"}})
    async def user_profile(request: Request, user_id: Annotated[str, id_path],
                           _: str = admin) -> Response:
        raw = await backend.redis.get(backend.keys.profile(user_id))
        if raw is None:
            raise ApiError(404, "not_found", f"nothing is known of shopper '{user_id}' yet (a "
                           "profile starts with their first purchase, or first view of an "
                           "item the catalog has a category for)", "path.user_id")
        doc = orjson.loads(raw)
        now = time.time()
        return json_response({
            "user_id": user_id,
            "rfm": rfm(doc["orders"], now, segments).to_dict(),
            "segment_config": segments.to_dict(),
            "orders_kept": len(doc["orders"]),
            "first_order_ts": doc["orders"][0][0] if doc["orders"] else None,
            "last_order_ts": doc["orders"][-1][0] if doc["orders"] else None,
            "bought": doc.get("bought", []),
            "interest": doc.get("interest"),
            "as_of": doc.get("as_of"), "generated_at": doc.get("generated_at"),
            "served_at": now, "request_id": request_id(request)})

    @app.get("/v1/audiences/{item_id}", tags=["shoppers"],
             summary="Shoppers most likely to buy this item who have not (admin)")
    async def audience(request: Request, item_id: Annotated[str, id_path],
                       k: Annotated[int, Query(ge=1, le=MAX_AUDIENCE)] = 50,
                       _: str = admin) -> Response:
        body = await backend.audience(item_id, k)
        return json_response(body | {"request_id": request_id(request)})

    @app.get("/v1/replenishment/due", tags=["shoppers"],
             summary="Shoppers due to rebuy a consumable (admin)")
    async def replenishment_due(
        request: Request,
        within: Annotated[str, Query(description="How far ahead: e.g. 7d, 36h (at most 90d)",
                                     max_length=10)] = "7d",
        cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
        count: Annotated[int, Query(ge=1, le=1000)] = 100,
        _: str = admin,
    ) -> Response:
        ahead = parse_span(within)
        if ahead is None:
            raise ApiError(422, "invalid_parameter", "within: a number of days or hours, e.g. "
                           "7d or 36h, at most 90d", "query.within")
        now = time.time()
        lead = s.replenish_lead_days * 86400.0
        # Due = reminded up to `lead` ago (the run-out is still ahead) or within `ahead`.
        rows = await backend.redis.zrangebyscore(backend.keys.due, now - lead, now + ahead,
                                                 start=cursor, num=count + 1, withscores=True)
        more = len(rows) > count
        rows = rows[:count]
        catalog = await backend.facts(list({orjson.loads(m)[1] for m, _ in rows}))
        out = []
        for member, at in rows:
            user, item = orjson.loads(member)
            facts = catalog.get(item) or {}
            out.append({"user_id": user, "item_id": item, "due_at": at,
                        "expected_run_out": at + lead, "name": facts.get("name"),
                        "price": facts.get("price"), "in_stock": facts.get("in_stock")})
        return json_response({"due": out, "within_s": ahead, "lead_days": s.replenish_lead_days,
                              "next_cursor": cursor + count if more else None,
                              "served_at": now, "request_id": request_id(request)})

    @app.post("/v1/cart/suggestions", response_model=Suggestions, tags=["suggestions"],
              summary="Suggestions for an anonymous cart")
    async def cart_suggestions(request: Request, body: CartRequest, _: str = read) -> Response:
        cart = list(dict.fromkeys(body.items))
        for n, i in enumerate(cart):
            if not 0 < len(i) <= MAX_ID_LEN:
                raise ApiError(422, "invalid_body", f"item ids are 1..{MAX_ID_LEN} characters",
                               f"body.items[{n}]")
        lists = {i: d for i, d in (await backend.store.item_lists(cart)).items() if d}
        wanted = {e["item_id"] for doc in lists.values() for kind in ("cross_sell", "next")
                  for e in doc.get(kind, ())[: CONFIG.per_anchor(kind)]}
        experiment, strategy, rules, reranked = backend.strategy(body.user_id)
        anchors = list(reversed(cart))
        catalog = await backend.facts(sorted(wanted | set(cart) | set(rules.wanted(anchors,
                                                                                 False))))
        exclude = set(body.exclude) | set(cart)
        room = body.k if rules.empty and not reranked else body.k + serving.HEADROOM
        ranked = rank_for_cart(cart, lists, catalog, room, exclude | rules.block, CONFIG)
        anchor = catalog.get(cart[-1])
        ranked, xs = backend.order(ranked, catalog, anchor, "cart", False, {}, reranked)
        entries = (ranked[: body.k] if rules.empty
                   else apply_rules(ranked, rules, catalog, body.k, anchors, exclude))
        categories = [(catalog.get(i) or {}).get("category") for i in reversed(cart)]
        entries, fallback = await backend.fill(entries, catalog, body.k, exclude,
                                               [c for c in categories if c][:3],
                                               rules=rules, enabled=strategy.fill)
        rid = request_id(request)
        backend.remember(rid, body.user_id, "cart", experiment, entries, xs, catalog, anchor,
                         False)
        newest = max(lists.values(), key=lambda d: d.get("generated_at") or 0, default=None)
        out = backend.body(entries, catalog, fallback, newest, experiment=experiment,
                           ranking="reranker" if reranked else "plain")
        return json_response(out | {"request_id": rid})

    @app.get("/v1/trending", response_model=Trending, tags=["suggestions"],
             summary="Most popular items now, shop-wide or in one category")
    async def trending(request: Request,
                       category: Annotated[str | None, Query(max_length=200)] = None,
                       k: Annotated[int, k_param] = 10, _: str = read) -> Response:
        catalog: dict[str, dict | None] = {}
        entries, _used = await backend.fill([], catalog, k, set(), [category] if category
                                            else [])
        return json_response({"items": serving.enrich(entries, catalog), "category": category,
                              "served_at": time.time(), "request_id": request_id(request)})

    @app.get("/v1/catalog", response_model=CatalogPage, tags=["catalog"],
             summary="Page through the catalog the workers know")
    async def catalog_page(cursor: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
                           count: Annotated[int, Query(ge=1, le=500)] = 100,
                           category: Annotated[str | None, Query(max_length=200)] = None,
                           _: str = read) -> Response:
        nxt, found = await backend.redis.hscan(backend.keys.catalog, cursor, count=count)
        items = [orjson.loads(v) for v in found.values()]
        if category is not None:
            items = [i for i in items if i.get("category") == category]
        items.sort(key=lambda i: i["item_id"])
        return json_response({"items": items, "next_cursor": int(nxt)})

    # -- business rules -----------------------------------------------------------------------

    @app.get("/v1/rules", tags=["rules"], summary="The merchant's business rules (admin)")
    async def get_rules(request: Request, _: str = admin) -> Response:
        await backend.load_rules()
        return json_response(backend.rules.to_dict() | {"request_id": request_id(request)})

    @app.put("/v1/rules", tags=["rules"],
             summary="Replace the business rules (admin); every API process applies them "
                     "within a second",
             openapi_extra=RULES_BODY, responses={503: CONFIG_NOT_SAVED})
    async def put_rules(request: Request, _: str = admin) -> Response:
        try:
            doc = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
        try:
            rules = Rules.parse(doc)
        except RulesError as exc:
            raise ApiError(422, "invalid_rules", exc.detail, f"body.{exc.field}") from None
        await backend.save_rules(rules)
        return json_response(rules.to_dict() | {"request_id": request_id(request)})

    # -- experiments and the re-ranker (docs/experiments.md) ----------------------------------

    exp_path = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")

    @app.get("/v1/experiments", tags=["experiments"], summary="Experiment definitions (admin)")
    async def list_experiments(request: Request, _: str = admin) -> Response:
        await backend.load_experiments()
        return json_response({"experiments": [e.to_dict() for _, e in
                                              sorted(backend.experiments.items())],
                              "default": backend.default_strategy.to_dict(),
                              "request_id": request_id(request)})

    @app.put("/v1/experiments/{experiment_id}", tags=["experiments"],
             summary="Create or replace an experiment (admin); every API process applies it "
                     "within a second", openapi_extra=EXPERIMENT_BODY,
             responses={503: CONFIG_NOT_SAVED})
    async def put_experiment(request: Request, experiment_id: Annotated[str, exp_path],
                             _: str = admin) -> Response:
        try:
            doc = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
        try:
            exp = Experiment.parse(experiment_id, doc)
        except ExperimentError as exc:
            where = "path.experiment_id" if exc.field == "id" else f"body.{exc.field}"
            raise ApiError(422, "invalid_experiment", exc.detail, where) from None
        await backend.load_experiments()
        current = dict(backend.experiments)
        if experiment_id not in current and len(current) >= MAX_EXPERIMENTS:
            raise ApiError(422, "too_many_experiments", f"at most {MAX_EXPERIMENTS}; delete an "
                           "ended one first", "path.experiment_id")
        current[experiment_id] = exp
        await backend.save_experiments(current)
        return json_response(exp.to_dict() | {"request_id": request_id(request)})

    @app.delete("/v1/experiments/{experiment_id}", tags=["experiments"],
                summary="Stop and forget an experiment and its counters (admin)",
                responses={404: {"model": ErrorBody, "description": "No such experiment"},
                           503: CONFIG_NOT_SAVED})
    async def delete_experiment(request: Request, experiment_id: Annotated[str, exp_path],
                                _: str = admin) -> Response:
        await backend.load_experiments()
        current = dict(backend.experiments)
        if current.pop(experiment_id, None) is None:
            raise ApiError(404, "not_found", f"no experiment {experiment_id!r}",
                           "path.experiment_id")
        await backend.save_experiments(current)
        await backend.redis.delete(backend.keys.experiment(experiment_id))
        return json_response({"deleted": experiment_id, "request_id": request_id(request)})

    @app.get("/v1/experiments/{experiment_id}/report", tags=["experiments"],
             summary="Per-variant impressions, CTR, conversion, cross-sell rate, order value "
                     "and revenue per shopper, with 95% intervals and a verdict (admin)",
             responses={404: {"model": ErrorBody, "description": "No such experiment"}})
    async def experiment_report_route(request: Request,
                                      experiment_id: Annotated[str, exp_path],
                                      _: str = admin) -> Response:
        await backend.load_experiments()
        exp = backend.experiments.get(experiment_id)
        if exp is None:
            raise ApiError(404, "not_found", f"no experiment {experiment_id!r}",
                           "path.experiment_id")
        counters = parse_counters(await backend.redis.hgetall(
            backend.keys.experiment(experiment_id)))
        out = experiment_report(exp, counters, time.time())
        return json_response(out | {"request_id": request_id(request)})

    @app.get("/v1/reranker", tags=["experiments"],
             summary="The learned re-ranker: examples, progressive AUC against the plain "
                     "order, whether it is used (admin)")
    async def reranker_status(request: Request, _: str = admin) -> Response:
        await backend.load_reranker()
        r = backend.reranker
        weights = dict(zip(FEATURES, r["weights"], strict=True)) if r["weights"] else None
        return json_response({**r, "weights": weights, "intercept": r["intercept"],
                              "min_examples": s.reranker_min_examples,
                              "default_ranking": s.ranking, "request_id": request_id(request)})

    # -- ingest -------------------------------------------------------------------------------

    async def ingest_batch(request: Request, plural: str, topic: str,
                           prepare: Callable[[Any, float], tuple[Any, bytes]],
                           key_of: Callable[[Any], str], id_of: Callable[[Any], str]
                           ) -> Response:
        rid = request_id(request)
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_json", f"body is not JSON: {str(exc)[:200]}") from None
        if isinstance(data, dict) and plural in data:
            records = data[plural]
            if not isinstance(records, list):
                raise ApiError(422, "wrong_type", f"'{plural}' must be a list", f"body.{plural}")
        elif isinstance(data, list):
            records = data
        elif isinstance(data, dict):
            records = [data]
        else:
            raise ApiError(422, "not_an_object", "send an object, a list of objects or "
                           f"{{\"{plural}\": [...]}}", "body")
        if not records:
            raise ApiError(422, "empty_batch", "no records in the request", "body")
        if len(records) > s.max_batch:
            raise ApiError(413, "batch_too_large", f"{len(records)} records > {s.max_batch}; "
                           "split the batch", "body")
        producer = backend.producer
        if producer is None:
            raise ApiError(503, "broker_unavailable", "the event broker is not reachable "
                           "yet; retry shortly", headers={"Retry-After": "1"})
        results: list[dict[str, Any]] = []
        sends: list[Awaitable[Any]] = []
        rejected: list[tuple[int, Any, ContractError]] = []
        now = time.time()
        for n, d in enumerate(records):
            try:
                valid, value = prepare(d, now)
            except ContractError as err:
                rejected.append((n, d, err))
                results.append({"index": n, "status": "rejected", **err.as_dict()})
                if err.field:
                    results[-1]["field"] = f"{plural}[{n}].{err.field}"
                continue
            sends.append(producer.send(topic, value, key=key_of(valid).encode()))
            results.append({"index": n, "status": "accepted", "id": id_of(valid)})
        try:
            futures = await asyncio.wait_for(asyncio.gather(*sends),
                                             s.produce_timeout_s)
            await asyncio.wait_for(asyncio.gather(*futures), s.produce_timeout_s)
        except Exception as exc:  # a timeout or a Kafka error: nothing may be half-claimed
            log.warning("request %s: produce failed: %r", rid, exc)
            raise ApiError(503, "broker_unavailable", "events were not stored (broker did "
                           "not acknowledge); retry with the same event_ids",
                           headers={"Retry-After": "1"}) from None
        await dead_letter(producer, rid, plural, rejected)
        for _n, _d, err in rejected:
            m.ingest.labels(plural, "rejected", err.reason).inc()
        m.ingest.labels(plural, "accepted", "").inc(len(sends))
        body: dict[str, Any] = {"accepted": len(sends), "rejected": len(rejected),
                                "results": results, "request_id": rid}
        if not sends:
            body["error"] = {"status": 422, "reason": "all_rejected",
                             "detail": f"none of the {plural} was accepted; see results"}
            return json_response(body, 422)
        return json_response(body, 202)

    async def dead_letter(producer: AIOKafkaProducer, rid: str, plural: str,
                          rejected: list[tuple[int, Any, ContractError]]) -> None:
        """Rejected records go to the dead-letter topic too: the sender may not log them."""
        if not rejected:
            return
        try:
            futures = [await producer.send(
                s.dlq_topic, orjson.dumps(d), headers=list(
                    dlq_headers(err, f"api/{rid}/{plural}[{n}]").items()))
                for n, d, err in rejected]
            await asyncio.wait_for(asyncio.gather(*futures), s.produce_timeout_s)
        except Exception as exc:  # the client has its answer; losing the copy is logged
            log.warning("request %s: dead-lettering %d records failed: %r", rid,
                        len(rejected), exc)

    @app.post("/v1/events", status_code=202, response_model=IngestResponse, tags=["ingest"],
              summary="Collect events (one, a list, or {\"events\": [...]})",
              openapi_extra=batch_body(EVENT_SCHEMA, "events"))
    async def collect_events(request: Request, _: str = ingest) -> Response:
        # Keyed by shopper: one shopper's events stay in order on one partition.
        return await ingest_batch(request, "events", s.events_topic, prepare_event,
                                  lambda e: e.user_id, lambda e: e.event_id)

    @app.post("/v1/catalog", status_code=202, response_model=IngestResponse, tags=["catalog"],
              summary="Add or update catalog records (admin)",
              openapi_extra=batch_body(CATALOG_SCHEMA, "items"))
    async def put_catalog(request: Request, _: str = admin) -> Response:
        return await ingest_batch(request, "items", s.catalog_topic,
                                  lambda d, _now: prepare_catalog(d), lambda c: c.item_id,
                                  lambda c: c.item_id)

    # -- operations ---------------------------------------------------------------------------

    @app.get("/health", tags=["operations"], summary="Liveness: the process serves requests")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"],
             summary="Readiness: Redis and the broker are reachable",
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
        return json_response({"ready": ok, "checks": checks, "stream": backend.stream},
                             200 if ok else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=Response)
    async def metrics() -> Response:
        return Response(m.render(), media_type=m.content_type)

    # The experiments page is static; its data comes from the admin routes, with the key the
    # user types in. Nothing secret is served here.
    app.mount("/experiments", StaticFiles(directory=STATIC / "experiments", html=True),
              name="experiments")

    # -- demo storefront ----------------------------------------------------------------------

    if s.demo_read_key and s.demo_ingest_key:
        @app.get("/demo/config.json", include_in_schema=False)
        async def demo_config() -> dict[str, str]:
            return {"read_key": s.demo_read_key, "ingest_key": s.demo_ingest_key}

        app.mount("/demo", StaticFiles(directory=STATIC / "demo", html=True), name="demo")

    app.add_middleware(Observe, metrics=m)
    app.add_middleware(CORSMiddleware, allow_origins=s.cors_origin_list,
                       allow_methods=["GET", "POST"],
                       allow_headers=["X-API-Key", "Content-Type", "X-Request-ID"],
                       expose_headers=["X-Request-ID", "Retry-After"], max_age=600)
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    return app


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


_SUGGESTIONS = re.compile(r"^/v1/(items|users)/([^/]+)/suggestions$")
_ROUTES = {"items": "/v1/items/{item_id}/suggestions", "users": "/v1/users/{user_id}/suggestions"}
_CHOICES = {"items": ("kind", serving.ITEM_KINDS, "cross_sell"),
            "users": ("placement", serving.PLACEMENTS, "product")}


class FastPath:
    """The two hot GET routes, served without FastAPI's routing and dependency machinery.

    They are most of the traffic, and FastAPI's per-request work costs several times the
    Redis read behind it (bench/api_latency.py). Same answers (Backend.item_answer and
    user_answer), same key check, rate limit, metrics and CORS; anything unusual (a parameter
    to validate, an origin not allowed) goes on to the full app, which owns every
    validation error's exact shape.
    """

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
                body = await b.item_answer(match[2], choice, k, rid=rid)
            else:
                body = await b.user_answer(match[2], choice, k, rid)
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
