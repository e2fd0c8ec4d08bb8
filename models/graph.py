"""Item graph: decayed co-occurrence counts and the item lists built from them.

Rows (an item's neighbours) are keyed by item, so each row lives in exactly one partition.
Marginals (how strong each item is overall) are needed by every row that names the item, so
every partition keeps all of them (they are small: three floats per item).

Time decay is *forward decay*: an increment at event time ts is stored multiplied by
2 ** ((ts - landmark) / half_life). Sums then never need touching as time passes; dividing by
the same factor at "now" gives the decayed count. The landmark moves in fixed steps of event
time, so two runs over the same events rebase at the same points.

Bounds (`max_neighbours` per row, `max_items` in all) are enforced so that the result does
not depend on the order evidence arrives in, which the stream does not fix: evidence from
several source partitions interleaves differently in every run. Each piece of evidence carries
its source partition and that source's clock (the newest event time the source has seen, so
it only grows along the source's own log). Evidence falls in fixed epochs of that clock
(`prune_epoch_s`). Epoch k is closed once every source's clock has passed its end: no more
evidence of it can come. Only then, and only on the evidence of closed epochs, are rows
pruned and items forgotten; evidence of open epochs counts in every list at once, and is kept
aside too (`open_rows`, `open_marg`) so that a prune can tell it apart.
Pure logic, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from models.config import ModelConfig
from models.graphstate import GraphState
from models.itemlists import KINDS, Candidates, find
from models.repurchase import DAY, KEEP_PER_ITEM, crowd_cycle, observe
from models.scoring import round_sig
from models.trending import trending_score

__all__ = ["KINDS", "ItemGraph"]
_REBASE_STEP = 16  # half-lives; stored factors stay below 2**32


class ItemGraph(GraphState):
    """`sources` > 0: the number of source partitions whose clocks close epochs (above);
    0 prunes at once, in arrival order (for one ordered stream only, e.g. unit tests)."""

    def __init__(self, config: ModelConfig | None = None, sources: int = 0) -> None:
        self.config = config or ModelConfig()
        self.sources = sources
        self.clocks: dict[int, float] = {}  # source partition -> its clock
        self.closed: int | None = None  # the last closed epoch
        # epoch -> item -> other -> the row entry's evidence of that (open) epoch
        self.open_rows: dict[int, dict[str, dict[str, list[float]]]] = {}
        # epoch -> item -> [all, buy, last ts, all at trending half-life] of that epoch
        self.open_marg: dict[int, dict[str, list[float]]] = {}
        self.dirty_open: set[tuple[int, str, str]] = set()  # (epoch, "r" or "m", item)
        # item -> newest closed epoch with evidence of it: what `max_items` forgets by
        self.seen_epoch: dict[str, int] = {}
        self.dirty_seen: set[str] = set()  # items whose seen_epoch changed or went
        self.dropped_open: set[tuple[int, str, str]] = set()  # open evidence closed since
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
        self.dropped_marg: set[str] = set()  # totals forgotten since the caller last cleared it
        # item -> newest repeat-purchase intervals of all shoppers (s): repurchase cycles
        self.cycles: dict[str, list[float]] = {}
        self.dirty_cycles: set[str] = set()
        # item -> the sum of its row's numbers (stored, undecayed), kept as evidence is added;
        # absent: count it from the row. And item -> a stamp of the last change to its row or
        # cycle other than added evidence (a prune, a load, a new cycle). Both for `list_due`.
        self._mass: dict[str, float] = {}
        self._reshaped: dict[str, int] = {}
        self._shapes = 0
        # For a stage that checkpoints rows as patches (models/rowpatch.py), once it sets
        # `changed` and `open_changed` to dicts (None: not tracked, as in the library): the
        # entries of each row and open row changed since the caller last cleared them; rows
        # whose entries went or were replaced (`whole`); every count rescaled (`rescaled`).
        self.changed: dict[str, set[str]] | None = None
        self.open_changed: dict[tuple[int, str, str], set[str]] | None = None
        self.whole: set[str] = set()
        self.rescaled = False

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

    def _decay_now(self) -> float:
        """What a stored count is multiplied by to read it decayed at "now" (1 before any)."""
        if self.landmark is None:
            return 1.0
        return 2.0 ** (-(self.now - self.landmark) / self.config.half_life_s)

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
        for item in self._mass:
            self._mass[item] *= c
        for margs in self.open_marg.values():
            for m in margs.values():
                m[0] *= c
                m[1] *= c
                m[3] *= ct
        for rows in self.open_rows.values():
            for row in rows.values():
                for v in row.values():
                    for n in range(len(v)):
                        v[n] *= c
        self.total = [self.total[0] * c, self.total[1] * c]
        self.landmark = landmark
        # Every stored number changed: a checkpoint must write all of it again.
        self.rescaled = True
        self.dirty.update(self.rows)
        self.dirty_marg.update(self.marg)
        for epoch, rows in self.open_rows.items():
            self.dirty_open.update((epoch, "r", item) for item in rows)
        for epoch, margs in self.open_marg.items():
            self.dirty_open.update((epoch, "m", item) for item in margs)

    def apply(self, ts: float, marginals: Iterable[tuple], pairs: Iterable[tuple],
              src: int = 0, clock: float | None = None, close: bool = True) -> None:
        """Add one event's evidence (models/context.py). Pairs are for rows this graph owns;
        marginals for all items. `clock`: the source's clock at this event (default `ts`).
        `close=False` leaves closing epochs to a later call (a message of many events)."""
        if self.sources:
            self._evidence_epoch(src, clock, ts, marginals, pairs)
            if close:
                self._close_due()
            return
        self._add(ts, marginals, pairs)
        if len(self.marg) > self.config.max_items:
            self._prune_items()

    def _add(self, ts: float, marginals: Iterable[tuple], pairs: Iterable[tuple],
             epoch: int | None = None) -> None:
        g = self._factor(ts)
        total = self.total
        marg = self.marg
        gt = 2.0 ** ((ts - self.landmark) / self.config.trending_half_life_s) if marginals \
            else 0.0
        open_marg = None if epoch is None else self.open_marg.setdefault(epoch, {})
        for item, da, db in marginals:
            add = [da * g, db * g, ts, da * gt]
            _add_marg(marg, item, add)
            if open_marg is not None:
                _add_marg(open_marg, item, add)
                self.dirty_open.add((epoch, "m", item))
            total[0] += da * g
            total[1] += db * g
            self.dirty_marg.add(item)
            self.marg_touched.add(item)
        rows = self.rows
        open_rows = None if epoch is None else self.open_rows.setdefault(epoch, {})
        immediate = epoch is None
        cap = self.config.max_neighbours
        dirty, touched, dirty_open = self.dirty, self.touched, self.dirty_open
        mass = self._mass
        changed, open_changed = self.changed, self.open_changed
        for p in pairs:
            if len(p) == 8:
                item, other, da, db, na, nb, dn, dp = p
            else:  # evidence written before "next" (6) or "before" (7) existed
                item, other, da, db, na, nb = p[:6]
                dn = p[6] if len(p) > 6 else 0.0
                dp = 0.0
            add = [da * g, db * g, na * g, nb * g, dn * g, dp * g]
            row = rows.get(item)
            if row is None:
                row = rows[item] = {}
                if changed is not None:
                    self.whole.add(item)
            if item in mass:
                mass[item] += add[0] + add[1] + add[4] + add[5]
            if _add_entry(row, other, add) and immediate and len(row) > cap + (item in row):
                self._prune_row(item, row)
            if changed is not None:
                ch = changed.get(item)
                if ch is None:
                    changed[item] = {other}
                else:
                    ch.add(other)
            if open_rows is not None:
                orow = open_rows.get(item)
                if orow is None:
                    orow = open_rows[item] = {}
                _add_entry(orow, other, add)
                key = (epoch, "r", item)
                dirty_open.add(key)
                if open_changed is not None:
                    och = open_changed.get(key)
                    if och is None:
                        open_changed[key] = {other}
                    else:
                        och.add(other)
            dirty.add(item)
            touched.add(item)
        if ts > self.now:
            self.now = ts

    # -- epochs: bounds that do not depend on arrival order -----------------------------------

    def epoch_of(self, clock: float) -> int:
        return math.floor(clock / self.config.prune_epoch_s)

    def _evidence_epoch(self, src: int, clock: float | None, ts: float,
                        marginals: Iterable[tuple], pairs: Iterable[tuple]) -> None:
        if clock is None and (marginals or pairs):
            clock = ts  # evidence always comes with its source's clock; older callers
        if clock is not None and clock > self.clocks.get(src, -math.inf):
            self.clocks[src] = clock
        if not marginals and not pairs:  # only moves "now" (and the source's clock)
            self._add(ts, (), ())
            return
        # The entry's own clock: entries of one message are applied out of event order
        # (all totals, then all pairs), and the source's newest clock may be a later event's.
        epoch = self.epoch_of(clock)
        if self.closed is not None and epoch <= self.closed:
            # Cannot happen with clocks that only grow; counted rather than lost.
            epoch = self.closed + 1
        self._add(ts, marginals, pairs, epoch)

    def close_due(self) -> None:
        """Close every epoch that all sources' clocks have passed."""
        self._close_due()

    def _close_due(self) -> None:
        if len(self.clocks) < self.sources:
            return  # a source not heard from yet may still send any epoch
        done = self.epoch_of(min(self.clocks.values())) - 1  # every epoch before the slowest's
        # Epochs before the oldest open one have nothing to close: skip them.
        skip = min(self.open_rows.keys() | self.open_marg.keys(), default=done + 1) - 1
        if self.closed is None or self.closed < min(skip, done):
            self.closed = min(skip, done)
        while self.closed < done:
            self.close(self.closed + 1)

    def close(self, epoch: int) -> None:
        """Epoch `epoch` gets no more evidence: apply the bounds to what is closed."""
        self.closed = epoch
        rows = self.open_rows.pop(epoch, {})
        margs = self.open_marg.pop(epoch, {})
        for kind, items in (("r", rows), ("m", margs)):
            for item in items:
                self.dropped_open.add((epoch, kind, item))
                self.dirty_open.discard((epoch, kind, item))
        for item in margs:
            self.seen_epoch[item] = epoch
            self.dirty_seen.add(item)
        later = sorted(e for e in self.open_rows if e > epoch)
        cap = self.config.max_neighbours
        for item in sorted(rows):
            row = self.rows.get(item)
            if row is not None and len(row) > cap:
                self._prune_closed_row(item, row, [self.open_rows[e].get(item) for e in later])
        if len(self.seen_epoch) > self.config.max_items:
            self._forget_closed_items()

    def _closed_part(self, v: list[float], opens: list[dict | None], key: str) -> list[float]:
        out = list(v)
        for o in opens:
            if o is not None and (w := o.get(key)) is not None:
                for n in range(len(w)):
                    out[n] -= w[n]
        return out

    def _prune_closed_row(self, item: str, row: dict[str, list[float]],
                          opens: list[dict | None]) -> None:
        """Keep the strongest three quarters of the bound, judged on closed evidence only
        (rounded, ties by id); evidence of open epochs stays."""
        digits = self.config.score_digits
        closed = {k: self._closed_part(v, opens, k) for k, v in row.items()}
        has_open = {k for o in opens if o is not None for k in o}
        # An entry whose evidence is all open has a closed part of rounding noise only.
        # The item's own entry (picked again right after itself) has no pair count to weigh:
        # it is kept, as one entry beyond the bound.
        weighed = [(round_sig(c[0], digits), k) for k, c in closed.items()
                   if k != item and (k not in has_open or c[0] > 1e-9 * abs(row[k][0]))]
        if len(weighed) <= self.config.max_neighbours:
            return
        weighed.sort(key=lambda t: (-t[0], t[1]))
        for _, k in weighed[self.config.max_neighbours * 3 // 4:]:
            if k in has_open:
                rest: dict[str, list[float]] = {}
                for o in opens:
                    if o is not None and (w := o.get(k)) is not None:
                        _add_entry(rest, k, w)
                row[k] = rest[k]
            else:
                del row[k]
        self._reshape(item)
        self.dirty.add(item)
        self.touched.add(item)

    def _forget_closed_items(self) -> None:
        """Forget the closed evidence of the quarter of items seen least recently (by closed
        epoch, ties by id), with their rows; evidence of open epochs stays."""
        n = len(self.seen_epoch) - self.config.max_items * 3 // 4
        victims = sorted(self.seen_epoch, key=lambda k: (self.seen_epoch[k], k))[:n]
        for item in victims:
            del self.seen_epoch[item]
            self.dirty_seen.add(item)
            open_marg: dict[str, list[float]] = {}
            for margs in self.open_marg.values():
                if (m := margs.get(item)) is not None:
                    _add_marg(open_marg, item, m)
            open_row: dict[str, list[float]] = {}
            for rows in self.open_rows.values():
                for k, v in (rows.get(item) or {}).items():
                    _add_entry(open_row, k, v)
            self._forget(item, open_marg.get(item), open_row)

    def advance(self, ts: float, src: int = 0, clock: float | None = None) -> None:
        """Move "now" to event time `ts` without evidence (an event that changed no count
        still ages every count), and the source's clock with it."""
        self.apply(ts, (), (), src, clock)

    def _prune_row(self, item: str, row: dict[str, list[float]]) -> None:
        """Keep the strongest three quarters of the neighbour bound (ties by id), and the
        item's own entry."""
        own = row.get(item)
        keep = sorted(((k, v) for k, v in row.items() if k != item),
                      key=lambda kv: (-kv[1][0], kv[0]))
        keep = keep[: self.config.max_neighbours * 3 // 4]
        row.clear()
        row.update(keep)
        if own is not None:
            row[item] = own
        self._reshape(item)

    def _prune_items(self) -> None:
        """Forget the quarter of items seen least recently, with their rows."""
        n = len(self.marg) - self.config.max_items * 3 // 4
        victims = sorted(self.marg, key=lambda k: (self.marg[k][2], k))[:n]
        for item in victims:
            self._forget(item)

    def _forget(self, item: str, marg: list[float] | None = None,
                row: dict[str, list[float]] | None = None) -> None:
        """Forget an item's totals, row and repurchase cycles; `marg` and `row`, where given,
        are what stays of them (evidence of epochs still open)."""
        if marg:
            self.marg[item] = marg
            self.dirty_marg.add(item)
        elif self.marg.pop(item, None) is not None:
            self.dropped_marg.add(item)
            self.dirty_marg.discard(item)
            self.marg_touched.discard(item)
        if row:
            self.rows[item] = row
            self._reshape(item)
            self.dirty.add(item)
        elif self.rows.pop(item, None) is not None:
            self._mass.pop(item, None)  # whoever lists it drops its mark (`dropped`)
            self._reshaped.pop(item, None)
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
            self._reshape(item)

    # -- when a changed list is worth recomputing ---------------------------------------------

    def _reshape(self, item: str) -> None:
        if self.changed is not None:
            self.whole.add(item)
        self._mass.pop(item, None)
        self._shapes += 1  # never repeats: a mark taken before it cannot match again
        self._reshaped[item] = self._shapes

    def list_mark(self, item: str) -> tuple[float, float, int]:
        """What `list_due` compares against: the row's decayed evidence now, "now", and the
        stamp of its last reshape. Taken by whoever computes `item`'s lists, as it does."""
        mass = self._mass.get(item)
        if mass is None:
            row = self.rows.get(item)
            mass = sum([v[0] + v[1] + v[4] + v[5] for v in row.values()]) if row else 0.0
            if row:
                self._mass[item] = mass
        return mass * self._decay_now(), self.now, self._reshaped.get(item, 0)

    def list_due(self, item: str, mark: tuple[float, float, int] | None) -> bool:
        """Whether `item`'s changed list is worth recomputing, given the `list_mark` taken
        when it was last computed (None: never): its row gained `list_min_change` of its
        evidence since, it was reshaped, or the list is `list_max_age_s` old."""
        cfg = self.config
        if mark is None or cfg.list_min_change <= 0:
            return True
        then, at, shape = mark
        mass, now, shape_now = self.list_mark(item)
        if shape_now != shape or now - at >= cfg.list_max_age_s:
            return True
        kept = then * 2.0 ** (-(now - at) / cfg.half_life_s)
        return mass - kept >= cfg.list_min_change * mass

    def repurchase(self, item: str) -> dict[str, Any] | None:
        """The item's repurchase cycle as published in cw:item, once enough repeats were seen."""
        history = self.cycles.get(item) or ()
        cycle = crowd_cycle(history)
        if cycle is None:
            return None
        return {"cycle_days": round(cycle / DAY, 2), "intervals": len(history)}

    # -- scoring ------------------------------------------------------------------------------

    def lists(self, item: str) -> dict[str, Any]:
        """Cross-sell, alternatives and next picks for `item`, as counted up to `self.now`, and
        the share of picks right after it that were itself (`repeat`)."""
        return self.candidates(item).lists(item, self.config)

    def candidates(self, item: str) -> Candidates:
        """What `lists` ranks and makes entries of (models/itemlists.py)."""
        row, mi = self.rows.get(item), self.marg.get(item)
        if not row or mi is None or self.landmark is None:
            return Candidates.none()
        return find(item, row, mi, self.marg, self.total, self._decay_now(), self.config)

    def trending(self, items: Iterable[str]) -> dict[str, float]:
        """Trending scores of `items` (models/trending.py), comparable across partitions."""
        if self.landmark is None:
            return {}
        h = self.config.trending_half_life_s
        return {i: trending_score(m[3], self.landmark, h) for i in items
                if (m := self.marg.get(i)) is not None and m[3] > 0}

    def counts(self, item: str) -> dict[str, Any]:
        """Decayed counts at `now`, for inspection and tests."""
        if self.landmark is None:
            return {}
        s = self._decay_now()
        m = self.marg.get(item, [0.0, 0.0, 0.0])
        return {
            "all": m[0] * s,
            "buy": m[1] * s,
            "pairs": {k: [x * s for x in v] for k, v in self.rows.get(item, {}).items()},
        }


def _add_marg(marg: dict[str, list[float]], item: str, add: list[float]) -> None:
    m = marg.get(item)
    if m is None:
        marg[item] = list(add)
    else:
        m[0] += add[0]
        m[1] += add[1]
        if add[2] > m[2]:
            m[2] = add[2]
        m[3] += add[3]


def _add_entry(row: dict[str, list[float]], other: str, add: list[float]) -> bool:
    """Add a row entry's evidence (`ROW_FIELDS` numbers: rows and open evidence loaded from
    older checkpoints are widened first, models/graphstate.py); True when the entry is new."""
    v = row.get(other)
    if v is None:
        row[other] = list(add)
        return True
    # On every event: the same sums, written out.
    v[0] += add[0]
    v[1] += add[1]
    v[2] += add[2]
    v[3] += add[3]
    v[4] += add[4]
    v[5] += add[5]
    return False
