"""Association measures against values worked out independently (50-digit decimal arithmetic),
and the cart ranking that puts what completes a cart first."""

from __future__ import annotations

import math

import pytest

from models.cart import complete_cart, rank_for_cart, substitutes
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


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_round_sig_is_exactly_round(seed):
    """The float path returns what round() returns, bit for bit: random magnitudes, and
    values built to sit next to a half at the rounding digit (where a float product could
    round the wrong way)."""
    import random

    rng = random.Random(seed)
    values = []
    for _ in range(40_000):
        values.append(rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 14))
        digits = rng.randint(1, 15)
        base = rng.randint(10 ** (digits - 1), 10 ** digits - 1) + 0.5
        scale = 10.0 ** rng.randint(-10, 6)
        half = base * scale / 10 ** digits
        values += [half, math.nextafter(half, 0), math.nextafter(half, math.inf)]
    for x in values:
        for digits in (3, 6, 9):
            places = digits - 1 - math.floor(math.log10(abs(x))) if x else 0
            want = round(x, places) if x else x
            assert round_sig(x, digits) == want, (x, digits)
            assert math.copysign(1, round_sig(x, digits)) == math.copysign(1, want)


def test_round_sig():
    assert round_sig(0.123456789123, 9) == 0.123456789
    assert round_sig(123456.789123, 4) == 123500.0
    assert round_sig(0.0, 9) == 0.0


# -- the cart placement: what completes the cart first ----------------------------------------

def _entry(kind: str, anchor: str, item: str, score: float) -> dict:
    return {"item_id": item, "score": score, "kind": kind, "reason": "r", "anchor": anchor,
            "evidence": {"share": score}}


CART_CATALOG = {"phone": {"category": "phones"}, "phone2": {"category": "phones"},
                "phone3": {"category": "phones"}, "case": {"category": "cases"},
                "charger": {"category": "power"}, "tripod": {"category": "photo"},
                "cam": {"category": "photo"}, "milk": {"category": "dairy"},
                "yogurt": {"category": "dairy"}}


def test_cart_suggestions_put_complements_before_substitutes():
    lists = {"phone": {"cross_sell": [_entry("cross_sell", "phone", "case", 0.3),
                                      _entry("cross_sell", "phone", "charger", 0.1)],
                       "next": [_entry("next", "phone", "phone2", 0.5),
                                _entry("next", "phone", "phone3", 0.4),
                                _entry("next", "phone", "tripod", 0.01)],
                       "alternatives": [_entry("alternatives", "phone", "tripod", 0.2)]}}
    got = rank_for_cart(["phone"], lists, CART_CATALOG, k=3)
    # Next picks weigh 20x: by score alone two other phones would lead. The tripod was
    # compared with the phone (an alternative) and never bought with it: it waits too.
    assert [e["item_id"] for e in got] == ["case", "charger", "phone2"]
    scores = [e["score"] for e in got]
    assert scores == sorted(scores, reverse=True)
    assert got[0]["anchor"] == "phone" and got[0]["kind"] == "cross_sell"
    # With nothing else to show, substitutes still fill: evidence beats a popular filler.
    only = {"phone": {"next": lists["phone"]["next"][:2]}}
    assert [e["item_id"] for e in rank_for_cart(["phone"], only, CART_CATALOG, k=4)] == \
        ["phone2", "phone3"]


def test_bought_together_in_one_category_completes_the_cart():
    lists = {"milk": {"cross_sell": [_entry("cross_sell", "milk", "yogurt", 0.4)],
                      "next": [_entry("next", "milk", "cam", 0.5)]}}
    got = rank_for_cart(["milk"], lists, CART_CATALOG, k=5)
    assert [e["item_id"] for e in got] == ["cam", "yogurt"]  # by score: no substitute here
    assert substitutes(got, ["milk"], CART_CATALOG, lists) == set()
    # A few of the phone's buyers also bought a second phone: still a substitute.
    rare = {"phone": {"cross_sell": [_entry("cross_sell", "phone", "phone2", 0.05),
                                     _entry("cross_sell", "phone", "case", 0.04)]}}
    got = rank_for_cart(["phone"], rare, CART_CATALOG, k=5)
    assert [e["item_id"] for e in got] == ["case", "phone2"]
    assert substitutes(got, ["phone"], CART_CATALOG) == {"phone2"}
    # The share counts as far as the shoppers behind it carry it: 20% of 10 buyers is not
    # enough to call a second phone a complement, 20% of 1,000 is.
    few = [dict(_entry("cross_sell", "phone", "phone2", 0.2), evidence={"share": 0.2,
                                                                        "out_of": 10.0})]
    many = [dict(few[0], evidence={"share": 0.2, "out_of": 1000.0})]
    assert substitutes(few, ["phone"], CART_CATALOG) == {"phone2"}
    assert substitutes(many, ["phone"], CART_CATALOG) == set()


def test_complete_cart_on_a_served_list_without_item_lists():
    # What the API holds for a shopper: ranked entries with kind and anchor, and the catalog.
    entries = [_entry("next", "phone", "phone2", 0.9), _entry("cross_sell", "cam", "tripod", 0.8),
               _entry("next", "phone", "case", 0.5), _entry("cross_sell", "phone", "phone3", 0.2)]
    got = complete_cart(entries, ["phone", "cam"], CART_CATALOG)
    # phone3 was bought with the phone: kept in order. The tripod shares the camera's
    # category but was bought with it. phone2 only follows the phone: a substitute.
    assert [e["item_id"] for e in got] == ["tripod", "case", "phone3", "phone2"]
    assert [e["score"] for e in got] == [0.9, 0.8, 0.5, 0.2]
    assert complete_cart(entries, [], CART_CATALOG) == entries
