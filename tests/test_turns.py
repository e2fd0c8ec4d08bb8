"""Shoppers first (streams/turns.py): background work runs between the shoppers' batches."""

from __future__ import annotations

import asyncio
import time

from streams.turns import Turns


def test_background_work_waits_for_the_batch_in_flight():
    async def run() -> list[str]:
        turns = Turns(slice_s=0.0, max_wait_s=5.0)
        order: list[str] = []

        async def batch() -> None:
            with turns.busy():
                order.append("batch starts")
                await asyncio.sleep(0.05)  # awaiting Redis, say: the loop is free meanwhile
                order.append("batch ends")

        async def background() -> None:
            work = turns.slice()
            for step in range(2):
                await work.turn()
                order.append(f"step {step}")

        b = asyncio.ensure_future(batch())
        await asyncio.sleep(0)  # the batch is in flight
        await background()
        await b
        return order

    assert asyncio.run(run()) == ["batch starts", "batch ends", "step 0", "step 1"]


def test_under_a_backlog_background_work_still_moves():
    """Batches without a gap between them: each step waits at most `max_wait_s`."""
    async def run() -> tuple[int, float]:
        turns = Turns(slice_s=0.0, max_wait_s=0.01)
        stop = False

        async def batches() -> None:
            while not stop:
                with turns.busy():
                    await asyncio.sleep(0.002)

        feed = asyncio.ensure_future(batches())
        await asyncio.sleep(0)
        work = turns.slice()
        steps = 0
        while steps < 5:
            await work.turn()
            steps += 1
        stop = True
        await feed
        return steps, work.waited

    steps, waited = asyncio.run(run())
    assert steps == 5 and waited > 0


def test_work_counts_its_own_time_not_the_waits():
    async def run() -> tuple[float, float]:
        turns = Turns(slice_s=0.0, max_wait_s=1.0)
        work = turns.slice()

        async def batch() -> None:
            with turns.busy():
                await asyncio.sleep(0.2)

        b = asyncio.ensure_future(batch())
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.02:
            pass  # 20 ms of work
        await work.turn()  # waits about 0.2 s for the batch
        await b
        return work.elapsed(), work.waited

    elapsed, waited = asyncio.run(run())
    assert elapsed < waited  # the wait is not counted as work
    assert elapsed >= 0.02


def test_a_slice_goes_on_without_waiting_while_it_lasts():
    async def run() -> float:
        turns = Turns(slice_s=10.0, max_wait_s=1.0)
        work = turns.slice()
        with turns.busy():
            for _ in range(100):
                await work.turn()  # within the slice: no wait even with a batch in flight
        return work.waited

    assert asyncio.run(run()) == 0.0
