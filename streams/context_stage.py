"""Stage 1, `context`: the events topic, keyed by shopper (docs/architecture.md).

Validates, drops duplicates, updates shopper contexts, writes shopper suggestion lists and
sends co-occurrence evidence to the internal pairs topic, routed by item.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cartwise.contract import (
    FEEDBACK_TYPES,
    ContractError,
    Event,
    check_not_future,
    dlq_record,
    expected_partition,
    parse_event,
)
from models.context import ContextBook, ShopperContext
from models.feedback import Attribution, Delta, Example, FeedbackConfig, Reranker
from models.interests import InterestClusters, preferences
from models.ranking import anchors, cycles_needed, listed, rank_for_user, rebuy_candidates
from models.repurchase import DAY, LIFECYCLE_DAYS, predict, touchpoints
from streams.profiles import order_mark, profile_doc
from streams.routing import PartitionOf
from streams.stage import MODEL_VERSION, YIELD_EVERY, ReadCache, Record, Stage, list_digest
from streams.store import Ops
from streams.touchpoints import TOUCHPOINTS_PER_TICK, touchpoint_member, touchpoint_message

log = logging.getLogger("cartwise.context")

USER_LIST_SIZE = 20
TRIM_EVERY = 8  # audience index: each item's sets are trimmed one batch in this many


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


class ContextStage(Stage):
    name = "context"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topic = self.settings.events_topic
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
        for value, _, offset, broker_ts, key in records:
            try:
                event = check_not_future(parse_event(value), broker_ts)
            except ContractError as err:
                counts[f"dlq.{err.reason}"] += 1
                out_value, headers = dlq_record(value, err.reason, err.field, err.detail,
                                                f"{s.events_topic}/{partition}/{offset}")
                st.acks.append(await self.send_copy(partition, offset, s.dlq_topic, out_value,
                                                    None, headers))
                continue
            want = expected_partition(event.user_id, s.partitions)
            if want != partition:
                # Not keyed by its shopper: applied here it would split their context over
                # two partitions. Sent again, keyed, to the partition that owns the shopper.
                counts["context.rekeyed"] += 1
                st.acks.append(await self.send_copy(partition, offset, s.events_topic, value,
                                                    want, None, event.user_id.encode()))
                continue
            if key != event.user_id.encode():
                counts["context.key_mismatch"] += 1  # right partition all the same
            parsed.append((offset, event))
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
            msg = orjson.dumps({"src": partition, "g": self.store.generation, "last": last,
                                "t": first_ts, "n": newest,
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
        for r in records:
            self.stats.observe("user", now - r[3])

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
        for p in sorted(self.assigned):
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is None:
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


