"""The two stages of a worker, between Faust (streams/app.py) and the pure model (models/).

Stage 1, `context`, reads the events topic (keyed by user): validates, drops duplicates,
updates shopper contexts, writes shopper suggestion lists and sends co-occurrence evidence to
the internal pairs topic, routed by item. Stage 2, `cooccurrence`, reads the pairs topic:
adds evidence to the item graph and writes item lists. State is held in memory per partition
and checkpointed to Redis with the input offset in one atomic step (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cartwise.contract import ContractError, parse_catalog, parse_event
from models.config import ModelConfig
from models.context import ContextBook, ShopperContext
from models.graph import KINDS, ItemGraph
from models.ranking import anchors, rank_for_user
from streams.stats import Stats
from streams.store import Ops, Store

log = logging.getLogger("cartwise.pipeline")

MODEL_VERSION = "cooc-1"
USER_LIST_SIZE = 20

# (value, partition, offset, broker timestamp in seconds)
Record = tuple[bytes, int, int, float]
# send(topic_name, value, partition, headers) -> awaitable that resolves when acked
Sender = Callable[[str, bytes, int | None, dict[str, bytes] | None], Awaitable[Awaitable[Any]]]


def item_partition(item_id: str, partitions: int) -> int:
    """Pairs-topic partition that owns an item's row (stable across processes and versions)."""
    return zlib.crc32(item_id.encode()) % partitions


def dlq_headers(err: ContractError, topic: str, partition: int, offset: int) -> dict[str, bytes]:
    return {
        "cartwise-reason": err.reason.encode(),
        "cartwise-field": (err.field or "").encode(),
        "cartwise-detail": err.detail.encode()[:500],
        "cartwise-source": f"{topic}/{partition}/{offset}".encode(),
    }


def group_by_partition(records: Sequence[Record]) -> dict[int, list[Record]]:
    out: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        out[r[1]].append(r)
    return out


def list_digest(payload: dict[str, Any], fields: Sequence[str]) -> int:
    return hash(orjson.dumps([payload.get(f) for f in fields]))


@dataclass
class ContextPartition:
    offset: int
    book: ContextBook
    written: dict[str, int] = field(default_factory=dict)  # user -> digest of the last list
    refreshed_version: int | None = None  # lists_version the last refresh ranked against


@dataclass
class GraphPartition:
    offset: int
    graph: ItemGraph
    hwm: dict[int, int]  # events partition -> highest source offset applied
    written: dict[str, int] = field(default_factory=dict)  # item -> digest of the last lists
    last_batch: float = 0.0
    unsettled: bool = True


class Stage:
    """Shared plumbing: per-partition locks, lazy loading, and the retry-on-conflict loop."""

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

    def revoke(self, partitions: set[int]) -> None:
        """Forget state of partitions this worker no longer owns; Redis has the checkpoint."""
        for p in partitions:
            self.parts.pop(p, None)

    async def load(self, partition: int) -> Any:
        raise NotImplementedError

    async def process(self, partition: int, st: Any, records: list[Record]) -> tuple[Ops, int]:
        raise NotImplementedError

    def committed(self, partition: int, st: Any, records: list[Record]) -> None:
        """Hook after a successful checkpoint."""

    async def handle(self, records: Sequence[Record]) -> None:
        """Process a batch; on any failure retry it on reloaded state, never skip it."""
        for p, recs in group_by_partition(records).items():
            async with self.locks[p]:
                delay = 0.1
                while True:
                    try:
                        await self._handle_partition(p, recs)
                        break
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # In-memory state may be half-updated: drop it, Redis has the truth.
                        self.parts.pop(p, None)
                        self.stats.inc(f"{self.name}.errors")
                        log.exception("%s partition %d: batch failed, retrying in %.1fs",
                                      self.name, p, delay)
                        await asyncio.sleep(delay)
                        delay = min(5.0, delay * 2)

    async def _handle_partition(self, p: int, recs: list[Record]) -> None:
        while True:
            st = self.parts.get(p)
            if st is None:
                st = self.parts[p] = await self.load(p)
            todo = [r for r in recs if r[2] > st.offset]
            self.stats.inc(f"{self.name}.replayed_skipped", len(recs) - len(todo))
            if not todo:
                return
            ops, new_offset = await self.process(p, st, todo)
            ok, found = await self.store.checkpoint(self.name, p, st.offset, new_offset, ops)
            if ok:
                st.offset = new_offset
                self.committed(p, st, todo)
                return
            # Someone else checkpointed this partition (a rebalance overlap): reload and redo
            # what is left of this batch on top of their state.
            log.warning("%s partition %d: checkpoint moved to %d under us; reloading",
                        self.name, p, found)
            self.stats.inc(f"{self.name}.checkpoint_conflicts")
            self.parts.pop(p, None)


class ContextStage(Stage):
    name = "context"

    async def load(self, partition: int) -> ContextPartition:
        book = ContextBook(self.config)
        for user, raw in (await self.store.hgetall(self.keys.contexts(partition))).items():
            book.load(user, raw)
        offset = await self.store.offset(self.name, partition)
        log.info("context partition %d loaded: %d shoppers, offset %d", partition,
                 len(book.users), offset)
        return ContextPartition(offset, book)

    async def process(self, partition: int, st: ContextPartition,
                      records: list[Record]) -> tuple[Ops, int]:
        s = self.settings
        n_pairs = s.partitions
        out: list[list] = [[] for _ in range(n_pairs)]
        touched: list[str] = []
        acks = []
        counts: dict[str, int] = defaultdict(int)
        book = st.book
        for value, _, offset, _ in records:
            try:
                event = parse_event(value)
            except ContractError as err:
                counts[f"dlq.{err.reason}"] += 1
                acks.append(await self.send(s.dlq_topic, value, None,
                                            dlq_headers(err, s.events_topic, partition, offset)))
                continue
            evidence = book.learn(event)
            if evidence is None:
                counts["duplicate"] += 1
                continue
            counts[f"applied.{event.type}"] += 1
            touched.append(event.user_id)
            for e in evidence:
                if e[0] == "m":
                    for q in range(n_pairs):
                        out[q].append((*e, offset))
                else:
                    out[item_partition(e[1], n_pairs)].append((*e, offset))
        last = records[-1][2]
        first_ts = min(r[3] for r in records)
        # Every pairs partition hears of every batch, so each can tell how far it has got.
        for q in range(n_pairs):
            msg = orjson.dumps({"src": partition, "last": last, "t": first_ts, "e": out[q]})
            acks.append(await self.send(s.pairs_topic, msg, q, None))
        await asyncio.gather(*acks)
        ops = Ops()
        users = list(dict.fromkeys(touched))
        for user in users:
            ctx = book.users.get(user)
            if ctx is not None:
                ops.hset(self.keys.contexts(partition), user, ctx.to_json())
        for user in book.evicted:
            ops.hdel(self.keys.contexts(partition), user)
        await self.user_lists(st, users, ops)
        self._counts = counts
        return ops, last

    def committed(self, partition: int, st: ContextPartition, records: list[Record]) -> None:
        st.book.dirty.clear()
        st.book.evicted.clear()
        for k, n in self._counts.items():
            self.stats.inc(k, n)
        now = time.time()
        for _, _, _, ts in records:
            self.stats.observe("user", now - ts)

    async def user_lists(self, st: ContextPartition, users: list[str], ops: Ops | None,
                         only_changed: bool = False) -> int:
        """Rank suggestions for `users`; add them to `ops`, or write them directly if None."""
        ctxs = [(u, st.book.users[u]) for u in users if u in st.book.users]
        wanted = list(dict.fromkeys(a for _, c in ctxs for a in anchors(c)))
        lists = await self.store.item_lists(wanted)
        candidates = {e["item_id"] for doc in lists.values() if doc for k in KINDS
                      for e in doc.get(k, ())}
        catalog = await self.store.catalog_facts(sorted(candidates))
        pipe = self.store.redis.pipeline(transaction=False) if ops is None else None
        written = 0
        for user, ctx in ctxs:
            payload = self._user_payload(user, ctx, lists, catalog)
            digest = list_digest(payload, ("items", "context"))
            if only_changed and st.written.get(user) == digest:
                continue
            st.written[user] = digest
            raw = orjson.dumps(payload)
            if ops is not None:
                ops.set(self.keys.user(user), raw)
            else:
                pipe.set(self.keys.user(user), raw)
            written += 1
        if pipe is not None and written:
            await pipe.execute()
        return written

    def _user_payload(self, user: str, ctx: ShopperContext, lists: dict, catalog: dict) -> dict:
        return {
            "user_id": user,
            "items": rank_for_user(ctx, lists, catalog, USER_LIST_SIZE, self.config.score_digits),
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
        for p in list(self.parts):
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is None or st.refreshed_version == version:
                    continue
                users = st.book.users
                horizon = max((c.last_ts for c in users.values()), default=0) - s.refresh_window_s
                recent = sorted((u for u, c in users.items() if c.last_ts >= horizon),
                                key=lambda u: (-users[u].last_ts, u))[: s.refresh_max_users]
                n = await self.user_lists(st, recent, None, only_changed=True)
                st.refreshed_version = version
                self.stats.inc("context.refreshed_users", n)
                await self.store.redis.set(
                    self.keys.refreshed(p),
                    orjson.dumps({"version": version, "started": started, "rewritten": n}))


class GraphStage(Stage):
    name = "cooccurrence"

    async def load(self, partition: int) -> GraphPartition:
        graph = ItemGraph(self.config)
        for item, raw in (await self.store.hgetall(self.keys.rows(partition))).items():
            graph.load_row(item, raw)
        for item, raw in (await self.store.hgetall(self.keys.marginals(partition))).items():
            graph.load_marg(item, raw)
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
                      records: list[Record]) -> tuple[Ops, int]:
        g = st.graph
        oldest = None
        for value, _, _, _ in records:
            msg = orjson.loads(value)
            src, last = msg["src"], msg["last"]
            seen = st.hwm.get(src, -1)
            if last <= seen:
                self.stats.inc("cooccurrence.duplicate_batches")
                continue
            entries = msg["e"]
            g.apply(e[:-1] for e in entries if e[-1] > seen)
            st.hwm[src] = last
            if entries and (oldest is None or msg["t"] < oldest):
                oldest = msg["t"]
        keys = self.keys
        ops = Ops()
        for item in g.dirty:
            ops.hset(keys.rows(partition), item, g.row_json(item))
        for item in g.dirty_marg:
            ops.hset(keys.marginals(partition), item, g.marg_json(item))
        for item in g.dropped:
            ops.hdel(keys.rows(partition), item)
        meta = g.meta()
        meta["hwm"] = {str(k): v for k, v in st.hwm.items()}
        ops.set(keys.meta(partition), orjson.dumps(meta))
        changed = self._item_lists(st, sorted(g.dirty), ops)
        if changed:
            ops.incr(keys.lists_version)
        self._oldest = oldest
        return ops, records[-1][2]

    def committed(self, partition: int, st: GraphPartition, records: list[Record]) -> None:
        g = st.graph
        self.stats.inc("cooccurrence.rows_updated", len(g.dirty))
        g.dirty.clear()
        g.dirty_marg.clear()
        g.dropped.clear()
        st.last_batch = time.monotonic()
        st.unsettled = True
        if self._oldest is not None:
            self.stats.observe("item", time.time() - self._oldest)

    def _item_lists(self, st: GraphPartition, items: list[str], ops: Ops | Any) -> int:
        """Write lists that changed; `ops` is an Ops or a Redis pipeline (both have set)."""
        g = st.graph
        changed = 0
        for item in items:
            payload: dict[str, Any] = {"item_id": item, **g.lists(item)}
            digest = list_digest(payload, KINDS)
            if st.written.get(item) == digest:
                continue
            st.written[item] = digest
            payload.update(as_of=g.now, generated_at=time.time(), model=MODEL_VERSION)
            ops.set(self.keys.item(item), orjson.dumps(payload))
            changed += 1
        return changed

    async def settle(self) -> None:
        """Recompute every list of an idle partition against its final counts.

        Lists are recomputed for changed rows after each batch; a row's list also depends on
        other items' totals, which keep moving. Once a partition goes quiet, one pass over all
        its rows makes every list a function of the counts alone.
        """
        idle = self.settings.settle_idle_s
        for p in list(self.parts):
            st = self.parts.get(p)
            if st is None or not st.unsettled or time.monotonic() - st.last_batch < idle:
                continue
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is None or not st.unsettled:
                    continue
                pipe = self.store.redis.pipeline(transaction=True)
                changed = self._item_lists(st, sorted(st.graph.rows), pipe)
                if changed:
                    pipe.incr(self.keys.lists_version)
                pipe.set(self.keys.settled(p), orjson.dumps(
                    {"offset": st.offset, "at": time.time(), "rewritten": changed}))
                await pipe.execute()
                st.unsettled = False
                self.stats.inc("cooccurrence.settled_lists", changed)


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
                acks.append(await self.send(s.dlq_topic, value, None,
                                            dlq_headers(err, s.catalog_topic, partition, offset)))
                continue
            facts[item.item_id] = orjson.dumps(item.as_dict())
        await asyncio.gather(*acks)
        if facts:
            pipe = self.store.redis.pipeline(transaction=True)
            pipe.hset(self.store.keys.catalog, mapping=facts)
            pipe.incr(self.store.keys.lists_version)
            await pipe.execute()
            self.stats.inc("catalog.applied", len(facts))
