"""The per-shopper "you may also need" list, built from the shopper's live context."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.config import ModelConfig
from models.context import ShopperContext
from models.repurchase import DAY, predict
from models.scoring import top_rounded

_DEFAULT = ModelConfig()
REVISIT_REASON = "you looked at it recently"


def anchors(ctx: ShopperContext, config: ModelConfig = _DEFAULT) -> list[str]:
    """Context items that seed suggestions, newest first."""
    return list(reversed(ctx.items))[: config.max_anchors]


def rank_for_user(
    ctx: ShopperContext,
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    config: ModelConfig = _DEFAULT,
) -> list[dict[str, Any]]:
    """Blend the item lists of the shopper's anchors; drop what must never be suggested.

    Excluded: items in the cart, bought durable items, bought consumables not yet due
    (`not_due`), items the catalog marks out of stock, and the context items themselves
    unless `revisit_weight` lets viewed ones come back.
    """
    seeds = [(a, ctx.items[a].b > 0) for a in anchors(ctx, config)]
    exclude = set(ctx.cart)
    revisit: dict[str, float] = {}
    if config.revisit_weight > 0:
        for rank, (a, committed) in enumerate(seeds):
            if not committed and a not in exclude:
                revisit[a] = config.revisit_weight * config.anchor_decay**rank
        exclude |= {i for i in ctx.items if i not in revisit}
    else:
        exclude |= set(ctx.items)
    exclude |= not_due(ctx, item_lists, catalog, config)
    return blend(seeds, item_lists, catalog, k, exclude, set(ctx.bought), config, revisit)


def not_due(ctx: ShopperContext, item_lists: Mapping[str, Mapping[str, Any] | None],
            catalog: Mapping[str, Mapping[str, Any] | None],
            config: ModelConfig = _DEFAULT) -> set[str]:
    """Bought consumables the shopper should not run out of yet, as of their last event.

    Due = bought + expected cycle - lead (models/repurchase.py). Only items whose cycle is
    known can be judged: a consumable without one may come back, as the shop flagged it.
    """
    out = set()
    for j, bought_ts in ctx.bought.items():
        if not (catalog.get(j) or {}).get("consumable"):
            continue
        learned = (item_lists.get(j) or {}).get("repurchase")
        crowd = learned["cycle_days"] * DAY if learned else None
        estimate = predict(ctx.repeats.get(j, ()), crowd)
        if estimate is not None and \
                ctx.last_ts < bought_ts + estimate.cycle_s - config.replenish_lead_s:
            out.add(j)
    return out


def rank_for_cart(
    cart: list[str],
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    exclude: set[str] | None = None,
    config: ModelConfig = _DEFAULT,
) -> list[dict[str, Any]]:
    """An anonymous cart, newest item last, ranked as a shopper who carted those items."""
    seeds = [(a, True) for a in reversed(list(dict.fromkeys(cart)))][: config.max_anchors]
    return blend(seeds, item_lists, catalog, k, set(cart) | (exclude or set()), set(), config)


def blend(
    seeds: list[tuple[str, bool]],
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    exclude: set[str],
    bought: set[str],
    config: ModelConfig = _DEFAULT,
    revisit: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Sum the anchors' list scores, newer anchors and carted anchors counting more.

    `seeds` are (item, carted or bought), newest first. Alternatives are offered only for
    items merely viewed: once a shopper commits to an item, substitutes are noise. `revisit`
    adds context items themselves, with their own score, always of kind "revisit".
    """
    scores: dict[str, float] = {}
    best: dict[str, tuple[float, str, str]] = {}
    for j, c in (revisit or {}).items():
        scores[j] = c
        best[j] = (c, "revisit", REVISIT_REASON)
    for rank, (anchor, committed) in enumerate(seeds):
        lists = item_lists.get(anchor)
        if not lists:
            continue
        w = (1.0 if committed else config.viewed_weight) * config.anchor_decay**rank
        sources = [("cross_sell", w)]
        if config.next_weight > 0:
            sources.append(("next", w * config.next_weight))
        if not committed:
            sources.append(("alternatives", w * config.alternatives_weight))
        for kind, kw in sources:
            for e in lists.get(kind, ())[: config.per_anchor(kind)]:
                j, c = e["item_id"], e["score"] * kw
                old = scores.get(j)
                if old is None:
                    scores[j] = c
                    best[j] = (c, kind, e["reason"])
                else:
                    scores[j] = old + c
                    if c > best[j][0]:
                        best[j] = (c, kind, e["reason"])
    kept = []
    for j, score in scores.items():
        if j in exclude:
            continue
        facts = catalog.get(j) or {}
        if facts.get("in_stock") is False:
            continue
        if j in bought and not facts.get("consumable", False):
            continue
        kept.append((score, j))
    out = []
    revisit = revisit or {}
    for score, (_, j) in top_rounded(kept, k, config.score_digits):
        # A context item is shown as one the shopper looked at, whatever else points to it.
        kind, reason = ("revisit", REVISIT_REASON) if j in revisit else best[j][1:]
        out.append({"item_id": j, "score": score, "kind": kind, "reason": reason})
    return out
