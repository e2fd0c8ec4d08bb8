"""Single-process recommender with a river-style API, built from the same parts the stream uses.

Use it as a library, in notebooks and in the offline replay (`cartwise evaluate`). The stream
splits the same work in two stages (shopper contexts by user, item graph by item); this class
runs both stages in one process, with the stream's per-partition bounds (`partitions`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

from cartwise.contract import (
    FEEDBACK_TYPES,
    CatalogItem,
    Event,
    expected_partition,
    validate_catalog,
    validate_event,
)
from models.blend import KindWeights
from models.config import ModelConfig
from models.context import ContextBook, ShopperContext
from models.graph import ItemGraph
from models.itemlists import KINDS, REASONS, Candidates
from models.ranking import (
    Parts,
    cycles_needed,
    list_anchors,
    rank_for_user,
    rebuy_candidates,
)

# kind -> the head of an item's list of that kind; "repeat" and "picks" -> the item's
Heads = dict[str, Any]
BLEND_DEPTH = 20  # the list the blend learner judges: as deep as the replay's HR@20


@functools.lru_cache(maxsize=1 << 14)
def _partition(user_id: str, partitions: int) -> int:
    """`expected_partition`, remembered: it hashes in Python, twice per replayed event."""
    return expected_partition(user_id, partitions)


class Contexts:
    """Shopper contexts split as the stream splits them: one bounded book per partition of
    the events topic, so `max_users` evicts the same shoppers here as there."""

    def __init__(self, config: ModelConfig, partitions: int) -> None:
        self.partitions = partitions
        self.books = [ContextBook(config) for _ in range(partitions)]
        self.clocks = [-math.inf] * partitions  # newest event time per partition (its clock)
        if partitions > 1:
            _partition("", partitions)  # its first call imports kafka (~0.2 s): not per event

    def partition(self, user_id: str) -> int:
        return _partition(user_id, self.partitions) if self.partitions > 1 else 0

    def get(self, user_id: str) -> ShopperContext | None:
        return self.books[self.partition(user_id)].get(user_id)

    @property
    def users(self) -> dict[str, ShopperContext]:
        return {u: c for b in self.books for u, c in b.users.items()}


class CrossSellRecommender:
    """`list_interval_s` > 0 recomputes a changed list at most once per that many seconds of
    event time, as the stream does in wall time (`LISTS_MIN_INTERVAL_S`), and only once its row
    changed enough (`list_min_change`, as the stream); 0 always recomputes.
    `partitions`: those of the stream it should agree with (its bounds are per partition)."""

    def __init__(self, config: ModelConfig | None = None, list_interval_s: float = 0.0,
                 partitions: int = 4) -> None:
        self.config = config or ModelConfig()
        self.list_interval_s = list_interval_s
        self.contexts = Contexts(self.config, partitions)
        self.graph = ItemGraph(self.config, sources=partitions)
        self.catalog: dict[str, dict[str, Any]] = {}
        # Each item's list candidates as last computed (ItemGraph.candidates), the heads of
        # its lists as a shopper's ranking reads them (`_heads`), and the items in those
        # (what `listed` finds in them).
        self._candidates: dict[str, Candidates] = {}
        self._lists: dict[str, Heads] = {}
        self._offered: dict[str, set[str]] = {}
        self._computed_at: dict[str, float] = {}
        self._marks: dict[str, tuple[float, float, int]] = {}  # ItemGraph.list_mark
        cfg = self.config
        self.blend = KindWeights(cfg.blend_rate, cfg.blend_epoch_s, cfg.blend_negatives) \
            if cfg.blend_rate > 0 else None

    def learn_one(self, event: Event | dict[str, Any]) -> bool:
        """Learn one event (validated if given as a dict). False when it was a duplicate."""
        if isinstance(event, dict):
            event = validate_event(event)
        p = self.contexts.partition(event.user_id)
        book = self.contexts.books[p]
        if self.blend is not None and event.type not in FEEDBACK_TYPES:
            self._learn_blend(event)
        evidence = book.learn(event)
        if evidence is None:
            return False
        ts, marginals, pairs = evidence
        if event.type not in FEEDBACK_TYPES:
            self.contexts.clocks[p] = max(self.contexts.clocks[p], ts)
        clock = self.contexts.clocks[p]
        self.graph.apply(ts, marginals, pairs, p, None if clock == -math.inf else clock)
        for item, interval in book.last_repeats:  # repurchase cycles, as the stream
            self.graph.repeat(item, interval)
        return True

    def _learn_blend(self, event: Event) -> None:
        """Before the event is learned: how the shopper's list ranked what they picked."""
        ctx = self.contexts.get(event.user_id)
        if ctx is None or not ctx.items or event.event_id in ctx.seen:
            return
        parts: Parts = {}
        ranked = self._rank(event.user_id, ctx, BLEND_DEPTH, parts)
        assert self.blend is not None
        self.blend.learn_one(event.ts, parts, [e["item_id"] for e in ranked],
                             [line.item_id for line in event.lines])

    def blend_weights(self) -> dict[str, float] | None:
        """The learned multiplier of each evidence kind; None when the weights are fixed."""
        return None if self.blend is None else self.blend.weights()

    def learn_catalog(self, item: CatalogItem | dict[str, Any]) -> None:
        if isinstance(item, dict):
            item = validate_catalog(item)
        self.catalog[item.item_id] = item.as_dict()

    def _refresh(self, items: list[str] | None = None) -> None:
        """Recompute lists of changed rows, as the stream does after each batch; only those of
        `items` when given (the replay asks for a shopper's anchors, not every changed row)."""
        g = self.graph
        for item in g.dropped:
            self._candidates.pop(item, None)
            self._lists.pop(item, None)
            self._offered.pop(item, None)
            self._computed_at.pop(item, None)
            self._marks.pop(item, None)
        g.dropped.clear()
        g.dropped_marg.clear()  # checkpoint bookkeeping: the library keeps no checkpoint
        g.dirty_open.clear()
        g.dropped_open.clear()
        g.dirty_seen.clear()
        g.touched.clear()
        g.marg_touched.clear()
        g.dirty_marg.clear()
        if items is None:
            todo = list(g.dirty)
        else:
            due = g.now - self.list_interval_s
            # With an interval, also only lists whose rows changed enough (the stream's rule);
            # 0 recomputes every changed list, so `related` is exact.
            todo = [i for i in items if i in g.dirty
                    and (self.list_interval_s <= 0 or (self._computed_at.get(i, -1e300) <= due
                                                       and g.list_due(i, self._marks.get(i))))]
        for item in todo:
            if self.list_interval_s > 0:  # only then does `list_due` read the mark
                self._marks[item] = g.list_mark(item)
            self._candidates[item] = cands = g.candidates(item)
            self._lists[item] = heads = self._heads(item, cands)
            self._offered[item] = {e["item_id"] for kind in KINDS for e in heads.get(kind, ())}
            self._computed_at[item] = g.now
            g.dirty.discard(item)

    def _heads(self, item: str, cands: Candidates) -> Heads:
        """The part of `item`'s lists a shopper's ranking reads (models/ranking.py): the first
        `per_anchor` of each kind, as entries without the numbers behind them. Ranking the
        rest and making whole entries (lift, G², evidence) is most of a list's cost; `recommend`
        adds the evidence of the few entries it returns, `related` makes whole lists. Tuples,
        as `Candidates` keeps them: the garbage collector stops visiting them after one look."""
        cfg = self.config
        heads: Heads = {}
        for kind in cands.found:
            top = cands.ranked(kind, min(cfg.list_size, cfg.per_anchor(kind)), cfg.score_digits)
            reason = REASONS[kind]
            heads[kind] = tuple([{"item_id": c[1], "score": score, "kind": kind, "anchor": item,
                                  "reason": reason} for score, c in top])
        heads["repeat"], heads["picks"] = cands.repeat, cands.picks
        return heads

    def settle(self) -> None:
        """Recompute every list against the current counts (the stream does this when idle)."""
        self.graph.dirty.update(self.graph.rows)
        self._refresh()

    def related(self, item_id: str, kind: str = "cross_sell", k: int = 10) -> list[dict]:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self._refresh([item_id])
        cands = self._candidates.get(item_id)
        return [] if cands is None else cands.lists(item_id, self.config)[kind][:k]

    def recommend(self, user_id: str, k: int = 10) -> list[dict[str, Any]]:
        ctx = self.contexts.get(user_id)
        if ctx is None:
            return []
        ranked = self._rank(user_id, ctx, k)
        digits = self.config.score_digits
        for e in ranked:  # the heads carry no evidence: the entries shown get it here
            if e["kind"] in KINDS:
                e["evidence"] = self._candidates[e["anchor"]].evidence(e["kind"], e["item_id"],
                                                                       digits)
        return ranked

    def recommend_ids(self, user_id: str, k: int = 10) -> list[str]:
        """The items of `recommend`, without the evidence it adds (the replay reads ids)."""
        ctx = self.contexts.get(user_id)
        return [] if ctx is None else [e["item_id"] for e in self._rank(user_id, ctx, k)]

    def _rank(self, user_id: str, ctx: ShopperContext, k: int,
              parts: Parts | None = None) -> list[dict[str, Any]]:
        """The shopper's list; its entries of the item lists have an empty `evidence`."""
        seeds = list_anchors(ctx, self.config)
        self._refresh(seeds)
        lists: dict[str, Any] = {a: self._lists.get(a) for a in seeds}
        # Whether a bought item may come back depends on its learned cycle (models/ranking.py).
        cfg = self.config
        offered = set(rebuy_candidates(ctx, cfg)).union(
            *(self._offered[a] for a in seeds if a in self._offered))  # listed(lists, cfg)
        for j in cycles_needed(ctx.bought, offered, self.catalog) - lists.keys():
            lists[j] = {"repurchase": self.graph.repurchase(j)}
        weights = None if self.blend is None else self.blend.weights()
        rate = self.contexts.books[self.contexts.partition(user_id)].repeat_rate()
        return rank_for_user(ctx, lists, self.catalog, k, cfg, weights, parts, rate)

    def trending(self, k: int = 10, category: str | None = None) -> list[tuple[str, float]]:
        """(item, trending score) best first, as the stream keeps them (models/trending.py)."""
        scores = self.graph.trending(self.graph.marg)
        if category is not None:
            scores = {i: v for i, v in scores.items()
                      if (self.catalog.get(i) or {}).get("category") == category}
        return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class CartwiseModel:
    """The default model as the replay (models/evaluation.py) drives it: item ids only.

    A list is recomputed at most once per `list_interval_s` of event time. The stream does so
    at most once a second of wall time, which at a live shop's rate is hundreds of events; a
    log replays far fewer events per second of its time, so a minute of it keeps the replay's
    lists at least as fresh as the stream's. Measured (docs/model.md): the same HR@20 on Online
    Retail and on the dense grocery log as at 1 s, at a third of the cost on the latter.
    """

    name = "cartwise"

    def __init__(self, config: ModelConfig | None = None, list_interval_s: float = 60.0) -> None:
        self.rec = CrossSellRecommender(config, list_interval_s)

    def learn(self, event: Event) -> None:
        self.rec.learn_one(event)

    def recommend(self, user: str, k: int) -> list[str]:
        return self.rec.recommend_ids(user, k)
