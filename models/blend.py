"""The weight of each evidence kind in a shopper's list, learned online from the shop's own
next events.

Why: one fixed set of kind weights cannot fit every shop. `next_weight` 20 -> 2 lifts a click
log's MRR@20 by a quarter and costs an invoice log a fifth of its own (issue 23). The shop's
event stream already says which weights are right: before a shopper's event is learned, the
shopper's list as ranked now either has the item they picked next near the top or not.

What is learned: one multiplier per kind (`BLEND_KINDS`) on top of the configured weights, so
a fresh learner (all multipliers 1) ranks exactly as the fixed blend. Each candidate's score
is the sum of its per-kind parts, s(j) = sum_k w_k x_k(j) (models/ranking.py, `parts`). For
the picked item p and each item n ranked above it (or the list's head, when p leads), the
learner takes a gradient step on the pairwise loss -log(s(p) / (s(p) + s(n))) (Bradley-Terry
on the scores), over theta_k = log w_k. The step on theta_k is the difference between kind k's
share of s(p) and of s(n), times s(n) / (s(p) + s(n)): the loss does not change when every
weight is scaled, so the steps only move weight between kinds, a step is the same whatever
the scale of a shop's scores, and a pick far down the list still teaches (its kinds' shares
do not vanish). Steps are applied as AdaGrad does (each kind's step over the root of the sum
of its squared steps so far): a shop with a hundred times the traffic gets no hundred times
larger moves, and the weights settle instead of swinging. Each log-weight stays within
`LOG_BOUND`.

Labels: none beyond the stream (prequential: predict, then learn the event). Deterministic:
no randomness, no wall clock; the result depends only on the events and their order.

What "per shop" means in the stream. Shopper contexts live in partitions of the events topic;
a learner per partition would make a shop's weights depend on its partition count, and one
learner fed from every partition would depend on how their batches interleave. Neither is
acceptable (a restarted or scaled-out worker must reach the same state). So the weights are
one per shop, changed once per epoch of event time (`blend_epoch_s`): every step of an epoch
is taken with the weights as of the epoch's start (`steps`, a pure function of those weights
and the shopper's list), and the epoch's steps are summed and applied when it closes
(`fold`). A sum does not depend on the order of its terms or on which partition computed
them, so the weights depend on the events alone. The library (models/recommender.py) closes
an epoch when an event of a later one arrives, which is the same thing in one process; the
stream would close it once every partition's clock has passed its end, as the item graph
does for closed evidence (models/graph.py). `blend_epoch_s` 0 applies each step at once
(per event), which only one process can do deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from models.ranking import Parts

# The evidence kinds a shopper's list blends: an anchor's bought-together (cross_sell), picked
# next (next) and viewed-instead (alternatives) lists, the shopper's own viewed items
# (revisit) and bought items due again (rebuy).
BLEND_KINDS = ("cross_sell", "next", "alternatives", "revisit", "rebuy")
LOG_BOUND = math.log(100.0)  # a kind's weight stays within 1/100 .. 100 of the configured



class KindWeights:
    """Online multipliers of the evidence kinds' weights (river-style: `learn_one`,
    `predict_one`), learned from which item a shopper picked next."""

    def __init__(self, rate: float, epoch_s: float = 0.0, negatives: int = 20) -> None:
        if rate < 0 or epoch_s < 0 or negatives < 1:
            raise ValueError("blend rate and epoch must be >= 0 and negatives >= 1")
        self.rate, self.epoch_s, self.negatives = rate, epoch_s, negatives
        self.theta = dict.fromkeys(BLEND_KINDS, 0.0)
        self.pending = dict.fromkeys(BLEND_KINDS, 0.0)  # steps of the open epoch
        self.g2 = dict.fromkeys(BLEND_KINDS, 0.0)  # sum of each kind's squared applied steps
        self.epoch: int | None = None  # the open epoch
        self.steps = 0  # pairs learned, for inspection

    def weights(self) -> dict[str, float]:
        """The multiplier of each kind, as the ranking should use it now."""
        return {k: math.exp(t) for k, t in self.theta.items()}

    def predict_one(self, parts: Mapping[str, float]) -> float:
        """One candidate's blended score from its per-kind parts."""
        w = self.weights()
        return sum(w.get(k, 1.0) * x for k, x in parts.items())

    def learn_one(self, ts: float, parts: Parts, ranked: Sequence[str],
                  picked: Iterable[str]) -> None:
        """Learn from one event at time `ts`: `parts` of the candidates the shopper's list had
        before it, `ranked` that list's order (best first), `picked` the event's items."""
        self._advance(ts)
        step, pairs = steps(self.weights(), parts, ranked, picked, self.negatives)
        for k, x in step.items():
            self.pending[k] += x
        self.steps += pairs
        if self.epoch_s <= 0:
            self.fold()

    def _advance(self, ts: float) -> None:
        """Fold the open epoch's steps when `ts` is in a later epoch."""
        if self.epoch_s <= 0:
            return
        epoch = math.floor(ts / self.epoch_s)
        if self.epoch is not None and epoch > self.epoch:
            self.fold()
        if self.epoch is None or epoch > self.epoch:
            self.epoch = epoch

    def fold(self) -> None:
        """Apply the pending steps (AdaGrad), each kind's log-weight kept within `LOG_BOUND`."""
        for k, step in self.pending.items():
            if step == 0.0:
                continue
            self.g2[k] += step * step
            move = self.rate * step / math.sqrt(self.g2[k])
            self.theta[k] = min(LOG_BOUND, max(-LOG_BOUND, self.theta[k] + move))
            self.pending[k] = 0.0


def steps(weights: Mapping[str, float], parts: Parts, ranked: Sequence[str],
          picked: Iterable[str], negatives: int) -> tuple[dict[str, float], int]:
    """The gradient step on each kind's log-weight from one event, before the learning rate,
    and the number of pairs it came from.

    Each picked item p is paired with the items ranked above it (the list's head when p leads
    it or is not in it), at most `negatives` of them. A picked item with no part (no evidence
    for it) teaches nothing about the weights.
    """
    out = dict.fromkeys(BLEND_KINDS, 0.0)
    pairs = 0
    picked = [p for p in dict.fromkeys(picked) if p in parts]
    others = [j for j in ranked if j not in picked and j in parts]
    for p in picked:
        above = [j for j in ranked[: ranked.index(p)] if j in others] if p in ranked else []
        for n in (above or others)[:negatives]:
            pairs += _pair(weights, parts[p], parts[n], out)
    return out, pairs


def _pair(w: Mapping[str, float], pos: Mapping[str, float], neg: Mapping[str, float],
          out: dict[str, float]) -> int:
    """Add the step on -log(a / (a + b)) to `out` (a, b: the pair's scores); 1 if taken."""
    a = sum(w[k] * pos.get(k, 0.0) for k in BLEND_KINDS)
    b = sum(w[k] * neg.get(k, 0.0) for k in BLEND_KINDS)
    if a <= 0 or b <= 0:
        return 0
    pull = b / (a + b)
    for k in BLEND_KINDS:
        out[k] += pull * w[k] * (pos.get(k, 0.0) / a - neg.get(k, 0.0) / b)
    return 1
