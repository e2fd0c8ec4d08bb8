"""Stage 2, `cooccurrence`: the pairs topic, keyed by item (docs/architecture.md).

Adds evidence to the item graph and publishes changed item lists on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import orjson

from models.graph import KINDS, ItemGraph
from streams.routing import item_partition
from streams.stage import MODEL_VERSION, YIELD_EVERY, ReadCache, Record, Stage, list_digest
from streams.store import Ops

log = logging.getLogger("cartwise.cooccurrence")


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



class GraphStage(Stage):
    """Counts are checkpointed per batch; lists are published on a timer (`publish_lists`).

    Building a list costs far more than counting (every neighbour is scored), and a hot item
    changes in almost every batch. Publishing changed lists every `lists_interval_s` instead
    of every batch bounds that cost without bounding throughput.
    """

    name = "cooccurrence"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topic = self.settings.pairs_topic
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
        gen = self.store.generation
        oldest = None
        for value, *_ in records:
            msg = orjson.loads(value)
            if msg.get("g", gen) != gen:
                # Evidence of an earlier state generation (before `cartwise rebuild`): the
                # replay of the events topic sends it again, computed from rebuilt contexts.
                st.counts["cooccurrence.old_generation"] += 1
                continue
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
                if st is None or p not in self.assigned:
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


