"""A real shop's traffic for the demo: a slice of UCI Online Retail replayed as live events.

The slice (cartwise/data/online_retail_slice, made by bench/make_shop_slice.py, attribution in
docs/demo-data.md) holds about 300 gift-ware products with their real names and prices and
3,000 whole invoices of them by about 1,900 customers (Aug-Oct 2011). Carting a Regency
cakestand there shows the teacups, teapot and sugar bowl real customers bought with it, which
the simulator's made-up phones cannot. `ShopSlice` has the interface of the simulator's `Shop`
that the demo's pacing loop uses (`catalog`, `events()`, `prices`, `complements`), and
`ReplayTraffic` is the demo's traffic source over it (`cartwise.demo.traffic_source` picks
one); the simulator stays for tests and benchmarks, where a known truth matters.

The log only records checkouts, so what a shopper did before one is reconstructed, stated here
once: each invoice line is viewed and then carted (its real quantity and price), sometimes
after viewing another product of the same category (`compare_rate`), and the invoice ends in a
purchase of all its lines (each at its real unit price). `out_of_stock` of the products are
marked out of stock in the catalog. Both are drawn from `seed`, so a replay repeats exactly.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "online_retail_slice"
DAY = 86_400.0
# Seconds of log time between a shopper's actions before the checkout the log recorded.
ACTION_GAP_S = 20.0
# Records that break the contract, for `bad_rate` (the worker dead-letters them).
_INVALID = (
    b"{not json",
    b'{"type": "view", "user_id": "c-x", "ts": 1700000000}',
    b'{"event_id": "bad-type", "type": "teleport", "user_id": "c", "item_id": "i", "ts": 1.7e9}',
    b"[1, 2, 3]",
)


@dataclass(frozen=True, slots=True)
class Product:
    item_id: str
    name: str
    category: str
    price: float


@dataclass(frozen=True, slots=True)
class Invoice:
    """One checkout of the log: who, when (epoch seconds) and its (item, quantity, price)."""

    invoice: str
    customer: str
    ts: float
    lines: tuple[tuple[str, int, float], ...]


def load_slice(folder: Path = DATA) -> tuple[list[Product], list[Invoice]]:
    """The slice's products (by id) and invoices (in time order).

    A missing file raises FileNotFoundError with one line saying how to get it back.
    """
    paths = [folder / "products.csv", folder / "invoices.csv.gz"]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(
                f"the demo shop's data {path.name} is missing from {folder}; reinstall "
                "cartwise (package data) or regenerate it: python -m bench.make_shop_slice")
    with open(paths[0], encoding="utf-8", newline="") as f:
        products = [Product(r["item_id"], r["name"], r["category"], float(r["price"]))
                    for r in csv.DictReader(f)]
    lines: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
    heads: dict[str, tuple[str, float]] = {}
    with io.TextIOWrapper(gzip.open(paths[1]), encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            inv = r["invoice"]
            if inv not in heads:
                ts = datetime.strptime(r["ts"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
                heads[inv] = (r["customer"], ts.timestamp())
            lines[inv].append((r["item_id"], int(r["quantity"]), float(r["price"])))
    invoices = [Invoice(inv, customer, ts, tuple(lines[inv]))
                for inv, (customer, ts) in heads.items()]
    invoices.sort(key=lambda i: (i.ts, i.invoice))
    return sorted(products, key=lambda p: p.item_id), invoices


def co_bought(invoices: list[Invoice]) -> tuple[Counter[str], Counter[tuple[str, str]]]:
    """Invoices per product and per pair of products (a, b with a < b)."""
    items: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    for inv in invoices:
        ids = sorted({line[0] for line in inv.lines})
        items.update(ids)
        pairs.update(itertools.combinations(ids, 2))
    return items, pairs


@dataclass
class ShopSlice:
    """The slice replayed as live shop traffic (module docstring).

    Parameters: `seed` draws the reconstructed views and the out-of-stock products;
    `speedup` is how many seconds of the log pass per second of replay (3600: an hour of the
    shop each second, the 9 weeks of the slice in about 25 minutes); `compare_rate` is the
    chance that a shopper views another product of the same category before carting a line;
    `out_of_stock` the share of products marked out of stock; `heroes` how many of the most
    bought products list their `complements` (for the demo's responding shoppers).

    >>> shop = ShopSlice()
    >>> events = list(shop.events(1, start_ts=1_800_000_000.0))
    >>> [e["type"] for e in events][-1], events[-1]["user_id"] == events[0]["user_id"]
    ('purchase', True)
    """

    seed: int = 7
    speedup: float = 3600.0
    compare_rate: float = 0.3
    out_of_stock: float = 0.03
    heroes: int = 30
    folder: Path = DATA
    products: list[Product] = field(init=False)
    invoices: list[Invoice] = field(init=False)
    catalog: list[dict[str, Any]] = field(init=False)
    prices: dict[str, float] = field(init=False)
    complements: dict[str, list[str]] = field(init=False)
    shoppers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0 (log seconds per replay second), "
                             f"got {self.speedup}")
        self.products, self.invoices = load_slice(self.folder)
        rng = random.Random(f"cartwise-slice-{self.seed}-catalog")
        self.catalog = [{"item_id": p.item_id, "name": p.name, "category": p.category,
                         "price": p.price, "in_stock": rng.random() >= self.out_of_stock}
                        for p in self.products]
        self.prices = {p.item_id: p.price for p in self.products}
        self._category = {p.item_id: p.category for p in self.products}
        self._by_category: dict[str, list[str]] = defaultdict(list)
        for p in self.products:
            self._by_category[p.category].append(p.item_id)
        self.complements = self._complements()
        visits = Counter(inv.customer for inv in self.invoices)
        self.shoppers = [f"c{c}" for c, _ in
                         sorted(visits.items(), key=lambda kv: (-kv[1], kv[0]))]

    def _complements(self) -> dict[str, list[str]]:
        """The `heroes` most bought products -> the products of other categories bought with
        them most often (at least 3 invoices), best first."""
        items, pairs = co_bought(self.invoices)
        partners: dict[str, Counter[str]] = defaultdict(Counter)
        for (a, b), n in pairs.items():
            if n >= 3 and self._category[a] != self._category[b]:
                partners[a][b] = n
                partners[b][a] = n
        top = sorted(items, key=lambda i: (-items[i], i))[: self.heroes]
        return {i: [j for j, _ in sorted(partners[i].items(), key=lambda kv: (-kv[1], kv[0]))
                    [:5]] for i in top if partners[i]}

    def events(self, invoices: int, start_ts: float, mean_gap_s: float | None = None,
               bad_rate: float = 0.0, dup_rate: float = 0.0
               ) -> Iterator[dict[str, Any] | bytes]:
        """Contract events of `invoices` checkouts replayed from `start_ts`, looping over the
        slice as often as needed (round k > 0 has fresh event, session and order ids).

        Times: None (the default) keeps the log's own pace, compressed by `speedup`, with
        each shopper's actions `ACTION_GAP_S` of log time apart before the checkout; a number
        puts events exactly `mean_gap_s` apart instead (0: all at `start_ts`, which
        `cartwise.demo.simulate` asks for: it stamps each event when it sends it). Times never
        go back; a shopper's events are not interleaved with another's.
        `bad_rate` inserts contract-breaking records (bytes) and `dup_rate` sends an event
        twice (the same event_id), as the simulator does, for the dead letters and dedup.
        """
        noise = random.Random(f"cartwise-slice-{self.seed}-noise")
        first = self.invoices[0].ts
        round_s = self.invoices[-1].ts - first + DAY  # one pass over the log, then a day off
        last = start_ts
        sent = emitted = 0
        for k in itertools.count():
            for inv in self.invoices:
                if sent >= invoices:
                    return
                sent += 1
                actions = self._visit(inv, k)
                checkout = inv.ts - first + k * round_s
                for n, ev in enumerate(actions):
                    if mean_gap_s is None:
                        at = checkout - (len(actions) - 1 - n) * ACTION_GAP_S
                        ts = max(last, start_ts + at / self.speedup)
                    else:
                        ts = start_ts + mean_gap_s * emitted
                    last = ts
                    emitted += 1
                    ev["ts"] = round(ts, 3)
                    if bad_rate and noise.random() < bad_rate:
                        yield noise.choice(_INVALID)
                    yield ev
                    if dup_rate and noise.random() < dup_rate:
                        yield dict(ev)

    def _visit(self, inv: Invoice, k: int) -> list[dict[str, Any]]:
        """One checkout's events without times: views, carts, then the purchase."""
        rng = random.Random(f"cartwise-slice-{self.seed}-{k}-{inv.invoice}")
        tag = inv.invoice if k == 0 else f"{inv.invoice}.{k}"
        user = f"c{inv.customer}"
        out: list[dict[str, Any]] = []

        def add(etype: str, **fields: Any) -> None:
            out.append({"event_id": f"or-{tag}-{len(out)}", "type": etype, "user_id": user,
                        "session_id": f"or-{tag}", **fields})

        for item, qty, price in inv.lines:
            if rng.random() < self.compare_rate:
                others = [i for i in self._by_category[self._category[item]] if i != item]
                if others:
                    add("view", item_id=rng.choice(others), category=self._category[item])
            add("view", item_id=item, category=self._category[item])
            add("add_to_cart", item_id=item, quantity=min(qty, 10_000), price=price,
                category=self._category[item])
        add("purchase", order_id=f"or-{tag}",
            items=[{"item_id": i, "quantity": min(q, 10_000), "price": p}
                   for i, q, p in inv.lines])
        return out


class ReplayTraffic:
    """The demo's traffic source (cartwise.demo.TrafficSource) over `ShopSlice`: the slice's
    invoices at `rate` events/s, event time = now, with a few invalid and duplicate records
    as the simulated traffic has, looping over the slice while the demo runs."""

    def __init__(self, rate: float, seed: int = 7) -> None:
        self.rate = rate
        self.shop = ShopSlice(seed=seed)

    def describe(self) -> str:
        return (f"{self.rate:g} events/s replayed from UCI Online Retail ({len(self.shop.products)}"
                f" products, {len(self.shop.invoices)} invoices; CC BY 4.0, docs/demo-data.md),"
                " with a few invalid and duplicate ones")

    def catalog(self) -> list[dict[str, Any]]:
        return self.shop.catalog

    def run(self, producer: Any, stop: list[bool]) -> int:
        from cartwise.demo import simulate  # the demo's pacing loop, shared with the simulator

        return simulate(producer, self.shop, rate=self.rate, seconds=None, stop=stop,
                        catalog=False)

    def showcase(self) -> tuple[list[str], dict[str, float]]:
        return list(self.shop.complements), self.shop.prices
