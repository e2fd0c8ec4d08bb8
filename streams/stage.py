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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from cartwise.contract import dlq_record
from models.config import ModelConfig
from streams.gaps import Gap, Stall, StallWatch
from streams.isolation import CheckpointIsolation, Outage, is_outage
from streams.stats import Stats
from streams.store import Ops, StateLost, Store
from streams.turns import Turns

log = logging.getLogger("cartwise.stage")

MODEL_VERSION = "cooc-3"
YIELD_EVERY = 20  # long loops on the event loop give other tasks a turn this often
# A batch's lag says the shoppers' lists are behind for this long after it, no longer: a quiet
# stream is not behind (streams/graph_stage.py, `lists_budget`).
BEHIND_FOR_S = 1.0


def most_behind(last: tuple[float, float] | None, now: float, age: float
                ) -> tuple[float, float]:
    """The shoppers' lag item lists go by, (monotonic time, age of the oldest event), after
    a batch written at `now` whose oldest event was `age` old: that batch's, unless one of the
    last `BEHIND_FOR_S` (another partition's, finished earlier) was further behind. Then that
    one stands until it ages out, so a partition that keeps up does not hide one that lags."""
    if last is not None and now - last[0] < BEHIND_FOR_S and last[1] > age:
        return last
    return (now, age)
# A batch that fails for a reason other than an outage is retried this often, then applied
# record by record: the record that fails alone goes to the dead-letter topic.
MAX_ATTEMPTS = 3

# (value, partition, offset, broker timestamp in seconds, key); value None is a tombstone
Record = tuple[bytes | None, int, int, float, bytes | None]
# send(topic, value, partition, headers, key=None) -> a future settled once the broker has it
Sender = Callable[..., Awaitable[Awaitable[Any]]]


# A partition's checkpoint waits at most this many `checkpoint_interval_s` (`checkpoint_every`).
CHECKPOINT_MAX_INTERVALS = 4


def checkpoint_every(settings: Any, ops_s: float, partitions: int) -> float:
    """How long a partition's state may wait for its next checkpoint: `checkpoint_interval_s`,
    or longer when building its last one (`ops_s`, the encoding done on the event loop) took
    more than its share of `checkpoint_budget`, split evenly over the `partitions` the stage
    holds. A wide row changed in every batch is then encoded every few seconds instead of every
    second; at most `CHECKPOINT_MAX_INTERVALS` intervals, so a crash replays little."""
    base = settings.checkpoint_interval_s
    budget = settings.checkpoint_budget
    if budget <= 0 or ops_s <= 0:
        return base
    return min(base * CHECKPOINT_MAX_INTERVALS, max(base, ops_s * max(1, partitions) / budget))


def group_by_partition(records: Sequence[Record]) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        out[r[1]].append(r)
    return out


def list_digest(payload: dict[str, Any], fields: Sequence[str]) -> int:
    return hash(orjson.dumps([payload.get(f) for f in fields]))


class Stage(CheckpointIsolation, StallWatch):
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
    yields = False  # to the shoppers' batches (streams/turns.py)
    stopping = False  # the worker is stopping itself (`fatal`): once per process

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
        # consumable(partition, offset): the offsets of the records one fetch of the broker
        # has for us at or after offset ([]: none came in time); asked before a gap is passed
        # over (streams/gaps.py; set by streams/app.py)
        self.consumable: Callable[[int, int], Awaitable[list[int]]] | None = None
        # on_stop(reason): publish the worker's stats before it exits (set by streams/app.py)
        self.on_stop: Callable[[str], Awaitable[Any]] | None = None
        # Called before the first state is loaded: reads or creates the state generation.
        self.claim: Callable[[], Awaitable[Any]] | None = None
        self.last_checkpoint: dict[int, float] = defaultdict(float)
        self.ops_seconds: dict[int, float] = {}  # partition -> encoding its last checkpoint
        self.assigned: set[int] = set()
        self.gaps: dict[int, Gap] = {}  # partition -> the hole before its next record
        self.stalls: dict[int, Stall] = {}  # partition -> behind the broker's end, none coming
        # partition -> offsets the broker said hold no record (above the checkpoint); a
        # partition here had such holes, so its next gaps are asked about at once
        self.empty: dict[int, set[int]] = {}
        # partition -> offsets dead-lettered after failing alone: skipped when redone
        self.poisoned: dict[int, set[int]] = defaultdict(set)
        # partition -> input offset -> its copy sent elsewhere (dead letter, re-key) since the
        # last checkpoint: a batch redone after a failure does not send it again
        self.copies: dict[int, dict[int, Any]] = defaultdict(dict)
        # Shoppers first (streams/turns.py): one gate per worker, shared by its stages
        # (streams/app.py); a stage that `yields` starts batches and checkpoints between the
        # context stage's batches.
        self.turns = Turns()

    def revoke(self, partitions: set[int]) -> None:
        """Forget state of partitions this worker no longer owns; Redis has the checkpoint."""
        for p in partitions:
            self.parts.pop(p, None)
            self.since.pop(p, None)
            self.held.pop(p, None)
            self.gaps.pop(p, None)
            self.stalls.pop(p, None)
            self.empty.pop(p, None)
            self.poisoned.pop(p, None)
            self.copies.pop(p, None)
            self.assigned.discard(p)

    def assign(self, partitions: set[int]) -> None:
        """Partitions this worker now owns. State is loaded lazily, with the first records,
        except where a timer needs it while no records come (ContextStage.refresh)."""
        self.assigned |= partitions

    async def load(self, partition: int) -> Any:
        """A partition's state from its checkpoint, the offset read last (`_load_still`)."""
        raise NotImplementedError

    async def _load_still(self, p: int) -> Any:
        """`load`, again until no checkpoint moved the offset while it read: a load spans many
        reads, and a worker still writing the partition (a rebalance overlap) could leave it
        with state older than the offset it read, and records in between never applied."""
        while True:
            before = await self.store.offset(self.name, p)
            st = await self.load(p)
            if st.offset == before:
                return st
            self.stats.inc(f"{self.name}.load_retries")
            log.warning("%s partition %d: checkpointed by another worker while loading (offset "
                        "%d, then %d); loading again", self.name, p, before, st.offset)

    async def process(self, partition: int, st: Any, records: list[Record]) -> None:
        raise NotImplementedError

    def checkpoint_ops(self, partition: int, st: Any) -> Ops:
        raise NotImplementedError

    def checkpointed(self, partition: int, st: Any) -> None:
        """Hook after a successful checkpoint: clear what it covered."""

    async def after_checkpoint(self, partition: int, st: Any) -> None:
        """Writes that follow a checkpoint outside its script: keys in other cluster slots.
        They must be safe to lose with the worker (a replay does not redo them)."""

    async def fatal(self, exc: BaseException, counter: str = "state_lost", code: int = 3) -> None:
        """Carrying on would be wrong (Redis lost the state, or a checkpoint cannot be written
        at all): stop the worker at once, its stats published first so the stop shows. The
        first caller stops it; others (partitions checkpointing together) wait for the exit."""
        if Stage.stopping:
            await asyncio.Event().wait()
        Stage.stopping = True
        log.critical("%s", exc)
        self.stats.inc(counter)
        if self.on_stop is not None:
            try:
                await asyncio.wait_for(self.on_stop(counter), 2.0)
            except Exception as err:  # exiting anyway; the log line above says why
                log.warning("could not publish the stats before stopping: %s", err)
        os._exit(code)

    async def handle(self, records: Sequence[Record], events: Sequence[Any] = ()) -> None:
        """Apply a batch, its partitions concurrently (their I/O waits overlap).

        The partitions of a batch wait for each other: the agent hands over the next batch
        only when this returns. So a partition's retries bound the others' delay: about 0.7 s
        per poison record (MAX_ATTEMPTS tries), and for a checkpoint that keeps failing the
        same plus its halving passes (`_isolate_checkpoint`). Letting partitions run ahead of
        each other would need pausing them in the consumer; not done (docs/architecture.md).
        """
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.time()
            self.stats.first_batch_cpu = time.process_time()
        if self.yields:
            await self.turns.wait()
        mine = [r for r in records if r[1] in self.assigned]
        if len(mine) != len(records):
            # Fetched before a rebalance took the partition away: its new owner reads them.
            self.stats.inc(f"{self.name}.stale_records", len(records) - len(mine))
        for e in events:
            if e.message.partition in self.assigned:
                self.held[e.message.partition].append(e)
        groups = group_by_partition(mine)
        t0 = time.perf_counter()
        await asyncio.gather(*(self._apply(p, recs) for p, recs in groups.items()))
        self.stats.last_batch_at, self.stats.last_batch_cpu = time.time(), time.process_time()
        t1 = time.perf_counter()
        await asyncio.gather(*(self.checkpoint(p) for p in groups if self._due(p)))
        self.stats.add_time(f"{self.name}.batch_apply", t1 - t0)
        self.stats.add_time(f"{self.name}.batch_checkpoint", time.perf_counter() - t1)

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
        there. Only offsets the broker said hold no record to apply (transaction markers,
        aborted or compacted records, retention; `_probe`) are passed over.
        """
        want = st.applied + 1
        empty = self.empty.get(p)
        if empty and want in empty and todo[0][2] > want:
            skip_to = want
            while skip_to in empty and skip_to < todo[0][2]:
                skip_to += 1
            self.stats.inc(f"{self.name}.gaps_accepted")
            st.applied, want = skip_to - 1, skip_to
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
        if gap is None or gap.want != want:
            gap = self.gaps[p] = Gap(want, now)
        gap.seen += 1
        # Drop what was fetched past the hole; it comes again after the seek.
        self.since[p] = [r for r in self.since[p] if r[2] < want]
        self.held[p] = [e for e in self.held[p] if e.message.offset < want]
        probe = self.consumable is not None and gap.due_probe(now, p in self.empty)
        if probe:
            gap.probing, gap.last_probe = True, now
            asyncio.ensure_future(self._probe(p, gap))
        if gap.due_seek(now):
            gap.last_seek = now
            self.stats.inc(f"{self.name}.gap_refetches")
            log.info("%s partition %d: offset %d missing before %d; fetching again from %d",
                     self.name, p, want, first, want)
            if self.seek is not None and not probe:  # the probe seeks when it has answered
                asyncio.ensure_future(self._seek(p, want))
        return []

    async def _probe(self, p: int, gap: Gap) -> None:
        """Ask the broker which records it has from the hole on, then fetch again: the offsets
        among them without a record are passed over at the next sight, no others."""
        try:
            answer = await self.ask_broker(p, gap.want)  # None: asked again after GAP_CONFIRM_S
        finally:
            gap.probing = False
        if answer is not None:
            offsets, found = answer
            if gap.want in found:
                log.warning("%s partition %d: offsets %d-%d hold no record to apply (transaction "
                            "markers, aborted or compacted records, retention), nor %d more up "
                            "to %d: passing over them", self.name, p, gap.want, offsets[0] - 1,
                            len(found) - (offsets[0] - gap.want), offsets[-1])
            else:  # the record exists (or none came in time): wait for it, never skip
                self.stats.inc(f"{self.name}.gap_waits")
                log.warning("%s partition %d: offset %d still missing after %d refetches; the "
                            "broker %s: fetching again until it comes", self.name, p, gap.want,
                            gap.seen, "has it" if offsets else "sent nothing in time")
        await self._seek(p, gap.want)

    async def refetch_gaps(self) -> None:
        """Timer: fetch again from every hole not seen for GAP_RESEEK_S.

        A seek can be overtaken by records the consumer fetched before it: Faust then takes
        its read position past the hole again and drops the records fetched again, so no
        record arrives to show the hole; on a quiet log nothing else would ever seek.
        """
        now = time.monotonic()
        for p, gap in list(self.gaps.items()):
            if gap.due_seek(now) and not gap.probing:
                gap.last_seek = now
                self.stats.inc(f"{self.name}.gap_refetches")
                await self._seek(p, gap.want)

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
                    st = await self._load_still(p)
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
                await self.fatal(exc)
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
        """Write state and offset atomically, then acknowledge the records it covers.

        A checkpoint that fails for a reason other than an outage MAX_ATTEMPTS times is
        written record by record instead (`_isolate_checkpoint`), so no record can hold it.
        """
        async with self.locks[p]:
            delay = 0.1
            failures = 0
            while True:
                st = await self._catch_up(p)
                self.last_checkpoint[p] = time.monotonic()
                if st is None:
                    return
                if st.applied == st.offset:
                    break
                try:
                    ok, found = await self._write(p, st)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Nothing of it was written (the script checks before it writes and moves
                    # the offset last): reload and redo the same records, then try again.
                    self.parts.pop(p, None)
                    failures += not is_outage(exc)
                    if failures >= MAX_ATTEMPTS:
                        await self._isolate_checkpoint(p)
                        failures = 0
                        continue
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                    continue
                if ok:
                    self._covered(p, st)
                    break
                # Another worker checkpointed this partition (a rebalance overlap): reload
                # and redo what is left on top of their state.
                log.warning("%s partition %d: checkpoint moved to %d under us; reloading",
                            self.name, p, found)
                self.stats.inc(f"{self.name}.checkpoint_conflicts")
                self.parts.pop(p, None)
            await self.after_checkpoint(p, st)
            done = st.offset
            held = self.held[p]
            keep = [e for e in held if e.message.offset > done]
            if self.ack is not None:
                for e in held:
                    if e.message.offset <= done:
                        await self.ack(e)
            self.held[p] = keep

    async def _write(self, p: int, st: Any) -> tuple[bool, int]:
        """One checkpoint attempt: (written, offset found); a failure is logged and raised."""
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*st.acks)  # outputs durable before we claim the input
            t_ops = time.perf_counter()
            ops = self.checkpoint_ops(p, st)
            self.ops_seconds[p] = time.perf_counter() - t_ops
            with self.stats.redis_write(f"{self.name}.checkpoint"):
                ok, found = await self.store.checkpoint(self.name, p, st.offset, st.applied, ops)
        except asyncio.CancelledError:
            raise
        except StateLost as exc:
            await self.fatal(exc)
            raise
        except Exception as exc:
            log.warning("%s partition %d: checkpoint of offsets %d-%d failed (%s: %s)",
                        self.name, p, st.offset + 1, st.applied, type(exc).__name__, exc)
            self.stats.inc(f"{self.name}.errors")
            self.stats.inc(f"{self.name}.checkpoint_failures")
            raise
        self.stats.add_time(f"{self.name}.checkpoint", time.perf_counter() - t0)
        return ok, found

    def _covered(self, p: int, st: Any) -> None:
        """A checkpoint was written: count its records and forget what it covers."""
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
            self.copies[p] = {o: f for o, f in self.copies[p].items() if o > st.offset}
        if self.empty.get(p):
            self.empty[p] = {o for o in self.empty[p] if o > st.offset}

    async def checkpoint_all(self) -> None:
        """Timer: checkpoint partitions that have waited an interval (idle ones included)."""
        if self.yields:
            await self.turns.wait()
        await asyncio.gather(*(self.checkpoint(p) for p in list(self.parts) if self._due(p)))

    def _due(self, p: int) -> bool:
        every = checkpoint_every(self.settings, self.ops_seconds.get(p, 0.0), len(self.parts))
        return time.monotonic() - self.last_checkpoint[p] >= every


class _Poisoned(Exception):
    """A record failed alone and was dead-lettered: redo the batch without it."""
