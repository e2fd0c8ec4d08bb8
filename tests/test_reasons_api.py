"""Readable reasons, the cart placement and the answer's note, through the stream and the API.

The worker learns lists from simulated traffic (tests/conftest.py `served`); the API words
each entry's reason from its kind, anchor and evidence with the catalog's names
(models/wording.py), puts a cart's complements before its substitutes, and says why trending
items filled an answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from cartwise.contract import expected_partition
from models import serving
from models.wording import NOTES, WORDING
from streams.store import Keys
from tests.conftest import Served


@pytest.fixture
def rules_reset(served: Served) -> Iterator[Served]:
    yield served
    assert served.put("/v1/rules", {}).status_code == 200


def wait_for(what: str, done: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def names(s: Served) -> dict[str, str]:
    return {c["item_id"]: c["name"] for c in s.shop.catalog}


def hero(s: Served) -> str:
    """An item with a real cross-sell list, learned by the worker."""
    return next(i for i in s.shop.complements
                if len((s.doc("item", i) or {}).get("cross_sell", [])) >= 4)


def test_an_items_answer_names_its_anchor_never_its_id(served: Served):
    s = served
    item, name = hero(s), names(s)
    stored = s.doc("item", item)["cross_sell"]
    assert all(e["reason"] == WORDING["cross_sell.unnamed"] for e in stored)  # no names there
    fast = s.get(f"/v1/items/{item}/suggestions", k=4).json()
    got = [e for e in fast["items"] if e["kind"] == "cross_sell"]
    assert got
    for e in got:
        assert e["anchor"] == item and e["anchor_name"] == name[item]
        assert e["evidence"]["shoppers"] > 0 and e["evidence"]["share"] > 0
        # Few shoppers behind the share (under 50): no percentage, the product's name.
        if e["evidence"]["out_of"] < 50:
            assert e["reason"] == f"often bought together with {name[item]}"
        assert name[item] in e["reason"] and item not in e["reason"]
    # The full app (a parameter the fast path leaves to it) answers the same words.
    full = s.get(f"/v1/items/{item}/suggestions", k=4, user_id="reasons-nobody").json()
    assert [(e["item_id"], e["reason"], e["anchor_name"]) for e in full["items"]] == \
        [(e["item_id"], e["reason"], e["anchor_name"]) for e in fast["items"]]
    assert fast["note"] is None and fast["fallback"] is None
    # An upsell is "a step up from <name>": its price step is a field, not text.
    for other in s.shop.complements:
        ups = [e for e in s.get(f"/v1/items/{other}/suggestions", kind="upsell",
                                k=5).json()["items"] if e["kind"] == "upsell"]
        if ups:
            assert ups[0]["reason"] == f"a step up from {name[other]}"
            assert ups[0]["price_ratio"] > 1
            break
    else:
        raise AssertionError("no item has an upsell")


def test_a_shoppers_list_names_the_items_that_put_each_suggestion_there(served: Served):
    s = served
    name = names(s)
    seen = 0
    for key in list(s.r.scan_iter(f"{s.settings.prefix}user:*"))[:40]:
        user = key.decode().rsplit(":", 1)[1]
        for e in s.get(f"/v1/users/{user}/suggestions", k=6).json()["items"]:
            if e.get("anchor"):
                seen += 1
                assert e["anchor_name"] == name[e["anchor"]]
                assert name[e["anchor"]] in e["reason"] and e["anchor"] not in e["reason"]
            elif e["kind"] == "revisit":
                assert e["reason"] in (WORDING["revisit"], WORDING["rebuy"])
    assert seen


def test_a_shoppers_cart_placement_shows_complements_before_another_same_category_item(
        served: Served):
    s = served
    category = {c["item_id"]: c["category"] for c in s.shop.catalog}
    found = 0
    for key in s.r.scan_iter(f"{s.settings.prefix}user:*"):
        user = key.decode().rsplit(":", 1)[1]
        doc = s.doc("user", user)
        cart = set(doc["context"]["cart"])
        head = serving.for_placement(doc["items"], "cart")[:4]
        # Other tests of the shared stack send shoppers of their own (the API fuzz test's
        # random ids): only the simulated shop's shoppers are judged here.
        if not cart <= category.keys() or any(e["item_id"] not in category for e in head):
            continue
        carted = {category[i] for i in cart}
        # The worker's list leads with an item of a carted item's category, a complement
        # (another category) below it.
        if len(head) < 4 or category[head[0]["item_id"]] not in carted or \
                all(category[e["item_id"]] in carted for e in head):
            continue
        got = s.get(f"/v1/users/{user}/suggestions", placement="cart", k=4).json()["items"]
        assert {e["item_id"] for e in got} == {e["item_id"] for e in head}, user
        assert category[got[0]["item_id"]] not in carted, (user, head, got)
        firsts = [category[e["item_id"]] not in carted for e in got]
        assert firsts == sorted(firsts, reverse=True), (user, got)  # complements, then the rest
        scores = [e["score"] for e in got]
        assert scores == sorted(scores, reverse=True)
        found += 1
        if found >= 3:
            break
    assert found, "no shopper's cart list leads with a same-category item"


def test_a_rule_that_empties_the_list_says_so_not_no_evidence(rules_reset: Served):
    s = rules_reset
    item = hero(s)
    doc = s.doc("item", item)  # a cart blends complements and next picks
    listed = list(dict.fromkeys(e["item_id"] for kind in ("cross_sell", "next")
                                for e in doc[kind]))
    assert s.put("/v1/rules", {"block": listed}).status_code == 200
    body = s.get(f"/v1/items/{item}/suggestions", k=3).json()
    assert body["fallback"] and all(e["kind"] == "trending" for e in body["items"])
    assert body["note"] == {"code": "rules", "text": NOTES["rules"]}
    cart = s.post("/v1/cart/suggestions", {"items": [item], "k": 3}, key="read").json()
    assert cart["fallback"] and cart["note"]["code"] == "rules", cart
    # Nothing known about an item: that, and only that, is "no evidence".
    cold = s.get("/v1/items/reasons-never-seen/suggestions", k=3).json()
    assert cold["note"] == {"code": "no_evidence", "text": NOTES["no_evidence"]}
    # Lifted: the evidence is back, with nothing to explain.
    assert s.put("/v1/rules", {}).status_code == 200
    back = s.get(f"/v1/items/{item}/suggestions", k=3).json()
    assert back["fallback"] is None and back["note"] is None


def test_the_frequency_cap_counts_what_the_shopper_saw_not_what_was_asked(
        rules_reset: Served):
    s = rules_reset
    user, item = "reasons-cap-1", hero(s)
    now = time.time()
    assert s.post("/v1/events", [{"event_id": "rc-v1", "type": "view", "user_id": user,
                                  "item_id": item, "ts": now}]).status_code == 202
    wait_for("the shopper's list", lambda: bool((s.doc("user", user) or {}).get("items")))
    assert s.put("/v1/rules", {"frequency_cap": 2}).status_code == 200
    # Asking, however often, shows nothing: the list stays.
    asked = [s.get(f"/v1/users/{user}/suggestions", k=3).json() for _ in range(3)]
    assert asked[0]["items"] == asked[2]["items"] and asked[2]["note"] is None
    day = time.strftime("%Y%m%d", time.gmtime(now))
    key = Keys(s.settings.prefix).shown(expected_partition(user, s.settings.partitions), user,
                                        day)
    assert not s.r.exists(key)
    # Seeing it twice (two impressions, counted by the worker) caps every item of the list.
    shown = [{"item_id": e["item_id"]} for e in s.doc("user", user)["items"]][:50]
    events = [{"event_id": f"rc-i{n}", "type": "impression", "user_id": user, "ts": now + n,
               "request_id": asked[n]["request_id"], "placement": "product", "items": shown}
              for n in (1, 2)]
    assert s.post("/v1/events", events).status_code == 202
    wait_for("the impressions counted",
             lambda: (c := s.r.hgetall(key)) and all(float(v) >= 2 for v in c.values())
             and len(c) == len({e["item_id"] for e in shown}))
    body = s.get(f"/v1/users/{user}/suggestions", k=3).json()
    assert not {e["item_id"] for e in body["items"]} & {e["item_id"] for e in shown}
    assert body["note"] == {"code": "frequency_cap", "text": NOTES["frequency_cap"]}
