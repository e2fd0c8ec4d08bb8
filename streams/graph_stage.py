"""Stage 2, `cooccurrence`: the pairs topic, keyed by item (docs/architecture.md).

Adds evidence to the item graph and publishes changed item lists on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from models import rowpatch
from models.graph import KINDS, ItemGraph
from streams.cache import ReadCache
from streams.routing import item_partition
from streams.stage import BEHIND_FOR_S, MODEL_VERSION, Record, Stage, list_digest
from streams.store import Ops
from streams.turns import Slice

log = logging.getLogger("cartwise.cooccurrence")


def lists_budget(settings: Any, lag: tuple[float, float] | None, now: float) -> float:
    """The share of a list tick that item lists may take: `lists_budget_behind` while the
    shoppers' lists are behind (`lag`: when the context stage last wrote them, monotonic, and
    how old the batch's oldest event was then), `lists_budget` otherwise."""
    if lag is not None and now - lag[0] < BEHIND_FOR_S and lag[1] > settings.behind_after_s:
        return min(settings.lists_budget_behind, settings.lists_budget)
    return settings.lists_budget


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
    # item -> ItemGraph.list_mark when its lists were last written (`list_min_change`)
    marks: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    # Rows changed too little to rebuild yet, out of `pending` until their next evidence or
    # until their list is too old (`sweep_parked`): item -> what `pending` held for it.
    parked: dict[str, float] = field(default_factory=dict)
    parked_swept: float = 0.0  # the graph's "now" at the last sweep
    last_batch: float = 0.0
    unsettled: bool = True
    # Rows and totals forgotten by the bounds: their lists and trending scores are removed.
    gone: set[str] = field(default_factory=set)
    gone_marg: set[str] = field(default_factory=set)
    # A settle pass in progress: rows still to recompute (popped from the end), and the
    # offset applied when it began (None: no pass).
    settle_queue: list[str] = field(default_factory=list)
    settle_offset: int | None = None
    acks: list[Awaitable[Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # Row (item) or open row ((epoch, "r", item)) -> entries in its stored patches
    # (models/rowpatch.py; absent: none stored, the next write is whole), and what the
    # checkpoint being written makes of them, recorded once it is.
    patched: dict[str | tuple[int, str, str], int] = field(default_factory=dict)
    patching: dict[str | tuple[int, str, str], int] = field(default_factory=dict)


class GraphStage(Stage):
    """Counts are checkpointed per batch; lists are published on a timer (`publish_lists`).

    Building a list costs far more than counting (every neighbour is scored), and a hot item
    changes in almost every batch. Publishing changed lists every `lists_interval_s` instead
    of every batch bounds that cost without bounding throughput.
    """

    name = "cooccurrence"
    yields = True  # to the shoppers' batches (streams/turns.py)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topic = self.settings.pairs_topic
        self.catalog_cache = ReadCache(self.settings.lists_interval_s * 25,
                                       self.store.catalog_facts)
        self._rotation = 0  # which partition publishes first next tick
        # (when, how old) of the shoppers' lists last written: the context stage's `lag`
        self.shoppers_lag: Callable[[], tuple[float, float] | None] = lambda: None

    async def load(self, partition: int) -> GraphPartition:
        graph = ItemGraph(self.config, sources=self.settings.partitions)
        graph.changed, graph.open_changed = {}, {}  # checkpoints write patches
        patched: dict[str | tuple[int, str, str], int] = {}
        for item, raw in (await self.store.hgetall(self.keys.rows(partition))).items():
            patched[item] = graph.load_row(item, raw)
        for item, raw in (await self.store.hgetall(self.keys.marginals(partition))).items():
            graph.load_marg(item, raw)
        for item, raw in (await self.store.hgetall(self.keys.cycles(partition))).items():
            graph.load_cycle(item, raw)
        for field_, raw in (await self.store.hgetall(self.keys.open_evidence(partition))).items():
            epoch, kind, item = field_.split("|", 2)
            n = graph.load_open(int(epoch), kind, item, raw)
            if kind == "r":
                patched[(int(epoch), kind, item)] = n
        for item, raw in (await self.store.hgetall(self.keys.seen_epochs(partition))).items():
            graph.load_seen(item, raw)
        meta = await self.store.get_json(self.keys.meta(partition))
        hwm: dict[int, int] = {}
        if meta:
            graph.load_meta(meta)
            hwm = {int(k): v for k, v in meta["hwm"].items()}
        offset = await self.store.offset(self.name, partition)
        log.info("cooccurrence partition %d loaded: %d rows, %d items, offset %d", partition,
                 len(graph.rows), len(graph.marg), offset)
        return GraphPartition(offset, graph, hwm, patched=patched)

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
            # Entries carry their source's clock (older messages none); epochs are closed
            # after the whole message, so that its entries all count first (models/graph.py).
            for offset, ts, marginals, *clock in msg["m"]:
                if offset > seen:
                    g.apply(ts, marginals, (), src, clock[0] if clock else None, close=False)
            for offset, ts, pairs, *clock in msg["p"]:
                if offset > seen:
                    g.apply(ts, (), pairs, src, clock[0] if clock else None, close=False)
            for offset, item, interval in msg.get("r", ()):  # older messages have none
                if offset > seen:
                    g.repeat(item, interval)
            if msg.get("n") is not None:
                # Events without evidence still move "now", as in models/.
                g.advance(msg["n"], src, msg.get("c"))
            else:
                g.close_due()
            st.hwm[src] = last
            if msg["p"] and (oldest is None or msg["t"] < oldest):
                oldest = msg["t"]
        for item in g.touched:
            # A parked row keeps the time of its oldest evidence not yet in its list.
            first = st.parked.pop(item, None) if st.parked else None
            if first is None:
                first = oldest if oldest is not None else time.time()
            st.pending.setdefault(item, first)
        g.touched.clear()
        for item in g.dropped:
            st.marks.pop(item, None)  # a row forgotten and begun again is new
            if item not in g.rows:
                st.pending.pop(item, None)
                st.parked.pop(item, None)
                st.gone.add(item)
        st.gone = {i for i in st.gone if i not in g.rows}
        st.gone_marg = {i for i in st.gone_marg | g.dropped_marg if i not in g.marg}
        st.last_batch = time.monotonic()
        st.unsettled = True

    def checkpoint_ops(self, partition: int, st: GraphPartition) -> Ops:
        g = st.graph
        keys = self.keys
        ops = Ops()
        # Rows whole or as patches of their changed entries (models/rowpatch.py); the patches
        # after every whole row, so that each kind travels as one op.
        patched, patching = st.patched, st.patching
        patching.clear()
        patches: list[tuple[str, str, bytes]] = []
        rescaled, whole, dropped = g.rescaled, g.whole, g.dropped
        changed = g.changed or {}
        for item in g.dirty:
            row = g.rows.get(item)
            if row is None:
                continue
            fresh = rescaled or item in whole or item in dropped  # dropped: begun again
            value, n = rowpatch.encode(row, None if fresh else changed.get(item),
                                       patched.get(item))
            if n:
                patches.append((keys.rows(partition), item, value))
            else:
                ops.hset(keys.rows(partition), item, value)
            patching[item] = n
        for item in g.dirty_marg:
            ops.hset(keys.marginals(partition), item, g.marg_json(item))
        for item in g.dirty_cycles:
            ops.hset(keys.cycles(partition), item, g.cycle_json(item))
        for item in g.dropped_marg:
            if item not in g.marg:
                ops.hdel(keys.marginals(partition), item)
        for item in g.dropped:
            if item not in g.rows:  # not back since
                ops.hdel(keys.rows(partition), item)
            if item not in g.cycles:
                ops.hdel(keys.cycles(partition), item)
        open_changed = g.open_changed or {}
        for key in g.dirty_open:
            epoch, kind, item = key
            name = f"{epoch}|{kind}|{item}"
            if kind == "r":
                orow = g.open_rows.get(epoch, {}).get(item)
                if orow is None:
                    continue
                value, n = rowpatch.encode(orow, None if rescaled else open_changed.get(key),
                                           patched.get(key))
                patching[key] = n
                if n:
                    patches.append((keys.open_evidence(partition), name, value))
                    continue
            else:
                value = g.open_json(epoch, kind, item)
                if value is None:
                    continue
            ops.hset(keys.open_evidence(partition), name, value)
        for epoch, kind, item in g.dropped_open:
            ops.hdel(keys.open_evidence(partition), f"{epoch}|{kind}|{item}")
        for item in g.dirty_seen:
            if item in g.seen_epoch:
                ops.hset(keys.seen_epochs(partition), item, str(g.seen_epoch[item]))
            else:
                ops.hdel(keys.seen_epochs(partition), item)
        for key, name, value in patches:
            ops.happend(key, name, value)
        meta = g.meta()
        meta["hwm"] = {str(k): v for k, v in st.hwm.items()}
        ops.set(keys.meta(partition), orjson.dumps(meta))
        st.counts["cooccurrence.rows_checkpointed"] += len(g.dirty)
        return ops

    def checkpointed(self, partition: int, st: GraphPartition) -> None:
        g = st.graph
        patched = st.patched
        patched.update(st.patching)
        st.patching.clear()
        for item in g.dropped:
            if item not in g.rows:
                patched.pop(item, None)
        for key in g.dropped_open:
            patched.pop(key, None)
        if g.changed is not None:
            g.changed.clear()
        if g.open_changed is not None:
            g.open_changed.clear()
        g.whole.clear()
        g.rescaled = False
        g.dirty.clear()
        g.dirty_marg.clear()
        g.dirty_cycles.clear()
        g.dropped.clear()
        g.dropped_marg.clear()
        g.dirty_open.clear()
        g.dropped_open.clear()
        g.dirty_seen.clear()

    async def _item_lists(self, st: GraphPartition, todo: Iterable[str], pipe: Any,
                          work: Slice, spent: Callable[[], bool],
                          marks: dict[str, tuple[float, float, int]]
                          ) -> tuple[list[str], dict[str, int], bool]:
        """Queue the lists of `todo` that changed since last written, until the tick is
        `spent`, giving the shoppers' batches their turns (`work`, streams/turns.py). The
        caller holds the partition's lock: no evidence arrives meanwhile.

        Returns the items computed (at least one), the digests of those queued, to record in
        `st.written` once the pipeline has succeeded, and whether the deadline cut it short;
        fills `marks` with each computed row's `list_mark`, to record likewise.
        """
        g = st.graph
        docs: dict[str, bytes] = {}
        digests: dict[str, int] = {}
        done: list[str] = []
        cut = False
        for item in todo:
            if done:
                if spent():
                    cut = True
                    break
                await work.turn()
            done.append(item)
            marks[item] = g.list_mark(item)
            payload: dict[str, Any] = {"item_id": item, **g.lists(item),
                                       "repurchase": g.repurchase(item)}
            digest = list_digest(payload, (*KINDS, "repeat", "picks", "repurchase"))
            if st.written.get(item) == digest:
                continue
            digests[item] = digest
            payload.update(as_of=g.now, generated_at=time.time(), model=MODEL_VERSION)
            docs[self.keys.item(item)] = orjson.dumps(payload)
        if docs and self.store.cluster:
            for key, doc in docs.items():  # the pipeline sends each node its own keys
                pipe.set(key, doc)
        elif docs:
            pipe.mset(docs)
        return done, digests, cut

    @staticmethod
    def sweep_parked(st: GraphPartition) -> None:
        """Parked rows whose lists are due without new evidence (`list_max_age_s` old, or
        reshaped) go back to `pending`: looked for once per 1/24 of that age in event time."""
        g = st.graph
        every = g.config.list_max_age_s / 24
        if not st.parked or g.now - st.parked_swept < every:
            return
        st.parked_swept = g.now
        for item in [i for i in st.parked if g.list_due(i, st.marks.get(i))]:
            st.pending.setdefault(item, st.parked.pop(item))

    @staticmethod
    def _lists_due(st: GraphPartition, now_m: float, min_interval: float,
                   parked: list[str]) -> Iterator[str]:
        """The pending rows whose lists may be recomputed now: not within `min_interval` of the
        last time, and changed enough since (`ItemGraph.list_due`). Those that have not are
        added to `parked`, to leave `pending` until their rows change again or their lists are
        too old (`sweep_parked`)."""
        g, marks, computed_at = st.graph, st.marks, st.computed_at
        for i in st.pending:
            if now_m - computed_at.get(i, -min_interval) < min_interval:
                continue
            if g.list_due(i, marks.get(i)):
                yield i
            else:
                parked.append(i)

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
        gone = sorted(i for i in st.gone_marg if item_partition(i, n) == p)
        if not scores and not gone:
            return mine
        facts = await self.catalog_cache.get_many(mine + gone)
        for item in gone:
            pipe.zrem(self.keys.trending(), item)
            if cat := (facts.get(item) or {}).get("category"):
                pipe.zrem(self.keys.trending(cat), item)
        by_cat: dict[str, dict[str, float]] = defaultdict(dict)
        for item, score in scores.items():
            cat = (facts.get(item) or {}).get("category")
            if cat:
                by_cat[cat][item] = score
        keep = self.settings.trending_size
        for key, members in ((self.keys.trending(), scores),
                             *((self.keys.trending(c), m) for c, m in by_cat.items())):
            if members:
                pipe.zadd(key, members)
                pipe.zremrangebyrank(key, 0, -keep - 1)
        return mine

    async def publish_lists(self) -> None:
        """Write changed lists within a time budget; once a partition is idle, all of them.

        Scoring a row costs a look at every neighbour, and a hot item changes in every batch:
        a row's list is recomputed at most every `lists_min_interval_s`, and one tick spends
        at most `lists_budget` of `lists_interval_s` on lists (`lists_budget_behind` while
        shoppers' lists are behind), over all partitions, oldest evidence first, starting with
        a different partition each tick. Under load lists wait
        instead of the shoppers' lists, which share this event loop; the cost of a tick no
        longer grows with the number of rows a worker owns.

        A row's list also depends on other items' totals, which keep moving. Once a partition
        goes quiet (`settle_idle_s`) and is checkpointed, a settle pass recomputes every row
        (in budgeted slices, restarted if evidence arrives meanwhile) and then writes the
        settled mark: two runs over the same events end with the same lists.
        """
        s = self.settings
        budget = lists_budget(s, self.shoppers_lag(), time.monotonic())
        if budget < s.lists_budget:
            self.stats.inc("cooccurrence.lists_yielded")
        # The budget counts work; waiting for shoppers' batches counts only toward the tick's
        # end, so that ticks do not pile up behind each other.
        work = self.turns.slice()
        limit = budget * s.lists_interval_s
        tick_end = time.perf_counter() + s.lists_interval_s

        def spent() -> bool:
            return work.elapsed() >= limit or time.perf_counter() >= tick_end

        parts = sorted(p for p in self.parts if p in self.assigned)
        if parts:
            k = self._rotation % len(parts)
            self._rotation += 1
            parts = parts[k:] + parts[:k]
        for n, p in enumerate(parts):
            if n and not spent():
                await work.turn(force=True)  # let batches in between partitions
            elif n:  # only trending and deletions left: no turn to wait for
                await asyncio.sleep(0)
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is not None and p in self.assigned:
                    # The first partition builds at least one list even when waiting for Redis
                    # took the budget: under load the work slows down, it never stops.
                    await self._publish(p, st, work, spent, at_least_one=n == 0)
        self.stats.add_time("cooccurrence.lists_waited", work.waited)

    async def _publish(self, p: int, st: GraphPartition, work: Slice, spent: Callable[[], bool],
                       at_least_one: bool = False) -> None:
        s = self.settings
        now_m = time.monotonic()
        # A pass is for the evidence applied when it began: evidence applied since (even if not
        # yet checkpointed) starts it over, or the pass would mark it settled unseen.
        if st.settle_offset is not None and st.settle_offset != st.applied:
            st.settle_queue, st.settle_offset = [], None
        # Settle only what is checkpointed, so the settled mark means "final".
        if (st.unsettled and st.settle_offset is None and st.offset == st.applied
                and now_m - st.last_batch >= s.settle_idle_s):
            st.settle_queue = sorted(st.graph.rows, reverse=True)  # popped from the end
            st.settle_offset = st.applied
        settling = st.settle_offset is not None
        if (not settling and not st.pending and not st.graph.marg_touched and not st.gone
                and not st.gone_marg):
            return
        pipe = self.store.pipeline()
        scored = await self._trending(p, st, pipe)
        todo: Iterator[str]
        parked: list[str] = []
        if settling:
            todo = reversed(st.settle_queue)
        else:
            self.sweep_parked(st)
            # `pending` is in order of first evidence since the last write: oldest first;
            # rows written within `lists_min_interval_s` are at its end, so few are skipped.
            min_interval = s.lists_min_interval_s
            todo = self._lists_due(st, now_m, min_interval, parked)
        items: list[str] = []
        digests: dict[str, int] = {}
        marks: dict[str, tuple[float, float, int]] = {}
        if at_least_one or not spent():
            items, digests, cut = await self._item_lists(st, todo, pipe, work, spent, marks)
        else:
            cut = next(todo, None) is not None
        for item in parked:  # back in `pending` with the next evidence for its row
            t = st.pending.pop(item, None)
            if t is not None:
                st.parked[item] = t
        if parked:
            self.stats.inc("cooccurrence.lists_unchanged", len(parked))
        if cut:  # lists left for the next tick: the budget, not the rows, set the pace
            self.stats.inc("cooccurrence.lists_deferred")
        gone = sorted(st.gone)
        if gone:  # the library has no list for a forgotten row either
            pipe.delete(*(self.keys.item(i) for i in gone))
        gone_marg = set(st.gone_marg)
        changed = len(digests) + len(gone)
        # The version and the settled mark follow the lists (a second step: in a cluster they
        # are in other slots), so whoever reads them then reads lists at least that new.
        after = self.store.pipeline()
        if changed:
            after.incr(self.keys.lists_version)
        if settling and len(items) == len(st.settle_queue):
            after.set(self.keys.settled(p), orjson.dumps(
                {"offset": st.offset, "at": time.time(), "rewritten": changed}))
        if not len(pipe) and not len(after) and not items:
            return
        try:
            with self.stats.redis_write("item_lists"):
                if len(pipe):
                    await pipe.execute()
                if len(after):
                    await after.execute()
        except Exception:
            st.graph.marg_touched.update(scored)  # to score again next tick
            raise
        st.written.update(digests)
        st.marks.update(marks)  # only once written: a failed write is redone, not parked
        for item in gone:
            st.written.pop(item, None)
            st.marks.pop(item, None)
        st.gone.difference_update(gone)
        st.gone_marg.difference_update(gone_marg)
        now = time.time()
        for item in items:
            t = st.pending.pop(item, None)
            if t is None:
                t = st.parked.pop(item, None)  # rebuilt by a settle pass
            if t is not None:
                self.stats.observe("item", now - t)
            st.computed_at[item] = now_m
        self.stats.inc("cooccurrence.lists_written", changed)
        if settling:
            del st.settle_queue[len(st.settle_queue) - len(items):]
            if not st.settle_queue:
                st.unsettled, st.settle_offset = False, None
