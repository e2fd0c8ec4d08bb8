"""Feedback: attribution, experiment counters, the re-ranker, and a simulated A/B test."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import pytest

from cartwise.contract import Event, validate_event
from cartwise.simulator import Responder
from models.experiments import Experiment, report
from models.feedback import (
    FEATURES,
    Attribution,
    Delta,
    Example,
    FeedbackConfig,
    Reranker,
    combine,
    features,
    rerank,
)

T0 = 1_800_000_000.0
_ids = iter(range(10**9))


def ev(type_: str, ts: float, **kw: Any) -> Event:
    return validate_event({"event_id": f"e{next(_ids)}", "type": type_, "user_id": "u1",
                           "ts": ts, **kw})


def shown(items: list[str], rid: str = "r1", ts: float = T0, **kw: Any) -> Event:
    return ev("impression", ts, request_id=rid, items=[{"item_id": i} for i in items], **kw)


def x(n: int) -> list[float]:
    return [float(n)] * len(FEATURES)


SERVED = {"u": "u1", "p": "product", "e": None, "v": None, "x": {"a": x(1), "b": x(2)}}


def totals(deltas: list[Delta]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for _, variant, counter, amount in deltas:
        out[f"{variant}|{counter}"] += amount
    return dict(out)


def test_a_click_then_a_cart_is_one_positive_example_and_one_conversion():
    att = Attribution()
    fb: dict[str, Any] = {}
    d = att.impression(fb, shown(["a", "b"], experiment_id="e", variant="B"), SERVED, False)
    assert totals(d) == {"B|shoppers": 1, "B|impressions": 1}
    d = att.click(fb, ev("click", T0 + 5, item_id="a", request_id="r1"))
    assert totals(d) == {"B|clicks": 1, "B|clicked": 1}
    d = att.click(fb, ev("click", T0 + 6, item_id="a", request_id="r1"))
    assert totals(d) == {"B|clicks": 1}  # the impression was clicked once already
    d = att.shop_event(fb, ev("add_to_cart", T0 + 9, item_id="a"), {})
    assert totals(d) == {"B|conversions": 1, "B|converters": 1}
    # both items are learned together when the label window closes, and only once
    assert att.settle(fb, T0 + 100) == []
    assert att.next_settle(fb) == T0 + 1800
    assert att.settle(fb, T0 + 1801) == [(x(1), True, x(1)[1]), (x(2), False, x(2)[1])]
    assert att.settle(fb, T0 + 3600) == []
    assert att.next_settle(fb) is None


def test_purchases_count_orders_revenue_and_cross_sell_for_existing_customers():
    att = Attribution()
    fb: dict[str, Any] = {}
    att.impression(fb, shown(["a", "b"], experiment_id="e", variant="B"), SERVED, True)
    order = ev("purchase", T0 + 60, items=[{"item_id": "a", "quantity": 2, "price": 5.0},
                                           {"item_id": "z", "price": 10.0}])
    d = att.shop_event(fb, order, bought_before={"old": T0 - 1e6})
    t = totals(d)
    assert t["B|orders"] == 1 and t["B|revenue"] == 20.0 and t["B|revenue_sq"] == 400.0
    assert t["B|attributed_revenue"] == 10.0
    assert t["B|cross_sold"] == 1 and t["B|converters"] == 1 and t["B|conversions"] == 1
    assert [label for _, label, _ in att.settle(fb, T0 + 1800)] == [True, False]
    # a second order: the shopper's revenue goes 20 -> 30, the sum of squares by 900 - 400
    d = att.shop_event(fb, ev("purchase", T0 + 90, items=[{"item_id": "y", "price": 10.0}]),
                       {"a": T0})
    assert totals(d)["B|shopper_revenue_sq"] == 500.0
    assert "B|cross_sold" not in totals(d)


def test_no_credit_outside_the_attribution_window_or_for_items_not_shown():
    att = Attribution(FeedbackConfig(attribution_s=3600))
    fb: dict[str, Any] = {}
    att.impression(fb, shown(["a"], experiment_id="e", variant="A"), SERVED, False)
    assert att.shop_event(fb, ev("add_to_cart", T0 + 10, item_id="q"), {}) == []
    assert att.shop_event(fb, ev("add_to_cart", T0 + 7200, item_id="a"), {}) == []
    att.settle(fb, T0 + 7200)
    assert fb["shown"] == [] and fb["exp"] == {}  # forgotten past the window


def test_an_impression_without_a_served_record_counts_but_does_not_train():
    att = Attribution()
    fb: dict[str, Any] = {}
    att.impression(fb, shown(["a"], experiment_id="e", variant="A"), None, False)
    assert att.click(fb, ev("click", T0 + 1, item_id="a", request_id="r1"))
    assert att.settle(fb, T0 + 3600) == []


def test_rerank_keeps_pins_in_place_and_orders_the_rest_by_prediction():
    entries = [{"item_id": "p", "kind": "pinned"}, {"item_id": "a", "kind": "cross_sell"},
               {"item_id": "b", "kind": "cross_sell"}]
    xs = [[0.0] * len(FEATURES), [0.0] * len(FEATURES), [1.0] * len(FEATURES)]
    weights = [1.0] * len(FEATURES)
    assert [e["item_id"] for e in rerank(entries, xs, weights, 0.0)] == ["p", "b", "a"]
    assert [e["item_id"] for e in rerank(entries, xs, [-w for w in weights], 0.0)] == \
        ["p", "a", "b"]


def test_reranker_survives_a_round_trip_and_combines_by_examples():
    r = Reranker(min_examples=10)
    rng = random.Random(1)
    r.learn([(x(rng.random()), rng.random() < 0.3, 0.5) for _ in range(50)])
    back = Reranker.from_bytes(r.to_bytes())
    assert back.summary() == r.summary()
    one = combine([r.summary(), None], 10)
    assert one["examples"] == 50 and one["weights"] == pytest.approx(r.summary()["weights"])
    assert combine([], 10)["active"] is False


# -- a simulated A/B test: the shoppers' preference is known, the model does not see it -------

ANCHOR = {"price": 50.0, "category": "phones"}


def candidates(rng: random.Random) -> tuple[list[dict], dict[str, dict]]:
    """Ten suggestions in the model's (plain) order; prices unrelated to that order."""
    entries, facts = [], {}
    for n in range(10):
        item = f"i{rng.randrange(10**6)}"
        entries.append({"item_id": item, "score": 1.0 / (1 + n), "kind": "cross_sell"})
        facts[item] = {"price": round(rng.uniform(10, 100), 2), "category": "cases"}
    return entries, facts


class Shop:
    """Serving, the shopper's response and the worker's bookkeeping, as pure calls."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.responder = Responder(seed=seed)
        self.att = Attribution()
        self.reranker = Reranker(min_examples=300)
        self.counters: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.fbs: list[dict[str, Any]] = []
        self.t = T0

    def visit(self, user: str, variant: str | None, reranked: bool) -> None:
        self.t += 10
        entries, facts = candidates(self.rng)
        xs = [features(e, n, 1.0, facts[e["item_id"]], ANCHOR, "product", False)
              for n, e in enumerate(entries)]
        by_item = {e["item_id"]: v for e, v in zip(entries, xs, strict=True)}
        if reranked:
            model = combine([self.reranker.summary()], self.reranker.min_examples)
            assert model["active"]
            entries = rerank(entries, xs, model["weights"], model["intercept"])
        top = entries[:5]
        served = {"u": user, "p": "product", "e": "ab" if variant else None, "v": variant,
                  "x": by_item}
        fb: dict[str, Any] = {}
        self.fbs.append(fb)
        rid = f"r{len(self.fbs)}"
        extra = {"experiment_id": "ab", "variant": variant} if variant else {}
        deltas: list[Delta] = []
        examples: list[Example] = []
        imp = validate_event({"event_id": f"i-{rid}", "type": "impression", "user_id": user,
                              "ts": self.t, "request_id": rid,
                              "items": [{"item_id": e["item_id"]} for e in top], **extra})
        deltas += self.att.impression(fb, imp, served, False)
        clicked, carted = self.responder.respond(
            [(e["item_id"], facts[e["item_id"]]["price"]) for e in top], ANCHOR["price"])
        if clicked:
            deltas += self.att.click(fb, validate_event({
                "event_id": f"c-{rid}", "type": "click", "user_id": user, "ts": self.t + 1,
                "item_id": clicked, "request_id": rid}))
            if carted:
                deltas += self.att.shop_event(fb, validate_event({
                    "event_id": f"a-{rid}", "type": "add_to_cart", "user_id": user,
                    "ts": self.t + 2, "item_id": clicked}), {})
        examples += self.att.settle(fb, self.t + 3600)
        self.reranker.learn(examples)
        for _, v, counter, amount in deltas:
            self.counters[v][counter] += amount


def test_simulated_shoppers_show_the_reranker_winning_and_the_report_calling_it():
    shop = Shop(seed=3)
    for n in range(1500):  # warm-up on the plain order: the re-ranker learns from feedback
        shop.visit(f"w{n}", None, False)
    summary = shop.reranker.summary()
    # progressive validation: scored before learning each example, it beats the plain order
    assert summary["examples"] == 1500 * 5
    assert summary["auc"] > summary["auc_plain"] + 0.05
    weights = dict(zip(FEATURES, summary["weights"], strict=True))
    assert weights["cheaper"] > 0  # it found the shoppers' taste for cheaper items

    exp = Experiment.parse("ab", {"variants": [
        {"name": "plain", "settings": {"ranking": "plain"}},
        {"name": "reranked", "settings": {"ranking": "auto"}}], "min_shoppers": 200})
    for n in range(1200):
        user = f"s{n}"
        variant = exp.assign(user)
        assert variant is not None
        shop.visit(user, variant.name, variant.strategy.ranking == "auto")
        if n == 60:
            early = report(exp, shop.counters, shop.t)
            assert early["winner"] is None and early["verdict"].startswith("not significant")
    out = report(exp, shop.counters, shop.t)
    rows = {r["variant"]: r for r in out["variants"]}
    assert rows["plain"]["shoppers"] + rows["reranked"]["shoppers"] == 1200
    assert rows["reranked"]["conversion_rate"]["value"] > rows["plain"]["conversion_rate"]["value"]
    assert rows["reranked"]["vs_control"]["conversion_rate"]["p_value"] < 0.01
    assert out["winner"] == "reranked"
