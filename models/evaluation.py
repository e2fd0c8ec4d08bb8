"""Prequential (test-then-learn) replay: SPEC 4, the protocol of docs/quality.md.

Events go through every model in time order. Before an event that is a *target* (an item the
shopper is about to cart, buy or view next), each model's top-K for that shopper is taken from
what it learned before; then every model learns the event. Pure logic: the caller loads the
events and times nothing but what `Replay` times itself.

Each target is also flagged *new* (an item the shopper never touched before: discovery) and
*basket* (an item added to a basket that already holds others: basket completion), so the same
ranks give the overall, discovery and basket-completion figures.
"""

from __future__ import annotations

import math
import random
import time
import zlib
from array import array
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cartwise.contract import Event
from models.baselines import Model, Sessions

K = 20


def new_rank(recs: Sequence[str], item: str, own: Container[str]) -> int:
    """Rank (1..) of `item` in `recs` once the shopper's `own` items are left out; 0: absent.
    What a "new for you" answer shows (`placement=new`, docs/api.md)."""
    n = 0
    for i in recs:
        if i in own:
            continue
        n += 1
        if i == item:
            return n
    return 0


class _TouchedBefore:
    """The items a shopper touched before the event: `touched` less those it `added`."""

    __slots__ = ("added", "touched")

    def __init__(self, touched: set[str], added: set[str]) -> None:
        self.touched, self.added = touched, added

    def __contains__(self, item: object) -> bool:
        return item in self.touched and item not in self.added
TARGET_OF = {"view": "view", "add_to_cart": "cart", "purchase": "purchase"}


@dataclass
class Targets:
    """One row per target, shared by all models (so their results pair up)."""

    kind: list[str] = field(default_factory=list)
    new: array = field(default_factory=lambda: array("b"))  # item new to the shopper
    basket: array = field(default_factory=lambda: array("b"))  # completes a non-empty basket
    report: array = field(default_factory=lambda: array("b"))  # in the reported part
    ts: array = field(default_factory=lambda: array("d"))


class Replay:
    """Feeds events to models and records, per model, the rank (1..K, 0 = miss) of each target.

    Targets (docs/quality.md): an add-to-cart ("cart"); a purchase of an item not in the
    shopper's cart ("purchase": one in the cart was a cart target already); a view after an
    earlier view in the same session ("view", only when asked for: click logs).
    """

    def __init__(self, models: Sequence[Model], kinds: Iterable[str], report_from_ts: float,
                 k: int = K, sample: int = 1) -> None:
        self.models = list(models)
        # Ask for suggestions at 1 in `sample` target events (by event id, the same for
        # every model), learn every event: an unbiased estimate at a fraction of the cost.
        self.sample = sample
        self.kinds = set(kinds)
        self.report_from_ts = report_from_ts
        self.k = k
        self.targets = Targets()
        self.ranks: dict[str, array] = {m.name: array("h") for m in self.models}
        # The same targets ranked with the shopper's own items (touched before the event) left
        # out of the model's top k: what a "new for you" answer shows (docs/api.md). Read for
        # discovery targets only: an item the shopper touched before has no rank here.
        self.fresh: dict[str, array] = {m.name: array("h") for m in self.models}
        self._own = _TouchedBefore(set(), set())  # the current event's shopper's, before it
        self.shown: dict[str, set[str]] = {m.name: set() for m in self.models}  # coverage
        self.seconds: dict[str, float] = dict.fromkeys(self.ranks, 0.0)
        self.events = 0
        self.items: set[str] = set()
        self._touched: dict[str, set[str]] = {}
        self._cart: dict[str, set[str]] = {}
        self._order: dict[str, tuple[str, set[str]]] = {}  # shopper -> (order, its lines)
        self._sessions = Sessions()  # the same session rule the baselines use

    def _basket(self, e: Event, key: str) -> set[str]:
        """What the shopper's basket holds before `e`: the cart for an add-to-cart, the order's
        earlier lines (its order_id, else its session) for a purchase."""
        if e.type == "add_to_cart":
            return self._cart.setdefault(e.user_id, set())
        if e.type != "purchase":
            return set()
        order = e.order_id or key
        cur = self._order.get(e.user_id)
        if cur is None or cur[0] != order:
            cur = self._order[e.user_id] = (order, set())
        return cur[1]

    def _targets(self, e: Event) -> list[tuple[str, str, bool, bool]]:
        """(kind, item, new to the shopper, completes a basket) for each target in `e`;
        updates what it tracks."""
        kind = TARGET_OF.get(e.type)
        touched = self._touched.setdefault(e.user_id, set())
        cart = self._cart.setdefault(e.user_id, set())
        before = self._sessions.current.get(e.user_id)
        key, _ = self._sessions.touch(e)
        same_session = before is not None and before[0] == key
        basket = self._basket(e, key)
        out = []
        added: set[str] = set()
        self._own = _TouchedBefore(touched, added)
        for line in e.lines:
            item = line.item_id
            if kind == "cart" or (kind == "purchase" and item not in cart) or (
                    kind == "view" and same_session):
                if kind in self.kinds:
                    out.append((kind, item, item not in touched,
                                bool(basket) and item not in basket))
            if e.type == "purchase":
                basket.add(item)
            if e.type == "add_to_cart":
                cart.add(item)
            elif e.type in ("purchase", "remove_from_cart"):
                cart.discard(item)
            if item not in touched:
                added.add(item)
                touched.add(item)
            self.items.add(item)
        return out

    def step(self, e: Event) -> None:
        targets = self._targets(e)
        if targets and self.sample > 1 and zlib.crc32(e.event_id.encode()) % self.sample:
            targets = []
        report = e.ts >= self.report_from_ts
        if targets:
            t = self.targets
            for kind, _, new, completes in targets:
                t.kind.append(kind)
                t.new.append(new)
                t.basket.append(completes)
                t.report.append(report)
                t.ts.append(e.ts)
        perf = time.perf_counter
        for m in self.models:
            t0 = perf()
            if targets:
                recs = m.recommend(e.user_id, self.k)
                ranks = self.ranks[m.name]
                pos = {item: r for r, item in enumerate(recs[: self.k], 1)}
                for _, item, _, _ in targets:
                    ranks.append(pos.get(item, 0))
                self.seconds[m.name] += perf() - t0
                top = recs[: self.k]
                self.fresh[m.name].extend(new_rank(top, item, self._own) if new else 0
                                          for _, item, new, _ in targets)
                t0 = perf()  # the new-for-you ranks are the replay's work, not the model's
                if report:
                    self.shown[m.name].update(recs[: self.k])
            m.learn(e)
            self.seconds[m.name] += perf() - t0
        self.events += 1

    def run(self, events: Iterable[Event]) -> Replay:
        for e in events:
            self.step(e)
        return self

    # -- results --------------------------------------------------------------------------------

    def rows(self, kinds: Iterable[str], report: bool = True, only: str | None = None
             ) -> list[int]:
        """Indices of the targets of these kinds in the reported (or tuning) part; `only`
        "new" keeps discovery targets, "basket" basket-completion targets."""
        ks = set(kinds)
        t = self.targets
        flags = {None: None, "new": t.new, "basket": t.basket}[only]
        return [i for i, (k, r) in enumerate(zip(t.kind, t.report, strict=True))
                if k in ks and bool(r) == report and (flags is None or flags[i])]

    def metrics(self, model: str, rows: list[int], fresh: bool = False) -> dict[str, Any]:
        """`fresh`: the ranks with the shopper's own items left out (`self.fresh`)."""
        ranks = (self.fresh if fresh else self.ranks)[model]
        return metrics([ranks[i] for i in rows], [self.targets.new[i] for i in rows])

    def coverage(self, model: str) -> float:
        return len(self.shown[model]) / len(self.items) if self.items else 0.0

    def cost_us(self, model: str) -> float:
        """Learn + recommend time per event, microseconds."""
        return 1e6 * self.seconds[model] / self.events if self.events else 0.0


def score(rank: int, metric: str) -> float:
    """One target's value of a metric: HR@k a hit (1) or not, MRR@20 1/rank in the top 20."""
    if metric == "mrr20":
        return 1.0 / rank if 0 < rank <= 20 else 0.0
    return 1.0 if 0 < rank <= int(metric.removeprefix("hr")) else 0.0


def metrics(ranks: Sequence[int], new: Sequence[int]) -> dict[str, Any]:
    """HR@5, HR@10, HR@20, MRR@20 and the share of @20 hits on items new to the shopper."""
    n = len(ranks)
    hits5 = sum(1 for r in ranks if 0 < r <= 5)
    hits10 = sum(1 for r in ranks if 0 < r <= 10)
    hits20 = [i for i, r in enumerate(ranks) if 0 < r <= 20]
    rr = sum(1.0 / r for r in ranks if 0 < r <= 20)
    return {
        "targets": n,
        "hr5": hits5 / n if n else 0.0,
        "hr10": hits10 / n if n else 0.0,
        "hr20": len(hits20) / n if n else 0.0,
        "mrr20": rr / n if n else 0.0,
        "new_hit_share": sum(1 for i in hits20 if new[i]) / len(hits20) if hits20 else 0.0,
    }


def blocks(values: Sequence[float], n_blocks: int) -> list[float]:
    """Means of `n_blocks` consecutive, near-equal slices (time windows of equal weight)."""
    n = len(values)
    if n == 0:
        return []
    n_blocks = min(n_blocks, n)
    edges = [round(b * n / n_blocks) for b in range(n_blocks + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of wins vs losses (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], rounds: int = 2000,
                     seed: int = 7) -> tuple[float, float, float]:
    """Mean of a - b over paired blocks, with a 95% percentile interval from resampled blocks."""
    if len(a) != len(b) or not a:
        raise ValueError("need two non-empty sequences of the same length")
    d = [x - y for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    n = len(d)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return sum(d) / n, means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]


def compare(ranks_a: Sequence[int], ranks_b: Sequence[int], n_blocks: int = 20,
            metric: str = "hr20") -> dict[str, Any]:
    """Is A's metric (HR@k, MRR@20) above B's beyond noise? Sign test and paired bootstrap
    over time blocks."""
    ha = blocks([score(r, metric) for r in ranks_a], n_blocks)
    hb = blocks([score(r, metric) for r in ranks_b], n_blocks)
    return compare_blocks(ha, hb)


def compare_blocks(ha: Sequence[float], hb: Sequence[float]) -> dict[str, Any]:
    """`compare` on per-window values already computed (as results files keep them)."""
    wins = sum(x > y for x, y in zip(ha, hb, strict=True))
    losses = sum(x < y for x, y in zip(ha, hb, strict=True))
    mean, lo, hi = paired_bootstrap(ha, hb) if ha else (0.0, 0.0, 0.0)
    return {"blocks": len(ha), "wins": wins, "losses": losses,
            "sign_p": sign_test(wins, losses), "diff": mean, "ci95": [lo, hi]}
