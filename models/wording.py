"""What a shopper reads next to a suggestion: the one place the words live (docs/model.md).

List entries carry facts, not sentences: their `kind`, the `anchor` (the item whose evidence
put them there) and `evidence` numbers. The workers do not know product names, and a shop
may want its own language, so the text is rendered here, at read time, from those facts and
the catalog's names. A shop translates or rewords by passing its own table with the same keys.
Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from models.scoring import round_sig

Catalog = Mapping[str, Mapping[str, Any] | None]

# A percentage is shown only when it rests on at least this many shoppers (the estimated
# shoppers the share is out of, `evidence.out_of`): at 50 a share is known to about +-14
# points (95%), enough for "about 40%" to be honest; "100%" of 3 buyers never shows.
MIN_SHARE_BASE = 50.0
# Below this a share rounds to "0%" or reads as no reason at all: the plain phrase instead.
MIN_SHARE = 0.05

# Keys: the entry kind, "<kind>.share" (a percentage may be shown), "<kind>.unnamed" (the
# anchor has no name in the catalog: never show its raw id). Placeholders: {anchor} (a
# product name), {share} (e.g. "40%"), {category} (a category name).
WORDING: dict[str, str] = {
    "cross_sell": "often bought together with {anchor}",
    "cross_sell.share": "{share} of shoppers who bought {anchor} also bought this",
    "cross_sell.unnamed": "often bought together",
    "alternatives": "often compared with {anchor}",
    "alternatives.share": "{share} of shoppers who looked at {anchor} also looked at this",
    "alternatives.unnamed": "often compared by the same shoppers",
    "next": "often picked just before or after {anchor}",
    "next.unnamed": "often picked in the same visit",
    "upsell": "a step up from {anchor}",
    "upsell.unnamed": "a step up, considered by the same shoppers",
    "revisit": "you looked at it recently",
    "rebuy": "you bought it before",
    "pinned": "recommended by the shop",
    "new": "new in the shop, picked for returning customers",
    "trending": "popular in the shop right now",
    "trending.category": "popular in {category} right now",
    "other": "picked for you",
}
SHARE_KINDS = ("cross_sell", "alternatives", "next")

# What an answer says when it is short of evidence-based items, by the code of
# `models.rules.shortfall`: what happened, never "no evidence" when a rule emptied the list.
NOTES: dict[str, str] = {
    "no_evidence": "Popular in the shop: suggestions follow as you browse.",
    "held": "You already have what usually goes with these: popular items instead.",
    "out_of_stock": "What usually goes with these is out of stock: popular items instead.",
    "rules": "The shop hides some suggestions here: popular items instead.",
    "frequency_cap": "You have seen today's suggestions: popular items instead.",
}


def evidence_fields(kind: str, share: float, shoppers: float,
                    digits: int = 9) -> dict[str, float]:
    """The numbers behind a list entry, as fields a storefront can word itself.

    `share`: the entry's confidence; `shoppers`: the decayed shopper contexts with the pair
    (its support), both already rounded to `digits` by the caller (list building is the
    model's largest cost: no second rounding); `out_of`: about how many shoppers the share
    is of (shoppers / share), for cross-sell and alternatives only: a next pick's share is of
    weighted picks, not shoppers, so no percentage of shoppers is claimed for it.
    """
    out = {"share": share, "shoppers": shoppers}
    if kind != "next" and share > 0:
        # From the rounded numbers: two runs that sum counts in another order agree on them.
        out["out_of"] = round_sig(shoppers / share, digits)
    return out


def name_of(item_id: str | None, catalog: Catalog) -> str | None:
    """The catalog's name for an item, or None: callers word around a missing name."""
    if not item_id:
        return None
    name = (catalog.get(item_id) or {}).get("name")
    return name.strip() if isinstance(name, str) and name.strip() else None


def share_text(evidence: Mapping[str, Any]) -> str | None:
    """"40%" when the share rests on enough shoppers (`MIN_SHARE_BASE`), else None."""
    share, base = evidence.get("share"), evidence.get("out_of")
    if not isinstance(share, int | float) or not isinstance(base, int | float):
        return None
    if base < MIN_SHARE_BASE or not MIN_SHARE <= share <= 1.0:
        return None
    return f"{round(share * 100)}%"


def render(entry: Mapping[str, Any], catalog: Catalog,
           table: Mapping[str, str] = WORDING) -> str:
    """The reason text for one entry, from its kind, anchor and evidence and the names."""
    kind = entry.get("kind") or "other"
    evidence = entry.get("evidence") or {}
    if kind == "revisit":
        return _pick(table, "rebuy" if evidence.get("bought") else "revisit")
    if kind == "trending":
        category = evidence.get("category")
        if category:
            return _pick(table, "trending.category", "trending").format(category=category)
        return _pick(table, "trending")
    if kind not in SHARE_KINDS and kind != "upsell":
        return _pick(table, kind if kind in table or kind in WORDING else "other")
    anchor = name_of(entry.get("anchor"), catalog)
    if anchor is None:
        return _pick(table, f"{kind}.unnamed")
    share = share_text(evidence) if kind in SHARE_KINDS else None
    if share is not None and f"{kind}.share" in table:
        return table[f"{kind}.share"].format(anchor=anchor, share=share)
    return _pick(table, kind).format(anchor=anchor)


def render_all(entries: Iterable[Mapping[str, Any]], catalog: Catalog,
               table: Mapping[str, str] = WORDING) -> list[dict[str, Any]]:
    """Copies of `entries` with `reason` rendered and `anchor_name` added where there is one.

    `catalog` must hold the facts of the entries' anchors (their names), not only of the
    suggested items.
    """
    out = []
    for e in entries:
        d = dict(e)
        d["reason"] = render(e, catalog, table)
        if e.get("anchor"):
            d["anchor_name"] = name_of(e["anchor"], catalog)
        out.append(d)
    return out


def anchors_of(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """Anchor ids whose names rendering needs, first seen first (for one catalog read)."""
    return list(dict.fromkeys(e["anchor"] for e in entries if e.get("anchor")))


def note(code: str | None, table: Mapping[str, str] = NOTES) -> dict[str, str] | None:
    """The answer's note: a stable `code` to branch on and its `text`, or None."""
    if code is None:
        return None
    return {"code": code, "text": table.get(code) or NOTES.get(code) or code}


def _pick(table: Mapping[str, str], *keys: str) -> str:
    """The first key the table has; a shop's partial table falls back to the defaults."""
    for key in keys:
        if key in table:
            return table[key]
    for key in keys:
        if key in WORDING:
            return WORDING[key]
    return table.get("other", WORDING["other"])
