"""Stage 1, `context`: the events topic, keyed by shopper (docs/architecture.md).

Validates, drops duplicates, updates shopper contexts, writes shopper suggestion lists and
sends co-occurrence evidence to the internal pairs topic, routed by item.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Sequence
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
from models.feedback import Delta, Example, Reranker
from models.interests import InterestClusters
from models.ranking import (
    Scored,
    anchors,
    cycles_needed,
    list_anchors,
    listed,
    rebuy_candidates,
    score_for_user,
)
from models.rules import impression_counts
from streams.audience import AudienceIndex
from streams.cache import ReadCache, parse_json
from streams.evidence import marginals_of, pairs_messages
from streams.feedback import Feedback
from streams.profiles import Profiles
from streams.routing import PartitionOf
from streams.stage import (
    MODEL_VERSION,
    YIELD_EVERY,
    Record,
    Stage,
    list_digest,
    most_behind,
)
from streams.store import SHOWN_TTL_S, Ops
from streams.touchpoints import Touchpoints

log = logging.getLogger("cartwise.context")

USER_LIST_SIZE = 20
# Stock is read for this many items past a list's head as well, so that a few out-of-stock
# items at the head do not cost another round trip to Redis.
HEAD_SLACK = 5


@dataclass
class ContextPartition:
    offset: int  # last offset checkpointed to Redis
    book: ContextBook
    applied: int = -1  # last offset applied in memory (>= offset)
    written: dict[str, int] = field(default_factory=dict)  # user -> digest of the last list
    # user -> (orders, category-share hash, interest) of the profile last written
    profiled: dict[str, tuple] = field(default_factory=dict)
    # Shoppers evicted by a checkpoint whose list and profile are still to delete: those keys
    # are not in the partition's slot, so they go after the checkpoint (`after_checkpoint`);
    # the checkpoint records them (`Keys.forgotten`), so a worker killed in between is redone.
    forgotten: set[str] = field(default_factory=set)
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
    # (user, UTC day, item) -> times shown since the last checkpoint: the frequency cap counts
    # impression events (once each, with the checkpoint), not the API's answers.
    shown_deltas: dict[tuple[str, str, str], int] = field(
        default_factory=lambda: defaultdict(int))
    # (event time to settle at, user): shoppers with unlabelled impressions, soonest first
    settle_heap: list[tuple[float, str]] = field(default_factory=list)
    refreshed_version: int | None = None  # lists_version the last refresh ranked against
    # A refresh pass in progress: shoppers still to re-rank (most recent last), the
    # lists_version it ranks against, when it began, and whether no hot-path write came since.
    refresh_queue: list[str] = field(default_factory=list)
    refresh_version: int | None = None
    refresh_started: float = 0.0
    refresh_clean: bool = False
    refresh_rewritten: int = 0
    # The partition's clock: the newest event time of a shop event applied (models/graph.py)
    clock: float | None = None
    acks: list[Awaitable[Any]] = field(default_factory=list)  # sends to settle before checkpoint
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class ContextStage(Stage):
    name = "context"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.topic = self.settings.events_topic
        self.partition_of = PartitionOf(self.settings.partitions)
        # A row's list changes at most every `lists_min_interval_s`: reading and parsing the
        # anchors' lists more often than that was a quarter of a worker's time at scale. The
        # API filters stock again when it serves, and the refresh re-ranks with fresh reads.
        self.list_cache = ReadCache(self.settings.lists_min_interval_s,
                                    self.store.item_lists_raw, parse=parse_json)
        self.catalog_cache = ReadCache(self.settings.lists_min_interval_s,
                                       self.store.catalog_facts)
        # Side jobs of the stage, each in its own module.
        self.feedback = Feedback(self.store, self.settings)
        self.touchpoints = Touchpoints(self.store, self.stats, self.send, self.settings,
                                       self.config, self.catalog_cache, self.list_cache)
        self.audience = AudienceIndex(self.store, self.stats, self.settings)
        self.profiles = Profiles(self.keys)
        self._refresh_rotation = 0  # which partition refreshes first next tick
        # (monotonic time, age of the oldest event) of the batch most behind among those whose
        # lists were written in the last second (`most_behind`): while it is behind, item lists
        # yield (streams/graph_stage.py, `lists_budget`).
        self.lag: tuple[float, float] | None = None

    async def handle(self, records: Sequence[Record], events: Sequence[Any] = ()) -> None:
        with self.turns.busy():  # background work waits (streams/turns.py)
            await super().handle(records, events)

    async def load(self, partition: int) -> ContextPartition:
        book = ContextBook(self.config)
        for user, raw in (await self.store.hgetall(self.keys.contexts(partition))).items():
            book.load(user, raw)
        offset = await self.store.offset(self.name, partition)
        log.info("context partition %d loaded: %d shoppers, offset %d", partition,
                 len(book.users), offset)
        raw, raw_rr, raw_picks = await self.store.redis.mget(
            self.keys.clusters(partition), self.keys.reranker_state(partition),
            self.keys.picks(partition))
        if raw_picks:
            book.picks = orjson.loads(raw_picks)
        clusters = InterestClusters.from_bytes(raw) if raw else InterestClusters()
        reranker = (Reranker.from_bytes(raw_rr) if raw_rr
                    else Reranker(self.settings.reranker_min_examples))
        forgotten = set(await self.store.hgetall(self.keys.forgotten(partition)))
        return ContextPartition(offset, book, clusters=clusters, reranker=reranker,
                                forgotten=forgotten,
                                settle_heap=self.feedback.pending(book),
                                clock=max((c.last_ts for c in book.users.values()),
                                          default=None))

    async def process(self, partition: int, st: ContextPartition,
                      records: list[Record]) -> None:
        s = self.settings
        received = time.time()
        for r in records:
            self.stats.observe("received", received - r[3])
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
        served = await self.feedback.served_docs([e for _, e in parsed])
        shown: list[tuple[str, float, list[str]]] = []  # impressions: (user, ts, items)
        deltas: list[Delta] = []
        examples: list[Example] = []
        for offset, event in parsed:
            if event.type in ("add_to_cart", "purchase"):
                ctx0 = book.users.get(event.user_id)
                if ctx0 is not None and ctx0.feedback and event.event_id not in ctx0.seen:
                    deltas += self.feedback.attribution.shop_event(ctx0.feedback, event,
                                                                   ctx0.bought)
            evidence = book.learn(event)
            if evidence is None:
                counts["duplicate"] += 1
                continue
            counts[f"applied.{event.type}"] += 1
            if event.type in FEEDBACK_TYPES:
                self.feedback.attribute(st, event, served, deltas)
                if event.type == "impression":
                    shown.append((event.user_id, event.ts, [ln.item_id for ln in event.lines]))
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
            if st.clock is None or ts > st.clock:
                st.clock = ts
            clock = st.clock
            for item, interval in book.last_repeats:  # to the partition owning the item
                repeats[partition_of[item]].append((offset, item, interval))
            for item, ts_, prev in book.last_purchases:
                cycles.append((event.user_id, item, ts_, prev))
            if not marginals and not pairs:
                continue
            # Stage 2 gets [offset, ts, entries]: the offset is its dedup key. Marginals go to
            # every pairs partition (one shared list), a pair to the partition of its first item.
            if marginals:
                all_marginals.append((offset, ts, marginals, clock))
            if pairs:
                by_q: dict[int, list] = {}
                for pair in pairs:
                    q = partition_of[pair[0]]
                    if q in by_q:
                        by_q[q].append(pair)
                    else:
                        by_q[q] = [pair]
                for q, mine in by_q.items():
                    out[q].append((offset, ts, mine, clock))
        if newest is not None:
            self.feedback.settle(st, newest, examples)
        for exp, variant, counter, amount in deltas:
            st.exp_deltas[(exp, f"{variant}|{counter}")] += amount
        for (user, day), items in impression_counts(shown).items():
            for item, n in items.items():
                st.shown_deltas[(user, day, item)] += n
        if examples:
            st.reranker.learn(examples)
            st.reranker_dirty = True
            counts["feedback.examples"] += len(examples)
        last = records[-1][2]
        first_ts = min(r[3] for r in records)
        # Every pairs partition hears of every batch, so each can tell how far it has got.
        marginals = marginals_of(all_marginals)
        for q in range(n_pairs):
            for msg in pairs_messages(partition, self.store.generation, last, first_ts, newest,
                                      st.clock, marginals, out[q], repeats[q]):
                st.acks.append(await self.send(s.pairs_topic, msg, q, None))
        t_lists = time.perf_counter()
        ranked = list(dict.fromkeys(touched))
        # Shoppers ranked per event: a backlog's batches hold several events of a shopper, a
        # steady rate's about one each, and ranking is most of a steady event's cost.
        counts["context.users_ranked"] += len(ranked)
        await self.user_lists(partition, st, ranked)
        self.stats.add_time("context.user_lists", time.perf_counter() - t_lists)
        if index:
            await self.audience.write(index)
        if cycles:
            await self.touchpoints.schedule(st, cycles)
        now = time.time()
        for r in records:
            self.stats.observe("user", now - r[3])
        self.lag = most_behind(self.lag, time.monotonic(), now - first_ts)

    async def send_touchpoints(self) -> None:
        await self.touchpoints.send_due(self)

    def checkpoint_ops(self, partition: int, st: ContextPartition) -> Ops:
        ops = Ops()
        book = st.book
        for user in book.dirty:
            ctx = book.users.get(user)
            if ctx is not None:
                ops.hset(self.keys.contexts(partition), user, ctx.to_json())
        for user in book.evicted:
            if user in book.users:  # back since
                continue
            ops.hdel(self.keys.contexts(partition), user)
            ops.hset(self.keys.forgotten(partition), user, b"1")  # lists deleted after it
        for member, at in st.schedule.items():
            if at is None:
                ops.zrem(self.keys.touchpoints(partition), member)
            else:
                ops.zadd(self.keys.touchpoints(partition), at, member)
        for member, at in st.due.items():
            if at is None:
                ops.zrem(self.keys.due(partition), member)
            else:
                ops.zadd(self.keys.due(partition), at, member)
        ops.set(self.keys.picks(partition), orjson.dumps(book.picks))
        if st.clusters_dirty:
            ops.set(self.keys.clusters(partition), st.clusters.to_bytes())
        for (exp, fld), amount in st.exp_deltas.items():
            ops.hincrbyfloat(self.keys.experiment(exp, partition), fld, amount)
        days = set()
        for (user, day, item), n in st.shown_deltas.items():
            ops.hincrbyfloat(self.keys.shown(partition, user, day), item, n)
            days.add((user, day))
        for user, day in sorted(days):  # a day's counts outlive the day by one day
            ops.expire(self.keys.shown(partition, user, day), SHOWN_TTL_S)
        if st.reranker_dirty:
            ops.set(self.keys.reranker_state(partition), st.reranker.to_bytes())
            ops.set(self.keys.reranker(partition), orjson.dumps(st.reranker.summary()))
        return ops

    def checkpointed(self, partition: int, st: ContextPartition) -> None:
        for user in st.book.evicted:
            if user not in st.book.users:  # their documents are deleted: write anew if back
                st.written.pop(user, None)
                st.profiled.pop(user, None)
                st.forgotten.add(user)
        st.book.dirty.clear()
        st.book.evicted.clear()
        st.schedule.clear()
        st.due.clear()
        st.clusters_dirty = False
        st.exp_deltas.clear()
        st.shown_deltas.clear()
        st.reranker_dirty = False

    async def after_checkpoint(self, partition: int, st: ContextPartition) -> None:
        """Delete what was written for shoppers the checkpoint forgot: the library has no list
        for them either, and Redis stays bounded by `max_users`. Then strike them from the
        partition's record of them; until then a failure or a kill only delays it (retried
        after the next checkpoint, or by the worker that loads the partition)."""
        if not st.forgotten:
            return
        done = sorted(st.forgotten)
        gone = [u for u in done if u not in st.book.users]  # back since: their list stays
        try:
            with self.stats.redis_write("forget"):
                await self.store.write_docs({}, [k for u in gone for k in (self.keys.user(u),
                                                                         self.keys.profile(u))])
                await self.store.redis.hdel(self.keys.forgotten(partition), *done)
        except Exception as exc:  # an outage: the next checkpoint tries again
            log.warning("context partition %d: deleting %d forgotten shoppers' lists failed "
                        "(%s: %s); retried after the next checkpoint", partition, len(gone),
                        type(exc).__name__, exc)
            return
        st.forgotten.difference_update(done)

    async def user_lists(self, partition: int, st: ContextPartition, users: list[str],
                         only_changed: bool = False) -> int:
        """Rank suggestions for `users` and write them (a replay rewrites the same lists).

        The periodic refresh (`only_changed`) reads past the cache: it must see the newest lists.
        """
        cfg = self.config
        ctxs = [(u, st.book.users[u]) for u in users if u in st.book.users]
        ranks: dict[str, int] = {}  # anchor -> its newest place among the shoppers' anchors
        for _, c in ctxs:
            for r, a in enumerate(list_anchors(c, cfg)):
                if r < ranks.get(a, r + 1):
                    ranks[a] = r
        lists = await self.list_cache.get_many(list(ranks), only_changed)
        candidates = listed(lists, cfg, ranks)
        # Facts the scoring reads (models/ranking.py, `score_for_user`): the context items,
        # which may come back as revisits, the newest bought items, which may be bought
        # again, and bought items among the candidates. Other candidates' facts (stock) are
        # read for the head of each list only, below: most candidates never reach it.
        sure: set[str] = set()
        for _, c in ctxs:
            sure.update(anchors(c, cfg))
            sure.update(rebuy_candidates(c, cfg))
            sure.update(j for j in c.bought if j in candidates)
        catalog = await self.catalog_cache.get_many(sure, only_changed)
        # Whether a bought item may come back, and when, is in its lists' learned cycle. Every
        # bought item that may be offered is in `sure` (bought candidates, rebuy candidates).
        rebuy = sorted(set().union(*(cycles_needed(c.bought, sure, catalog)
                                     for _, c in ctxs)) - lists.keys())
        if rebuy:
            lists = lists | await self.list_cache.get_many(rebuy, only_changed)
        rate = st.book.repeat_rate()
        scored: list[tuple[str, ShopperContext, Scored]] = []
        for n, (user, ctx) in enumerate(ctxs):
            if only_changed and n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # a long refresh must not stall the event loop
            scored.append((user, ctx, score_for_user(ctx, lists, catalog, cfg,
                                                     repeat_rate=rate)))
        # Once, and again only where more than `HEAD_SLACK` items of a head are out of stock.
        # A list whose head lacked no facts keeps its head when facts of other items come.
        pending = [r for _, _, r in scored]
        while pending:
            asks = [(r, r.unchecked(USER_LIST_SIZE + HEAD_SLACK, catalog)) for r in pending]
            unchecked = set().union(*(m for _, m in asks))
            if not unchecked:
                break
            catalog = catalog | await self.catalog_cache.get_many(unchecked, only_changed)
            pending = [r for r, m in asks if m]
        docs: dict[str, bytes] = {}
        digests: dict[str, int] = {}
        profiled: dict[str, tuple] = {}
        for user, ctx, ranked in scored:
            payload = self._user_payload(user, ctx, ranked.cut(USER_LIST_SIZE, catalog))
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
                self.profiles.queue(st, user, ctx, catalog, docs, profiled)
        if docs and not only_changed:
            # Ranked against cached item lists, possibly older than the last refresh: the
            # partition needs refreshing again, and must not look refreshed meanwhile.
            st.refreshed_version = None
            st.refresh_clean = False
            docs[self.keys.refreshed(partition)] = orjson.dumps({"version": -1})
        if docs:
            with self.stats.redis_write("user_lists"):
                await self.store.write_docs(docs)  # one MSET: far cheaper than a SET each
        # Only what reached Redis counts as written: a failed write is retried next time.
        st.written.update(digests)
        st.profiled.update(profiled)
        return len(docs)

    def _user_payload(self, user: str, ctx: ShopperContext, items: list[dict]) -> dict:
        return {
            "user_id": user,
            "items": items,
            "context": ctx.public(),
            "as_of": ctx.last_ts,
            "generated_at": time.time(),
            "model": MODEL_VERSION,
        }

    async def refresh(self) -> None:
        """Re-rank recently active shoppers so their lists follow newer item lists.

        A pass re-ranks a partition's `refresh_max_users` most recent shoppers; one tick
        spends at most `refresh_budget` of `refresh_interval_s` on passes, over all partitions,
        and a pass cut short goes on at the next tick. The refreshed mark (what `cartwise lag`
        and the tests wait for) is written once a pass ends with no shopper list written
        meanwhile from possibly older cached lists; otherwise the next pass starts over.
        """
        s = self.settings
        # Read the version before any list: lists read afterwards are at least this new.
        version = int(await self.store.redis.get(self.keys.lists_version) or 0)
        # The budget counts work, not waiting for the shoppers' batches (streams/turns.py);
        # a tick ends by the next one all the same.
        work = self.turns.slice()
        limit = s.refresh_budget * s.refresh_interval_s
        tick_end = time.perf_counter() + s.refresh_interval_s

        def spent() -> bool:
            return work.elapsed() >= limit or time.perf_counter() >= tick_end
        parts = sorted(self.assigned)
        if parts:
            k = self._refresh_rotation % len(parts)
            self._refresh_rotation += 1
            parts = parts[k:] + parts[:k]
        # Assigned partitions too, loaded if need be: one taken over after a rebalance may
        # get no new events, yet its shoppers' lists must follow the newer item lists.
        for n, p in enumerate(parts):
            if n and spent():
                break
            async with self.locks[p]:
                st = self.parts.get(p)
                if st is None:
                    st = await self._catch_up(p)
                if st is None:
                    continue
                if st.refresh_version is None:
                    if st.refreshed_version == version:
                        continue
                    users = st.book.users
                    horizon = (max((c.last_ts for c in users.values()), default=0)
                               - s.refresh_window_s)
                    recent = sorted((u for u, c in users.items() if c.last_ts >= horizon),
                                    key=lambda u: (-users[u].last_ts, u))[: s.refresh_max_users]
                    recent.reverse()  # popped from the end: the most recent first
                    st.refresh_queue, st.refresh_version = recent, version
                    st.refresh_started, st.refresh_clean = time.time(), True
                    st.refresh_rewritten = 0
            # The partition's lock is held one chunk at a time: batches of its events wait
            # for a chunk, not for the pass (a pass held them for up to the whole budget, half
            # a second, once per tick). A batch in between marks the pass unclean, as one
            # between two ticks does; a partition reloaded or moved meanwhile ends the pass.
            # The first partition re-ranks at least one chunk even when loading it took the
            # budget: under load a pass slows down, it never stops.
            first = n == 0
            while True:
                await work.turn(force=True)  # each chunk between the shoppers' batches
                async with self.locks[p]:
                    if self.parts.get(p) is not st or not st.refresh_queue or not (
                            first or not spent()):
                        break
                    first = False
                    chunk = st.refresh_queue[-YIELD_EVERY:][::-1]
                    written = await self.user_lists(p, st, chunk, only_changed=True)
                    del st.refresh_queue[-len(chunk):]
                    st.refresh_rewritten += written
                    self.stats.inc("context.refreshed_users", written)
            async with self.locks[p]:
                if self.parts.get(p) is not st:
                    continue
                if st.refresh_queue:  # the rest of the pass waits for the next tick
                    self.stats.inc("context.refresh_deferred")
                    continue
                if st.refresh_clean:
                    with self.stats.redis_write("refreshed"):
                        await self.store.redis.set(self.keys.refreshed(p), orjson.dumps(
                            {"version": st.refresh_version, "started": st.refresh_started,
                             "rewritten": st.refresh_rewritten}))
                    # Only once the mark is written: a failed write is retried next tick.
                    st.refreshed_version = st.refresh_version
                st.refresh_version = None
