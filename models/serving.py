"""What the storefront API answers, from the documents the workers wrote (docs/api.md).

The workers precompute item lists and shopper lists; serving only selects, filters by the
catalog as it is now (stock, price) and fills short answers with trending items, so a lookup
is a few Redis reads and no scoring. Pure logic, no I/O: api/ fetches, this decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from models.scoring import round_sig
from models.trending import trending_entries
from models.wording import WORDING

ITEM_KINDS = ("cross_sell", "alternatives", "next", "upsell")
PLACEMENTS = ("product", "cart", "home", "new")
# What an answer keeps of a stored entry: the facts rendering words (models/wording.py), not
# the scoring internals (confidence, lift, support) a storefront has no use for.
ENTRY_FIELDS = ("item_id", "score", "kind", "reason", "anchor", "evidence")
# Items read past k to survive the stock filter without a second round trip.
HEADROOM = 10
# Next to a cart: complements and what shoppers went on to pick; substitutes and revisits of
# items not chosen there compete with what was chosen.
PLACEMENT_KINDS: dict[str, tuple[str, ...] | None] = {
    "product": None,
    "cart": ("cross_sell", "next"),
    "home": None,
    # "New for you": what the shopper never touched, without their own items (revisits and
    # rebuys); a storefront shows recently viewed items in a widget of its own.
    "new": ("cross_sell", "next", "alternatives"),
}

Catalog = Mapping[str, Mapping[str, Any] | None]


def candidates(entries: Iterable[Mapping[str, Any]], k: int) -> list[str]:
    """Item ids whose catalog facts serving needs: the head of a list, with headroom."""
    out = []
    for e in entries:
        out.append(e["item_id"])
        if len(out) >= k + HEADROOM:
            break
    return out


def in_stock(entries: Iterable[dict[str, Any]], catalog: Catalog, k: int,
             exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """The first k entries that are not excluded and not marked out of stock."""
    out = []
    for e in entries:
        if e["item_id"] in exclude or (catalog.get(e["item_id"]) or {}).get("in_stock") is False:
            continue
        out.append({f: e[f] for f in ENTRY_FIELDS if f in e})
        if len(out) >= k:
            break
    return out


def upsell(anchor: str, doc: Mapping[str, Any] | None, anchor_facts: Mapping[str, Any] | None,
           catalog: Catalog, k: int, digits: int = 9) -> list[dict[str, Any]]:
    """Alternatives at a higher price in the anchor's category (SPEC 1, price ladder).

    Needs the anchor's price; an alternative without a known price is left out rather than
    guessed. Ordered by how often shoppers considered both, as for alternatives.
    """
    facts = anchor_facts or {}
    price, category = facts.get("price"), facts.get("category")
    if not doc or price is None:
        return []
    out = []
    for e in doc.get("alternatives", ()):
        other = catalog.get(e["item_id"]) or {}
        p = other.get("price")
        if p is None or p <= price or other.get("in_stock") is False:
            continue
        if category is not None and other.get("category") not in (None, category):
            continue
        entry = {
            "item_id": e["item_id"],
            "score": e["score"],
            "kind": "upsell",
            # Worded at read time with the anchor's name (models/wording.py); the price step
            # stays a field, not text.
            "reason": WORDING["upsell.unnamed"],
            "anchor": anchor,
            "price_ratio": round_sig(p / price, digits) if price > 0 else None,
        }
        if e.get("evidence"):
            entry["evidence"] = e["evidence"]
        out.append(entry)
        if len(out) >= k:
            break
    return out


def upsell_trending(ranked: Iterable[tuple[str, float]], anchor_facts: Mapping[str, Any] | None,
                    catalog: Catalog) -> list[tuple[str, float]]:
    """Trending items that qualify as an upsell: same category, dearer than the anchor."""
    facts = anchor_facts or {}
    price = facts.get("price")
    if price is None:
        return []
    return [(i, s) for i, s in ranked
            if (p := (catalog.get(i) or {}).get("price")) is not None and p > price]


def for_placement(entries: Iterable[Mapping[str, Any]], placement: str) -> list[Mapping[str, Any]]:
    kinds = PLACEMENT_KINDS[placement]
    return [e for e in entries if kinds is None or e.get("kind") in kinds]


def user_exclusions(doc: Mapping[str, Any] | None, catalog: Catalog,
                    placement: str = "product") -> set[str]:
    """Items a shopper must not be offered as a filler: what they hold or own (durables);
    for the "new" placement, everything they bought."""
    if not doc:
        return set()
    ctx = doc.get("context") or {}
    out = set(ctx.get("recent", ())) | set(ctx.get("cart", {}))
    out |= {i for i in ctx.get("bought", ())
            if placement == "new" or not (catalog.get(i) or {}).get("consumable")}
    return out


def fill(entries: list[dict[str, Any]], trending: list[tuple[list[tuple[str, float]], str | None]],
         catalog: Catalog, k: int, exclude: set[str]) -> tuple[list[dict[str, Any]], str | None]:
    """Top up a short answer from trending sets, most specific first.

    `trending` is [(ranked (item, score), category or None for shop-wide)]. Returns the
    entries and which fallback was used: None, "trending:<category>" or "trending".
    """
    used: str | None = None
    taken = exclude | {e["item_id"] for e in entries}
    for ranked, category in trending:
        if len(entries) >= k:
            break
        top = ranked[0][1] if ranked else None
        more = trending_entries(ranked, catalog, k - len(entries), taken, category, top)
        if more:
            used = used or (f"trending:{category}" if category else "trending")
            entries = entries + more
            taken |= {e["item_id"] for e in more}
    return entries, used


def enrich(entries: list[dict[str, Any]], catalog: Catalog) -> list[dict[str, Any]]:
    """Add the catalog facts a storefront renders (name, price, category) where known."""
    for e in entries:
        facts = catalog.get(e["item_id"]) or {}
        e["name"] = facts.get("name")
        e["price"] = facts.get("price")
        e["category"] = facts.get("category")
    return entries
