"""Simulated shop traffic with a known structure, for the demo, tests and benchmarks.

Each category has a few "hero" products with fixed complements in other categories (a phone
and its case and charger; a coffee machine and its pods). A shopper on a mission views a few
alternatives in one category, may cart one, often adds its complements and sometimes buys.
Some shoppers just browse at random. The generator is deterministic for a given seed.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("phones", "laptops", "audio", "coffee", "kitchen", "garden", "toys", "books")
_NOUNS = {"phones": "phone", "laptops": "laptop", "audio": "headphones", "coffee": "coffee",
          "kitchen": "kitchen tool", "garden": "garden tool", "toys": "toy", "books": "book"}


@dataclass
class Shop:
    seed: int = 7
    items_per_category: int = 25
    rng: random.Random = field(init=False)
    catalog: list[dict[str, Any]] = field(init=False)
    complements: dict[str, list[str]] = field(init=False)
    by_category: dict[str, list[str]] = field(init=False)
    prices: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        rng = self.rng = random.Random(self.seed)
        self.catalog, self.by_category, self.complements = [], {}, {}
        for cat in CATEGORIES:
            ids = [f"{cat[:3]}-{n:03d}" for n in range(self.items_per_category)]
            self.by_category[cat] = ids
            for n, item in enumerate(ids):
                tier = ("budget", "mid", "premium")[n % 3]
                price = round(rng.uniform(5, 40) * (1, 3, 9)[n % 3], 2)
                self.catalog.append({
                    "item_id": item, "category": cat, "price": price, "tier": tier,
                    "in_stock": rng.random() > 0.03, "consumable": cat in ("coffee", "books"),
                    "brand": f"brand-{rng.randint(1, 6)}",
                })
                self.catalog[-1]["name"] = (f"{self.catalog[-1]['brand'].title()} "
                                            f"{_NOUNS[cat]} {tier} {n}")
        self.prices = {c["item_id"]: c["price"] for c in self.catalog}
        others = {c: [i for d, ids in self.by_category.items() if d != c for i in ids]
                  for c in CATEGORIES}
        for cat, ids in self.by_category.items():
            for item in ids[:6]:  # heroes
                self.complements[item] = rng.sample(others[cat], 3)

    def events(self, n_users: int, start_ts: float, mean_gap_s: float = 2.0,
               bad_rate: float = 0.0, dup_rate: float = 0.0) -> Iterator[dict[str, Any] | bytes]:
        """Events in time order; `bad_rate` of them are raw invalid records (bytes)."""
        rng = self.rng
        ts = start_ts
        n = 0
        for u in range(n_users):
            user = f"u-{u:05d}"
            for s in range(rng.randint(1, 3)):
                session = f"{user}-s{s}"
                for etype, item, extra in self._session(rng):
                    n += 1
                    ts += rng.expovariate(1.0 / mean_gap_s) if mean_gap_s > 0 else 0.0
                    if bad_rate and rng.random() < bad_rate:
                        yield self._bad(rng, n)
                        continue
                    ev = {"event_id": f"e-{self.seed}-{n}", "type": etype, "user_id": user,
                          "session_id": session, "ts": round(ts, 3), **extra}
                    if item is not None:
                        ev["item_id"] = item
                    yield ev
                    if dup_rate and rng.random() < dup_rate:
                        yield dict(ev)

    def _session(self, rng: random.Random) -> list[tuple[str, str | None, dict]]:
        out: list[tuple[str, str | None, dict]] = []
        if rng.random() < 0.25:
            for _ in range(rng.randint(1, 4)):
                out.append(("view", rng.choice(self.catalog)["item_id"], {}))
            return out
        cat = rng.choice(CATEGORIES)
        ids = self.by_category[cat]
        hero = rng.choice(ids[:6])
        for alt in [hero, *rng.sample(ids[:10], rng.randint(1, 3))]:
            out.append(("view", alt, {}))
        if rng.random() < 0.6:
            basket = [hero] + [c for c in self.complements[hero] if rng.random() < 0.6]
            for item in basket:
                out.append(("add_to_cart", item, {"quantity": 1}))
            if len(basket) > 1 and rng.random() < 0.2:
                out.append(("remove_from_cart", basket[-1], {}))
                basket.pop()
            if rng.random() < 0.6:
                lines = [{"item_id": i, "quantity": 1, "price": self.prices[i]} for i in basket]
                order = {"items": lines, "order_id": f"o-{rng.random():.8f}"}
                out.append(("purchase", None, order))
        return out

    @staticmethod
    def realistic(mode: str = "wide", **knobs: Any) -> RealisticShop:
        """A shop at realistic scale (`RealisticShop`): "wide" (50,000 items, 500,000
        shoppers, Zipf-like popularity) or "dense" (a 300-item grocery store)."""
        return RealisticShop(mode=mode, **knobs)

    @staticmethod
    def _bad(rng: random.Random, n: int) -> bytes:
        return rng.choice([
            b"{not json",
            b'{"type": "view", "user_id": "u-x", "ts": 1700000000}',
            b'{"event_id": "b%d", "type": "teleport", "user_id": "u", "item_id": "i",'
            b' "ts": 1.7e9}' % n,
            b'{"event_id": "b%d", "type": "purchase", "user_id": "u", "ts": 1.7e9,'
            b' "items": [{"item_id": "i", "price": -3}]}' % n,
            b"[1, 2, 3]",
        ])


@dataclass
class Responder:
    """Shoppers who react to shown suggestions with a known preference, for A/B tests.

    A shopper reads the list top down and clicks a slot with chance
    `base * decay**slot * appeal`; `appeal` is `cheap_appeal` for an item cheaper than the
    anchor (what the page was about) and `dear_appeal` otherwise: a price-sensitive crowd
    that the model's plain order, built from co-occurrence alone, knows nothing about. After
    a click the shopper adds the item to the cart with chance `cart_after_click`. A test knows
    therefore which ordering converts better before any data is seen.
    """

    seed: int = 11
    base: float = 0.6
    decay: float = 0.75
    cheap_appeal: float = 1.0
    dear_appeal: float = 0.1
    cart_after_click: float = 0.7
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def appeal(self, price: float | None, anchor_price: float | None) -> float:
        if price is None or anchor_price is None:
            return self.dear_appeal
        return self.cheap_appeal if price < anchor_price else self.dear_appeal

    def respond(self, shown: list[tuple[str, float | None]], anchor_price: float | None
                ) -> tuple[str | None, bool]:
        """(clicked item or None, whether it was carted) for a list of (item, price)."""
        for slot, (item, price) in enumerate(shown):
            p = self.base * self.decay ** slot * self.appeal(price, anchor_price)
            if self.rng.random() < p:
                return item, self.rng.random() < self.cart_after_click
        return None, False


# -- realistic scale (bench/scale.py) ----------------------------------------------------------

_AISLES = ("produce", "dairy", "bakery", "meat", "frozen", "pantry", "snacks", "drinks",
           "breakfast", "household", "personal-care", "pets")
_MODES = {
    # mode: (items, categories, shoppers, popularity exponent, concurrent sessions, mean gap s)
    # wide: 500 events/s, a session's events ~30 s apart; dense: a basket's ~30 s apart.
    "wide": (50_000, 400, 500_000, 0.9, 15_000, 0.002),
    "dense": (300, len(_AISLES), 500, 0.6, 5, 6.0),
}


def _cumulative(weights: list[float]) -> list[float]:
    out, total = [], 0.0
    for w in weights:
        total += w
        out.append(total)
    return out


@dataclass
class RealisticShop:
    """A deterministic shop at realistic scale, streamed: `catalog()` and `events()` are
    iterators, nothing per event is kept (per shopper: one small int, the visit counter).

    `mode="wide"` (the defaults: 50,000 items in 400 categories, 500,000 shoppers): a long-tail
    department store. Item popularity is Zipf-like (the item of popularity rank r is drawn with
    weight (r+1)**-`zipf`, ranks shuffled over the ids), categories differ in size and
    traffic, every category has `partners` partner categories (phones and cases, coffee
    machines and pods) and every item has `complements` complements in them, popular ones
    more likely. A session is either a bounce (`bounce_rate`: one or two views of items drawn
    by popularity over the whole shop) or a mission: a category drawn by traffic, an anchor
    item and 0-2 alternatives viewed; with `cart_rate` the anchor is carted, each of its
    complements with `complement_rate`; `remove_rate` of carts drop the last line and
    `purchase_rate` are bought. About 1.8 events per session, so 1,000,000 events reach
    500,000 distinct shoppers.

    `mode="dense"` (300 items in 12 aisles, 500 shoppers): a grocery store where almost
    everything co-occurs. A visit views a few items, then carts a basket of `basket` (10-30)
    items: the shopper's own staples (a fixed list per shopper), one or two recipe bundles
    (3-5 items from different aisles that go together) and popular items (`zipf` 0.6, a flat
    tail), drops one now and then and buys (`purchase_rate`). Shoppers come back: by default
    within hours (two baskets a shopper in about 33 hours of 20,000 events), after days with
    `return_gap_s` (one basket at a time, the store quiet in between).

    Shoppers: `events(n)` introduces `new_shoppers` (default: `shoppers`) new shoppers at an
    even pace over its n events; a session is a new shopper's whenever the pace is behind,
    otherwise a returning shopper's (drawn with a Zipf-like bias to the earliest, loyal ones).
    `concurrent` sessions are open at once and interleave, as on a real site (at most one per
    40 events of the call, so a short run is not all session starts); times advance by
    exponential gaps of mean `mean_gap_s` (events/s of the shop = 1 / mean_gap_s; a session's
    events are about concurrent x mean_gap_s apart).

    Deterministic for a given seed and knobs: `catalog()` and each `events()` call draw from
    their own generators, so they repeat exactly whatever was drawn before. Pure Python
    (`random`), so the same on every platform and numpy version. A knob left None takes the
    mode's default (`_MODES`).
    """

    seed: int = 7
    mode: str = "wide"
    items: int | None = None
    categories: int | None = None
    shoppers: int | None = None
    zipf: float | None = None
    concurrent: int | None = None
    mean_gap_s: float | None = None
    partners: int = 3  # partner categories per category (wide)
    complements: int = 3  # complements per item (wide)
    bounce_rate: float = 0.55
    cart_rate: float = 0.35
    complement_rate: float = 0.5
    remove_rate: float = 0.1
    purchase_rate: float | None = None  # wide 0.55, dense 0.92
    basket: tuple[int, int] = (10, 30)  # dense: items per basket
    staples: int = 20  # dense: a shopper's own regular items
    bundles: int = 40  # dense: recipe bundles
    # dense: the store's mean quiet time between two baskets, s. Above 0, baskets come one at
    # a time (`mean_gap_s` apart within one) and shoppers come back after days, not hours:
    # with 1,200 s and `mean_gap_s` 30, 20,000 events span about 19 days (docs/model.md).
    return_gap_s: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {sorted(_MODES)}, not {self.mode!r}")
        items, cats, shoppers, zipf, conc, gap = _MODES[self.mode]
        self.items = items if self.items is None else self.items
        self.categories = cats if self.categories is None else self.categories
        self.shoppers = shoppers if self.shoppers is None else self.shoppers
        self.zipf = zipf if self.zipf is None else self.zipf
        self.concurrent = conc if self.concurrent is None else self.concurrent
        self.mean_gap_s = gap if self.mean_gap_s is None else self.mean_gap_s
        if self.purchase_rate is None:
            self.purchase_rate = 0.55 if self.mode == "wide" else 0.92
        if self.mode == "dense":
            self.categories = min(self.categories, len(_AISLES))
        if self.items < self.categories or self.categories < 2:
            raise ValueError("need at least 2 categories and one item per category")
        self._build()

    # -- catalog ---------------------------------------------------------------------------

    def item_id(self, i: int) -> str:
        return f"g{i:04d}" if self.mode == "dense" else f"i{i:06d}"

    def category_name(self, c: int) -> str:
        return _AISLES[c] if self.mode == "dense" else f"cat{c:04d}"

    def _build(self) -> None:
        rng = random.Random(f"cartwise-realistic-{self.mode}-{self.seed}-catalog")
        n, nc = self.items, self.categories
        ranks = list(range(n))
        rng.shuffle(ranks)  # popularity rank of item i: ranks[i]
        self.weight = [(r + 1) ** -self.zipf for r in ranks]
        by_rank = sorted(range(n), key=ranks.__getitem__)
        # Category sizes differ (Zipf-like, exponent 0.8); every category gets one item first.
        cat_cum = _cumulative([(c + 1) ** -0.8 for c in range(nc)])
        self.category = [0] * n
        for k, i in enumerate(by_rank):
            self.category[i] = k if k < nc else bisect_right(cat_cum, rng.random() * cat_cum[-1])
        self.members: list[list[int]] = [[] for _ in range(nc)]
        for i in by_rank:  # most popular first
            self.members[self.category[i]].append(i)
        self.member_cum = [_cumulative([self.weight[i] for i in m]) for m in self.members]
        self.cat_cum = _cumulative([cum[-1] for cum in self.member_cum])
        self.all_cum = _cumulative(self.weight)
        self.price = [0.0] * n
        self.brand = [0] * n
        self.in_stock = bytearray(n)
        for i in range(n):
            base = rng.lognormvariate(2.5 if self.mode == "wide" else 1.0, 0.8)
            self.price[i] = round(min(base * (1, 2.5, 6)[i % 3], 50_000.0), 2)
            self.brand[i] = rng.randint(1, 60)
            self.in_stock[i] = rng.random() > 0.03
        self.consumable_category = [self.mode == "dense" and c < 9 or
                                    self.mode == "wide" and rng.random() < 0.2
                                    for c in range(nc)]
        self.complements_of: list[list[int]] = []
        self.bundle_list: list[list[int]] = []
        if self.mode == "wide":
            self.partner_of = []
            for c in range(nc):
                ps: list[int] = []
                while len(ps) < min(self.partners, nc - 1):
                    d = bisect_right(self.cat_cum, rng.random() * self.cat_cum[-1])
                    if d != c and d not in ps:
                        ps.append(d)
                self.partner_of.append(ps)
            for i in range(n):
                ps = self.partner_of[self.category[i]]
                comp: list[int] = []
                for _ in range(self.complements * 3):
                    if len(comp) >= self.complements:
                        break
                    j = self._in_category(rng, ps[rng.randrange(len(ps))])
                    if j not in comp:
                        comp.append(j)
                self.complements_of.append(comp)
        else:
            for _ in range(self.bundles):
                size = rng.randint(3, 5)
                aisles = rng.sample(range(nc), min(size, nc))
                self.bundle_list.append([self._in_category(rng, a) for a in aisles])

    def _in_category(self, rng: random.Random, c: int) -> int:
        cum = self.member_cum[c]
        return self.members[c][min(bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)]

    def _anywhere(self, rng: random.Random) -> int:
        cum = self.all_cum
        return min(bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)

    def catalog(self) -> Iterator[dict[str, Any]]:
        """Every item's catalog record (contract: docs/events.md), in id order."""
        tiers = ("budget", "mid", "premium")
        for i in range(self.items):
            c = self.category[i]
            cat = self.category_name(c)
            yield {"item_id": self.item_id(i), "category": cat, "price": self.price[i],
                   "tier": tiers[i % 3], "in_stock": bool(self.in_stock[i]),
                   "consumable": self.consumable_category[c], "brand": f"brand-{self.brand[i]}",
                   "name": f"Brand-{self.brand[i]} {cat} {tiers[i % 3]} {i}"}

    def describe(self) -> dict[str, Any]:
        """The knobs, for a benchmark's results."""
        return {"mode": self.mode, "seed": self.seed, "items": self.items,
                "categories": self.categories, "shoppers": self.shoppers, "zipf": self.zipf,
                "concurrent": self.concurrent, "mean_gap_s": self.mean_gap_s,
                "top1_share": self.weight[self._top()] / self.all_cum[-1],
                "top1pct_share": self._top_share(0.01)}

    def _top(self) -> int:
        return max(range(self.items), key=self.weight.__getitem__)

    def _top_share(self, q: float) -> float:
        w = sorted(self.weight, reverse=True)
        return sum(w[: max(1, int(q * len(w)))]) / self.all_cum[-1]

    # -- traffic ---------------------------------------------------------------------------

    def events(self, n_events: int, start_ts: float, part: int = 0, known_shoppers: int = 0,
               new_shoppers: int | None = None, mean_gap_s: float | None = None
               ) -> Iterator[dict[str, Any]]:
        """Exactly `n_events` contract events in time order, sessions interleaved.

        `part` makes another, disjoint stream (event, session and order ids carry it): a
        live run after a backlog uses part=1 with `known_shoppers` = the backlog's shoppers,
        so its returning visitors are shoppers the backlog built up state for.
        """
        rng = random.Random(f"cartwise-realistic-{self.mode}-{self.seed}-events-{part}")
        gap = self.mean_gap_s if mean_gap_s is None else mean_gap_s
        new_total = self.shoppers if new_shoppers is None else new_shoppers
        created = known_shoppers
        visits = array("I", bytes(4 * (known_shoppers + new_total + 1)))
        open_: list[list] = []  # [user, session, events of the session, next index]
        ts = start_ts
        emitted = 0
        tag = f"r{self.seed}.{part}"
        staples: dict[int, list[int]] = {}
        concurrent = max(1, min(self.concurrent, n_events // 40))
        paced = self.mode == "dense" and self.return_gap_s > 0
        if paced:
            concurrent = 1
        while emitted < n_events:
            opened = len(open_) < concurrent
            while len(open_) < concurrent:
                due = known_shoppers + new_total * (emitted + len(open_) + 1) / n_events
                if created < known_shoppers + new_total and (created < due or created == 0):
                    u = created
                    created += 1
                else:  # a returning shopper, biased to the earliest (loyal) ones
                    u = int(created * rng.random() ** 2.5)
                if u >= len(visits):
                    visits.extend(bytes(4 * (u + 1 - len(visits))))
                v = visits[u]
                visits[u] = v + 1
                if self.mode == "wide":
                    plan = self._mission(rng)
                else:
                    if u not in staples:
                        staples[u] = self._staples(u)
                    plan = self._basket(rng, staples[u])
                open_.append([f"u{u:07d}", f"u{u:07d}-{part}.{v}", plan, 0])
            # A session starts with its first event (so every shopper introduced shows up);
            # then its events interleave with the other open sessions'.
            if opened and paced and emitted:  # the store was quiet since the last basket
                ts += rng.expovariate(1.0 / self.return_gap_s)
            k = len(open_) - 1 if opened else rng.randrange(len(open_))
            sess = open_[k]
            etype, payload = sess[2][sess[3]]
            sess[3] += 1
            if sess[3] == len(sess[2]):
                open_[k] = open_[-1]
                open_.pop()
            emitted += 1
            if gap > 0:
                ts += rng.expovariate(1.0 / gap)
            ev: dict[str, Any] = {"event_id": f"{tag}-{emitted}", "type": etype,
                                  "user_id": sess[0], "session_id": sess[1], "ts": round(ts, 3)}
            if etype == "purchase":
                ev["items"] = [{"item_id": self.item_id(i), "quantity": q,
                                "price": self.price[i]} for i, q in payload]
                ev["order_id"] = f"o{tag}-{emitted}"
            else:
                ev["item_id"] = self.item_id(payload[0])
                if etype == "add_to_cart":
                    ev["quantity"] = payload[1]
            yield ev

    def _mission(self, rng: random.Random) -> list[tuple[str, Any]]:
        if rng.random() < self.bounce_rate:
            return [("view", (self._anywhere(rng),))
                    for _ in range(1 if rng.random() < 0.8 else 2)]
        c = bisect_right(self.cat_cum, rng.random() * self.cat_cum[-1])
        c = min(c, self.categories - 1)
        anchor = self._in_category(rng, c)
        seen = [anchor]
        for _ in range(rng.randint(0, 2)):
            alt = self._in_category(rng, c)
            if alt not in seen:
                seen.append(alt)
        plan: list[tuple[str, Any]] = [("view", (i,)) for i in seen]
        if rng.random() < self.cart_rate:
            cart = [anchor] + [j for j in self.complements_of[anchor]
                               if rng.random() < self.complement_rate]
            lines = [(i, 1 if rng.random() < 0.9 else 2) for i in cart]
            plan += [("add_to_cart", line) for line in lines]
            if len(lines) > 1 and rng.random() < self.remove_rate:
                plan.append(("remove_from_cart", (lines.pop()[0],)))
            if rng.random() < self.purchase_rate:
                plan.append(("purchase", lines))
        return plan

    def _staples(self, u: int) -> list[int]:
        rng = random.Random(f"cartwise-realistic-{self.seed}-staples-{u}")
        out: list[int] = []
        for _ in range(self.staples * 3):
            if len(out) >= self.staples:
                break
            i = self._anywhere(rng)
            if i not in out:
                out.append(i)
        return out

    def _basket(self, rng: random.Random, staples: list[int]) -> list[tuple[str, Any]]:
        size = rng.randint(*self.basket)
        basket: list[int] = []
        for i in rng.sample(staples, min(len(staples), size * 6 // 10)):
            basket.append(i)
        for _ in range(rng.randint(1, 2)):
            for i in self.bundle_list[rng.randrange(len(self.bundle_list))]:
                if i not in basket:
                    basket.append(i)
        for _ in range(size * 3):
            if len(basket) >= size:
                break
            i = self._anywhere(rng)
            if i not in basket:
                basket.append(i)
        plan: list[tuple[str, Any]] = [("view", (self._anywhere(rng),))
                                       for _ in range(rng.randint(0, 4))]
        lines = [(i, rng.choice((1, 1, 1, 2, 2, 3))) for i in basket]
        plan += [("add_to_cart", line) for line in lines]
        if rng.random() < self.remove_rate * 2:
            plan.append(("remove_from_cart", (lines.pop()[0],)))
        if rng.random() < self.purchase_rate:
            plan.append(("purchase", lines))
        return plan
