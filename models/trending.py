"""Trending items: the cold-start answer when a shopper or an item has no evidence yet.

An item's popularity is its decayed interaction weight (views, carts and purchases weighted
as in the co-occurrence counts, halving every `trending_half_life_s`, faster than the counts
that build item lists). The graph stores it forward
decayed: value * 2 ** ((ts - landmark) / half_life). Its log2 plus landmark / half_life is a
*trending score* that no longer depends on the landmark or on "now": scores written by
different partitions at different times compare directly, and a score never has to be
rewritten just because time passed. Two scores differ by log2 of the ratio of the
popularities at any common moment. Pure logic, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from models.scoring import round_sig


def trending_score(forward_value: float, landmark: float, half_life_s: float) -> float:
    return math.log2(forward_value) + landmark / half_life_s


def relative_popularity(score: float, top_score: float) -> float:
    """Popularity as a share of the most popular item's: 2 ** (score - top)."""
    return 2.0 ** min(0.0, score - top_score)


def trending_entries(
    ranked: Iterable[tuple[str, float]],
    catalog: Mapping[str, Mapping[str, Any] | None],
    k: int,
    exclude: set[str] | frozenset[str] = frozenset(),
    category: str | None = None,
    top_score: float | None = None,
    digits: int = 9,
) -> list[dict[str, Any]]:
    """Suggestion entries from (item, trending score) pairs, best first.

    Skips excluded and out-of-stock items. Scores are popularity relative to `top_score`
    (the shop's or category's most popular item), so they fall in (0, 1].
    """
    out: list[dict[str, Any]] = []
    where = f"in {category}" if category else "in the shop"
    for item, score in ranked:
        if item in exclude:
            continue
        facts = catalog.get(item) or {}
        if facts.get("in_stock") is False:
            continue
        if top_score is None:
            top_score = score
        entry: dict[str, Any] = {
            "item_id": item,
            "score": round_sig(relative_popularity(score, top_score), digits),
            "kind": "trending",
            "reason": f"popular {where} right now",
        }
        if category:  # worded at read time as "popular in {category} right now"
            entry["evidence"] = {"category": category}
        out.append(entry)
        if len(out) >= k:
            break
    return out
