"""The cart placement: what completes the cart comes before what would replace an item in it
(docs/model.md, "The cart placement"). Pure logic, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from models.config import ModelConfig
from models.ranking import _cut, _scored

_DEFAULT = ModelConfig()
# A suggestion that shares a cart item's category completes the cart (is no substitute) when
# at least this share of the cart item's buyers bought it too, at 95% confidence: yogurt
# with milk. Two of twenty buyers who bought a second phone are not that evidence.
TOGETHER_MIN_SHARE = 0.1


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
    head = _cut(kept, best, {}, k, config, catalog)
    together, alternatives, categories = _cart_basis(cart, item_lists, catalog, config)
    swap = {j for _, j in kept if j not in together and (
        j in alternatives or (catalog.get(j) or {}).get("category") in categories)}
    if not any(e["item_id"] in swap for e in head):
        return head
    # Complements below the first k take the substitutes' places; the places keep their
    # scores (`complete_cart`).
    first = _cut([c for c in kept if c[1] not in swap], best, {}, k, config, catalog)
    rest = _cut([c for c in kept if c[1] in swap], best, {}, k - len(first), config, catalog) \
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
