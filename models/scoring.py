"""Association measures on (weighted, decayed) co-occurrence counts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter


def llr(k11: float, k12: float, k21: float, k22: float) -> float:
    """Dunning's log-likelihood ratio (G^2) of a 2x2 table; ~chi-square with 1 dof.

    k11: both, k12: first without second, k21: second without first, k22: neither.
    Written as 2 * sum(k * ln(k / expected)) rather than the entropy form: with decayed counts
    in the millions the entropy form subtracts huge, nearly equal numbers and keeps only ~7
    significant digits, enough to make two runs over the same events disagree.
    Negative cells (from rounding of decayed counts) are clipped to zero.
    """
    k11, k12, k21, k22 = (max(0.0, k) for k in (k11, k12, k21, k22))
    n = k11 + k12 + k21 + k22
    if n <= 0:
        return 0.0
    r1, r2, c1, c2 = k11 + k12, k21 + k22, k11 + k21, k12 + k22
    g2 = 0.0
    for k, r, c in ((k11, r1, c1), (k12, r1, c2), (k21, r2, c1), (k22, r2, c2)):
        if k > 0:
            g2 += k * math.log(k * n / (r * c))
    return max(0.0, 2.0 * g2)


def confidence_lift(pair: float, n_i: float, n_j: float, total: float) -> tuple[float, float]:
    """(confidence i->j, lift). Cheap: list building tests lift on every neighbour, and G²
    (`pair_llr`) only where it filters or is shown."""
    if n_i <= 0 or n_j <= 0 or total <= 0:
        return 0.0, 0.0
    conf = min(1.0, pair / n_i)
    return conf, conf / min(1.0, n_j / total)


def pair_llr(pair: float, n_i: float, n_j: float, total: float) -> float:
    """G² of the pair's 2x2 table, from the pair count, both marginals and the total."""
    return llr(pair, n_i - pair, n_j - pair, total - n_i - n_j + pair)


# Powers of ten as floats, each exact (10**22 is the last power of ten a double holds).
_POW10 = [float(10**k) for k in range(23)]


def round_sig(x: float, digits: int) -> float:
    """Round to significant digits so float summation order cannot reorder a list."""
    if x == 0 or not math.isfinite(x):
        return x
    places = digits - 1 - math.floor(math.log10(abs(x)))
    if 0 <= places < len(_POW10):
        # round(x, places) without the decimal conversion that is most of its cost, and with
        # its result: below 2**40, `scaled` is within 2**-14 of the exact x * 10**places, so
        # when it is within 0.49 of an integer, that integer is the exact product's nearest
        # (no tie), and dividing it by the exact power of ten gives the float nearest to that
        # decimal, which is what round() returns. Nearer a half, round() itself decides.
        scaled = x * _POW10[places]
        near = round(scaled)
        if 1.0 <= abs(scaled) < 2.0**40 and abs(scaled - near) < 0.49:
            return near / _POW10[places]
    return round(x, places)


def top_rounded(cands: Sequence[tuple], n: int, digits: int) -> list[tuple[float, tuple]]:
    """The `n` best of `cands` (positive score first, then id second) by rounded score, ties by
    id, as (rounded score, candidate). Only candidates that can reach the top n are rounded:
    rounding moves a value by less than 1e-7 of itself and never reorders two values."""
    if n <= 0:
        return []
    if len(cands) > n:
        # The n-th best score; at list sizes a sort in C beats heapq.nlargest.
        floor = sorted([c[0] for c in cands], reverse=True)[n - 1] * (1.0 - 1e-7)
        cands = [c for c in cands if c[0] >= floor]
    # By id, then by rounded score, best first: sorts are stable, so ties stay by id.
    ranked = [(round_sig(c[0], digits), c) for c in sorted(cands, key=_ID)]
    ranked.sort(key=_SCORE, reverse=True)
    return ranked[:n]


_ID, _SCORE = itemgetter(1), itemgetter(0)
