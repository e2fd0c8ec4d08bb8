"""Reasons a shopper can read: rendered from an entry's anchor and evidence, with names."""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from models.graph import ItemGraph
from models.recommender import CrossSellRecommender
from models.wording import (
    MIN_SHARE_BASE,
    NOTES,
    WORDING,
    anchors_of,
    evidence_fields,
    name_of,
    note,
    render,
    render_all,
    share_text,
)

T0 = 1_700_000_000.0
CATALOG = {"pho-6": {"name": "Brand-6 phone", "category": "phones"},
           "case-1": {"name": "Slim case"}, "nameless": {"category": "phones"},
           "blank": {"name": "  "}}


def entry(kind: str, anchor: str | None = "pho-6", **evidence: float) -> dict:
    e = {"item_id": "case-1", "score": 0.4, "kind": kind, "reason": "stale text"}
    if anchor is not None:
        e["anchor"] = anchor
        e["evidence"] = evidence
    return e


def test_reasons_name_the_anchor_and_never_show_its_id():
    assert render(entry("cross_sell"), CATALOG) == "often bought together with Brand-6 phone"
    assert render(entry("alternatives"), CATALOG) == "often compared with Brand-6 phone"
    assert render(entry("next"), CATALOG) == "often picked just before or after Brand-6 phone"
    assert render(entry("upsell", price_ratio=45.68), CATALOG) == "a step up from Brand-6 phone"
    for kind in ("cross_sell", "alternatives", "next", "upsell"):
        for anchor in ("nameless", "blank", "unknown-item"):
            text = render(entry(kind, anchor), CATALOG)
            assert text == WORDING[f"{kind}.unnamed"] and anchor not in text


def test_a_percentage_only_when_it_rests_on_enough_shoppers():
    many = entry("cross_sell", share=0.41, shoppers=41.0, out_of=100.0)
    assert render(many, CATALOG) == "41% of shoppers who bought Brand-6 phone also bought this"
    few = entry("cross_sell", share=1.0, shoppers=3.0, out_of=3.0)
    assert render(few, CATALOG) == "often bought together with Brand-6 phone"
    edge = {"share": 0.5, "out_of": MIN_SHARE_BASE}
    assert share_text(edge) == "50%"
    assert share_text({"share": 0.5, "out_of": MIN_SHARE_BASE - 0.1}) is None
    assert share_text({"share": 0.01, "out_of": 1e6}) is None  # would read as "1%" or "0%"
    assert share_text({"share": 0.5}) is None
    # A next pick's share is of weighted picks, not of shoppers: never a percentage.
    assert render(entry("next", share=0.9, shoppers=500.0, out_of=900.0), CATALOG) == \
        "often picked just before or after Brand-6 phone"


def test_kinds_without_an_anchor():
    assert render(entry("revisit", None), CATALOG) == "you looked at it recently"
    assert render(entry("revisit", "case-1", bought=2), CATALOG) == "you bought it before"
    assert render(entry("pinned", None), CATALOG) == "recommended by the shop"
    assert render(entry("trending", None), CATALOG) == "popular in the shop right now"
    assert render(entry("trending", "x", category="toys"), CATALOG) == \
        "popular in toys right now"
    assert render(entry("something-new", None), CATALOG) == WORDING["other"]


def test_a_shop_translates_with_its_own_table():
    german = {"cross_sell": "oft zusammen mit {anchor} gekauft",
              "cross_sell.share": "{share} der Käufer von {anchor} kauften auch dies"}
    assert render(entry("cross_sell"), CATALOG, german) == "oft zusammen mit Brand-6 phone gekauft"
    assert render(entry("cross_sell", share=0.3, shoppers=30, out_of=100), CATALOG, german) == \
        "30% der Käufer von Brand-6 phone kauften auch dies"
    # Keys the shop did not translate fall back to the defaults, never to an error.
    assert render(entry("next"), CATALOG, german) == \
        "often picked just before or after Brand-6 phone"
    assert render(entry("pinned", None), CATALOG, german) == "recommended by the shop"


def test_render_all_fills_reason_and_anchor_name_on_copies():
    entries = [entry("cross_sell"), entry("trending", None), entry("next", "nameless")]
    got = render_all(entries, CATALOG)
    assert [e["reason"] for e in got] == ["often bought together with Brand-6 phone",
                                          "popular in the shop right now",
                                          "often picked in the same visit"]
    assert got[0]["anchor_name"] == "Brand-6 phone" and got[2]["anchor_name"] is None
    assert "anchor_name" not in got[1]
    assert entries[0]["reason"] == "stale text"  # the inputs are not changed
    assert anchors_of(entries + [entry("next")]) == ["pho-6", "nameless"]
    assert name_of(None, CATALOG) is None and name_of("case-1", CATALOG) == "Slim case"


def test_notes_say_what_happened():
    assert note(None) is None
    assert note("frequency_cap") == {"code": "frequency_cap", "text": NOTES["frequency_cap"]}
    assert "no evidence" not in note("rules")["text"].lower()
    assert note("rules", {"rules": "Ausgeblendet"})["text"] == "Ausgeblendet"


def test_evidence_fields():
    assert evidence_fields("cross_sell", 0.25, 10.0) == {"share": 0.25, "shoppers": 10.0,
                                                         "out_of": 40.0}
    assert evidence_fields("next", 0.25, 10.0) == {"share": 0.25, "shoppers": 10.0}
    assert evidence_fields("alternatives", 0.0, 0.0) == {"share": 0.0, "shoppers": 0.0}


# -- entries as the item graph writes them ----------------------------------------------------

def test_item_lists_carry_anchor_and_evidence_and_no_ids_in_the_text():
    g = ItemGraph(ModelConfig(min_support=0.5))
    g.apply(T0, [("A", 1, 0), ("B", 1, 0), ("C", 1, 0)],
            [("A", "B", 1, 0, 1, 0, 1.0), ("A", "C", 1, 0, 1, 0, 0.5),
             ("B", "A", 1, 0, 1, 0, 0.0), ("C", "A", 1, 0, 1, 0, 0.0)])
    nxt = g.lists("A")["next"]
    assert nxt[0]["anchor"] == "A" and nxt[0]["kind"] == "next"
    assert nxt[0]["evidence"]["share"] == pytest.approx(1 / 1.5)
    assert nxt[0]["evidence"]["shoppers"] == pytest.approx(1.0)
    assert nxt[0]["reason"] == "often picked in the same visit" and "A" not in nxt[0]["reason"]
    assert render(nxt[0], {"A": {"name": "Alpha"}}) == "often picked just before or after Alpha"


def test_a_few_buyers_never_read_as_a_percentage():
    rec = CrossSellRecommender(ModelConfig(llr_min=3.84))
    n = 0
    baskets = [["phone", "case"]] * 4 + [[f"x{i}", f"y{i}"] for i in range(30)]
    for u, basket in enumerate(baskets):
        for item in basket:
            n += 1
            rec.learn_one({"event_id": str(n), "type": "add_to_cart", "user_id": f"u{u}",
                           "item_id": item, "ts": T0 + n})
    rec.settle()
    cross = rec.related("phone", "cross_sell")
    assert [e["item_id"] for e in cross] == ["case"]
    ev = cross[0]["evidence"]
    assert cross[0]["anchor"] == "phone" and ev["share"] == pytest.approx(1.0)
    assert ev["out_of"] == pytest.approx(ev["shoppers"], rel=1e-6) and ev["out_of"] < 5
    names = {"phone": {"name": "Brand-6 phone"}}
    assert render(cross[0], names) == "often bought together with Brand-6 phone"
