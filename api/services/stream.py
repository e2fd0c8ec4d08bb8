"""The workers' progress as this API process sees it: lag, stalls, lost state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from api.metrics import ApiMetrics
from cartwise.lag import StallDetector
from cartwise.lag import collect as collect_lag
from cartwise.settings import Settings
from streams.store import Keys


class StreamWatch:
    """Check the workers' progress (cartwise lag) and flag stalled partitions.

    Reported in /ready's body and as metrics, but it does not make this process unready:
    suggestions are still served while a worker is stuck, only staler. Alert on
    cartwise_stream_stalled instead (docs/operations.md).
    """

    def __init__(self, settings: Settings, redis: aioredis.Redis, keys: Keys,
                 metrics: ApiMetrics) -> None:
        self.settings, self.redis, self.keys, self.metrics = settings, redis, keys, metrics
        self.status: dict[str, Any] = {"status": "unknown", "detail": "not checked yet"}

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
                # Progress committed, yet no generation: Redis lost the state (the workers stop).
                lost = (any((row.committed or 0) > 0 for row in rows)
                        and not await self.redis.exists(self.keys.generation))
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
