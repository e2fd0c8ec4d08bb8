"""The two stages of a worker, between Faust (streams/app.py) and the pure model (models/).

Stage 1, `context`, reads the events topic (keyed by user): validates, drops duplicates,
updates shopper contexts, writes shopper suggestion lists and sends co-occurrence evidence to
the internal pairs topic, routed by item. Stage 2, `cooccurrence`, reads the pairs topic:
adds evidence to the item graph and writes item lists. State is held in memory per partition
and checkpointed to Redis with the input offset in one atomic step (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cartwise.contract import (
    FEEDBACK_TYPES,
    ContractError,
    Event,
    check_not_future,
    dlq_headers,
    parse_catalog,
    parse_event,
)
from models.config import ModelConfig
from models.context import ContextBook, ShopperContext
from models.feedback import Attribution, Delta, Example, FeedbackConfig, Reranker
from models.graph import KINDS, ItemGraph
from models.interests import InterestClusters, preferences
from models.ranking import anchors, cycles_needed, listed, rank_for_user, rebuy_candidates
from models.repurchase import DAY, LIFECYCLE_DAYS, predict, touchpoints
from streams.stats import Stats
from streams.store import Ops, Store

log = logging.getLogger("cartwise.pipeline")

MODEL_VERSION = "cooc-2"
USER_LIST_SIZE = 20
YIELD_EVERY = 20  # long loops on the event loop give other tasks a turn this often

# (value, partition, offset, broker timestamp in seconds)
Record = tuple[bytes, int, int, float]
# send(topic, value, partition, headers, key=None) -> a future settled once the broker has it
Sender = Callable[..., Awaitable[Awaitable[Any]]]


def item_partition(item_id: str, partitions: int) -> int:
    """Pairs-topic partition that owns an item's row (stable across processes and versions)."""
    return zlib.crc32(item_id.encode()) % partitions


class PartitionOf(dict):
    """item -> pairs partition, memoised: hot items are routed thousands of times a second."""

    def __init__(self, partitions: int, max_size: int = 500_000) -> None:
        super().__init__()
        self.partitions = partitions
        self.max_size = max_size

    def __missing__(self, item: str) -> int:
        if len(self) >= self.max_size:
            self.clear()
        q = self[item] = item_partition(item, self.partitions)
        return q


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


TRIM_EVERY = 8  # audience index: each item's sets are trimmed one batch in this many
TOUCHPOINTS_PER_TICK = 500  # per partition: bounds one tick's work after downtime


def touchpoint_member(user: str, item: str, kind: str, bought_at: float) -> bytes:
    return orjson.dumps([user, item, kind, bought_at])


def touchpoint_message(member: bytes, at: float, lead_s: float) -> dict[str, Any]:
    """A touchpoint as sent to the touchpoints topic (docs/events.md, contract v1)."""
    user, item, kind, bought_at = orjson.loads(member)
    msg: dict[str, Any] = {
        "v": 1, "touchpoint_id": hashlib.sha1(member + repr(at).encode()).hexdigest()[:20],
        "kind": kind, "user_id": user, "item_id": item, "at": at, "bought_at": bought_at}
    if kind == "replenish":
        msg["expected_run_out"] = at + lead_s
        msg["reason"] = f"about to run out of {item}"
    else:
        msg["reason"] = f"{kind.replace('_', ' ')} after buying {item}"
    return msg


def order_mark(ctx: ShopperContext) -> tuple:
    return (len(ctx.orders), ctx.orders[-1][0] if ctx.orders else None)


def profile_doc(user: str, ctx: ShopperContext,
                interest: dict[str, Any] | None) -> dict[str, Any]:
    """What segments and audiences are computed from (docs/redis.md, cw:profile)."""
    return {"user_id": user, "orders": ctx.orders, "bought": list(ctx.bought),
            "interest": interest, "as_of": ctx.last_ts, "generated_at": time.time()}


@dataclass
class ContextPartition:
    offset: int  # last offset checkpointed to Redis
    book: ContextBook
    applied: int = -1  # last offset applied in memory (>= offset)
    written: dict[str, int] = field(default_factory=dict)  # user -> digest of the last list
    # user -> (orders, category-share hash, interest) of the profile last written
    profiled: dict[str, tuple] = field(default_factory=dict)
    # Touchpoint and due-reminder changes since the last checkpoint: member -> time, or None
    # to remove (docs/replenishment.md); written with the checkpoint, so a replay redoes them.
    schedule: dict[bytes, float | None] = field(default_factory=dict)
    due: dict[bytes, float | None] = field(default_factory=dict)
    clusters: InterestClusters = field(default_factory=InterestClusters)
    clusters_dirty: bool = False
    reranker: Reranker = field(default_factory=Reranker)
    reranker_dirty: bool = False
    # (experiment, "variant|counter") -> amount since the last checkpoint, added with it
    exp_deltas: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    # (event time to settle at, user): shoppers with unlabelled impressions, soonest first
    settle_heap: list[tuple[float, str]] = field(default_factory=list)
    refreshed_version: int | None = None  # lists_version the last refresh ranked against
    acks: list[Awaitable[Any]] = field(default_factory=list)  # sends to settle before checkpoint
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class GraphPartition:
    offset: int
    graph: ItemGraph
    hwm: dict[int, int]  # events partition -> highest source offset applied
    applied: int = -1
    written: dict[str, int] = field(default_factory=dict)  # item -> digest of the last lists
    # rows changed since their lists were written -> broker time of the oldest such evidence
    pending: dict[str, float] = field(default_factory=dict)
    computed_at: dict[str, float] = field(default_factory=dict)  # item -> monotonic time
    last_batch: float = 0.0
    unsettled: bool = True
    acks: list[Awaitable[Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Stage:
    """Per-partition state in memory, applied per batch, checkpointed every interval.

    A batch is applied to the in-memory state at once (and its outputs written); the state
    and the input offset reach Redis together, in one atomic step, at most every
    `checkpoint_interval_s`. Input records are acknowledged to Faust only once checkpointed,
    so after a crash the consumer resumes at or before the checkpoint and replays the rest.
    Records since the last checkpoint are kept (`since`) to redo them on reloaded state when
    anything fails or another worker moved the checkpoint.
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
        self.parts: dict[int, Any] = {}
        self.locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.since: dict[int, list[Record]] = defaultdict(list)
        self.held: dict[int, list[Any]] = defaultdict(list)  # Faust events awaiting their ack
        self.ack: Callable[[Any], Awaitable[Any]] | None = None
        self.last_checkpoint: dict[int, float] = defaultdict(float)
        self.assigned: set[int] = set()

    def revoke(self, partitions: set[int]) -> None:
        """Forget state of partitions this worker no longer owns; Redis has the checkpoint."""
        for p in partitions:
            self.parts.pop(p, None)
            self.since.pop(p, None)
            self.held.pop(p, None)
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

    async def handle(self, records: Sequence[Record], events: Sequence[Any] = ()) -> None:
        """Apply a batch, its partitions concurrently (their I/O waits overlap)."""
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = time.time()
            self.stats.first_batch_cpu = time.process_time()
        for e in events:
            self.held[e.message.partition].append(e)
        groups = group_by_partition(records)
        await asyncio.gather(*(self._apply(p, recs) for p, recs in groups.items()))
        self.stats.last_batch_at, self.stats.last_batch_cpu = time.time(), time.process_time()
        due = time.monotonic() - self.settings.checkpoint_interval_s
        await asyncio.gather(*(self.checkpoint(p) for p in groups if self.last_checkpoint[p] < due))

    async def _apply(self, p: int, recs: list[Record]) -> None:
        async with self.locks[p]:
            self.since[p].extend(recs)
            await self._catch_up(p, recs)

    async def _catch_up(self, p: int, recs: list[Record] | None = None) -> Any:
        """Bring partition p's memory up to date with `since`; on failure reload and redo.

        `recs` is the newest part of `since`: when the state in memory has seen everything
        before it, only that part needs a look.
        """
        delay = 0.1
        while True:
            try:
                st = self.parts.get(p)
                if st is None:
                    st = self.parts[p] = await self.load(p)
                    st.applied = st.offset
                    recs = None
                fresh = recs is not None and (not recs or recs[0][2] > st.applied)
                todo = recs if fresh else [r for r in self.since[p] if r[2] > st.applied]
                if todo:
                    t0 = time.perf_counter()
                    await self.process(p, st, todo)
                    st.applied = todo[-1][2]
                    self.stats.add_time(f"{self.name}.process", time.perf_counter() - t0)
                return st
            except asyncio.CancelledError:
                raise
            except Exception:
                # In-memory state may be half-updated: drop it, Redis has the truth.
                self.parts.pop(p, None)
                self.stats.inc(f"{self.name}.errors")
                recs = None
                log.exception("%s partition %d: batch failed, retrying in %.1fs",
                              self.name, p, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def checkpoint(self, p: int) -> None:
        """Write state and offset atomically, then acknowledge the records it covers."""
        async with self.locks[p]:
            while True:
                st = await self._catch_up(p)
                self.last_checkpoint[p] = time.monotonic()
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
                except Exception:
                    log.exception("%s partition %d: checkpoint failed; will retry",
                                  self.name, p)
                    self.stats.inc(f"{self.name}.errors")
                    self.parts.pop(p, None)
                    await asyncio.sleep(0.5)
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


class ContextStage(Stage):
    name = "context"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partition_of = PartitionOf(self.settings.partitions)
        self.list_cache = ReadCache(self.settings.lists_interval_s)
        self.catalog_cache = ReadCache(self.settings.lists_interval_s)
        self._trim_turn = 0
        self.attribution = Attribution(FeedbackConfig(self.settings.attribution_window_s,
                                                      self.settings.feedback_label_s))

    async def load(self, partition: int) -> ContextPartition:
        book = ContextBook(self.config)
        for user, raw in (await self.store.hgetall(self.keys.contexts(partition))).items():
            book.load(user, raw)
        offset = await self.store.offset(self.name, partition)
        log.info("context partition %d loaded: %d shoppers, offset %d", partition,
                 len(book.users), offset)
        raw, raw_rr = await self.store.redis.mget(self.keys.clusters(partition),
                                                  self.keys.reranker_state(partition))
        clusters = InterestClusters.from_bytes(raw) if raw else InterestClusters()
        reranker = (Reranker.from_bytes(raw_rr) if raw_rr
                    else Reranker(self.settings.reranker_min_examples))
        st = ContextPartition(offset, book, clusters=clusters, reranker=reranker)
        for user, ctx in book.users.items():
            if ctx.feedback and (at := self.attribution.next_settle(ctx.feedback)) is not None:
                st.settle_heap.append((at, user))
        heapq.heapify(st.settle_heap)
        return st

    async def served_docs(self, events: list[Event]) -> dict[str, Any]:
        """What the API served for the impressions of a batch: one MGET."""
        rids = list({e.request_id for e in events if e.type == "impression" and e.request_id})
        if not rids:
            return {}
        raws = await self.store.redis.mget([self.keys.served(r) for r in rids])
        return {r: orjson.loads(raw) for r, raw in zip(rids, raws, strict=True) if raw}

    def feedback(self, st: ContextPartition, event: Event, served: dict[str, Any],
                 deltas: list[Delta]) -> None:
        """Attribute one impression or click (after the context learned it: it is new)."""
        ctx = st.book.users[event.user_id]
        fb = ctx.feedback
        if event.type == "impression":
            doc = served.get(event.request_id or "")
            if doc is not None and doc.get("u") not in (None, event.user_id):
                doc = None  # another shopper's answer: its features are not about this one
            st.counts["feedback.impressions"] += 1
            if doc is None:
                st.counts["feedback.unserved"] += 1
            deltas += self.attribution.impression(fb, event, doc, bool(ctx.orders))
            at = self.attribution.next_settle(fb)
            if at is not None:
                heapq.heappush(st.settle_heap, (at, event.user_id))
        else:
            st.counts["feedback.clicks"] += 1
            deltas += self.attribution.click(fb, event)

    def settle(self, st: ContextPartition, now: float, examples: list[Example]) -> None:
        """Label the impressions whose window has passed by event time `now`."""
        heap = st.settle_heap
        while heap and heap[0][0] <= now:
            _, user = heapq.heappop(heap)
            ctx = st.book.users.get(user)
            if ctx is None or not ctx.feedback:
                continue
            examples += self.attribution.settle(ctx.feedback, now)
            st.book.dirty.add(user)
            at = self.attribution.next_settle(ctx.feedback)
            if at is not None:
                heapq.heappush(heap, (at, user))

    async def process(self, partition: int, st: ContextPartition,
                      records: list[Record]) -> None:
        s = self.settings
        n_pairs = s.partitions
        out: list[list] = [[] for _ in range(n_pairs)]
        repeats: list[list] = [[] for _ in range(n_pairs)]
        cycles: list[tuple[str, str, float, float | None]] = []  # purchases starting a cycle
        touched: list[str] = []
        # (channel, item) -> {user: ts}, for the audience index (docs/audiences.md)
        index: defaultdict[tuple[str, str], dict[str, float]] | None = (
            defaultdict(dict) if s.audience_index else None)
        counts = st.counts
        book = st.book
        partition_of = self.partition_of
        all_marginals: list[tuple] = []
        newest: float | None = None  # event time of the newest event applied
        parsed: list[tuple[int, Event]] = []
        for value, _, offset, broker_ts in records:
            try:
                parsed.append((offset, check_not_future(parse_event(value), broker_ts)))
            except ContractError as err:
                counts[f"dlq.{err.reason}"] += 1
                source = f"{s.events_topic}/{partition}/{offset}"
                st.acks.append(await self.send(s.dlq_topic, value, None, dlq_headers(err, source)))
        served = await self.served_docs([e for _, e in parsed])
        deltas: list[Delta] = []
        examples: list[Example] = []
        for offset, event in parsed:
            if event.type in ("add_to_cart", "purchase"):
                ctx0 = book.users.get(event.user_id)
                if ctx0 is not None and ctx0.feedback and event.event_id not in ctx0.seen:
                    deltas += self.attribution.shop_event(ctx0.feedback, event, ctx0.bought)
            evidence = book.learn(event)
            if evidence is None:
                counts["duplicate"] += 1
                continue
            counts[f"applied.{event.type}"] += 1
            if event.type in FEEDBACK_TYPES:
                self.feedback(st, event, served, deltas)
                if newest is None or event.ts > newest:
                    newest = event.ts
                continue
            touched.append(event.user_id)
            if index is not None and event.type != "remove_from_cart":
                channel = "view" if event.type == "view" else "buy"
                for line in event.lines:
                    index[(channel, line.item_id)][event.user_id] = event.ts
            ts, marginals, pairs = evidence
            if newest is None or ts > newest:
                newest = ts
            for item, interval in book.last_repeats:  # to the partition owning the item
                repeats[partition_of[item]].append((offset, item, interval))
            for item, ts_, prev in book.last_purchases:
                cycles.append((event.user_id, item, ts_, prev))
            if not marginals and not pairs:
                continue
            # Stage 2 gets [offset, ts, entries]: the offset is its dedup key. Marginals go to
            # every pairs partition (one shared list), a pair to the partition of its first item.
            if marginals:
                all_marginals.append((offset, ts, marginals))
            if pairs:
                by_q: dict[int, list] = {}
                for pair in pairs:
                    q = partition_of[pair[0]]
                    if q in by_q:
                        by_q[q].append(pair)
                    else:
                        by_q[q] = [pair]
                for q, mine in by_q.items():
                    out[q].append((offset, ts, mine))
        if newest is not None:
            self.settle(st, newest, examples)
        for exp, variant, counter, amount in deltas:
            st.exp_deltas[(exp, f"{variant}|{counter}")] += amount
        if examples:
            st.reranker.learn(examples)
            st.reranker_dirty = True
            counts["feedback.examples"] += len(examples)
        last = records[-1][2]
        first_ts = min(r[3] for r in records)
        # Every pairs partition hears of every batch, so each can tell how far it has got.
        for q in range(n_pairs):
            msg = orjson.dumps({"src": partition, "last": last, "t": first_ts, "n": newest,
                                "m": all_marginals, "p": out[q], "r": repeats[q]})
            st.acks.append(await self.send(s.pairs_topic, msg, q, None))
        t_lists = time.perf_counter()
        await self.user_lists(partition, st, list(dict.fromkeys(touched)))
        self.stats.add_time("context.user_lists", time.perf_counter() - t_lists)
        if index:
            await self.write_audience_index(index)
        if cycles:
            await self.schedule(st, cycles)
        now = time.time()
        for _, _, _, ts in records:
            self.stats.observe("user", now - ts)

    async def schedule(self, st: ContextPartition,
                       cycles: list[tuple[str, str, float, float | None]]) -> None:
        """Plan the touchpoints and the due reminder of each consumable just bought."""
        items = sorted({i for _, i, _, _ in cycles})
        catalog = await self.catalog_cache.get_many(items, self.store.catalog_facts)
        docs = await self.list_cache.get_many(items, self.store.item_lists)
        lead = self.config.replenish_lead_s
        for user, item, ts, prev in cycles:
            if not (catalog.get(item) or {}).get("consumable"):
                continue
            if prev is not None:  # a repeat: what the last purchase planned is void
                for kind in (*(f"day_{d}" for d in LIFECYCLE_DAYS), "replenish"):
                    st.schedule[touchpoint_member(user, item, kind, prev)] = None
            ctx = st.book.users.get(user)
            learned = (docs.get(item) or {}).get("repurchase")
            estimate = predict(ctx.repeats.get(item, ()) if ctx else (),
                               learned["cycle_days"] * DAY if learned else None)
            planned = touchpoints(ts, prev is not None, estimate, lead)
            for tp in planned:
                st.schedule[touchpoint_member(user, item, tp.kind, ts)] = tp.at
            due = [tp.at for tp in planned if tp.kind == "replenish"]
            st.due[orjson.dumps([user, item])] = due[0] if due else None
            st.counts["context.touchpoints_planned"] += len(planned)

    async def send_touchpoints(self) -> None:
        """Send the touchpoints whose time has come to the touchpoints topic, then forget them.

        At least once: a crash between the send and the removal sends again; consumers dedupe
        by `touchpoint_id`. The partition lock keeps a checkpoint from re-planning a member
        between reading and removing it.
        """
        s = self.settings
        redis = self.store.redis
        for p in sorted(self.assigned):
            async with self.locks[p]:
                now = time.time()
                key = self.keys.touchpoints(p)
                rows = await redis.zrangebyscore(key, "-inf", now, start=0,
                                                 num=TOUCHPOINTS_PER_TICK, withscores=True)
                if not rows:
                    continue
                # Re-planned or voided since the last checkpoint: the checkpoint decides.
                pending = st.schedule if (st := self.parts.get(p)) is not None else {}
                rows = [(m, at) for m, at in rows if m not in pending]
                acks, stale = [], 0
                for member, at in rows:
                    if at < now - s.touchpoint_max_late_s:
                        stale += 1
                        continue
                    msg = touchpoint_message(member, at, self.config.replenish_lead_s)
                    acks.append(await self.send(s.touchpoints_topic, orjson.dumps(msg), None,
                                                None, msg["user_id"].encode()))
                await asyncio.gather(*acks)
                if rows:
                    await redis.zrem(key, *[m for m, _ in rows])
                self.stats.inc("context.touchpoints_sent", len(acks))
                self.stats.inc("context.touchpoints_stale", stale)
        # Reminders whose run-out has passed unanswered are no longer due.
        await redis.zremrangebyscore(self.keys.due, "-inf",
                                     time.time() - self.config.replenish_lead_s)

    async def write_audience_index(self, index: dict[tuple[str, str], dict[str, float]]) -> None:
        """Who touched each item lately, newest kept: what audiences are ranked from.

        Derived output like the lists: a replay writes the same scores again (GT keeps the
        newest time), so it needs no checkpoint.
        """
        rows = []
        for (channel, item), users in index.items():
            key = self.keys.audience(channel, item)
            # Trimming every time would cost a command per key; a set may run past the bound
            # by what one item gets in a few batches before its next trim.
            rows.append((key, zlib.crc32(key.encode()) % TRIM_EVERY == self._trim_turn, users))
        self._trim_turn = (self._trim_turn + 1) % TRIM_EVERY
        with self.stats.redis_write("audience_index"):
            await self.store.audience_index(self.settings.audience_index_size, rows)

    def checkpoint_ops(self, partition: int, st: ContextPartition) -> Ops:
        ops = Ops()
        book = st.book
        for user in book.dirty:
            ctx = book.users.get(user)
            if ctx is not None:
                ops.hset(self.keys.contexts(partition), user, ctx.to_json())
        for user in book.evicted:
            ops.hdel(self.keys.contexts(partition), user)
        for member, at in st.schedule.items():
            if at is None:
                ops.zrem(self.keys.touchpoints(partition), member)
            else:
                ops.zadd(self.keys.touchpoints(partition), at, member)
        for member, at in st.due.items():
            if at is None:
                ops.zrem(self.keys.due, member)
            else:
                ops.zadd(self.keys.due, at, member)
        if st.clusters_dirty:
            ops.set(self.keys.clusters(partition), st.clusters.to_bytes())
        for (exp, fld), amount in st.exp_deltas.items():
            ops.hincrbyfloat(self.keys.experiment(exp), fld, amount)
        if st.reranker_dirty:
            ops.set(self.keys.reranker_state(partition), st.reranker.to_bytes())
            ops.set(self.keys.reranker(partition), orjson.dumps(st.reranker.summary()))
        return ops

    def checkpointed(self, partition: int, st: ContextPartition) -> None:
        st.book.dirty.clear()
        st.book.evicted.clear()
        st.schedule.clear()
        st.due.clear()
        st.clusters_dirty = False
        st.exp_deltas.clear()
        st.reranker_dirty = False

    async def user_lists(self, partition: int, st: ContextPartition, users: list[str],
                         only_changed: bool = False) -> int:
        """Rank suggestions for `users` and write them (a replay rewrites the same lists).

        The periodic refresh (`only_changed`) reads past the cache: it must see the newest lists.
        """
        ctxs = [(u, st.book.users[u]) for u in users if u in st.book.users]
        wanted = list(dict.fromkeys(a for _, c in ctxs for a in anchors(c, self.config)))
        lists = await self.list_cache.get_many(wanted, self.store.item_lists, only_changed)
        candidates = listed(lists, self.config)
        candidates.update(wanted)  # anchors come back as revisits: their stock matters too
        for _, c in ctxs:  # so may the newest bought items
            candidates.update(rebuy_candidates(c, self.config))
        catalog = await self.catalog_cache.get_many(sorted(candidates), self.store.catalog_facts,
                                                    only_changed)
        # Whether a bought item may come back, and when, is in its lists' learned cycle.
        rebuy = sorted(set().union(*(cycles_needed(c.bought, candidates, catalog)
                                     for _, c in ctxs)) - lists.keys())
        if rebuy:
            lists = lists | await self.list_cache.get_many(rebuy, self.store.item_lists,
                                                           only_changed)
        docs: dict[str, bytes] = {}
        digests: dict[str, int] = {}
        profiled: dict[str, tuple] = {}
        for n, (user, ctx) in enumerate(ctxs):
            if only_changed and n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a long refresh must not stall the event loop
            payload = self._user_payload(user, ctx, lists, catalog)
            if only_changed:
                digest = list_digest(payload, ("items", "context"))
                if st.written.get(user) == digest:
                    continue
                digests[user] = digest
            else:
                # The hot path skips the digest; the next refresh rewrites this one once.
                st.written.pop(user, None)
            docs[self.keys.user(user)] = orjson.dumps(payload)
            if not only_changed:  # a refresh changes no context: nothing new to learn
                self._profile(st, user, ctx, catalog, docs, profiled)
        if docs and not only_changed:
            # Ranked against cached item lists, possibly older than the last refresh: the
            # partition needs refreshing again, and must not look refreshed meanwhile.
            st.refreshed_version = None
            docs[self.keys.refreshed(partition)] = orjson.dumps({"version": -1})
        if docs:
            with self.stats.redis_write("user_lists"):
                await self.store.redis.mset(docs)  # one command: far cheaper than a SET each
        # Only what reached Redis counts as written: a failed write is retried next time.
        st.written.update(digests)
        st.profiled.update(profiled)
        return len(docs)

    def _profile(self, st: ContextPartition, user: str, ctx: ShopperContext, catalog: dict,
                 docs: dict[str, bytes], profiled: dict[str, tuple]) -> None:
        """Learn the shopper's interest and queue their profile, when either changed.

        The clustering learns a shopper again only when their category shares moved: most
        events are another view in the same categories, and k-means is the costly part.
        """
        prefs = preferences(((i, t.w) for i, t in ctx.items.items()), catalog)
        shape = hash(tuple(sorted((c, round(v, 2)) for c, v in prefs.items())))
        before = st.profiled.get(user)
        if before is not None and before[1] == shape:
            interest = before[2]
        else:
            interest = st.clusters.learn(prefs)
            st.clusters_dirty = st.clusters_dirty or interest is not None
        mark = (order_mark(ctx), shape, interest)
        if (ctx.orders or interest) and before != mark:
            docs[self.keys.profile(user)] = orjson.dumps(profile_doc(user, ctx, interest))
            profiled[user] = mark

    def _user_payload(self, user: str, ctx: ShopperContext, lists: dict, catalog: dict) -> dict:
        return {
            "user_id": user,
            "items": rank_for_user(ctx, lists, catalog, USER_LIST_SIZE, self.config),
            "context": ctx.public(),
            "as_of": ctx.last_ts,
            "generated_at": time.time(),
            "model": MODEL_VERSION,
        }

    async def refresh(self) -> None:
        """Re-rank recently active shoppers so their lists follow newer item lists."""
        s = self.settings
        started = time.time()
        # Read the version before any list: lists read afterwards are at least this new.
        version = int(await self.store.redis.get(self.keys.lists_version) or 0)
        # Assigned partitions too, loaded if need be: one taken over after a rebalance may
        # get no new events, yet its shoppers' lists must follow the newer item lists.
        for p in sorted(self.assigned | set(self.parts)):
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is None and p in self.assigned:
                    st = await self._catch_up(p)
                if st is None or st.refreshed_version == version:
                    continue
                users = st.book.users
                horizon = max((c.last_ts for c in users.values()), default=0) - s.refresh_window_s
                recent = sorted((u for u, c in users.items() if c.last_ts >= horizon),
                                key=lambda u: (-users[u].last_ts, u))[: s.refresh_max_users]
                n = await self.user_lists(p, st, recent, only_changed=True)
                self.stats.inc("context.refreshed_users", n)
                with self.stats.redis_write("refreshed"):
                    await self.store.redis.set(
                        self.keys.refreshed(p),
                        orjson.dumps({"version": version, "started": started, "rewritten": n}))
                # Only once the mark is written: a failed write must be retried next tick.
                st.refreshed_version = version


class GraphStage(Stage):
    """Counts are checkpointed per batch; lists are published on a timer (`publish_lists`).

    Building a list costs far more than counting (every neighbour is scored), and a hot item
    changes in almost every batch. Publishing changed lists every `lists_interval_s` instead
    of every batch bounds that cost without bounding throughput.
    """

    name = "cooccurrence"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.catalog_cache = ReadCache(self.settings.lists_interval_s * 25)

    async def load(self, partition: int) -> GraphPartition:
        graph = ItemGraph(self.config)
        for item, raw in (await self.store.hgetall(self.keys.rows(partition))).items():
            graph.load_row(item, raw)
        for item, raw in (await self.store.hgetall(self.keys.marginals(partition))).items():
            graph.load_marg(item, raw)
        for item, raw in (await self.store.hgetall(self.keys.cycles(partition))).items():
            graph.load_cycle(item, raw)
        meta = await self.store.get_json(self.keys.meta(partition))
        hwm: dict[int, int] = {}
        if meta:
            graph.load_meta(meta)
            hwm = {int(k): v for k, v in meta["hwm"].items()}
        offset = await self.store.offset(self.name, partition)
        log.info("cooccurrence partition %d loaded: %d rows, %d items, offset %d", partition,
                 len(graph.rows), len(graph.marg), offset)
        return GraphPartition(offset, graph, hwm)

    async def process(self, partition: int, st: GraphPartition,
                      records: list[Record]) -> None:
        g = st.graph
        oldest = None
        for value, _, _, _ in records:
            msg = orjson.loads(value)
            src, last = msg["src"], msg["last"]
            seen = st.hwm.get(src, -1)
            if last <= seen:
                st.counts["cooccurrence.duplicate_batches"] += 1
                continue
            for offset, ts, marginals in msg["m"]:
                if offset > seen:
                    g.apply(ts, marginals, ())
            for offset, ts, pairs in msg["p"]:
                if offset > seen:
                    g.apply(ts, (), pairs)
            for offset, item, interval in msg.get("r", ()):  # older messages have none
                if offset > seen:
                    g.repeat(item, interval)
            if msg.get("n") is not None:
                g.advance(msg["n"])  # events without evidence still move "now", as in models/
            st.hwm[src] = last
            if msg["p"] and (oldest is None or msg["t"] < oldest):
                oldest = msg["t"]
        for item in g.touched:
            st.pending.setdefault(item, oldest if oldest is not None else time.time())
        g.touched.clear()
        for item in g.dropped:
            st.pending.pop(item, None)
        st.last_batch = time.monotonic()
        st.unsettled = True

    def checkpoint_ops(self, partition: int, st: GraphPartition) -> Ops:
        g = st.graph
        keys = self.keys
        ops = Ops()
        for item in g.dirty:
            ops.hset(keys.rows(partition), item, g.row_json(item))
        for item in g.dirty_marg:
            ops.hset(keys.marginals(partition), item, g.marg_json(item))
        for item in g.dirty_cycles:
            ops.hset(keys.cycles(partition), item, g.cycle_json(item))
        for item in g.dropped:
            ops.hdel(keys.rows(partition), item)
            if item not in g.cycles:
                ops.hdel(keys.cycles(partition), item)
        meta = g.meta()
        meta["hwm"] = {str(k): v for k, v in st.hwm.items()}
        ops.set(keys.meta(partition), orjson.dumps(meta))
        st.counts["cooccurrence.rows_checkpointed"] += len(g.dirty)
        return ops

    def checkpointed(self, partition: int, st: GraphPartition) -> None:
        g = st.graph
        g.dirty.clear()
        g.dirty_marg.clear()
        g.dirty_cycles.clear()
        g.dropped.clear()

    async def _item_lists(self, st: GraphPartition, items: list[str],
                          pipe: Any) -> dict[str, int]:
        """Queue the lists of `items` that changed since last written.

        Returns their digests, to record in `st.written` once the pipeline has succeeded.
        """
        g = st.graph
        docs: dict[str, bytes] = {}
        digests: dict[str, int] = {}
        for n, item in enumerate(items):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a settle of many rows must not stall the event loop
            payload: dict[str, Any] = {"item_id": item, **g.lists(item),
                                       "repurchase": g.repurchase(item)}
            digest = list_digest(payload, (*KINDS, "repurchase"))
            if st.written.get(item) == digest:
                continue
            digests[item] = digest
            payload.update(as_of=g.now, generated_at=time.time(), model=MODEL_VERSION)
            docs[self.keys.item(item)] = orjson.dumps(payload)
        if docs:
            pipe.mset(docs)
        return digests

    async def _trending(self, p: int, st: GraphPartition, pipe: Any) -> list[str]:
        """Queue trending scores of the items this partition owns whose totals moved.

        Every partition holds every item's totals; only the owner (the partition of the
        item's row) writes its score, so each item is written once. Per-category sets need
        the catalog; an item not in it yet is only in the shop-wide set.
        """
        g = st.graph
        n = self.settings.partitions
        mine = sorted(i for i in g.marg_touched if item_partition(i, n) == p)
        g.marg_touched.clear()
        scores = g.trending(mine)
        if not scores:
            return mine
        facts = await self.catalog_cache.get_many(mine, self.store.catalog_facts)
        by_cat: dict[str, dict[str, float]] = defaultdict(dict)
        for item, score in scores.items():
            cat = (facts.get(item) or {}).get("category")
            if cat:
                by_cat[cat][item] = score
        keep = self.settings.trending_size
        for key, members in ((self.keys.trending(), scores),
                             *((self.keys.trending(c), m) for c, m in by_cat.items())):
            pipe.zadd(key, members)
            pipe.zremrangebyrank(key, 0, -keep - 1)
        return mine

    async def publish_lists(self) -> None:
        """Write changed lists; once a partition is idle, recompute all of them.

        Scoring a row costs a look at every neighbour, and a hot item changes in every batch:
        a row's list is recomputed at most every `lists_min_interval_s`, so the cost is bounded
        by the number of items, not by the traffic. Quiet items are published within one tick.

        A row's list also depends on other items' totals, which keep moving. Once a partition
        goes quiet (`settle_idle_s`), one pass over all its rows makes every list a function
        of the counts alone, so two runs over the same events end with the same lists.
        """
        idle = self.settings.settle_idle_s
        min_interval = self.settings.lists_min_interval_s
        for p in list(self.parts):
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is None:
                    continue
                # Settle only what is checkpointed, so the settled mark means "final".
                settle = (st.unsettled and time.monotonic() - st.last_batch >= idle
                          and st.offset == st.applied)
                if not settle and not st.pending and not st.graph.marg_touched:
                    continue
                now_m = time.monotonic()
                if settle:
                    items = sorted(st.graph.rows)
                else:
                    items = sorted(i for i in st.pending
                                   if now_m - st.computed_at.get(i, -min_interval) >= min_interval)
                    if not items and not st.graph.marg_touched:
                        continue
                pipe = self.store.redis.pipeline(transaction=True)
                scored = await self._trending(p, st, pipe)
                digests = await self._item_lists(st, items, pipe)
                changed = len(digests)
                if changed:
                    pipe.incr(self.keys.lists_version)
                if settle:
                    pipe.set(self.keys.settled(p), orjson.dumps(
                        {"offset": st.offset, "at": time.time(), "rewritten": changed}))
                try:
                    with self.stats.redis_write("item_lists"):
                        await pipe.execute()
                except Exception:
                    st.graph.marg_touched.update(scored)  # to score again next tick
                    raise
                st.written.update(digests)
                now = time.time()
                for item in items:
                    t = st.pending.pop(item, None)
                    if t is not None:
                        self.stats.observe("item", now - t)
                    st.computed_at[item] = now_m
                self.stats.inc("cooccurrence.lists_written", changed)
                if settle:
                    st.unsettled = False


class CatalogStage:
    """Item facts into one Redis hash; the ranking reads them when it filters."""

    def __init__(self, store: Store, stats: Stats, send: Sender, settings: Any) -> None:
        self.store, self.stats, self.send, self.settings = store, stats, send, settings

    async def handle(self, records: Sequence[Record]) -> None:
        s = self.settings
        facts: dict[str, bytes] = {}
        acks = []
        for value, partition, offset, _ in records:
            try:
                item = parse_catalog(value)
            except ContractError as err:
                self.stats.inc(f"dlq.{err.reason}")
                source = f"{s.catalog_topic}/{partition}/{offset}"
                acks.append(await self.send(s.dlq_topic, value, None, dlq_headers(err, source)))
                continue
            facts[item.item_id] = orjson.dumps(item.as_dict())
        await asyncio.gather(*acks)
        if facts:
            pipe = self.store.redis.pipeline(transaction=True)
            pipe.hset(self.store.keys.catalog, mapping=facts)
            pipe.incr(self.store.keys.lists_version)
            pipe.incr(self.store.keys.catalog_version)
            with self.stats.redis_write("catalog"):
                await pipe.execute()
            self.stats.inc("catalog.applied", len(facts))
