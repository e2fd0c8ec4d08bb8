"""The stage skeleton shared by the context and co-occurrence stages (docs/architecture.md).

A batch is applied to per-partition state in memory; state and input offset reach Redis
together in one atomic checkpoint, and records are acknowledged only once covered by it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson
from redis.exceptions import BusyLoadingError, ReadOnlyError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cartwise.contract import dlq_record
from models.config import ModelConfig
from streams.stats import Stats
from streams.store import Ops, StateLost, Store

log = logging.getLogger("cartwise.stage")

MODEL_VERSION = "cooc-2"
YIELD_EVERY = 20  # long loops on the event loop give other tasks a turn this often
# A batch that fails for a reason other than an outage is retried this often, then applied
# record by record: the record that fails alone goes to the dead-letter topic.
MAX_ATTEMPTS = 3
# A record missing before the next one is fetched again from the broker (a seek). Only when
# the same gap comes back this often, over at least GAP_CONFIRM_S, is it taken as real (log
# compaction, transaction markers, retention): never silently on the first sight.
GAP_CONFIRM = 5
GAP_CONFIRM_S = 2.0
GAP_RESEEK_S = 0.5

# (value, partition, offset, broker timestamp in seconds, key); value None is a tombstone
Record = tuple[bytes | None, int, int, float, bytes | None]
# send(topic, value, partition, headers, key=None) -> a future settled once the broker has it
Sender = Callable[..., Awaitable[Awaitable[Any]]]


def group_by_partition(records: Sequence[Record]) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        out[r[1]].append(r)
    return out


def list_digest(payload: dict[str, Any], fields: Sequence[str]) -> int:
    return hash(orjson.dumps([payload.get(f) for f in fields]))


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


class Stage:
    """Per-partition state in memory, applied per batch, checkpointed every interval.

    A batch is applied to the in-memory state at once (and its outputs written); the state
    and the input offset reach Redis together, in one atomic step, at most every
    `checkpoint_interval_s`. Input records are acknowledged to Faust only once checkpointed,
    so after a crash the consumer resumes at or before the checkpoint and replays the rest.
    Records since the last checkpoint are kept (`since`) to redo them on reloaded state when
    anything fails or another worker moved the checkpoint.

    Records are applied only in offset order without a gap, and only for partitions this
    worker owns: records fetched before a rebalance or a seek may still arrive, and applying
    one past a missing record would lose that record for good (docs/architecture.md).
    """

    name = "stage"

    def __init__(self, store: Store, config: ModelConfig, stats: Stats, send: Sender,
                 settings: Any) -> None:
        self.store = store
        self.keys = store.keys
        self.config = config
        self.stats = stats
        self.send = send
        self.settings = settings
        self.topic = ""  # the input topic, for dead-letter sources
        self.parts: dict[int, Any] = {}
        self.locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.since: dict[int, list[Record]] = defaultdict(list)
        self.held: dict[int, list[Any]] = defaultdict(list)  # Faust events awaiting their ack
        self.ack: Callable[[Any], Awaitable[Any]] | None = None
        # seek(partition, offset): fetch again from there (set by streams/app.py)
        self.seek: Callable[[int, int], Awaitable[Any]] | None = None
        # Called before the first state is loaded: reads or creates the state generation.
        self.claim: Callable[[], Awaitable[Any]] | None = None
        self.last_checkpoint: dict[int, float] = defaultdict(float)
        self.assigned: set[int] = set()
        # partition -> [offset wanted, offset found, times seen, first seen, last seek]
        self.gaps: dict[int, list[Any]] = {}
        # partition -> offsets dead-lettered after failing alone: skipped when redone
        self.poisoned: dict[int, set[int]] = defaultdict(set)
        # partition -> input offset -> its copy sent elsewhere (dead letter, re-key) since the
        # last checkpoint: a batch redone after a failure does not send it again
        self.copies: dict[int, dict[int, Any]] = defaultdict(dict)

    def revoke(self, partitions: set[int]) -> None:
        """Forget state of partitions this worker no longer owns; Redis has the checkpoint."""
        for p in partitions:
            self.parts.pop(p, None)
            self.since.pop(p, None)
            self.held.pop(p, None)
            self.gaps.pop(p, None)
            self.poisoned.pop(p, None)
            self.copies.pop(p, None)
            self.assigned.discard(p)

    def assign(self, partitions: set[int]) -> None:
        """Partitions this worker now owns. State is loaded lazily, with the first records,
        except where a timer needs it while no records come (ContextStage.refresh)."""
        self.assigned |= partitions

    async def load(self, partition: int) -> Any:
        raise NotImplementedError

    async def process(self, partition: int, st: Any, records: list[Record]) -> None:
        raise NotImplementedError

    def checkpoint_ops(self, partition: int, st: Any) -> Ops:
        raise NotImplementedError

    def checkpointed(self, partition: int, st: Any) -> None:
        """Hook after a successful checkpoint: clear what it covered."""

    def fatal(self, exc: BaseException) -> None:
        """The state cannot be trusted any more (Redis lost it): stop the worker at once."""
        log.critical("%s", exc)
        self.stats.inc("state_lost")
        os._exit(3)

    async def handle(self, records: Sequence[Record], events: Sequence[Any] = ()) -> None:
        """Apply a batch, its partitions concurrently (their I/O waits overlap)."""
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.time()
            self.stats.first_batch_cpu = time.process_time()
        mine = [r for r in records if r[1] in self.assigned]
        if len(mine) != len(records):
            # Fetched before a rebalance took the partition away: its new owner reads them.
            self.stats.inc(f"{self.name}.stale_records", len(records) - len(mine))
        for e in events:
            if e.message.partition in self.assigned:
                self.held[e.message.partition].append(e)
        groups = group_by_partition(mine)
        await asyncio.gather(*(self._apply(p, recs) for p, recs in groups.items()))
        self.stats.last_batch_at, self.stats.last_batch_cpu = time.time(), time.process_time()
        due = time.monotonic() - self.settings.checkpoint_interval_s
        await asyncio.gather(*(self.checkpoint(p) for p in groups if self.last_checkpoint[p] < due))

    async def _apply(self, p: int, recs: list[Record]) -> None:
        async with self.locks[p]:
            since = self.since[p]
            if since:  # keep `since` in offset order without repeats (refetches overlap)
                recs = [r for r in recs if r[2] > since[-1][2]]
            since.extend(recs)
            await self._catch_up(p, recs)

    def _next_run(self, p: int, st: Any, todo: list[Record]) -> list[Record]:
        """The records of `todo` that follow `st.applied` without a gap.

        A missing record is fetched again (a seek) and what follows it dropped until it is
        there; a gap that comes back GAP_CONFIRM times over GAP_CONFIRM_S is real.
        """
        want = st.applied + 1
        n = 0
        for r in todo:
            if r[2] != want:
                break
            want += 1
            n += 1
        if n == len(todo):
            self.gaps.pop(p, None)
            return todo
        if n:
            return todo[:n]  # apply the run now; the gap after it is looked at next time
        first = todo[0][2]
        now = time.monotonic()
        gap = self.gaps.get(p)
        if gap is None or gap[0] != want or gap[1] != first:
            gap = self.gaps[p] = [want, first, 0, now, -GAP_RESEEK_S]
        gap[2] += 1
        if gap[2] >= GAP_CONFIRM and now - gap[3] >= GAP_CONFIRM_S:
            log.warning("%s partition %d: offsets %d-%d are not in the log (compaction, "
                        "transaction markers or retention); going on from %d", self.name, p,
                        want, first - 1, first)
            self.stats.inc(f"{self.name}.gaps_accepted")
            self.gaps.pop(p, None)
            run = [todo[0]]
            for r in todo[1:]:
                if r[2] != run[-1][2] + 1:
                    break
                run.append(r)
            return run
        # Drop what was fetched past the hole; it comes again after the seek.
        self.since[p] = [r for r in self.since[p] if r[2] < want]
        self.held[p] = [e for e in self.held[p] if e.message.offset < want]
        if now - gap[4] >= GAP_RESEEK_S:
            gap[4] = now
            self.stats.inc(f"{self.name}.gap_refetches")
            log.info("%s partition %d: offset %d missing before %d; fetching again from %d",
                     self.name, p, want, first, want)
            if self.seek is not None:
                asyncio.ensure_future(self._seek(p, want))
        return []

    async def _seek(self, p: int, offset: int) -> None:
        try:
            if self.seek is not None:
                await self.seek(p, offset)
        except Exception as exc:  # the next batch will ask again
            log.warning("%s partition %d: seek to %d failed: %s", self.name, p, offset, exc)

    async def _apply_run(self, p: int, st: Any, run: list[Record]) -> None:
        """Process a gap-free run, minus the records already dead-lettered."""
        poisoned = self.poisoned.get(p)
        recs = [r for r in run if r[2] not in poisoned] if poisoned else run
        if recs:
            t0 = time.perf_counter()
            await self.process(p, st, recs)
            self.stats.add_time(f"{self.name}.process", time.perf_counter() - t0)
        st.applied = run[-1][2]

    async def _isolate(self, p: int, st: Any, run: list[Record]) -> None:
        """Apply one record at a time: the one that fails alone is dead-lettered and skipped."""
        for r in run:
            try:
                await self._apply_run(p, st, [r])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_outage(exc) or isinstance(exc, StateLost):
                    raise
                await self.dead_letter(p, r, "processing_failed",
                                       f"{type(exc).__name__}: {exc}")
                self.poisoned[p].add(r[2])
                raise _Poisoned from exc

    async def send_copy(self, p: int, offset: int, topic: str, value: bytes,
                        partition: int | None, headers: dict[str, bytes] | None,
                        key: bytes | None = None) -> Any:
        """Send a copy of input record `offset` once per checkpoint interval: returns the
        future to settle before the checkpoint (a failed one is sent again)."""
        sent = self.copies[p].get(offset)
        if sent is not None and not (sent.done() and (sent.cancelled() or sent.exception())):
            return sent
        fut = asyncio.ensure_future(await self.send(topic, value, partition, headers, key))
        self.copies[p][offset] = fut
        return fut

    async def dead_letter(self, p: int, r: Record, reason: str, detail: str,
                          field: str | None = None) -> None:
        """Copy a record to the dead-letter topic and wait until the broker has it."""
        value, headers = dlq_record(r[0], reason, field, detail, f"{self.topic}/{p}/{r[2]}")
        fut = await self.send(self.settings.dlq_topic, value, None, headers)
        await fut
        self.stats.inc(f"dlq.{reason}")

    async def _catch_up(self, p: int, recs: list[Record] | None = None) -> Any:
        """Bring partition p's memory up to date with `since`; on failure reload and redo.

        `recs` is the newest part of `since`: when the state in memory has seen everything
        before it, only that part needs a look. Returns None for a partition not owned.
        Outages (Redis, broker) are retried until they end; any other failure MAX_ATTEMPTS
        times, then the batch is applied record by record to find the one that fails.
        """
        delay = 0.1
        attempts = 0
        while True:
            try:
                st = self.parts.get(p)
                if st is None:
                    if p not in self.assigned:
                        return None
                    if self.claim is not None and not self.store.generation:
                        try:
                            await self.claim()
                        except StateLost:
                            raise
                        except Exception as exc:  # not the records' fault: retry until it works
                            raise Outage(f"cannot read the state generation: {exc}") from exc
                    st = await self.load(p)
                    st.applied = st.offset
                    if p not in self.assigned:  # revoked while loading
                        return None
                    self.parts[p] = st
                    recs = None
                fresh = recs is not None and (not recs or recs[0][2] > st.applied)
                todo = recs if fresh else [r for r in self.since[p] if r[2] > st.applied]
                while todo:
                    run = self._next_run(p, st, todo)
                    if not run:
                        break
                    if attempts >= MAX_ATTEMPTS:
                        await self._isolate(p, st, run)
                    else:
                        await self._apply_run(p, st, run)
                    todo = [r for r in todo if r[2] > st.applied]
                return st
            except asyncio.CancelledError:
                raise
            except StateLost as exc:
                self.fatal(exc)
                raise
            except _Poisoned:
                self.parts.pop(p, None)  # half-updated: reload and redo without it
                recs = None
                attempts = 0
            except Exception as exc:
                # In-memory state may be half-updated: drop it, Redis has the truth.
                self.parts.pop(p, None)
                self.stats.inc(f"{self.name}.errors")
                recs = None
                outage = is_outage(exc)
                if not outage:
                    attempts += 1
                if attempts <= 1:
                    log.exception("%s partition %d: batch failed, retrying in %.1fs",
                                  self.name, p, delay)
                else:
                    log.warning("%s partition %d: batch failed again (%s: %s)%s", self.name,
                                p, type(exc).__name__, exc, "" if outage or attempts <
                                MAX_ATTEMPTS else "; applying it record by record")
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2) if outage else 0.1 * 2 ** min(attempts, 3)

    async def checkpoint(self, p: int) -> None:
        """Write state and offset atomically, then acknowledge the records it covers."""
        async with self.locks[p]:
            delay = 0.1
            while True:
                st = await self._catch_up(p)
                self.last_checkpoint[p] = time.monotonic()
                if st is None:
                    return
                if st.applied == st.offset:
                    break
                t0 = time.perf_counter()
                try:
                    await asyncio.gather(*st.acks)  # outputs durable before we claim the input
                    with self.stats.redis_write(f"{self.name}.checkpoint"):
                        ok, found = await self.store.checkpoint(
                            self.name, p, st.offset, st.applied, self.checkpoint_ops(p, st))
                except asyncio.CancelledError:
                    raise
                except StateLost as exc:
                    self.fatal(exc)
                    raise
                except Exception as exc:
                    # Nothing of it was written (the script checks before it writes and moves
                    # the offset last): reload and redo the same records, then try again.
                    log.warning("%s partition %d: checkpoint failed (%s: %s); will retry",
                                self.name, p, type(exc).__name__, exc)
                    self.stats.inc(f"{self.name}.errors")
                    self.stats.inc(f"{self.name}.checkpoint_failures")
                    self.parts.pop(p, None)
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                    continue
                self.stats.add_time(f"{self.name}.checkpoint", time.perf_counter() - t0)
                if ok:
                    st.offset = st.applied
                    st.acks.clear()
                    for k, n in st.counts.items():
                        self.stats.inc(k, n)
                    st.counts.clear()
                    self.checkpointed(p, st)
                    self.since[p] = [r for r in self.since[p] if r[2] > st.offset]
                    if p in self.poisoned:
                        self.poisoned[p] = {o for o in self.poisoned[p] if o > st.offset}
                    if self.copies.get(p):
                        self.copies[p] = {o: f for o, f in self.copies[p].items()
                                          if o > st.offset}
                    break
                # Another worker checkpointed this partition (a rebalance overlap): reload
                # and redo what is left on top of their state.
                log.warning("%s partition %d: checkpoint moved to %d under us; reloading",
                            self.name, p, found)
                self.stats.inc(f"{self.name}.checkpoint_conflicts")
                self.parts.pop(p, None)
            done = st.offset
            held = self.held[p]
            keep = [e for e in held if e.message.offset > done]
            if self.ack is not None:
                for e in held:
                    if e.message.offset <= done:
                        await self.ack(e)
            self.held[p] = keep

    async def checkpoint_all(self) -> None:
        """Timer: checkpoint partitions that have waited an interval (idle ones included)."""
        due = time.monotonic() - self.settings.checkpoint_interval_s
        await asyncio.gather(*(self.checkpoint(p) for p in list(self.parts)
                               if self.last_checkpoint[p] < due))


class Outage(RuntimeError):
    """A dependency failed (not the records): retried until it works again."""


class _Poisoned(Exception):
    """A record failed alone and was dead-lettered: redo the batch without it."""


def is_outage(exc: BaseException) -> bool:
    """An error of the infrastructure (retried until it ends), not of the records."""
    if isinstance(exc, Outage | RedisConnectionError | RedisTimeoutError | BusyLoadingError |
                  ReadOnlyError | OSError | asyncio.TimeoutError | TimeoutError):
        return True
    return bool(getattr(exc, "retriable", False))  # aiokafka's retriable broker errors
