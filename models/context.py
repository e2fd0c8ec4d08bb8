"""Shopper context: what one shopper touched recently, and the co-occurrence evidence it yields.

The context is keyed by user, so it lives in the partition of the user's events. Every change to
it is turned into *evidence*: marginal increments for one item and pair increments for two,
which the item graph (keyed by item, models/graph.py) adds up. Pure logic, no I/O.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from cartwise.contract import FEEDBACK_TYPES, Event
from models.config import ModelConfig
from models.repurchase import KEEP_PER_SHOPPER, MIN_INTERVAL_S, observe

BUY_TYPES = frozenset({"add_to_cart", "purchase"})

# What one event adds to the item graph, compact because it crosses the internal pairs topic:
#   (ts, marginals, pairs)
#   marginals: [(item, d_all, d_buy)]        item entered a context / got stronger
#   pairs: [(item, other, d_all, d_buy, n_all, n_buy, d_next, d_before)]
#                                            the pair (item, other) got stronger; n_* is 1 when
#                                            the pair is new in this context (counts shoppers);
#                                            d_next is 1/d when `other` was picked right after
#                                            `item`, d steps later in one session, d_before
#                                            1/d when `other` was picked d steps before it
Evidence = tuple[float, list[tuple], list[tuple]]


@dataclass(slots=True)
class Touch:
    w: float  # strongest event weight seen on the item in this context (all channel)
    b: float  # strongest buy-type weight (buy channel), 0 if only viewed
    ts: float
    session: str
    r: int = 0  # times picked again right after itself while in this context


@dataclass(slots=True)
class ShopperContext:
    items: dict[str, Touch] = field(default_factory=dict)  # oldest first
    cart: dict[str, int] = field(default_factory=dict)
    bought: dict[str, float] = field(default_factory=dict)
    seen: deque[str] = field(default_factory=deque)
    # One [ts, amount] per purchase event (amount None when no line had a price), oldest
    # first, kept for `orders_keep_s`: what RFM segments are computed from (models/segments.py).
    orders: list[list[Any]] = field(default_factory=list)
    # item -> the shopper's own newest repeat intervals (s), for repurchase cycles
    repeats: dict[str, list[float]] = field(default_factory=dict)
    last_ts: float = 0.0
    session: str = ""
    session_n: int = 0
    # Suggestions shown and experiments joined (models/feedback.py, Attribution)
    feedback: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "f": self.feedback,
                "i": [[k, t.w, t.b, t.ts, t.session, t.r] for k, t in self.items.items()],
                "c": self.cart,
                "b": self.bought,
                "e": list(self.seen),
                "o": self.orders,
                "r": self.repeats,
                "t": self.last_ts,
                "s": self.session,
                "n": self.session_n,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ShopperContext:
        d = orjson.loads(raw)
        return cls(
            items={t[0]: Touch(*t[1:]) for t in d["i"]},
            cart=d["c"],
            bought=d["b"],
            seen=deque(d["e"]),
            orders=d.get("o", []),  # contexts checkpointed before order history was kept
            repeats=d.get("r", {}),
            last_ts=d["t"],
            session=d["s"],
            session_n=d["n"],
            feedback=d.get("f") or {},
        )

    def public(self) -> dict[str, Any]:
        """The part of the context storefronts may see (docs/redis.md)."""
        return {
            "recent": list(reversed(self.items)),
            "cart": self.cart,
            "bought": list(self.bought),
            "session": self.session,
            "last_ts": self.last_ts,
        }


def record_order(orders: list[list[Any]], event: Event, cfg: ModelConfig) -> None:
    """Add one purchase event as an order; keep the window and the bound."""
    priced = [line.price * line.quantity for line in event.lines if line.price is not None]
    amount = round(sum(priced), 2) if priced else None
    at = len(orders)
    while at and orders[at - 1][0] > event.ts:  # a late event goes where its time says
        at -= 1
    orders.insert(at, [event.ts, amount])
    horizon = orders[-1][0] - cfg.orders_keep_s
    drop = 0
    while drop < len(orders) and orders[drop][0] < horizon:
        drop += 1
    del orders[: max(drop, len(orders) - cfg.orders_max)]


class ContextBook:
    """All shopper contexts of one partition, with a bound on how many are kept."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.users: dict[str, ShopperContext] = {}
        self.dirty: set[str] = set()
        self.evicted: set[str] = set()
        # Of the last event learned: repeat purchases (item, interval s) for the item stage,
        # and purchases that start a repurchase cycle (item, ts, previous purchase ts or None).
        self.last_repeats: list[tuple[str, float]] = []
        self.last_purchases: list[tuple[str, float, float | None]] = []
        # "Next" evidence this partition's shoppers gave: [of it a pick of the item itself
        # again, all of it] (models/ranking.py, `repeat_share`); checkpointed with the contexts.
        self.picks = [0.0, 0.0]

    def repeat_rate(self) -> float:
        """The share of picks right after another that were the same item again."""
        return self.picks[0] / self.picks[1] if self.picks[1] > 0 else 0.0

    def get(self, user_id: str) -> ShopperContext | None:
        return self.users.get(user_id)

    def load(self, user_id: str, raw: bytes | str) -> None:
        self.users[user_id] = ShopperContext.from_json(raw)

    def learn(self, event: Event) -> Evidence | None:
        """Apply one event; returns its evidence, or None when the event_id was seen already."""
        cfg = self.config
        ctx = self.users.get(event.user_id)
        if ctx is None:
            if len(self.users) >= cfg.max_users:
                self._evict()
            ctx = self.users[event.user_id] = ShopperContext()
        elif event.event_id in ctx.seen:
            return None
        self.last_repeats = []
        self.last_purchases = []
        ctx.seen.append(event.event_id)
        while len(ctx.seen) > cfg.seen_ids_max:
            ctx.seen.popleft()
        self.dirty.add(event.user_id)
        now = event.ts
        if event.type in FEEDBACK_TYPES:  # models/feedback.py keeps what it needs
            return now, [], []
        if event.session_id is not None:
            ctx.session = event.session_id
        elif not ctx.session or now - ctx.last_ts > cfg.session_gap_s:
            ctx.session_n += 1
            ctx.session = f"~{ctx.session_n}"
        ctx.last_ts = max(ctx.last_ts, now)
        self._expire(ctx)
        marginals: list[tuple] = []
        pairs: list[tuple] = []
        if event.type == "remove_from_cart":
            for line in event.lines:
                left = ctx.cart.get(line.item_id, 0) - line.quantity
                if left > 0:
                    ctx.cart[line.item_id] = left
                else:
                    ctx.cart.pop(line.item_id, None)
            return now, marginals, pairs
        w_type = cfg.weight(event.type)
        b_type = w_type if event.type in BUY_TYPES else 0.0
        for line in event.lines:
            self._touch(ctx, line.item_id, w_type, b_type, now, marginals, pairs)
            if event.type == "add_to_cart":
                ctx.cart[line.item_id] = ctx.cart.get(line.item_id, 0) + line.quantity
            elif event.type == "purchase":
                ctx.cart.pop(line.item_id, None)
                prev = ctx.bought.pop(line.item_id, None)
                if prev is not None and now - prev < MIN_INTERVAL_S:
                    now_or_prev = prev  # the same need: the cycle runs from the first purchase
                else:
                    now_or_prev = now
                    if prev is not None and now > prev:
                        own = ctx.repeats.pop(line.item_id, [])
                        observe(own, now - prev, KEEP_PER_SHOPPER)
                        ctx.repeats[line.item_id] = own
                        self.last_repeats.append((line.item_id, now - prev))
                    self.last_purchases.append((line.item_id, now, prev))
                ctx.bought[line.item_id] = now_or_prev
        picks = self.picks
        for p in pairs:
            if p[6] > 0:
                picks[1] += p[6]
                if p[0] == p[1]:
                    picks[0] += p[6]
        while len(ctx.bought) > cfg.bought_max:
            del ctx.bought[next(iter(ctx.bought))]
        while len(ctx.repeats) > cfg.bought_max:
            del ctx.repeats[next(iter(ctx.repeats))]
        if event.type == "purchase":
            record_order(ctx.orders, event, cfg)
        return now, marginals, pairs

    def _touch(
        self, ctx: ShopperContext, item: str, w_type: float, b_type: float, now: float,
        marginals: list[tuple], pairs: list[tuple],
    ) -> None:
        # Hot path (every event): plain comparisons instead of min()/max() calls.
        items = ctx.items
        old = items.get(item)
        # (A purchase of an item in the cart is its checkout, not a pick.)
        if old is not None and old.session == ctx.session and next(reversed(items)) == item \
                and not (b_type >= self.config.weight("purchase") and item in ctx.cart):
            # Picked again right after itself in the session (a re-click, or a cart of the
            # item just viewed): "next" evidence of the item for itself (models/itemlists.py,
            # `repeat`); its support counts each shopper context once, on its first repeat.
            pairs.append((item, item, 0.0, 0.0, 0.0 if old.r else 1.0, 0.0, 1.0, 0.0))
            old.r += 1
        old = items.pop(item, None)
        w_old, b_old = (old.w, old.b) if old is not None else (0.0, 0.0)
        w_new = w_type if w_type > w_old else w_old
        b_new = b_type if b_type > b_old else b_old
        if w_new > w_old or b_new > b_old:
            marginals.append((item, w_new - w_old, b_new - b_old))
            session, history = ctx.session, self.config.history_factor
            new_item = w_old == 0
            # Steps back from this pick to each earlier pick of the session (newest is 1).
            step = sum(1 for t in items.values() if t.session == session) if new_item else 0
            for other, t in items.items():
                same = t.session == session
                f = 1.0 if same else history
                tw, tb = t.w, t.b
                da = ((w_new if w_new < tw else tw) - (w_old if w_old < tw else tw)) * f
                b_before = b_old if b_old < tb else tb
                db = ((b_new if b_new < tb else tb) - b_before) * f
                dn = 0.0
                if same and step:
                    dn = 1.0 / step if step <= self.config.next_steps else 0.0
                    step -= 1
                if da > 0 or db > 0:
                    na = f if new_item else 0.0
                    nb = f if db > 0 and b_before == 0 else 0.0
                    pairs.append((item, other, da, db, na, nb, 0.0, dn))
                    pairs.append((other, item, da, db, na, nb, dn, 0.0))
        if old is None:
            items[item] = Touch(w_new, b_new, now, ctx.session)
            if len(items) > self.config.context_max_items:
                del items[next(iter(items))]
        else:  # move to the end (most recent), updated in place
            old.w, old.b, old.session = w_new, b_new, ctx.session
            if now > old.ts:
                old.ts = now
            items[item] = old

    def _expire(self, ctx: ShopperContext) -> None:
        horizon = ctx.last_ts - self.config.history_s
        items = ctx.items
        # Items are kept in order of last touch, so expired ones are at the front; a late
        # (out-of-order) event can leave an older one behind, which the full pass catches.
        if items and next(iter(items.values())).ts < horizon:
            for item in [k for k, t in items.items() if t.ts < horizon]:
                del items[item]

    def _evict(self) -> None:
        """Drop the least recently active tenth of shoppers (by event time, ties by id)."""
        n = max(1, len(self.users) // 10)
        victims = sorted(self.users, key=lambda u: (self.users[u].last_ts, u))[:n]
        for u in victims:
            del self.users[u]
            self.dirty.discard(u)
            self.evicted.add(u)
