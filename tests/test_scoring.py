"""Association measures against values worked out independently (50-digit decimal arithmetic)."""

from __future__ import annotations

import math

import pytest

from models.scoring import confidence_lift, llr, pair_llr, round_sig


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ((1, 0, 0, 1), 4 * math.log(2)),
        ((10, 10, 10, 10), 0.0),
        ((5, 1995, 0, 100000), 39.3305216549061378),
        ((1000, 1995, 1000, 100000), 4730.73681306123647),
    ],
)
def test_llr(table, expected):
    assert llr(*table) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_llr_is_stable_at_large_decayed_counts():
    # Same proportions, a million times larger: G^2 scales exactly with the counts.
    small = llr(5, 1995, 0, 100000)
    assert llr(5e6, 1995e6, 0, 1e11) == pytest.approx(small * 1e6, rel=1e-10)


def test_association_measures():
    conf, lift = confidence_lift(pair=20, n_i=40, n_j=50, total=1000)
    assert conf == 0.5 and lift == pytest.approx(10.0)
    assert pair_llr(pair=20, n_i=40, n_j=50, total=1000) == pytest.approx(llr(20, 20, 30, 930))
    assert confidence_lift(0, 0, 5, 10) == (0.0, 0.0)


def test_round_sig():
    assert round_sig(0.123456789123, 9) == 0.123456789
    assert round_sig(123456.789123, 4) == 123500.0
    assert round_sig(0.0, 9) == 0.0
