"""Audience for a product: the shoppers most likely to buy it who have not (SPEC 1).

The merchant picks a product; evidence runs backwards through the item lists: shoppers who
carted or bought a related item j, where j's buyers often went on to the product, are its
likely buyers; those who only viewed j count less, and older touches fade. Pure logic, no
I/O: api/ reads the lists and the audience index (cw:buyers, cw:viewers), this ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DAY = 86400.0
# How much a view of a related item counts against carting or buying it.
VIEW_WEIGHT = 0.3
# A touch this old counts half (the item graph's own half-life, docs/model.md).
HALF_LIFE_S = 14 * DAY
# Related items read per product: the head of its lists carries nearly all the evidence.
RELATED_PER_KIND = {"cross_sell": 20, "next": 10, "alternatives": 10}


@dataclass(frozen=True)
class Related:
    item_id: str
    strength: float  # how often shoppers who touched this item went on to the product
    kind: str  # which list of the product it came from


def related_items(target: str, doc: Mapping[str, Any] | None,
                  docs: Mapping[str, Mapping[str, Any] | None]) -> list[Related]:
    """Items whose shoppers are evidence for `target`, strongest first.

    The strength is `target`'s score in the related item's own list (its buyers went on to
    the target), else half the related item's score in the target's list (co-occurrence
    is symmetric, confidence is not: the reverse direction is weaker evidence).
    """
    out: dict[str, Related] = {}
    for kind, n in RELATED_PER_KIND.items():
        for e in (doc or {}).get(kind, ())[:n]:
            j = e["item_id"]
            if j == target or j in out:
                continue
            strength = 0.5 * e["score"]
            other = docs.get(j) or {}
            for back_kind in ("cross_sell", "next", "alternatives"):
                for b in other.get(back_kind, ()):
                    if b["item_id"] == target and b["score"] > strength:
                        strength = b["score"]
            if strength > 0:
                out[j] = Related(j, strength, kind)
    return sorted(out.values(), key=lambda r: (-r.strength, r.item_id))


def rank_audience(
    related: Sequence[Related],
    touches: Mapping[str, tuple[Sequence[tuple[str, float]], Sequence[tuple[str, float]]]],
    now: float,
    k: int,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, Any]]:
    """Shoppers ranked by the evidence they carry, each with the touch that counted most.

    `touches[j]` = (buyers, viewers) of related item j as (user, last ts). `exclude` holds
    shoppers known to own the product already.
    """
    score: dict[str, float] = {}
    best: dict[str, tuple[float, str, str, float]] = {}
    for r in related:
        buyers, viewers = touches.get(r.item_id, ((), ()))
        # One related item counts once per shopper: a view before the cart is the same interest.
        mine: dict[str, tuple[float, str, str, float]] = {}
        for channel, rows, w in (("bought or carted", buyers, 1.0),
                                 ("viewed", viewers, VIEW_WEIGHT)):
            for user, ts in rows:
                if user in exclude:
                    continue
                c = r.strength * w * 0.5 ** (max(0.0, now - ts) / HALF_LIFE_S)
                if user not in mine or c > mine[user][0]:
                    mine[user] = (c, r.item_id, channel, ts)
        for user, got in mine.items():
            score[user] = score.get(user, 0.0) + got[0]
            if user not in best or got[0] > best[user][0]:
                best[user] = got
    ranked = sorted(score, key=lambda u: (-score[u], u))[:k]
    out = []
    for u in ranked:
        _, item, channel, ts = best[u]
        days = max(0.0, now - ts) / DAY
        out.append({"user_id": u, "score": round(score[u], 6), "because": item,
                    "reason": f"{channel} {item} {_ago(days)}", "last_touch": ts})
    return out


def _ago(days: float) -> str:
    if days < 1:
        return "today"
    if days < 2:
        return "yesterday"
    return f"{days:.0f} days ago"
