"""Process-level tuning shared by the long-running commands (worker, API)."""

from __future__ import annotations

import gc
import time
from typing import Any

# Time the cyclic collector stopped the process, per generation, and the longest pause: a
# full collection walks every long-lived object, and in a worker holding GBs of state that is
# a tail-latency cost worth seeing (the worker's stats: `gc.gen2`, counters `gc.gen2_runs`).
GC_SECONDS: dict[str, float] = {"gc.gen0": 0.0, "gc.gen1": 0.0, "gc.gen2": 0.0}
GC_RUNS: dict[str, int] = {"gc.gen0_runs": 0, "gc.gen1_runs": 0, "gc.gen2_runs": 0}
GC_LONGEST: list[float] = [0.0]
_started: list[float] = [0.0]


def _watch(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _started[0]
    gen = info.get("generation", 0)
    GC_SECONDS[f"gc.gen{gen}"] += took
    GC_RUNS[f"gc.gen{gen}_runs"] += 1
    GC_LONGEST[0] = max(GC_LONGEST[0], took)


def tune_gc() -> None:
    """Collect young garbage less often; leave start-up objects out of collections.

    Both services allocate many short-lived objects per record or request and keep large
    long-lived state (contexts, counts, caches); with the default thresholds the cyclic
    collector rescans that state very often, which shows as throughput loss and tail latency.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    if _watch not in gc.callbacks:
        gc.callbacks.append(_watch)
