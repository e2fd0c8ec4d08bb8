"""Business rules: the pure policy directly, then through the real API, worker and Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from models.rules import BOOST_REASON, PIN_REASON, Rules, RulesError, apply
from tests.conftest import Served


def entry(i: str, score: float) -> dict:
    return {"item_id": i, "score": score, "kind": "cross_sell", "reason": "bought together"}


CATALOG = {
    "ink": {"category": "supplies", "in_stock": True},
    "paper": {"category": "supplies", "in_stock": True},
    "cable": {"category": "cables", "in_stock": True},
    "case": {"category": "accessories", "in_stock": True},
    "old": {"category": "supplies", "in_stock": False},
    "new1": {"category": "printers", "in_stock": True},
    "new2": {"category": "printers", "in_stock": True},
}
LIST = [entry("ink", 9.0), entry("paper", 7.0), entry("cable", 5.0), entry("case", 3.0)]


# -- parsing ----------------------------------------------------------------------------------

def test_parse_round_trips_and_defaults():
    doc = {"block": ["a", "b", "a"], "exclude_categories": ["adult"],
           "pins": {"printer": ["ink"]}, "boost": {"items": ["new1"], "slots": 2},
           "frequency_cap": 3}
    rules = Rules.parse(doc, now=100.0)
    assert rules.block == {"a", "b"} and rules.pins == {"printer": ("ink",)}
    assert rules.boost == ("new1",) and rules.boost_slots == 2 and rules.frequency_cap == 3
    again = Rules.parse(rules.to_dict(), now=100.0)
    assert again == rules
    assert Rules.parse({}).empty and not rules.empty


@pytest.mark.parametrize(("doc", "field"), [
    ([], "body"),
    ({"blok": []}, "blok"),
    ({"block": "a"}, "block"),
    ({"block": ["a", 3]}, "block[1]"),
    ({"block": ["x" * 201]}, "block[0]"),
    ({"pins": {"a": ["a"]}}, "pins.a"),
    ({"pins": {"a": ["b"] * 11}}, "pins.a"),
    ({"pins": ["a"]}, "pins"),
    ({"boost": {"items": ["n"], "slots": 9}}, "boost.slots"),
    ({"boost": {"item": ["n"]}}, "boost.item"),
    ({"frequency_cap": -1}, "frequency_cap"),
    ({"frequency_cap": True}, "frequency_cap"),
    ({"frequency_cap": 1.5}, "frequency_cap"),
])
def test_parse_names_the_field_that_is_wrong(doc, field):
    with pytest.raises(RulesError) as err:
        Rules.parse(doc)
    assert err.value.field == field and err.value.detail


# -- applying ---------------------------------------------------------------------------------

def ids(entries: list[dict]) -> list[str]:
    return [e["item_id"] for e in entries]


def test_block_and_category_exclusion_drop_items_and_keep_order():
    rules = Rules.parse({"block": ["paper"], "exclude_categories": ["cables"]})
    assert ids(apply(LIST, rules, CATALOG, 10)) == ["ink", "case"]
    assert ids(apply(LIST, Rules(), CATALOG, 3)) == ["ink", "paper", "cable"]


def test_pins_come_first_with_the_top_score_and_skip_what_cannot_be_shown():
    rules = Rules.parse({"pins": {"printer": ["case", "old", "paper", "gone"]},
                         "block": ["gone"]})
    got = apply(LIST, rules, CATALOG, 4, anchors=["printer"])
    # "old" is out of stock, "gone" blocked; pinned items already listed move up, not twice.
    assert ids(got) == ["case", "paper", "ink", "cable"]
    assert [e["kind"] for e in got[:2]] == ["pinned", "pinned"]
    assert got[0]["reason"] == PIN_REASON and got[0]["score"] == 9.0
    scores = [e["score"] for e in got]
    assert scores == sorted(scores, reverse=True)
    # Pins of another anchor do nothing here; pins never bring back what the cart holds.
    assert ids(apply(LIST, rules, CATALOG, 2, anchors=["phone"])) == ["ink", "paper"]
    assert ids(apply(LIST, rules, CATALOG, 2, anchors=["printer"], held={"case"})) == \
        ["paper", "ink"]


def test_boost_takes_the_last_slots_for_returning_customers_only():
    rules = Rules.parse({"boost": {"items": ["new1", "ink", "new2"], "slots": 2}})
    assert ids(apply(LIST, rules, CATALOG, 4)) == ids(LIST)
    got = apply(LIST, rules, CATALOG, 4, existing_customer=True)
    # "ink" is already in the answer: boosting it would take a slot for nothing.
    assert ids(got) == ["ink", "paper", "new1", "new2"]
    assert [e["kind"] for e in got[2:]] == ["new", "new"]
    assert got[2]["reason"] == BOOST_REASON and got[2]["score"] == 7.0
    owned = apply(LIST, rules, CATALOG, 4, existing_customer=True, held={"new1"})
    assert ids(owned) == ["ink", "paper", "cable", "new2"]


def test_frequency_cap_hides_items_shown_often_enough_today():
    rules = Rules.parse({"frequency_cap": 2})
    got = apply(LIST, rules, CATALOG, 3, shown={"ink": 2, "paper": 1})
    assert ids(got) == ["paper", "cable", "case"]
    off = Rules.parse({"block": ["zzz"]})
    assert ids(apply(LIST, off, CATALOG, 1, shown={"ink": 99})) == ["ink"]


# -- through the API --------------------------------------------------------------------------

@pytest.fixture
def rules_reset(served: Served) -> Iterator[Served]:
    yield served
    assert served.put("/v1/rules", {}).status_code == 200


def test_rules_change_answers_at_once_and_survive_a_round_trip(rules_reset: Served):
    s = rules_reset
    hero = next(i for i in s.shop.complements
                if len((s.doc("item", i) or {}).get("cross_sell", [])) >= 4)
    before = s.get(f"/v1/items/{hero}/suggestions", kind="cross_sell", k=4).json()["items"]
    first, second = before[0]["item_id"], before[1]["item_id"]
    facts = {c["item_id"]: c for c in s.shop.catalog}
    pin = next(c["item_id"] for c in s.shop.catalog if c["in_stock"] and c["item_id"] != hero
               and c["item_id"] not in {e["item_id"] for e in before}
               and c["category"] != facts[second]["category"])
    rules = {"block": [first], "pins": {hero: [pin]}}
    resp = s.put("/v1/rules", rules)
    assert resp.status_code == 200, resp.text
    assert resp.json()["pins"] == {hero: [pin]}
    after = s.get(f"/v1/items/{hero}/suggestions", kind="cross_sell", k=4).json()["items"]
    assert after[0]["item_id"] == pin and after[0]["kind"] == "pinned"
    assert first not in {e["item_id"] for e in after}
    assert after[1]["item_id"] == second
    # A whole category excluded: none of it anywhere, fillers included.
    banned = facts[second]["category"]
    assert s.put("/v1/rules", {"exclude_categories": [banned]}).status_code == 200
    for kind in ("cross_sell", "alternatives", "next", "upsell"):
        got = s.get(f"/v1/items/{hero}/suggestions", kind=kind, k=20).json()["items"]
        assert got and all(facts[e["item_id"]]["category"] != banned for e in got), kind
    cold = s.get("/v1/items/never-seen-item/suggestions", k=20).json()
    assert cold["fallback"] == "trending" and len(cold["items"]) == 20
    assert all(facts[e["item_id"]]["category"] != banned for e in cold["items"])
    cart = s.post("/v1/cart/suggestions", {"items": [hero], "k": 20}, key="read").json()
    assert cart["items"]
    assert all(facts[e["item_id"]]["category"] != banned for e in cart["items"])
    stored = s.get("/v1/rules", key="admin").json()
    assert stored["exclude_categories"] == [banned] and stored["block"] == []


def test_frequency_cap_and_boost_for_a_returning_shopper(rules_reset: Served):
    s = rules_reset
    shopper = next(u for u in s.r.scan_iter(f"{s.settings.prefix}user:*")
                   if (doc := s.doc("user", u.decode().rsplit(":", 1)[1]))
                   and doc["context"]["bought"] and len(doc["items"]) >= 6)
    user = shopper.decode().rsplit(":", 1)[1]
    owned = set(s.doc("user", user)["context"]["bought"])
    new = next(c["item_id"] for c in s.shop.catalog if c["in_stock"] and c["item_id"] not in owned
               and not c["consumable"])
    assert s.put("/v1/rules", {"frequency_cap": 2,
                               "boost": {"items": [new], "slots": 1}}).status_code == 200
    answers = [s.get(f"/v1/users/{user}/suggestions", k=3).json()["items"] for _ in range(3)]
    assert answers[0][-1]["item_id"] == new and answers[0][-1]["kind"] == "new"
    assert [e["item_id"] for e in answers[0]] == [e["item_id"] for e in answers[1]]
    # Two showings are the cap: the third answer shares nothing with the first two.
    assert not {e["item_id"] for e in answers[2]} & {e["item_id"] for e in answers[0]}
    day = time.strftime("%Y%m%d", time.gmtime())
    counts = s.r.hgetall(f"{s.settings.prefix}shown:{user}:{day}")
    assert counts[new.encode()] == b"2" and 0 < s.r.ttl(f"{s.settings.prefix}shown:{user}:{day}")


def test_bad_rules_are_refused_with_the_field_and_keep_the_old_ones(rules_reset: Served):
    s = rules_reset
    assert s.put("/v1/rules", {"block": ["x"]}).status_code == 200
    resp = s.put("/v1/rules", {"pins": {"a": ["b"] * 11}})
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["reason"] == "invalid_rules" and err["field"] == "body.pins.a"
    assert "at most 10" in err["detail"]
    bad_json = s.put("/v1/rules", "not json").status_code
    assert bad_json == 422  # a JSON string, not an object
    raw = s.base + "/v1/rules"
    assert httpx.put(raw, content=b"{", headers={"X-API-Key": s.admin}).status_code == 400
    assert s.put("/v1/rules", {}, key="read").status_code == 403
    assert s.get("/v1/rules", key="ingest").status_code == 403
    assert s.get("/v1/rules", key="admin").json()["block"] == ["x"]
