"""Simulated shop traffic with a known structure, for the demo, tests and benchmarks.

Each category has a few "hero" products with fixed complements in other categories (a phone
and its case and charger; a coffee machine and its pods). A shopper on a mission views a few
alternatives in one category, may cart one, often adds its complements and sometimes buys.
Some shoppers just browse at random. The generator is deterministic for a given seed.
"""

from __future__ import annotations

import random
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
