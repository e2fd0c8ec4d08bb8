"""Shoppers first: background work on the event loop runs between the shoppers' batches.

One event loop runs the context stage (shoppers' lists), the co-occurrence stage (item rows
and their lists) and the timers. A timer that built item lists for 50-180 ms, or refreshed
shoppers for half a second, held every shopper's batch that came meanwhile: at a steady 1,000
events/s on bench/scale.py's default size they took 30% of the loop, and a shopper's list
waited for them (docs/architecture.md, "Shoppers first").

So background work runs in slices of at most `slice_s` and starts a slice only while no
shoppers' batch is in flight, or once it has waited `max_wait_s` for one to end: under a
backlog, when batches follow each other without a gap, it still moves. What a tick may spend
is counted in work, not in time spent waiting (`Slice.worked`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MAX_WAIT_S", "SLICE_S", "Slice", "Turns"]

SLICE_S = 0.005  # background work between two looks for a shoppers' batch in flight
MAX_WAIT_S = 0.1  # the longest it waits for one to end (a backlog leaves no gap)


class Turns:
    """The gate: `busy()` around a shoppers' batch; `slice()` for each piece of background
    work, which calls `Slice.turn()` between its steps."""

    def __init__(self, slice_s: float = SLICE_S, max_wait_s: float = MAX_WAIT_S) -> None:
        self.slice_s = slice_s
        self.max_wait_s = max_wait_s
        self._batches = 0
        self._free: asyncio.Event | None = None  # made on first use, in the running loop

    def _event(self) -> asyncio.Event:
        if self._free is None:
            self._free = asyncio.Event()
            if not self._batches:
                self._free.set()
        return self._free

    @contextmanager
    def busy(self) -> Iterator[None]:
        """A shoppers' batch is in flight: background work waits for it to end."""
        self._batches += 1
        self._event().clear()
        try:
            yield
        finally:
            self._batches -= 1
            if not self._batches:
                self._event().set()

    @property
    def in_flight(self) -> bool:
        return self._batches > 0

    async def wait(self) -> float:
        """Wait until no shoppers' batch is in flight, at most `max_wait_s`; the seconds
        waited."""
        if not self._batches:
            return 0.0
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(self._event().wait(), self.max_wait_s)
        except TimeoutError:
            pass
        return time.perf_counter() - t0

    def slice(self) -> Slice:
        return Slice(self)


class Slice:
    """One piece of background work: `worked` counts its own time, not the waits."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns
        self.worked = 0.0
        self.waited = 0.0
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        """Work so far, this slice included."""
        return self.worked + time.perf_counter() - self._start

    async def turn(self, force: bool = False) -> None:
        """Between two steps: go on while the slice lasts; otherwise let other tasks run and
        wait for the shoppers' batch in flight before the next slice (`force`: always)."""
        now = time.perf_counter()
        if not force and now - self._start < self.turns.slice_s:
            return
        self.worked += now - self._start
        await asyncio.sleep(0)
        self.waited += await self.turns.wait()
        self._start = time.perf_counter()
