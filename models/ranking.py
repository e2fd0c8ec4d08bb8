"""The per-shopper "you may also need" list, built from the shopper's live context."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.context import ShopperContext
from models.scoring import round_sig

MAX_ANCHORS = 10
ANCHOR_DECAY = 0.8  # each older anchor counts this much less than the next newer one
VIEWED_WEIGHT = 0.6  # an item only viewed says less about intent than one carted or bought
ALTERNATIVES_WEIGHT = 0.5  # alternatives are offered for items viewed, never for items bought
# Only the head of each anchor's lists can reach a shopper's top 20; reading more costs time.
PER_ANCHOR = {"cross_sell": 20, "alternatives": 10}


def anchors(ctx: ShopperContext) -> list[str]:
    """Context items that seed suggestions, newest first."""
    return list(reversed(ctx.items))[:MAX_ANCHORS]


def rank_for_user(
    ctx: ShopperContext,
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    digits: int = 9,
) -> list[dict[str, Any]]:
    """Blend the item lists of the shopper's anchors; drop what must never be suggested.

    Excluded: the context items themselves, items in the cart, bought durable items
    (consumables may come back) and items the catalog marks out of stock.
    """
    seeds = [(a, ctx.items[a].b > 0) for a in anchors(ctx)]
    exclude = set(ctx.items) | set(ctx.cart)
    return blend(seeds, item_lists, catalog, k, exclude, set(ctx.bought), digits)


def rank_for_cart(
    cart: list[str],
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    exclude: set[str] | None = None,
    digits: int = 9,
) -> list[dict[str, Any]]:
    """An anonymous cart, newest item last, ranked as a shopper who carted those items."""
    seeds = [(a, True) for a in reversed(list(dict.fromkeys(cart)))][:MAX_ANCHORS]
    return blend(seeds, item_lists, catalog, k, set(cart) | (exclude or set()), set(), digits)


def blend(
    seeds: list[tuple[str, bool]],
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    exclude: set[str],
    bought: set[str],
    digits: int = 9,
) -> list[dict[str, Any]]:
    """Sum the anchors' list scores, newer anchors and carted anchors counting more.

    `seeds` are (item, carted or bought), newest first. Alternatives are offered only for
    items merely viewed: once a shopper commits to an item, substitutes are noise.
    """
    scores: dict[str, float] = {}
    best: dict[str, tuple[float, str, str]] = {}
    for rank, (anchor, committed) in enumerate(seeds):
        lists = item_lists.get(anchor)
        if not lists:
            continue
        w = (1.0 if committed else VIEWED_WEIGHT) * ANCHOR_DECAY**rank
        sources = [("cross_sell", w)]
        if not committed:
            sources.append(("alternatives", w * ALTERNATIVES_WEIGHT))
        for kind, kw in sources:
            for e in lists.get(kind, ())[: PER_ANCHOR[kind]]:
                j, c = e["item_id"], e["score"] * kw
                scores[j] = scores.get(j, 0.0) + c
                if j not in best or c > best[j][0]:
                    best[j] = (c, kind, e["reason"])
    out = []
    for j, score in scores.items():
        if j in exclude:
            continue
        facts = catalog.get(j) or {}
        if facts.get("in_stock") is False:
            continue
        if j in bought and not facts.get("consumable", False):
            continue
        _, kind, reason = best[j]
        out.append({"item_id": j, "score": round_sig(score, digits), "kind": kind,
                    "reason": reason})
    out.sort(key=lambda e: (-e["score"], e["item_id"]))
    return out[:k]
