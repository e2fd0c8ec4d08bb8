"""Holes in a partition's offsets: the one place the stream core may pass over input, so the
decision is made by asking the broker, never on timing (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streams.stage import Stage

log = logging.getLogger("cartwise.stage")

# The workers' consumers read committed records only: an aborted transaction's records are
# never applied (docs/events.md). The probe below reads alike, so it sees the same holes.
ISOLATION_LEVEL = "read_committed"
# A missing record is fetched again (a seek) at most this often; once the same hole came back
# GAP_CONFIRM times over GAP_CONFIRM_S, the broker is asked (the probe), again every
# GAP_CONFIRM_S while the record it names does not come.
GAP_CONFIRM = 5
GAP_CONFIRM_S = 2.0
GAP_RESEEK_S = 0.5
# How long the probe waits for a record; none within it means "keep waiting", not "skip".
PROBE_TIMEOUT_S = 5.0
# The most records one probe looks at: the holes among them are all passed over at once.
PROBE_MAX_RECORDS = 10_000


@dataclass
class Gap:
    """A hole at `want`, the next offset to apply, seen before later records."""

    want: int
    since: float  # monotonic time of the first sight
    seen: int = 0
    last_seek: float = float("-inf")
    last_probe: float = float("-inf")
    probing: bool = False

    def due_seek(self, now: float) -> bool:
        return now - self.last_seek >= GAP_RESEEK_S

    def due_probe(self, now: float, eager: bool) -> bool:
        """Seen long enough (at once, `eager`, where the broker already answered holes on this
        partition: a transactional producer's), and not asked within GAP_CONFIRM_S."""
        seen = eager or (self.seen >= GAP_CONFIRM and now - self.since >= GAP_CONFIRM_S)
        return seen and not self.probing and now - self.last_probe >= GAP_CONFIRM_S


def holes(want: int, offsets: list[int]) -> set[int]:
    """The offsets from `want` up to the last of `offsets` (sorted records' offsets a consumer
    got from `want` on) that hold no record to apply."""
    if not offsets:
        return set()
    return set(range(want, offsets[-1])).difference(offsets)


def consumable(bootstrap: list[str], topic: str, partition: int, offset: int,
               timeout_s: float = PROBE_TIMEOUT_S) -> list[int]:
    """The offsets of the records one fetch of a consumer of the workers' isolation level
    gets at or after `offset`, in order; [] when none came within `timeout_s`.

    A short consumer of its own (no group, nothing committed), so the answer does not depend
    on what the worker's consumer has buffered or dropped. Below the log start (retention) it
    resets to the earliest record. Blocking: run it off the event loop.
    """
    from kafka import KafkaConsumer, TopicPartition  # here: importing kafka takes ~0.2 s

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             isolation_level=ISOLATION_LEVEL,
                             # Offsets are all it reads: checksums in pure Python cost more
                             # than the rest of a probe (15% of a worker's time when probes
                             # were frequent).
                             check_crcs=False)
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            records = consumer.poll(timeout_ms=max(1, int(left * 1000)),
                                    max_records=PROBE_MAX_RECORDS).get(tp)
            if records:
                return [int(r.offset) for r in records]
        return []
    finally:
        consumer.close()


def prober(bootstrap: list[str], topic: str) -> Any:
    """consumable(partition, offset) for `topic`, run in a thread (Stage.consumable)."""
    async def probe(partition: int, offset: int) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, consumable, bootstrap, topic, partition,
                                          offset)
    return probe


# A partition whose log holds records past what the worker applied, while its consumer has
# handed over everything and nothing arrived for this long, is read again from after its
# checkpoint (`StallWatch`); where the broker has nothing to give there, it is asked again
# less and less often, up to STALL_MAX_S apart.
STALL_S = 5.0
STALL_MAX_S = 300.0


@dataclass
class Stall:
    """A partition behind its broker's end: since when, and when to look at it next."""

    applied: int
    end: int
    due: float
    wait: float = STALL_S
    probing: bool = False


class StallWatch:
    """Holes at the end of what a worker was given (mixed into streams.stage.Stage).

    A hole is seen when a later record arrives. Nothing arrives when the consumer starts past
    the checkpoint at the end of the log: a new owner starts at the group's committed offset,
    and Faust may commit past a hole it saw, because its own gap bookkeeping counts the
    offsets a fetch skipped (a seek, a rebalance) as done. The records after the checkpoint
    then sit on the broker unapplied for good. So the broker's end is compared with what was
    applied, and a partition that stays behind without records coming is asked about (the
    probe) and fetched again from after its checkpoint. The probe itself (`ask_broker`) serves
    the gaps of Stage._probe too.
    """

    async def find_stalls(self: Stage,
                          ends: Callable[[int], tuple[int | None, int | None]]) -> None:
        """Timer. `ends(p)`: the partition's high watermark as the consumer last saw it, and
        the last offset the consumer handed over (or where it was told to start)."""
        now = time.monotonic()
        for p in sorted(self.assigned):
            end, handed = ends(p)
            if end is None or handed is None or handed < end - 1 or p in self.gaps:
                # No fetch answer yet; still fetching (a busy worker's partitions wait their
                # turn: not a stall); or a hole already being fetched again.
                self.stalls.pop(p, None)
                continue
            st = self.parts.get(p)
            try:
                applied = st.applied if st is not None else await self.store.offset(self.name,
                                                                                    p)
            except Exception:  # a Redis outage: the next tick looks again
                continue
            behind = range(applied + 1, end)
            empty = self.empty.get(p, ())
            since = self.since.get(p)
            if not behind or all(o in empty for o in behind) or (since and since[-1][2] > applied):
                # Caught up; or the stage holds records past what it applied (a batch being
                # retried: an outage or a poison record), which no fetch would help.
                self.stalls.pop(p, None)
                continue
            stall = self.stalls.get(p)
            if stall is None or (stall.applied, stall.end) != (applied, end):
                self.stalls[p] = Stall(applied, end, now + STALL_S)
                continue
            if now < stall.due or stall.probing or self.consumable is None:
                continue
            # In the background: a probe that finds nothing waits PROBE_TIMEOUT_S, and this
            # timer also checkpoints idle partitions.
            stall.probing = True
            asyncio.ensure_future(self._probe_stall(p, stall))

    async def ask_broker(self: Stage, p: int, want: int) -> tuple[list[int], set[int]] | None:
        """The probe, for gaps (Stage._probe) and stalls: the offsets of the records the broker
        has from `want` on, and the holes among them, remembered while `p` is owned (passed
        over at the next sight). None, logged, when the broker could not be asked."""
        try:
            assert self.consumable is not None
            offsets = await self.consumable(p, want)
        except Exception as exc:
            log.warning("%s partition %d: could not ask the broker about offset %d: %s",
                        self.name, p, want, exc)
            return None
        found = holes(want, offsets)
        if p in self.assigned:
            self.empty.setdefault(p, set()).update(found)
        return offsets, found

    async def _probe_stall(self: Stage, p: int, stall: Stall) -> None:
        """Ask the broker what it has after the stalled checkpoint; fetch it again if any."""
        want = stall.applied + 1
        try:
            answer = await self.ask_broker(p, want)  # None: asked again at the next due time
        finally:
            stall.probing = False
        if p not in self.assigned or self.stalls.get(p) is not stall:
            return  # moved on meanwhile (records came, or the partition went elsewhere)
        offsets = answer[0] if answer is not None else []
        if not offsets:
            # Nothing to apply (a transaction's marker or aborted records at the end), or no
            # answer in time: asked again later, less and less often.
            stall.wait = min(STALL_MAX_S, stall.wait * 2)
            stall.due = time.monotonic() + stall.wait
            return
        stall.due = time.monotonic() + STALL_S
        self.stats.inc(f"{self.name}.stalls_found")
        log.warning("%s partition %d: the broker holds records from offset %d on but none "
                    "came after %d; fetching again from %d", self.name, p, offsets[0],
                    stall.applied, want)
        await self._seek(p, want)
