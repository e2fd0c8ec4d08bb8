"""The workers' progress as this API process sees it: lag, stalls, lost state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from api.metrics import ApiMetrics
from cartwise.lag import StallDetector
from cartwise.lag import collect as collect_lag
from cartwise.settings import Settings
from streams.store import Store


class StreamWatch:
    """Check the workers' progress (cartwise lag) and flag stalled partitions.

    Reported in /ready's body and as metrics, but it does not make this process unready:
    suggestions are still served while a worker is stuck, only staler. Alert on
    cartwise_stream_stalled instead (docs/operations.md).
    """

    def __init__(self, settings: Settings, store: Store, metrics: ApiMetrics) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.status: dict[str, Any] = {"status": "unknown", "detail": "not checked yet"}

    async def generation_missing(self) -> bool:
        """The global token or a partition's copy of it is gone, or in a cluster a node's
        slot sentinels (docs/redis.md, "Cluster"): one node can lose its data alone."""
        keys = self.store.keys
        found = await self.store.mget(
            [keys.generation, *keys.partition_generations(self.settings.partitions)])
        if None in found:
            return True
        return self.store.cluster and bool(await self.store.lost_slots(found[0]))

    async def run(self) -> None:
        detector = StallDetector(self.settings.stall_after_s)
        m = self.metrics
        while True:
            try:
                rows = await asyncio.to_thread(collect_lag, self.settings)
                stalled = detector.update(time.monotonic(), rows)
                for row in rows:
                    labels = (row.topic, str(row.partition))
                    m.stream_lag.labels(*labels).set(row.lag)
                    m.stream_stalled.labels(*labels).set(0)
                for row, _ in stalled:
                    m.stream_stalled.labels(row.topic, str(row.partition)).set(1)
                # Progress committed, yet no generation or no copy of it beside a partition's
                # state: Redis (or a cluster node) lost the state (the workers stop).
                lost = (any((row.committed or 0) > 0 for row in rows)
                        and await self.generation_missing())
                m.state_lost.set(1 if lost else 0)
                self.status = {
                    "status": "state_lost" if lost else "stalled" if stalled else "ok",
                    "max_lag": max((row.lag for row in rows), default=0),
                    "stalled": [{"topic": row.topic, "partition": row.partition,
                                 "lag": row.lag, "no_progress_s": round(idle)}
                                for row, idle in stalled],
                    "checked_at": time.time()}
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.status = {"status": "unknown",
                               "detail": f"{type(exc).__name__}: {exc}"[:200],
                               "checked_at": time.time()}
            await asyncio.sleep(self.settings.stall_check_s)
