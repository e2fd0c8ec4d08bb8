"""Business rules: the pure policy directly, then through the real API, worker and Redis."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from cartwise.contract import expected_partition
from models.rules import (
    BOOST_REASON,
    PIN_REASON,
    Rules,
    RulesError,
    apply,
    capped,
    dropped,
    impression_counts,
    ladder,
    order_by_price,
    shortfall,
    utc_day,
)
from streams.store import Keys
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


def test_the_cap_counts_impressions_per_shopper_and_day():
    day1 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    shown = [("ann", day1 + 10, ["ink", "paper", "ink"]),  # one showing lists ink once
             ("ann", day1 + 20, ["ink"]),
             ("bob", day1 + 30, ["ink"]),
             ("ann", day1 + 86_400 - 1, ["paper"]),
             ("ann", day1 + 86_400, ["ink"])]  # the next UTC day starts afresh
    got = impression_counts(shown)
    assert got == {("ann", "20260101"): {"ink": 2, "paper": 2},
                   ("bob", "20260101"): {"ink": 1},
                   ("ann", "20260102"): {"ink": 1}}
    assert utc_day(day1) == "20260101"
    cap = Rules.parse({"frequency_cap": 2})
    assert capped(cap, got[("ann", "20260101")]) == {"ink", "paper"}
    assert capped(cap, got[("bob", "20260101")]) == set()
    assert capped(Rules(), {"ink": 99}) == set()
    # Answers asked for and not shown count nothing: a page polling every second keeps its
    # list until the shopper has seen it `frequency_cap` times.
    assert ids(apply(LIST, cap, CATALOG, 2, shown=got[("bob", "20260101")])) == ["ink", "paper"]


def test_a_list_emptied_by_a_rule_says_which_rule():
    cap = Rules.parse({"frequency_cap": 1, "block": ["cable"]})
    shown = {"ink": 1, "paper": 3}
    served = apply(LIST, cap, CATALOG, 4, shown=shown, exclude={"case"})
    assert ids(served) == []
    why = dropped(LIST, ids(served), cap, CATALOG, held={"case"}, shown=shown)
    assert why == {"frequency_cap": 2, "rules": 1, "held": 1}
    assert shortfall(len(LIST), 0, why) == "frequency_cap"
    # Out of stock and held items are told apart from rules; ties go to the first cause.
    stock = dropped([entry("old", 1.0), entry("case", 0.5)], [], Rules(), CATALOG,
                    held={"case"})
    assert stock == {"out_of_stock": 1, "held": 1}
    assert shortfall(2, 0, stock) == "held"
    # "No evidence" only when there was none.
    assert shortfall(0, 0, {}) == "no_evidence"
    assert shortfall(3, 3, {}) is None
    assert shortfall(3, 1, dropped(LIST, ["ink"], Rules(), CATALOG)) is None  # cut by k


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
    doc = s.doc("user", user)
    # A product the shopper has not touched and the model does not suggest to them.
    known = ({*doc["context"]["bought"], *doc["context"]["recent"], *doc["context"]["cart"]}
             | {e["item_id"] for e in doc["items"]})
    new = next(c["item_id"] for c in s.shop.catalog if c["in_stock"] and c["item_id"] not in known)
    assert s.put("/v1/rules", {"frequency_cap": 2,
                               "boost": {"items": [new], "slots": 1}}).status_code == 200
    answers = [s.get(f"/v1/users/{user}/suggestions", k=3).json() for _ in range(3)]
    first = [e["item_id"] for e in answers[0]["items"]]
    assert first[-1] == new and answers[0]["items"][-1]["kind"] == "new"
    # Asking is not seeing: answers nobody reported as shown count nothing.
    assert [e["item_id"] for e in answers[2]["items"]] == first
    # Two impressions of that list (counted by the worker, per UTC day of event time) are
    # the cap: the next answer shares nothing with it.
    now = time.time()
    assert s.post("/v1/events", [
        {"event_id": f"{user}-cap-{n}", "type": "impression", "user_id": user, "ts": now,
         "request_id": answers[n]["request_id"], "placement": "product",
         "items": [{"item_id": i} for i in first]} for n in (0, 1)]).status_code == 202
    key = Keys(s.settings.prefix).shown(expected_partition(user, s.settings.partitions), user,
                                        time.strftime('%Y%m%d', time.gmtime(now)))
    deadline = time.monotonic() + 60
    while float(s.r.hget(key, new) or 0) < 2:
        assert time.monotonic() < deadline, "impressions never counted"
        time.sleep(0.2)
    after = s.get(f"/v1/users/{user}/suggestions", k=3).json()
    assert not {e["item_id"] for e in after["items"]} & set(first)
    assert float(s.r.hget(key, new)) == 2.0 and 0 < s.r.ttl(key)


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


# -- price ladder -----------------------------------------------------------------------------

LADDER = {"steps": [{"min_orders": 1, "order": "price_ascending", "max_price_ratio": 5},
                    {"min_orders": 3, "order": "score"}],
          "budget_quadrants": ["general_to_develop"]}
SMART_HOME = {
    "robot-vacuum": {"category": "smart_home", "price": 3999.0, "in_stock": True},
    "smart-lock": {"category": "smart_home", "price": 999.0, "in_stock": True},
    "bulb": {"category": "smart_home", "price": 29.0, "in_stock": True},
}
# Shoppers who bought a smart speaker went on to the vacuum more often than to the lock.
SPEAKER_LIST = [entry("robot-vacuum", 0.5), entry("smart-lock", 0.3), entry("bulb", 0.1)]


def serve_ladder(rules: Rules, orders: int, average: float | None) -> list[str]:
    """What serving does: cap, rules, cut to k, then the step's order."""
    step = rules.step(orders)
    got = apply(ladder(SPEAKER_LIST, step, SMART_HOME, average), rules, SMART_HOME, 2)
    return ids(order_by_price(got, step, SMART_HOME))


def test_price_ladder_offers_the_smart_lock_before_the_robot_vacuum_to_a_first_buyer():
    rules = Rules.parse({"price_ladder": LADDER})
    # One order of 700: the 3999 vacuum is over 5x the average, left out; cheaper first.
    assert serve_ladder(rules, 1, 700.0) == ["bulb", "smart-lock"]
    # One order of 1000: both in reach; cheaper first all the same.
    assert serve_ladder(rules, 1, 1000.0) == ["smart-lock", "robot-vacuum"]
    # Three orders: the evidence order, the vacuum may lead.
    assert serve_ladder(rules, 3, 50.0) == ["robot-vacuum", "smart-lock"]
    # No order yet: below every step, the ladder does not apply.
    assert serve_ladder(rules, 0, None) == ["robot-vacuum", "smart-lock"]


def test_price_ordering_keeps_scores_non_increasing_and_pins_first():
    rules = Rules.parse({"price_ladder": LADDER})
    pinned = {"item_id": "bulb", "score": 0.5, "kind": "pinned", "reason": PIN_REASON}
    got = order_by_price([pinned, *SPEAKER_LIST[:2]], rules.step(1), SMART_HOME)
    assert ids(got) == ["bulb", "smart-lock", "robot-vacuum"]
    assert [e["score"] for e in got] == [0.5, 0.5, 0.3]


def test_price_ladder_is_validated():
    for bad, field in [
        ({"steps": [{"min_orders": 3}, {"min_orders": 1}]}, "price_ladder.steps[1].min_orders"),
        ({"steps": [{"order": "score"}]}, "price_ladder.steps[0].min_orders"),
        ({"steps": [{"min_orders": 1, "order": "cheap"}]}, "price_ladder.steps[0].order"),
        ({"steps": [{"min_orders": 1, "max_price": 0}]}, "price_ladder.steps[0].max_price"),
        ({"budget_quadrants": ["broke"]}, "price_ladder.budget_quadrants[0]"),
        ({"tiers": []}, "price_ladder.tiers"),
    ]:
        with pytest.raises(RulesError) as err:
            Rules.parse({"price_ladder": bad})
        assert err.value.field == field, bad
    rules = Rules.parse({"price_ladder": LADDER})
    again = Rules.parse(rules.to_dict(), now=rules.updated_at)
    assert again == rules and rules.needs_profile and not Rules().needs_profile


def test_price_ladder_and_budget_segments_through_the_api(rules_reset: Served):
    s = rules_reset
    facts = {c["item_id"]: c for c in s.shop.catalog}
    hero = next(i for i in s.shop.complements
                if len((s.doc("item", i) or {}).get("cross_sell", [])) >= 5)
    now = time.time()
    one = [{"type": "purchase", "user_id": "lad-one", "event_id": "lad-one-1", "ts": now - 86400,
            "items": [{"item_id": "pho-000", "quantity": 1, "price": 10_000.0}]}]
    three = [{"type": "purchase", "user_id": "lad-three", "event_id": f"lad-three-{n}",
              "ts": now - 86400 * (n + 1),
              "items": [{"item_id": "pho-001", "quantity": 1, "price": 10_000.0}]}
             for n in range(3)]
    small = [{"type": "purchase", "user_id": "lad-small", "event_id": "lad-small-1",
              "ts": now - 86400, "items": [{"item_id": "aud-002", "quantity": 1, "price": 5.0}]}]
    assert s.post("/v1/events", one + three + small).status_code == 202
    deadline = time.monotonic() + 30
    while any(len(orjson.loads(s.r.get(f"{s.settings.prefix}profile:{u}") or b'{"orders":[]}')
                  ["orders"]) < n for u, n in (("lad-one", 1), ("lad-three", 3),
                                                ("lad-small", 1))):
        assert time.monotonic() < deadline, "profiles never reached Redis"
        time.sleep(0.2)
    assert s.put("/v1/rules", {"price_ladder": LADDER}).status_code == 200

    def answer(user: str | None, kind: str = "cross_sell") -> dict:
        params = {"kind": kind, "k": 5} | ({"user_id": user} if user else {})
        resp = s.get(f"/v1/items/{hero}/suggestions", **params)
        assert resp.status_code == 200, resp.text
        return resp.json()

    plain = answer(None)
    first = answer("lad-one")
    assert first["shopper"] == {"orders": 1, "quadrant": "important_to_develop", "step": 1,
                                "budget": False, "average_order": 10_000.0}
    assert {e["item_id"] for e in first["items"]} == {e["item_id"] for e in plain["items"]}
    prices = [facts[e["item_id"]]["price"] for e in first["items"]]
    assert prices == sorted(prices) and prices != [facts[e["item_id"]]["price"]
                                                   for e in plain["items"]]
    regular = answer("lad-three")
    assert regular["shopper"]["step"] == 3
    assert [e["item_id"] for e in regular["items"]] == [e["item_id"] for e in plain["items"]]
    # 5 spent in 90 days: general_to_develop, a budget segment: no upsell, complements.
    budget = answer("lad-small", kind="upsell")
    assert budget["shopper"]["budget"] and budget["kind"] == "cross_sell"
    assert all(e["kind"] != "upsell" for e in budget["items"])
    assert answer("lad-three", kind="upsell")["kind"] == "upsell"
    # With a cap of 5x the average order (5), nothing dearer than 25 is offered at all.
    user = s.get("/v1/users/lad-small/suggestions", k=5).json()
    assert user["shopper"]["budget"] and user["items"]
    assert all(facts[e["item_id"]]["price"] <= 25.0 for e in user["items"])
    assert all(e["kind"] != "alternatives" for e in user["items"])
