"""Per-process copies of catalog facts and trending sets, refreshed off the request path.

Every answer filters by stock and shows prices for ten or more items, and every cold-start
answer needs trending sets: reading them from Redis per request would cost more than the
lookup itself. Catalog facts are dropped when the workers bump the catalog version (checked
every CACHE_REFRESH_S); trending sets in use are re-read every TRENDING_TTL_S.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from streams.store import Keys, Store

TRENDING_READ = 60  # trending entries read per set: enough to fill k after filtering
TRENDING_TTL_S = 1.0  # how stale a process's copy of the trending sets may be
CACHE_REFRESH_S = 0.5  # how often the catalog version, rules and trending sets are checked
CATALOG_CACHE_MAX = 200_000
TRENDING_CACHE_MAX = 10_000  # categories kept (a request may name any category)


class CatalogCache:
    """Catalog facts (item -> facts, None: not in the catalog) and trending sets."""

    def __init__(self, redis: aioredis.Redis, store: Store, keys: Keys) -> None:
        self.redis, self.store, self.keys = redis, store, keys
        self._facts: dict[str, dict | None] = {}
        self._generation = 0  # bumped whenever the copy above is dropped
        self._version: bytes | None = None
        # category (None: shop-wide) -> (read at, ranked (item, score), catalog facts)
        self._trending: dict[str | None, tuple[float, list, dict]] = {}

    async def refresh(self) -> None:
        """Drop facts the workers changed; re-read the trending sets in use that went stale."""
        version = await self.redis.get(self.keys.catalog_version)
        if version != self._version:
            self._version = version
            self._generation += 1
            self._facts.clear()
        stale = [c for c, (at, _, _) in self._trending.items()
                 if time.monotonic() - at >= TRENDING_TTL_S]
        if stale:
            await self._read_trending(stale)

    async def facts(self, items: list[str]) -> dict[str, dict | None]:
        """Catalog facts of `items`, as of at most CACHE_REFRESH_S ago."""
        cache = self._facts
        out: dict[str, dict | None] = {}
        missing = []
        for i in items:
            if i in cache:
                out[i] = cache[i]
            else:
                missing.append(i)
        if missing:
            generation = self._generation
            got = await self.store.catalog_facts(missing)
            out.update(got)
            # Read before a catalog change was noticed: answer with it, but do not keep it.
            if generation == self._generation:
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
        if len(self._trending) > TRENDING_CACHE_MAX:
            self._trending.clear()
        now = time.monotonic()
        for c, ranked in zip(categories, ranked_sets, strict=True):
            self._trending[c] = (now, ranked, {i: facts[i] for i, _ in ranked})

    async def trending_sets(self, categories: list[str | None]
                            ) -> tuple[list[tuple[list, str | None]], dict[str, dict | None]]:
        """Trending (item, score) lists per category (None: shop-wide), with catalog facts."""
        missing = [c for c in categories if c not in self._trending]
        if missing:
            await self._read_trending(missing)
        sets, catalog = [], {}
        for c in categories:
            _, ranked, facts = self._trending.get(c, (0.0, [], {}))
            sets.append((ranked, c))
            catalog.update(facts)
        return sets, catalog
