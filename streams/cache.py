"""A worker-local read cache for documents the hot path reads on every batch (lists, catalog
facts); its own module because the stages share it and it has nothing to do with checkpoints."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any


class ReadCache:
    """A short-lived, worker-local copy of documents read on the hot path.

    Every batch of every partition ranks shoppers against the same hot items; reading and
    parsing their lists once per `max_age` instead of once per batch saves most of that work.
    Suggestions may then be up to `max_age` older than the newest lists, no more.
    """

    def __init__(self, max_age: float, max_size: int = 100_000) -> None:
        self.max_age = max_age
        self.max_size = max_size
        self.docs: dict[str, tuple[float, Any]] = {}

    def forget(self, keys: Iterable[str]) -> None:
        """Drop copies known to be stale (this process just changed them in Redis)."""
        for k in keys:
            self.docs.pop(k, None)

    async def get_many(self, keys: list[str], fetch: Callable[[list[str]], Awaitable[dict]],
                       fresh: bool = False) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {}
        missing = []
        for k in keys:
            hit = None if fresh else self.docs.get(k)
            if hit is not None and now - hit[0] < self.max_age:
                out[k] = hit[1]
            else:
                missing.append(k)
        if missing:
            got = await fetch(missing)
            if len(self.docs) + len(got) > self.max_size:
                self.docs.clear()
            for k, v in got.items():
                self.docs[k] = (now, v)
            out.update(got)
        return out
