"""The worker's event-loop probe (`watch_loop`): how long a batch, a timer or a collector pause
held the loop, which new records wait too (docs/operations.md, "Suggestions are stale")."""

from __future__ import annotations

import asyncio
import time

import pytest

from streams.metrics import WorkerCollector
from streams.stats import LOOP_PROBE_S, LOOP_RECENT_S, Stats, percentile, watch_loop


class Done(Exception):
    pass


def test_each_wake_up_records_how_late_it_came():
    """A scripted clock: each sleep of `every_s` lasts that long plus the scripted lateness."""
    late = [0.0, 0.002, 0.3, -0.001, 0.04]  # -0.001: asyncio may wake a hair early
    clock = [100.0]

    async def sleep(seconds: float) -> None:
        if not late:
            raise Done
        clock[0] += seconds + late.pop(0)

    stats = Stats("w")
    with pytest.raises(Done):
        asyncio.run(watch_loop(stats, 0.05, clock=lambda: clock[0], sleep=sleep))
    assert [round(d, 9) for _, d in stats.loop_recent] == [0.0, 0.002, 0.3, 0.0, 0.04]
    assert stats.loop_delay_max == pytest.approx(0.3)
    assert stats.loop_recent[-1][0] == pytest.approx(clock[0])


def test_a_blocked_loop_is_measured_as_held():
    """The real event loop and clock: a blocking call holds the sleeper past its time."""
    stats = Stats("w")
    hold = 0.3

    async def run() -> None:
        probe = asyncio.create_task(watch_loop(stats))
        await asyncio.sleep(3 * LOOP_PROBE_S)
        time.sleep(hold)  # what a long batch does to every other task of the loop
        await asyncio.sleep(3 * LOOP_PROBE_S)
        probe.cancel()

    asyncio.run(run())
    assert stats.loop_delay_max >= hold - LOOP_PROBE_S
    snap = stats.snapshot()["loop_delay_s"]
    assert snap["recent_max"] == snap["max"] == stats.loop_delay_max
    assert snap["n"] == len(stats.loop_recent) >= 2


def test_recent_is_the_last_minute_and_max_is_since_start():
    stats = Stats("w")
    stats.observe_loop(2.0, at=0.0)
    delays = [i / 1000 for i in range(1, 201)]
    for i, d in enumerate(delays):  # the next minute and a bit, one check every 0.5 s
        stats.observe_loop(d, at=1.0 + i * 0.5)
    snap = stats.snapshot()["loop_delay_s"]
    assert snap["max"] == 2.0
    kept = [d for i, d in enumerate(delays) if 1.0 + i * 0.5 >= 1.0 + 199 * 0.5 - LOOP_RECENT_S]
    assert snap["n"] == len(kept) == 121
    assert snap["recent_max"] == 0.2
    assert snap["recent_p99"] == percentile(sorted(kept), 0.99) == 0.199


def test_prometheus_sees_every_observation_in_its_bucket():
    stats = Stats("w")
    for i, delay in enumerate((0.0, 0.004, 0.03, 0.03, 0.7, 9.0)):
        stats.observe_loop(delay, at=float(i))
    samples = {(s.name, s.labels.get("le")): s.value
               for fam in WorkerCollector(stats).collect()
               if fam.name == "cartwise_loop_delay_seconds" for s in fam.samples}
    assert samples[("cartwise_loop_delay_seconds_bucket", "0.005")] == 2
    assert samples[("cartwise_loop_delay_seconds_bucket", "0.05")] == 4
    assert samples[("cartwise_loop_delay_seconds_bucket", "1.0")] == 5
    assert samples[("cartwise_loop_delay_seconds_bucket", "+Inf")] == 6
    assert samples[("cartwise_loop_delay_seconds_count", None)] == 6
    assert samples[("cartwise_loop_delay_seconds_sum", None)] == pytest.approx(9.764)
