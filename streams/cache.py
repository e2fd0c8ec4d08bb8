"""A worker-local read cache for documents the hot path reads on every batch (lists, catalog
facts); its own module because the stages share it and it has nothing to do with checkpoints."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import orjson

# (read at, document, the bytes it was parsed from or None)
Entry = tuple[float, Any, bytes | None]


def parse_json(raw: bytes | None) -> Any:
    return None if raw is None else orjson.loads(raw)


class ReadCache:
    """A short-lived, worker-local copy of documents read on the hot path.

    Every batch of every partition ranks shoppers against the same hot items; reading and
    parsing their lists once per `max_age` instead of once per batch saves most of that work.
    Suggestions may then be up to `max_age` older than the newest lists, no more.

    `fetch` reads the missing documents (one round trip for all of them). With `parse`, it
    returns raw bytes and the cache parses them; a document read again with the very same
    bytes keeps its parsed copy. Most lists do not change between two reads
    a second apart, and parsing them was a tenth of a worker's time at a steady 1,000 events/s.
    Parsed documents are shared: callers must not change them.
    """

    def __init__(self, max_age: float, fetch: Callable[[list[str]], Awaitable[dict]],
                 max_size: int = 100_000,
                 parse: Callable[[bytes | None], Any] | None = None) -> None:
        self.max_age = max_age
        self.fetch = fetch
        self.max_size = max_size
        self.parse = parse
        self.docs: dict[str, Entry] = {}

    def forget(self, keys: Iterable[str]) -> None:
        """Drop copies known to be stale (this process just changed them in Redis)."""
        for k in keys:
            self.docs.pop(k, None)

    async def get_many(self, keys: Iterable[str], fresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        horizon = now - self.max_age
        docs = self.docs
        out: dict[str, Any] = {}
        missing: list[str] = []
        if fresh:
            missing = list(keys)
        else:
            for k in keys:
                hit = docs.get(k)
                if hit is not None and hit[0] > horizon:
                    out[k] = hit[1]
                else:
                    missing.append(k)
        if not missing:
            return out
        got = await self.fetch(missing)
        if len(docs) + len(got) > self.max_size:
            docs.clear()
        parse = self.parse
        if parse is None:
            for k, v in got.items():
                docs[k] = (now, v, None)
            out.update(got)
            return out
        for k, raw in got.items():
            old = docs.get(k)
            doc = old[1] if old is not None and raw is not None and old[2] == raw else parse(raw)
            docs[k] = (now, doc, raw)
            out[k] = doc
        return out
