"""The per-shopper "you may also need" list, built from the shopper's live context."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from models.config import ModelConfig
from models.context import ShopperContext
from models.graph import KINDS
from models.repurchase import DAY, predict
from models.scoring import top_rounded

_DEFAULT = ModelConfig()
REVISIT_REASON = "you looked at it recently"
REBUY_REASON = "you bought it before"


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

    Excluded: items in the cart, bought items that are not `rebuyable`, items the catalog
    marks out of stock, and the context items themselves unless `revisit_weight` lets viewed
    ones come back. Rebuyable items not yet due (`not_due`) keep `not_due_weight` of their
    score: 0 leaves them out until due.
    """
    seeds = [(a, ctx.items[a].b > 0) for a in anchors(ctx, config)]
    exclude = set(ctx.cart)
    revisit: dict[str, tuple[float, str]] = {}
    if config.revisit_weight > 0:
        for rank, (a, committed) in enumerate(seeds):
            if not committed and a not in exclude:
                revisit[a] = (config.revisit_weight * config.anchor_decay**rank, REVISIT_REASON)
        exclude |= {i for i in ctx.items if i not in revisit}
    else:
        exclude |= set(ctx.items)
    w_late = config.not_due_weight
    late = not_due(ctx, item_lists, catalog, config) if w_late < 1 else set()
    if w_late <= 0:
        exclude |= late
    for j in rebuy_candidates(ctx, config):
        if j not in exclude and j not in revisit \
                and rebuyable(j, item_lists, catalog.get(j) or {}):
            times = 1 + len(ctx.repeats.get(j, ()))
            age = max(0.0, ctx.last_ts - ctx.bought[j])
            revisit[j] = (config.rebuy_weight * times
                          * 0.5 ** (age / config.rebuy_half_life_s), REBUY_REASON)
    return blend(seeds, item_lists, catalog, k, exclude, set(ctx.bought), config, revisit, late)


def listed(item_lists: Mapping[str, Mapping[str, Any] | None],
           config: ModelConfig = _DEFAULT) -> set[str]:
    """Every item the blend can read from these lists: the head of each kind per anchor."""
    return {e["item_id"] for doc in item_lists.values() if doc for kind in KINDS
            for e in doc.get(kind, ())[: config.per_anchor(kind)]}


def rebuy_candidates(ctx: ShopperContext, config: ModelConfig = _DEFAULT) -> list[str]:
    """The shopper's newest bought items, newest first: those the rebuy source may offer."""
    if config.rebuy_weight <= 0:
        return []
    return list(reversed(ctx.bought))[: config.rebuy_max]


def cycles_needed(bought: Iterable[str], offered: set[str],
                  catalog: Mapping[str, Mapping[str, Any] | None]) -> set[str]:
    """Bought items that may be offered and whose return hangs on a learned cycle (`rebuyable`,
    `not_due`): their lists must be read. A shop's `consumable: false` settles it without."""
    return {j for j in bought
            if j in offered and (catalog.get(j) or {}).get("consumable") is not False}


def rebuyable(j: str, item_lists: Mapping[str, Mapping[str, Any] | None],
              facts: Mapping[str, Any]) -> bool:
    """May a shopper who bought `j` be offered it again?

    The shop's `consumable` flag decides when the catalog sets it; when it does not, the
    shoppers do: an item with a learned repurchase cycle (bought again by several shoppers,
    models/repurchase.py) is one people buy again. Its lists must be in `item_lists`.
    """
    flag = facts.get("consumable")
    if flag is not None:
        return bool(flag)
    return bool((item_lists.get(j) or {}).get("repurchase"))


def not_due(ctx: ShopperContext, item_lists: Mapping[str, Mapping[str, Any] | None],
            catalog: Mapping[str, Mapping[str, Any] | None],
            config: ModelConfig = _DEFAULT) -> set[str]:
    """Bought consumables the shopper should not run out of yet, as of their last event.

    Due = bought + expected cycle - lead (models/repurchase.py). Only items whose cycle is
    known can be judged: a consumable without one may come back, as the shop flagged it.
    """
    out = set()
    for j, bought_ts in ctx.bought.items():
        if not rebuyable(j, item_lists, catalog.get(j) or {}):
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
    revisit: Mapping[str, tuple[float, str]] | None = None,
    late: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Sum the anchors' list scores, newer anchors and carted anchors counting more.

    `seeds` are (item, carted or bought), newest first. Alternatives are offered only for
    items merely viewed: once a shopper commits to an item, substitutes are noise. `revisit`
    adds the shopper's own items (viewed lately, or bought and bought again by shoppers) with
    their own score and reason, always of kind "revisit". Items in `late` (rebuyable, not
    yet due) keep `not_due_weight` of their score.
    """
    scores: dict[str, float] = {}
    best: dict[str, tuple[float, str, str]] = {}
    for j, (c, why) in (revisit or {}).items():
        scores[j] = c
        best[j] = (c, "revisit", why)
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
        if j in bought and not rebuyable(j, item_lists, facts):
            continue
        if late and j in late:
            score *= config.not_due_weight
        kept.append((score, j))
    out = []
    revisit = revisit or {}
    for score, (_, j) in top_rounded(kept, k, config.score_digits):
        # A context item is shown as one the shopper looked at, whatever else points to it.
        kind, reason = ("revisit", revisit[j][1]) if j in revisit else best[j][1:]
        out.append({"item_id": j, "score": score, "kind": kind, "reason": reason})
    return out
