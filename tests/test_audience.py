"""Audience for a product: the ranking arithmetic, then the index and route over the stream."""

from __future__ import annotations

import time

import orjson
import pytest

from models.audience import DAY, HALF_LIFE_S, VIEW_WEIGHT, Related, rank_audience, related_items
from tests.conftest import Served

NOW = 1_700_000_000.0


def e(i: str, score: float) -> dict:
    return {"item_id": i, "score": score}


def test_related_items_prefer_the_evidence_pointing_at_the_product():
    printer = {"cross_sell": [e("ink", 0.6), e("paper", 0.2), e("printer", 0.9)],
               "next": [e("ink", 0.1), e("cable", 0.4)], "alternatives": []}
    docs = {"ink": {"cross_sell": [e("printer", 0.05)]},  # ink buyers rarely go on to printers
            "paper": {"next": [e("printer", 0.3)]}, "cable": None}
    got = related_items("printer", printer, docs)
    # paper's own list says 0.3; ink's says 0.05, less than half of printer->ink (0.3).
    assert [(r.item_id, r.strength, r.kind) for r in got] == [
        ("ink", 0.3, "cross_sell"), ("paper", 0.3, "cross_sell"), ("cable", 0.2, "next")]
    assert related_items("printer", None, docs) == []


def test_rank_audience_weighs_buys_over_views_fades_with_age_and_excludes_owners():
    related = [Related("ink", 0.5, "cross_sell"), Related("paper", 0.2, "cross_sell")]
    touches = {
        "ink": ([("ann", NOW - DAY / 2), ("bob", NOW - HALF_LIFE_S)], [("cy", NOW), ("ann", NOW)]),
        "paper": ([("cy", NOW - 3 * DAY)], [("own", NOW)]),
    }
    got = rank_audience(related, touches, NOW, 10, exclude={"own"})
    scores = {r["user_id"]: r["score"] for r in got}
    decay = 0.5 ** (DAY / 2 / HALF_LIFE_S)
    # ann: ink bought half a day ago; her view of ink is the same interest, counted once.
    assert scores["ann"] == pytest.approx(0.5 * decay, abs=1e-6)
    assert scores["bob"] == pytest.approx(0.25, abs=1e-6)  # one half-life old
    assert scores["cy"] == pytest.approx(0.5 * VIEW_WEIGHT + 0.2 * 0.5 ** (3 * DAY /
                                                                         HALF_LIFE_S), abs=1e-6)
    assert [r["user_id"] for r in got] == ["ann", "cy", "bob"]
    assert "own" not in scores
    cy = next(r for r in got if r["user_id"] == "cy")
    # Her strongest touch: paper bought 3 days ago (0.2 x 0.86) over viewing ink (0.5 x 0.3).
    assert cy["because"] == "paper" and cy["reason"] == "bought or carted paper 3 days ago"
    assert got[0]["reason"] == "bought or carted ink today"
    assert [r["user_id"] for r in rank_audience(related, touches, NOW, 1)] == ["ann"]


def test_audience_route_finds_shoppers_of_related_items_and_drops_owners(served: Served):
    s = served
    hero = next(i for i in s.shop.complements
                if len((s.doc("item", i) or {}).get("cross_sell", [])) >= 3)
    partner = s.doc("item", hero)["cross_sell"][0]["item_id"]
    now = time.time()
    events = [
        {"type": "add_to_cart", "user_id": "aud-fan", "item_id": partner, "event_id": "af1",
         "ts": now},
        {"type": "purchase", "user_id": "aud-owner", "event_id": "ao1", "ts": now,
         "items": [{"item_id": partner, "quantity": 1, "price": 1.0},
                   {"item_id": hero, "quantity": 1, "price": 1.0}]},
    ]
    assert s.post("/v1/events", events).status_code == 202
    prefix = s.settings.prefix
    deadline = time.monotonic() + 30
    while s.r.zscore(f"{prefix}buyers:{partner}", "aud-fan") is None or \
            s.r.get(f"{prefix}profile:aud-owner") is None:
        assert time.monotonic() < deadline, "audience index never written"
        time.sleep(0.2)
    resp = s.get(f"/v1/audiences/{hero}", key="admin", k=1000)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    users = [r["user_id"] for r in body["shoppers"]]
    assert "aud-fan" in users and "aud-owner" not in users
    fan = body["shoppers"][users.index("aud-fan")]
    assert fan["because"] == partner and fan["reason"].startswith("bought or carted")
    scores = [r["score"] for r in body["shoppers"]]
    assert scores == sorted(scores, reverse=True)
    # Every reason is a real touch of a related item, and nobody listed owns the product.
    for r in body["shoppers"][:30]:
        key = "buyers" if r["reason"].startswith("bought") else "viewers"
        assert s.r.zscore(f"{prefix}{key}:{r['because']}", r["user_id"]) is not None
        profile = s.r.get(f"{prefix}profile:{r['user_id']}")
        assert profile is None or hero not in orjson.loads(profile)["bought"]
    assert s.get(f"/v1/audiences/{hero}", key="read").status_code == 403
    assert s.get(f"/v1/audiences/{hero}", key="admin", k=0).status_code == 422
    empty = s.get("/v1/audiences/no-such-item", key="admin").json()
    assert empty["shoppers"] == [] and empty["known_item"] is False
