"""Item graph: decayed co-occurrence counts and the item lists built from them.

Rows (an item's neighbours) are keyed by item, so each row lives in exactly one partition.
Marginals (how strong each item is overall) are needed by every row that names the item, so
every partition keeps all of them (they are small: three floats per item).

Time decay is *forward decay*: an increment at event time ts is stored multiplied by
2 ** ((ts - landmark) / half_life). Sums then never need touching as time passes; dividing by
the same factor at "now" gives the decayed count. The landmark moves in fixed steps of event
time, so two runs over the same events rebase at the same points.
Pure logic, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import orjson

from models.config import ModelConfig
from models.repurchase import DAY, KEEP_PER_ITEM, crowd_cycle, observe
from models.scoring import confidence_lift, pair_llr, round_sig, top_rounded
from models.trending import trending_score

KINDS = ("cross_sell", "alternatives", "next")
_REBASE_STEP = 16  # half-lives; stored factors stay below 2**32


class ItemGraph:
    def __init__(self, config: ModelConfig | None = None) -> None:
        self.config = config or ModelConfig()
        self.rows: dict[str, dict[str, list[float]]] = {}
        # item -> [all, buy, last event ts, all at the trending half-life (models/trending.py)]
        self.marg: dict[str, list[float]] = {}
        self.total = [0.0, 0.0]
        self.landmark: float | None = None
        self.now = 0.0
        self.dirty: set[str] = set()  # rows changed since the caller last cleared it
        self.dirty_marg: set[str] = set()  # marginals changed since the caller last cleared it
        self.touched: set[str] = set()  # like dirty, for a second consumer (list publishing)
        self.marg_touched: set[str] = set()  # like dirty_marg, for trending publishing
        self.dropped: set[str] = set()  # rows pruned since the caller last cleared it
        # item -> newest repeat-purchase intervals of all shoppers (s): repurchase cycles
        self.cycles: dict[str, list[float]] = {}
        self.dirty_cycles: set[str] = set()

    # -- counting -----------------------------------------------------------------------------

    def _factor(self, ts: float) -> float:
        h = self.config.half_life_s
        # The faster of the two decays sets the step, so neither stored factor overflows.
        step = min(h, self.config.trending_half_life_s) * _REBASE_STEP
        if self.landmark is None:
            self.landmark = math.floor(ts / step) * step
        elif ts - self.landmark > 2 * step:
            self._rebase(math.floor(ts / step) * step)
        return 2.0 ** ((ts - self.landmark) / h)

    def _rebase(self, landmark: float) -> None:
        c = 2.0 ** (-(landmark - self.landmark) / self.config.half_life_s)
        ct = 2.0 ** (-(landmark - self.landmark) / self.config.trending_half_life_s)
        for m in self.marg.values():
            m[0] *= c
            m[1] *= c
            m[3] *= ct
        for row in self.rows.values():
            for v in row.values():
                for n in range(len(v)):
                    v[n] *= c
        self.total = [self.total[0] * c, self.total[1] * c]
        self.landmark = landmark

    def apply(self, ts: float, marginals: Iterable[tuple], pairs: Iterable[tuple]) -> None:
        """Add one event's evidence (models/context.py). Pairs are for rows this graph owns;
        marginals for all items."""
        g = self._factor(ts)
        total = self.total
        marg = self.marg
        gt = 2.0 ** ((ts - self.landmark) / self.config.trending_half_life_s) if marginals \
            else 0.0
        for item, da, db in marginals:
            m = marg.get(item)
            if m is None:
                marg[item] = [da * g, db * g, ts, da * gt]
            else:
                m[0] += da * g
                m[1] += db * g
                if ts > m[2]:
                    m[2] = ts
                m[3] += da * gt
            total[0] += da * g
            total[1] += db * g
            self.dirty_marg.add(item)
            self.marg_touched.add(item)
        rows = self.rows
        for p in pairs:
            item, other, da, db, na, nb = p[:6]
            dn = p[6] if len(p) > 6 else 0.0  # evidence written before "next" existed
            row = rows.get(item)
            if row is None:
                row = rows[item] = {}
            v = row.get(other)
            if v is None:
                row[other] = [da * g, db * g, na * g, nb * g, dn * g]
                if len(row) > self.config.max_neighbours:
                    self._prune_row(row)
            else:
                v[0] += da * g
                v[1] += db * g
                v[2] += na * g
                v[3] += nb * g
                v[4] += dn * g
            self.dirty.add(item)
            self.touched.add(item)
        if ts > self.now:
            self.now = ts
        if len(marg) > self.config.max_items:
            self._prune_items()

    def advance(self, ts: float) -> None:
        """Move "now" to event time `ts` without evidence (an event that changed no count
        still ages every count)."""
        self.apply(ts, (), ())

    def _prune_row(self, row: dict[str, list[float]]) -> None:
        """Keep the strongest three quarters of the neighbour bound (ties by id)."""
        keep = sorted(row.items(), key=lambda kv: (-kv[1][0], kv[0]))
        keep = keep[: self.config.max_neighbours * 3 // 4]
        row.clear()
        row.update(keep)

    def _prune_items(self) -> None:
        """Forget the quarter of items seen least recently, with their rows."""
        n = len(self.marg) - self.config.max_items * 3 // 4
        victims = sorted(self.marg, key=lambda k: (self.marg[k][2], k))[:n]
        for item in victims:
            del self.marg[item]
            self.dirty_marg.discard(item)
            self.marg_touched.discard(item)
            if self.rows.pop(item, None) is not None:
                self.dirty.discard(item)
                self.touched.discard(item)
                self.dropped.add(item)
            if self.cycles.pop(item, None) is not None:
                self.dirty_cycles.discard(item)
                self.dropped.add(item)

    def repeat(self, item: str, interval_s: float) -> None:
        """A shopper bought `item` again after `interval_s` (models/repurchase.py)."""
        history = self.cycles.get(item)
        if history is None:
            history = self.cycles[item] = []
        if observe(history, interval_s, KEEP_PER_ITEM):
            self.dirty_cycles.add(item)
            self.touched.add(item)  # its published document carries the cycle

    def repurchase(self, item: str) -> dict[str, Any] | None:
        """The item's repurchase cycle as published in cw:item, once enough repeats were seen."""
        history = self.cycles.get(item) or ()
        cycle = crowd_cycle(history)
        if cycle is None:
            return None
        return {"cycle_days": round(cycle / DAY, 2), "intervals": len(history)}

    # -- scoring ------------------------------------------------------------------------------

    def lists(self, item: str) -> dict[str, list[dict[str, Any]]]:
        """Cross-sell, alternatives and next picks for `item`, as counted up to `self.now`."""
        cfg = self.config
        row, mi = self.rows.get(item), self.marg.get(item)
        if not row or mi is None or self.landmark is None:
            return {k: [] for k in KINDS}
        s = 2.0 ** (-(self.now - self.landmark) / cfg.half_life_s)
        ni_a, ni_b = mi[0] * s, mi[1] * s
        tot_a, tot_b = self.total[0] * s, self.total[1] * s
        min_support, llr_min, share = cfg.min_support, cfg.llr_min, cfg.alt_max_buy_share
        found: dict[str, list[tuple]] = {k: [] for k in KINDS}
        marg = self.marg
        # "next" is the share of what shoppers picked right after `item` (sequential rules);
        # its lift and G² (of the all channel) are only shown, never tested.
        next_total = sum(v[4] for v in row.values())
        nexts = []
        for other, (a, b, na, nb, dn) in row.items():
            if dn > 0 and na * s >= min_support and other in marg:
                nexts.append((dn / next_total, other, a * s, ni_a, marg[other][0] * s, tot_a,
                              na * s))
            # Support is counted in shopper contexts, not weights: one keen shopper is noise.
            # G² is only computed here when it filters; otherwise for the kept entries below.
            if nb * s >= min_support and ni_b > 0 and (mj := marg.get(other)) is not None:
                args = (b * s, ni_b, mj[1] * s, tot_b)
                conf, lift = confidence_lift(*args)
                if lift > 1.0 and (llr_min <= 0 or pair_llr(*args) >= llr_min):
                    found["cross_sell"].append((conf, other, *args, nb * s))
                    continue
            if na * s >= min_support and b <= share * a and (mj := marg.get(other)) is not None:
                args = (a * s, ni_a, mj[0] * s, tot_a)
                conf, lift = confidence_lift(*args)
                if lift > 1.0 and (llr_min <= 0 or pair_llr(*args) >= llr_min):
                    found["alternatives"].append((conf, other, *args, na * s))
        found["next"] = nexts
        digits = cfg.score_digits
        out: dict[str, list[dict[str, Any]]] = {}
        for kind, cands in found.items():
            out[kind] = [_entry(item, kind, score, c, digits)
                         for score, c in top_rounded(cands, cfg.list_size, digits)]
        return out

    def trending(self, items: Iterable[str]) -> dict[str, float]:
        """Trending scores of `items` (models/trending.py), comparable across partitions."""
        if self.landmark is None:
            return {}
        h = self.config.trending_half_life_s
        return {i: trending_score(m[3], self.landmark, h) for i in items
                if (m := self.marg.get(i)) is not None and m[3] > 0}

    # -- persistence --------------------------------------------------------------------------

    def row_json(self, item: str) -> bytes | None:
        row = self.rows.get(item)
        return None if row is None else orjson.dumps(row)

    def load_row(self, item: str, raw: bytes | str) -> None:
        row = orjson.loads(raw)
        for v in row.values():
            if len(v) < 5:  # checkpoint written before "next" existed
                v.append(0.0)
        self.rows[item] = row

    def marg_json(self, item: str) -> bytes | None:
        m = self.marg.get(item)
        return None if m is None else orjson.dumps(m)

    def load_marg(self, item: str, raw: bytes | str) -> None:
        m = orjson.loads(raw)
        if len(m) < 4:  # checkpoint written before trending had its own half-life
            m.append(m[0])
        self.marg[item] = m

    def cycle_json(self, item: str) -> bytes | None:
        history = self.cycles.get(item)
        return None if history is None else orjson.dumps(history)

    def load_cycle(self, item: str, raw: bytes | str) -> None:
        self.cycles[item] = orjson.loads(raw)

    def meta(self) -> dict[str, Any]:
        return {"total": self.total, "landmark": self.landmark, "now": self.now}

    def load_meta(self, d: dict[str, Any]) -> None:
        self.total, self.landmark, self.now = list(d["total"]), d["landmark"], d["now"]

    def counts(self, item: str) -> dict[str, Any]:
        """Decayed counts at `now`, for inspection and tests."""
        if self.landmark is None:
            return {}
        s = 2.0 ** (-(self.now - self.landmark) / self.config.half_life_s)
        m = self.marg.get(item, [0.0, 0.0, 0.0])
        return {
            "all": m[0] * s,
            "buy": m[1] * s,
            "pairs": {k: [x * s for x in v] for k, v in self.rows.get(item, {}).items()},
        }


_REASONS = {
    "cross_sell": "bought together by {:.0%} of {}'s buyers",
    "alternatives": "viewed together by {:.0%} of {}'s viewers",
    "next": "{:.0%} of picks right after {}",
}


def _entry(anchor: str, kind: str, score: float, c: tuple, digits: int) -> dict[str, Any]:
    """`c` is (score, item, pair count, count of anchor, count of item, total, support)."""
    conf, item, pair, n_i, n_j, total, support = c
    _, lift = confidence_lift(pair, n_i, n_j, total)
    return {
        "item_id": item,
        "score": score,
        "kind": kind,
        "reason": _REASONS[kind].format(conf, anchor),
        "confidence": score,
        "lift": round_sig(lift, digits),
        # Absolute, not significant, digits: near independence G² is a difference of nearly
        # equal sums, and its last significant digits depend on the order counts were added.
        "llr": round(pair_llr(pair, n_i, n_j, total), 4) if lift > 1.0 else 0.0,
        "support": round_sig(support, digits),
    }
