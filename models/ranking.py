"""The per-shopper "you may also need" list, built from the shopper's live context."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from models.config import ModelConfig
from models.context import ShopperContext
from models.graph import KINDS
from models.repurchase import DAY, predict
from models.scoring import top_rounded
from models.wording import WORDING

_DEFAULT = ModelConfig()
REVISIT_REASON = WORDING["revisit"]
REBUY_REASON = WORDING["rebuy"]
Revisit = tuple[float, str, dict[str, Any] | None]  # score, reason, evidence
# A suggestion that shares a cart item's category completes the cart (is no substitute) when
# at least this share of the cart item's buyers bought it too, at 95% confidence: yogurt
# with milk. Two of twenty buyers who bought a second phone are not that evidence.
TOGETHER_MIN_SHARE = 0.1
_NO_FACTS: Mapping[str, Any] = {}  # an item the catalog does not know (read only)


def anchors(ctx: ShopperContext, config: ModelConfig = _DEFAULT) -> list[str]:
    """Context items that seed suggestions, newest first."""
    return list(reversed(ctx.items))[: config.max_anchors]


def list_anchors(ctx: ShopperContext, config: ModelConfig = _DEFAULT) -> list[str]:
    """The anchors whose item lists are blended (the newest `list_anchors`), newest first."""
    return anchors(ctx, config)[: config.list_anchors]


def repeat_share(doc: Mapping[str, Any] | None, rate: float, prior: float) -> float:
    """The share of picks right after an item that were the item again, from its lists'
    `repeat` share of `picks` picks, drawn toward `rate` (the share over all items of the
    shopper's partition, `ContextBook.repeat_rate`) as if `prior` more picks had it: an item
    few shoppers picked next from says little, and shops differ (a click log re-clicks a
    third of the time, a shop whose carts follow other views almost never)."""
    share, picks = (doc.get("repeat") or 0.0, doc.get("picks") or 0.0) if doc else (0.0, 0.0)
    return (share * picks + prior * rate) / (picks + prior) if picks + prior > 0 else 0.0


def rank_for_user(
    ctx: ShopperContext,
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    config: ModelConfig = _DEFAULT,
    kind_weights: Mapping[str, float] | None = None,
    parts: Parts | None = None,
    repeat_rate: float = 0.0,
) -> list[dict[str, Any]]:
    """Blend the item lists of the shopper's anchors; drop what must never be suggested.

    Excluded: items in the cart, bought items that are not `rebuyable`, items the catalog
    marks out of stock, and the context items themselves unless `revisit_weight` lets viewed
    ones come back (the newest on repeat evidence only, `repeat_share` with `repeat_rate`,
    the shopper's partition's share). Rebuyable items not yet due (`not_due`) keep
    `not_due_weight` of their score: 0 leaves them out until due. `kind_weights` and
    `parts`: see `blend`.
    """
    seeds = [(a, ctx.items[a].b > 0) for a in anchors(ctx, config)]
    exclude = set(ctx.cart)
    revisit: dict[str, Revisit] = {}
    if config.revisit_weight > 0:
        for rank, (a, committed) in enumerate(seeds):
            if not committed and a not in exclude:
                if rank == 0:  # the item the shopper is on now
                    score = config.repeat_weight * config.viewed_weight * repeat_share(
                        item_lists.get(a), repeat_rate, config.repeat_prior)
                else:
                    score = config.revisit_weight * config.anchor_decay**rank
                if score > 0:
                    revisit[a] = (score, REVISIT_REASON, None)
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
                          * 0.5 ** (age / config.rebuy_half_life_s), REBUY_REASON,
                          {"bought": times})
    return blend(seeds[: config.list_anchors], item_lists, catalog, k, exclude, set(ctx.bought),
                 config, revisit, late, kind_weights, parts)


def head(config: ModelConfig, kind: str, rank: int) -> int:
    """How much of an anchor's list of `kind` the blend reads, `rank` anchors back."""
    n = config.per_anchor(kind)
    share = config.anchor_heads ** rank
    return n if share >= 1.0 else max(1, int(n * share + 0.5))


def listed(item_lists: Mapping[str, Mapping[str, Any] | None],
           config: ModelConfig = _DEFAULT, ranks: Mapping[str, int] | None = None) -> set[str]:
    """Every item the blend can read from these lists: the head of each kind per anchor, as
    read at the anchor's newest place among the shoppers' anchors (`ranks`; default: first)."""
    out: set[str] = set()
    for anchor, doc in item_lists.items():
        if not doc:
            continue
        rank = ranks.get(anchor, 0) if ranks is not None else 0
        for kind in KINDS:
            out.update(e["item_id"] for e in doc.get(kind, ())[:head(config, kind, rank)])
    return out


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
    """An anonymous cart, newest item last, ranked as a shopper who carted those items, with
    what completes the cart first (as `complete_cart` orders them, over every candidate, not
    only the first k). `catalog` must hold the categories of the cart's items and of the
    candidates (`listed`)."""
    seeds = [(a, True) for a in reversed(list(dict.fromkeys(cart)))][: config.max_anchors]
    kept, best = _scored(seeds, item_lists, catalog, set(cart) | (exclude or set()), set(),
                         config, None, None)
    head = _cut(kept, best, {}, k, config)
    together, alternatives, categories = _cart_basis(cart, item_lists, catalog, config)
    swap = {j for _, j in kept if j not in together and (
        j in alternatives or (catalog.get(j) or {}).get("category") in categories)}
    if not any(e["item_id"] in swap for e in head):
        return head
    # Complements below the first k take the substitutes' places; the places keep their
    # scores (`complete_cart`).
    first = _cut([c for c in kept if c[1] not in swap], best, {}, k, config)
    rest = _cut([c for c in kept if c[1] in swap], best, {}, k - len(first), config) \
        if len(first) < k else []
    return [dict(e, score=h["score"]) for e, h in zip(first + rest, head, strict=True)]


def _cart_basis(cart: Iterable[str], item_lists: Mapping[str, Mapping[str, Any] | None] | None,
                catalog: Mapping[str, Mapping[str, Any] | None], config: ModelConfig
                ) -> tuple[set[str], set[str], set[Any]]:
    """What `substitutes` reads from the cart items' lists and facts: the items enough of
    their buyers bought with them, their alternatives, and their categories."""
    together: set[str] = set()
    alternatives: set[str] = set()
    for a in cart:
        doc = (item_lists or {}).get(a) or {}
        together |= {e["item_id"]
                     for e in doc.get("cross_sell", ())[: config.per_anchor("cross_sell")]
                     if _share(e) >= TOGETHER_MIN_SHARE}
        alternatives |= {e["item_id"] for e in
                         doc.get("alternatives", ())[: config.per_anchor("alternatives")]}
    categories = {c for a in cart if (c := (catalog.get(a) or {}).get("category")) is not None}
    return together, alternatives, categories


def substitutes(
    entries: Iterable[Mapping[str, Any]],
    cart: Iterable[str],
    catalog: Mapping[str, Mapping[str, Any] | None],
    item_lists: Mapping[str, Mapping[str, Any] | None] | None = None,
    config: ModelConfig = _DEFAULT,
) -> set[str]:
    """Suggested items that would replace an item in the cart rather than complete it.

    A substitute of a cart item shares its catalog category, or is one of its alternatives
    (viewed together, not bought together), unless enough of the cart item's buyers bought
    the two together (`TOGETHER_MIN_SHARE`): that says it completes the cart (a second dairy
    item in a grocery basket). "Bought together" comes from the cart items' cross-sell lists
    in `item_lists` when given, and from the entries themselves (kind cross_sell, anchored on
    the cart item) always.
    """
    cart = list(dict.fromkeys(cart))
    entries = list(entries)
    together, alternatives, categories = _cart_basis(cart, item_lists, catalog, config)
    in_cart = set(cart)
    for e in entries:
        if e.get("anchor") in in_cart:
            if e.get("kind") == "cross_sell":
                if e["item_id"] not in together and _share(e) >= TOGETHER_MIN_SHARE:
                    together.add(e["item_id"])
            elif e.get("kind") == "alternatives":
                alternatives.add(e["item_id"])
    out = set()
    for e in entries:
        j = e["item_id"]
        if j in together:
            continue
        if j in alternatives or (catalog.get(j) or {}).get("category") in categories:
            out.add(j)
    return out


def _share(entry: Mapping[str, Any]) -> float:
    """A cross-sell entry's share of the anchor's buyers, as low as 95% confidence allows
    (Wilson's lower bound over `evidence.out_of` shoppers); the plain share without it."""
    evidence = entry.get("evidence") or {}
    p = evidence.get("share")
    if p is None:
        return float(entry.get("confidence", entry["score"]))
    n = evidence.get("out_of")
    if not n or n <= 0 or p < TOGETHER_MIN_SHARE:  # the bound is below the share
        return float(p)
    z2 = 1.96**2
    centre = p + z2 / (2 * n)
    spread = 1.96 * math.sqrt(max(0.0, p * (1 - p)) / n + z2 / (4 * n * n))
    return (centre - spread) / (1 + z2 / n)


def complete_cart(
    entries: list[dict[str, Any]],
    cart: Iterable[str],
    catalog: Mapping[str, Mapping[str, Any] | None],
    item_lists: Mapping[str, Mapping[str, Any] | None] | None = None,
    config: ModelConfig = _DEFAULT,
) -> list[dict[str, Any]]:
    """Ranked entries with the cart's complements first, each part in its own order.

    Substitutes of a cart item (`substitutes`) only fill what complements leave: a shopper
    who carted a phone needs its case, not three other phones. They are kept, after the
    rest, because an item the shop has evidence for still beats a popular filler. Scores
    are reassigned in the new order (the same multiset), so they stay non-increasing.
    """
    swap = substitutes(entries, cart, catalog, item_lists, config)
    if not swap:
        return entries
    ordered = [e for e in entries if e["item_id"] not in swap] + \
              [e for e in entries if e["item_id"] in swap]
    scores = [e["score"] for e in entries]
    return [dict(e, score=sc) for e, sc in zip(ordered, scores, strict=True)]


def blend(
    seeds: list[tuple[str, bool]],
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    exclude: set[str],
    bought: set[str],
    config: ModelConfig = _DEFAULT,
    revisit: Mapping[str, Revisit] | None = None,
    late: set[str] | None = None,
    kind_weights: Mapping[str, float] | None = None,
    parts: Parts | None = None,
) -> list[dict[str, Any]]:
    """Sum the anchors' list scores, newer anchors and carted anchors counting more.

    `seeds` are (item, carted or bought), newest first. Alternatives are offered only for
    items merely viewed: once a shopper commits to an item, substitutes are noise. `revisit`
    adds the shopper's own items (viewed lately, or bought and bought again by shoppers) with
    their own score and reason, always of kind "revisit". Items in `late` (rebuyable, not
    yet due) keep `not_due_weight` of their score. An entry keeps the `anchor` and `evidence`
    of its largest contribution, so it can be worded at read time (models/wording.py).

    `kind_weights` (learned, models/blend.py) multiply each evidence kind's contributions;
    None ranks with the configured weights alone. `parts`, when given, is filled with each
    kept candidate's score split by kind, before `kind_weights`, for the learner.
    """
    kept, best = _scored(seeds, item_lists, catalog, exclude, bought, config, revisit, late,
                         kind_weights, parts)
    return _cut(kept, best, revisit or {}, k, config)


Best = dict[str, tuple[float, str, Mapping[str, Any]]]  # item: its largest contribution
Parts = dict[str, dict[str, float]]  # item: evidence kind: its part of the item's score


def _scored(
    seeds: list[tuple[str, bool]],
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    exclude: set[str],
    bought: set[str],
    config: ModelConfig,
    revisit: Mapping[str, Revisit] | None,
    late: set[str] | None,
    kind_weights: Mapping[str, float] | None = None,
    parts: Parts | None = None,
) -> tuple[list[tuple[float, str]], Best]:
    """`blend`'s candidates, (score, item), and each one's largest contribution, uncut."""
    scores: dict[str, float] = {}
    best: Best = {}
    split: Parts = {}
    learning = parts is not None or kind_weights is not None  # the blend learner's (one test)
    scores_get, best_get = scores.get, best.get
    for j, (c, reason, _) in (revisit or {}).items():
        own = "rebuy" if reason == REBUY_REASON else "revisit"
        if parts is not None:
            split[j] = {own: c}
        if kind_weights is not None:
            c *= kind_weights.get(own, 1.0)
        scores[j] = c
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
            entries = lists.get(kind, ())[:head(config, kind, rank)]
            if learning:
                lw = 1.0 if kind_weights is None else kind_weights.get(kind, 1.0)
                for e in entries:
                    j, c = e["item_id"], e["score"] * kw
                    if parts is not None:
                        own = split.setdefault(j, {})
                        own[kind] = own.get(kind, 0.0) + c
                    if kind_weights is not None:
                        c *= lw
                    _add(scores, best, j, c, kind, e)
                continue
            # `_add` written out: this loop is most of a shopper's ranking.
            for e in entries:
                j, c = e["item_id"], e["score"] * kw
                old = scores_get(j)
                if old is None:
                    scores[j] = c
                    best[j] = (c, kind, e)
                    continue
                scores[j] = old + c
                top = best_get(j)
                if top is None or c > top[0]:
                    best[j] = (c, kind, e)
    kept = []
    for j, score in scores.items():
        if j in exclude:
            continue
        facts = catalog.get(j) or _NO_FACTS
        if facts.get("in_stock") is False:
            continue
        if j in bought and not rebuyable(j, item_lists, facts):
            continue
        if late and j in late:
            score *= config.not_due_weight
            if j in split:
                split[j] = {kind: x * config.not_due_weight for kind, x in split[j].items()}
        kept.append((score, j))
        if parts is not None:
            parts[j] = split[j]
    return kept, best


def _add(scores: dict[str, float], best: Best, j: str, c: float, kind: str,
         e: Mapping[str, Any]) -> None:
    """Add contribution `c` to `j`'s score; keep it as `j`'s largest if it is."""
    old = scores.get(j)
    if old is None:
        scores[j] = c
        best[j] = (c, kind, e)
        return
    scores[j] = old + c
    top = best.get(j)
    if top is None or c > top[0]:
        best[j] = (c, kind, e)


def _cut(kept: list[tuple[float, str]], best: Best, revisit: Mapping[str, Revisit], k: int,
         config: ModelConfig) -> list[dict[str, Any]]:
    """The top k of `_scored` candidates as list entries."""
    out = []
    for score, (_, j) in top_rounded(kept, k, config.score_digits):
        # A context item is shown as one the shopper looked at, whatever else points to it.
        if j in revisit:
            _, reason, evidence = revisit[j]
            entry = {"item_id": j, "score": score, "kind": "revisit", "reason": reason}
            if evidence:
                entry["evidence"] = evidence
        else:
            _, kind, e = best[j]
            entry = {"item_id": j, "score": score, "kind": kind, "reason": e["reason"]}
            if "anchor" in e:
                entry["anchor"] = e["anchor"]
                entry["evidence"] = e.get("evidence") or {}
        out.append(entry)
    return out
