"""Worker counters and freshness samples, published to Redis for `cartwise stats` and bench."""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

from cartwise import runtime

# Histogram buckets (seconds) of event-to-suggestion freshness, for Prometheus.
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)
# Buckets (seconds) of one Redis write call (a pipeline or command), for Prometheus.
REDIS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# How often the worker checks how late its event loop runs (`watch_loop`), the buckets of that
# delay for Prometheus, and the window of "recent" checks in its stats (seconds).
LOOP_PROBE_S = 0.05
LOOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOOP_RECENT_S = 60.0
FRESHNESS_SAMPLES = 20_000
RECENT_SAMPLES = 1_000  # "recent" percentiles: the last this many events, for live views


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and a sum: cheap on the hot path."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count at or below it) pairs, as Prometheus expects them."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), list(self.counts), strict=True):
            total += n
            out.append((bound, total))
        return out


class Stats:
    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.started = time.time()
        self.first_batch_at: float | None = None
        self.first_batch_cpu: float | None = None  # process CPU seconds then (bench)
        self.last_batch_at: float | None = None
        self.last_batch_cpu: float | None = None
        self.counters: Counter[str] = Counter()
        self.seconds: dict[str, float] = {}
        # Seconds from the event's broker timestamp to its suggestions being written in Redis
        # ("user", "item"), and to its batch reaching the context stage ("received": what the
        # broker, the consumer and the batches before it took; "user" minus it is processing).
        self.freshness: dict[str, deque[float]] = {
            "user": deque(maxlen=FRESHNESS_SAMPLES),
            "item": deque(maxlen=FRESHNESS_SAMPLES),
            "received": deque(maxlen=FRESHNESS_SAMPLES),
        }
        self.freshness_histograms = {k: Histogram(FRESHNESS_BUCKETS) for k in self.freshness}
        # Per Redis write operation (checkpoint, item_lists, user_lists, ...): latency, errors.
        self.redis_histograms: dict[str, Histogram] = {}
        self.redis_errors: Counter[str] = Counter()
        # How late the event loop ran `watch_loop`'s wake-ups: what a record that arrived
        # while it was held waited. Recent: (when, delay) over the last LOOP_RECENT_S.
        self.loop_delay = Histogram(LOOP_BUCKETS)
        self.loop_recent: deque[tuple[float, float]] = deque()
        self.loop_delay_max = 0.0
        # Set by the worker's stats timer: lag and state size per partition (streams/app.py).
        self.partitions: list[dict[str, Any]] = []

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def add_time(self, name: str, seconds: float) -> None:
        """Accumulate time spent in a processing step (seconds, as a float counter)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def step_seconds(self) -> dict[str, float]:
        """Time per processing step, and the process's garbage-collection pauses
        (cartwise/runtime.py): one view for `cartwise stats` and Prometheus."""
        return dict(self.seconds) | runtime.GC_SECONDS

    def observe(self, kind: str, seconds: float) -> None:
        self.freshness[kind].append(seconds)
        self.freshness_histograms[kind].observe(seconds)

    def observe_loop(self, delay: float, at: float) -> None:
        """One wake-up `delay` seconds late, seen at `at` (a monotonic clock)."""
        self.loop_delay.observe(delay)
        recent = self.loop_recent
        recent.append((at, delay))
        while recent[0][0] < at - LOOP_RECENT_S:
            recent.popleft()
        self.loop_delay_max = max(self.loop_delay_max, delay)

    @contextmanager
    def redis_write(self, op: str) -> Iterator[None]:
        """Time one Redis write call; a failure is counted (and re-raised), not timed."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception:
            self.redis_errors[op] += 1
            raise
        h = self.redis_histograms.get(op)
        if h is None:
            h = self.redis_histograms[op] = Histogram(REDIS_BUCKETS)
        h.observe(time.perf_counter() - t0)

    def snapshot(self) -> dict[str, Any]:
        fresh = {}
        for kind, samples in self.freshness.items():
            s = sorted(samples)
            recent = sorted(list(samples)[-RECENT_SAMPLES:])
            fresh[kind] = {"n": len(s), "p50": percentile(s, 0.5), "p99": percentile(s, 0.99),
                           "max": s[-1] if s else None,
                           "recent_p50": percentile(recent, 0.5),
                           "recent_p99": percentile(recent, 0.99)}
        recent = sorted(d for _, d in self.loop_recent)
        loop = {"n": len(recent), "recent_p99": percentile(recent, 0.99),
                "recent_max": recent[-1] if recent else None, "max": self.loop_delay_max,
                "counts": list(self.loop_delay.counts)}  # per LOOP_BUCKETS, since start
        return {"worker_id": self.worker_id, "started": self.started, "updated": time.time(),
                "first_batch_at": self.first_batch_at, "first_batch_cpu": self.first_batch_cpu,
                "last_batch_at": self.last_batch_at, "last_batch_cpu": self.last_batch_cpu,
                "counters": dict(self.counters) | runtime.GC_RUNS,
                "seconds": self.step_seconds(), "gc_longest_s": runtime.GC_LONGEST[0],
                "freshness_s": fresh, "loop_delay_s": loop,
                "partitions": self.partitions}


async def watch_loop(stats: Stats, every_s: float = LOOP_PROBE_S,
                     clock: Callable[[], float] | None = None,
                     sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
    """Sleep `every_s` again and again and record how much later than asked each wake-up came.

    One event loop runs the consumer's hand-overs, the stages' batches and the timers; a record
    that arrived while a batch, a timer or a collector pause held it waited about as long before
    reaching a stage (holds shorter than `every_s` may be seen in part only; docs/operations.md,
    "Suggestions are stale"). `clock` and `sleep` are for tests.
    """
    now = clock or asyncio.get_running_loop().time
    while True:
        t0 = now()
        await sleep(every_s)
        t1 = now()
        stats.observe_loop(max(0.0, t1 - t0 - every_s), t1)  # asyncio may wake a hair early
