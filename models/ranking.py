"""The per-shopper "you may also need" list, built from the shopper's live context."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
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
    scored = score_for_user(ctx, item_lists, catalog, config, kind_weights, parts, repeat_rate)
    out = scored.cut(k, catalog)
    if parts is not None:  # the learner compares only what could be shown
        for j in [j for j in parts if not in_stock(catalog, j)]:
            del parts[j]
    return out


def score_for_user(
    ctx: ShopperContext,
    item_lists: Mapping[str, Mapping[str, list[dict[str, Any]]] | None],
    catalog: Mapping[str, Mapping[str, Any] | None],
    config: ModelConfig = _DEFAULT,
    kind_weights: Mapping[str, float] | None = None,
    parts: Parts | None = None,
    repeat_rate: float = 0.0,
) -> Scored:
    """`rank_for_user` before the cut: every candidate scored, stock not yet checked.

    `catalog` must hold the facts of the shopper's context items, of their newest bought
    items (`rebuy_candidates`) and of bought items among the candidates (`listed`); the
    other candidates' facts are only read by the cut (`Scored.unchecked` names them).
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
    kept, best = _scored(seeds[: config.list_anchors], item_lists, catalog, exclude,
                         set(ctx.bought), config, revisit, late, kind_weights, parts)
    return Scored(kept, best, revisit, config)


def in_stock(catalog: Mapping[str, Mapping[str, Any] | None], j: str) -> bool:
    """Whether `j` may be suggested as far as stock goes: not marked out of stock."""
    return (catalog.get(j) or _NO_FACTS).get("in_stock") is not False


class Scored:
    """A shopper's scored candidates (`score_for_user`), before the cut to k in stock.

    Stock is checked last, walking down the list, so a caller whose catalog facts are far
    away (the stream reads them from Redis) needs them only for the head of the list, not
    for every candidate: `unchecked` names the facts the cut would read and lacks.
    """

    def __init__(self, kept: list[tuple[float, str]], best: Best,
                 revisit: Mapping[str, Revisit], config: ModelConfig) -> None:
        self.kept, self.best, self.revisit, self.config = kept, best, revisit, config
        self._heads: dict[int, list[tuple[float, tuple]]] = {}

    def head(self, n: int) -> list[tuple[float, tuple]]:
        """The best n candidates, stock unchecked (`top_rounded`). Kept for the next call:
        `top_rounded`'s order is total, so a longer head kept already gives a shorter one."""
        longer = min((m for m in self._heads if m >= n), default=None)
        if longer is None:
            self._heads[n] = top_rounded(self.kept, n, self.config.score_digits)
            return self._heads[n]
        return self._heads[longer][:n]

    def cut(self, k: int, catalog: Mapping[str, Mapping[str, Any] | None]
            ) -> list[dict[str, Any]]:
        """The best k candidates in stock, as list entries."""
        return _entries(_walk(self.head, k, catalog)[0], self.best, self.revisit)

    def unchecked(self, k: int, catalog: Mapping[str, Mapping[str, Any] | None]) -> set[str]:
        """Candidates whose facts `cut(k, catalog)` reads and `catalog` does not hold (not
        even as None): an item without facts counts as in stock, so once these are read
        and added, the cut is the one a catalog with every candidate's facts gives."""
        return _walk(self.head, k, catalog, unknown=True)[1]


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
    return _cut(kept, best, revisit or {}, k, config, catalog)


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
        # Stock is checked at the cut (`_cut`), for the head of the list only.
        if j in bought and not rebuyable(j, item_lists, catalog.get(j) or _NO_FACTS):
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


def _walk(head: Callable[[int], list[tuple[float, tuple]]], k: int,
          catalog: Mapping[str, Mapping[str, Any] | None], unknown: bool = False
          ) -> tuple[list[tuple[float, tuple]], set[str]]:
    """Down the list (`head(n)`: the best n, `top_rounded`), the first k candidates in stock;
    with `unknown`, those without facts in `catalog` count as in stock and are also
    returned by name."""
    n = k
    while True:
        ranked = head(n)
        chosen: list[tuple[float, tuple]] = []
        missing: set[str] = set()
        for r in ranked:
            j = r[1][1]
            if unknown and j not in catalog:
                missing.add(j)
            elif not in_stock(catalog, j):
                continue
            chosen.append(r)
            if len(chosen) == k:
                return chosen, missing
        if len(ranked) < n:  # every candidate seen
            return chosen, missing
        n *= 2  # out-of-stock items took places: look further down


def _cut(kept: list[tuple[float, str]], best: Best, revisit: Mapping[str, Revisit], k: int,
         config: ModelConfig, catalog: Mapping[str, Mapping[str, Any] | None]
         ) -> list[dict[str, Any]]:
    """The top k of `_scored` candidates in stock, as list entries."""
    return _entries(_walk(lambda n: top_rounded(kept, n, config.score_digits), k, catalog)[0],
                    best, revisit)


def _entries(chosen: list[tuple[float, tuple]], best: Best, revisit: Mapping[str, Revisit]
             ) -> list[dict[str, Any]]:
    """Chosen candidates, (rounded score, (score, item)), as list entries."""
    out = []
    for score, (_, j) in chosen:
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
