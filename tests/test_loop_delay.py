"""The worker's event-loop probe (`watch_loop`): how long a batch, a timer or a collector pause
held the loop, which new records wait too (docs/operations.md, "Suggestions are stale")."""

from __future__ import annotations

import asyncio
import time

from streams.metrics import WorkerCollector
from streams.stats import LOOP_PROBE_S, LOOP_RECENT, Stats, watch_loop


def test_a_blocked_loop_is_measured_as_held():
    stats = Stats("w")
    hold = 0.3

    async def run() -> None:
        probe = asyncio.create_task(watch_loop(stats))
        await asyncio.sleep(3 * LOOP_PROBE_S)
        time.sleep(hold)  # what a long batch does to every other task of the loop
        await asyncio.sleep(3 * LOOP_PROBE_S)
        probe.cancel()

    asyncio.run(run())
    # The sleeper asked for LOOP_PROBE_S and could not wake before the loop was free again.
    assert stats.loop_delay_max >= hold - LOOP_PROBE_S
    assert max(stats.loop_recent) == stats.loop_delay_max
    assert stats.loop_delay.counts[-1] + sum(stats.loop_delay.counts[:-1]) == len(
        stats.loop_recent)
    snap = stats.snapshot()["loop_delay_s"]
    assert snap["recent_max"] == snap["max"] == stats.loop_delay_max
    assert snap["n"] == len(stats.loop_recent) >= 2


def test_recent_is_the_last_minute_and_max_is_since_start():
    stats = Stats("w")
    stats.observe_loop(2.0)
    for _ in range(LOOP_RECENT):
        stats.observe_loop(0.001)
    snap = stats.snapshot()["loop_delay_s"]
    assert snap["max"] == 2.0
    assert snap["recent_max"] == snap["recent_p99"] == 0.001
    assert snap["n"] == LOOP_RECENT


def test_prometheus_sees_every_observation_in_its_bucket():
    stats = Stats("w")
    for delay in (0.0, 0.004, 0.03, 0.03, 0.7, 9.0):
        stats.observe_loop(delay)
    samples = {(s.name, s.labels.get("le")): s.value
               for fam in WorkerCollector(stats).collect()
               if fam.name == "cartwise_loop_delay_seconds" for s in fam.samples}
    assert samples[("cartwise_loop_delay_seconds_bucket", "0.005")] == 2
    assert samples[("cartwise_loop_delay_seconds_bucket", "0.05")] == 4
    assert samples[("cartwise_loop_delay_seconds_bucket", "1.0")] == 5
    assert samples[("cartwise_loop_delay_seconds_bucket", "+Inf")] == 6
    assert samples[("cartwise_loop_delay_seconds_count", None)] == 6
    assert abs(samples[("cartwise_loop_delay_seconds_sum", None)] - 9.764) < 1e-9
