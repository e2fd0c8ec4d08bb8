"""An item's lists (cross-sell, alternatives, next picks) from its row of the item graph.

Finding the candidates is one pass over the row (models/graph.py calls `find`); ranking them
and making entries is most of a list's cost. Entries carry lift, G² and evidence, and a
shopper's list reads only ids and scores of the head of each list, so the library ranks only
that head and makes entries only of what it shows (models/recommender.py); the stream makes
whole lists (`Candidates.lists`). Both give the same entries. Pure logic, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models.config import ModelConfig
from models.scoring import confidence_lift, pair_llr, round_sig, top_rounded
from models.wording import evidence_fields, render

KINDS = ("cross_sell", "alternatives", "next")
# `picks` only weighs an item's repeat share against its partition's (models/ranking.py): two
# digits say enough, and keep a list that did not change from being rewritten as time decays it.
PICKS_DIGITS = 2
# No names here: the text shown to shoppers is rendered again at read time, with them
# (models/wording.py); this one, without the anchor, serves readers that do not render.
REASONS = {kind: render({"kind": kind}, {}) for kind in KINDS}


@dataclass(frozen=True, slots=True)
class Candidates:
    """One item's candidates of each kind, as counted at one time, unranked.

    A candidate is (score, item, pair count, count of item, support), its counts as the graph
    stores them (undecayed: the objects themselves, so keeping them copies nothing); `facts`
    decays them. Tuples, not lists: kept until the list is next recomputed, they drop out of
    the garbage collector's view once it has seen them hold no containers.
    """

    decay: float  # stored count -> count at the time
    found: dict[str, tuple[tuple, ...]]  # kind -> candidates
    base: dict[str, tuple[float, float]]  # kind -> (count of the anchor, total), decayed
    # Of the picks right after the item (`picks`, decayed), the share that were the item
    # itself: a re-click, or a cart of the item just viewed (models/ranking.py, repeat_share).
    repeat: float = 0.0
    picks: float = 0.0

    def facts(self, kind: str, c: tuple) -> tuple:
        """(score, item, pair count, count of the anchor, count of item, total, support),
        decayed with the same arithmetic as the pass that found the candidate."""
        s = self.decay
        n_i, total = self.base[kind]
        return c[0], c[1], c[2] * s, n_i, c[3] * s, total, c[4] * s

    def ranked(self, kind: str, n: int, digits: int) -> list[tuple[float, tuple]]:
        """The `n` best of a kind, (rounded score, candidate), as `lists` ranks them."""
        return top_rounded(self.found[kind], n, digits)

    def lists(self, anchor: str, config: ModelConfig) -> dict[str, Any]:
        """Each kind's list (the `list_size` best entries), and `repeat` of `picks`."""
        size, digits = config.list_size, config.score_digits
        out: dict[str, Any] = {kind: [entry(anchor, kind, score, self.facts(kind, c), digits)
                                      for score, c in self.ranked(kind, size, digits)]
                               for kind in self.found}
        out["repeat"], out["picks"] = self.repeat, self.picks
        return out

    def evidence(self, kind: str, item: str, digits: int) -> dict[str, float]:
        """The `evidence` of `item`'s entry in the list of `kind`, alone."""
        for c in self.found[kind]:
            if c[1] == item:
                return evidence_fields(kind, round_sig(c[0], digits),
                                       round_sig(c[4] * self.decay, digits), digits)
        raise KeyError(f"{item} is not a {kind} candidate")

    @classmethod
    def none(cls) -> Candidates:
        return cls(1.0, dict.fromkeys(KINDS, ()), {})


def find(item: str, row: dict[str, list[float]], mi: list[float],
         marg: dict[str, list[float]], total: list[float], s: float,
         cfg: ModelConfig) -> Candidates:
    """The candidates of `item` with row `row` and totals `mi`; `s` decays stored counts."""
    ni_a, ni_b = mi[0] * s, mi[1] * s
    tot_a, tot_b = total[0] * s, total[1] * s
    min_support, llr_min, share = cfg.min_support, cfg.llr_min, cfg.alt_max_buy_share
    # "next" is the share of what shoppers picked right after the item (sequential rules),
    # with what they picked right before it counting `before_weight` as much; its lift and G²
    # (of the all channel) are only shown, never tested. `picks` and `repeat` are of the
    # picks after it alone.
    next_total = sum([v[4] for v in row.values()])
    before = cfg.before_weight
    near_total = next_total + before * sum([v[5] for v in row.values()]) if before > 0 \
        else next_total
    own = row.get(item)  # (0, 0, shopper contexts, 0, picks): models/context.py, `_touch`
    repeat = own[4] / next_total if own is not None and own[4] > 0 \
        and own[2] * s >= min_support else 0.0
    cross: list[tuple] = []
    alts: list[tuple] = []
    nexts: list[tuple] = []
    buy, view = ni_b > 0 and tot_b > 0, ni_a > 0 and tot_a > 0
    # confidence_lift inlined (the same arithmetic, `min` written out): this loop is the cost
    # of finding candidates.
    for other, (a, b, na, nb, dn, dp) in row.items():
        mj = marg.get(other)
        if mj is None or other == item:
            continue
        na_s = na * s
        if before > 0 and dp > 0:
            dn += before * dp
        if dn > 0 and na_s >= min_support:
            nexts.append((dn / near_total, other, a, mj[0], na))
        # Support is counted in shopper contexts, not weights: one keen shopper is noise.
        # G² is only computed here when it filters; otherwise for the entries made.
        if buy and nb * s >= min_support:
            nj = mj[1] * s
            if nj > 0:
                pair = b * s
                conf = pair / ni_b
                conf = conf if conf < 1.0 else 1.0
                lift_base = nj / tot_b
                if conf / (lift_base if lift_base < 1.0 else 1.0) > 1.0 and (
                        llr_min <= 0 or pair_llr(pair, ni_b, nj, tot_b) >= llr_min):
                    cross.append((conf, other, b, mj[1], nb))
                    continue
        if view and na_s >= min_support and b <= share * a:
            nj = mj[0] * s
            if nj > 0:
                pair = a * s
                conf = pair / ni_a
                conf = conf if conf < 1.0 else 1.0
                lift_base = nj / tot_a
                if conf / (lift_base if lift_base < 1.0 else 1.0) > 1.0 and (
                        llr_min <= 0 or pair_llr(pair, ni_a, nj, tot_a) >= llr_min):
                    alts.append((conf, other, a, mj[0], na))
    return Candidates(s, {"cross_sell": tuple(cross), "alternatives": tuple(alts),
                          "next": tuple(nexts)},
                      {"cross_sell": (ni_b, tot_b), "alternatives": (ni_a, tot_a),
                       "next": (ni_a, tot_a)},
                      round_sig(repeat, cfg.score_digits),
                      round_sig(next_total * s, PICKS_DIGITS))


def entry(anchor: str, kind: str, score: float, c: tuple, digits: int) -> dict[str, Any]:
    """A list entry: `score` is the rounded score of `c` (`Candidates.facts`)."""
    conf, item, pair, n_i, n_j, total, support = c
    _, lift = confidence_lift(pair, n_i, n_j, total)
    shoppers = round_sig(support, digits)
    return {
        "item_id": item,
        "score": score,
        "kind": kind,
        "anchor": anchor,
        "evidence": evidence_fields(kind, score, shoppers, digits),
        "reason": REASONS[kind],
        "confidence": score,
        "lift": round_sig(lift, digits),
        # Absolute, not significant, digits: near independence G² is a difference of nearly
        # equal sums, and its last significant digits depend on the order counts were added.
        "llr": round(pair_llr(pair, n_i, n_j, total), 4) if lift > 1.0 else 0.0,
        "support": shoppers,
    }
