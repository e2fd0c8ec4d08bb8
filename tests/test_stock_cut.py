"""Stock is checked at the cut: facts read for the head of a list give the list that every
candidate's facts give (models/ranking.py, `Scored`; the stream reads facts this way)."""

from __future__ import annotations

import random

import pytest

from cartwise.contract import validate_event
from models import ContextBook, ModelConfig
from models.itemlists import KINDS
from models.ranking import anchors, listed, rank_for_user, rebuy_candidates, score_for_user

T0 = 1_700_000_000.0
ITEMS = [f"i{n:03d}" for n in range(120)]


def _world(seed: int, sold_out: float):
    """A shopper's context, random item lists for every item, and a catalog in which
    `sold_out` of the items are out of stock (some have no record at all)."""
    rng = random.Random(seed)
    book = ContextBook()
    for n in range(rng.randint(3, 25)):
        kind = rng.choice(["view", "view", "view", "add_to_cart", "purchase"])
        book.learn(validate_event({"event_id": f"e{n}", "type": kind, "user_id": "u",
                                   "item_id": rng.choice(ITEMS[:40]), "ts": T0 + 60 * n,
                                   "session_id": "s"}))
    lists = {}
    for item in ITEMS:
        doc = {kind: [{"item_id": j, "score": round(rng.random(), 3), "kind": kind,
                       "reason": kind, "anchor": item}
                      for j in rng.sample(ITEMS, rng.randint(0, 40))]
               for kind in KINDS}
        for kind in KINDS:
            doc[kind].sort(key=lambda e: -e["score"])
        doc["repeat"], doc["picks"] = rng.random() / 3, rng.randint(0, 30)
        lists[item] = doc
    catalog = {}
    for item in ITEMS:
        if rng.random() < 0.1:
            continue  # no catalog record: nothing known, offered as in stock
        catalog[item] = {"in_stock": rng.random() >= sold_out,
                         "consumable": rng.choice([True, False, None])}
    return book.get("u"), lists, catalog


@pytest.mark.parametrize("slack", [0, 5])  # 5: facts read past the head, as the worker does
@pytest.mark.parametrize("sold_out", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("seed", range(12))
def test_facts_for_the_head_give_the_list_every_fact_gives(seed, sold_out, slack):
    ctx, lists, catalog = _world(seed, sold_out)
    cfg = ModelConfig()
    k = 10
    want = rank_for_user(ctx, lists, catalog, k, cfg, repeat_rate=0.2)
    # What the stream does: the facts scoring reads first, then the heads' until none lack.
    candidates = listed({a: lists[a] for a in anchors(ctx, cfg)[: cfg.list_anchors]}, cfg)
    sure = set(anchors(ctx, cfg)) | set(rebuy_candidates(ctx, cfg)) | \
        {j for j in ctx.bought if j in candidates}
    known = {j: catalog.get(j) for j in sure}
    scored = score_for_user(ctx, lists, known, cfg, repeat_rate=0.2)
    rounds = 0
    while missing := scored.unchecked(k + slack, known):
        assert not missing & known.keys()
        known |= {j: catalog.get(j) for j in missing}
        rounds += 1
    assert scored.cut(k, known) == want
    assert all(e["item_id"] not in catalog or catalog[e["item_id"]]["in_stock"]
               for e in want)
    if sold_out == 0.0 and len(candidates) > 3 * k:
        assert rounds <= 1
        assert len(known) < len(sure) + len(candidates)  # not every candidate's facts


def test_an_out_of_stock_head_is_replaced_from_further_down():
    book = ContextBook()
    book.learn(validate_event({"event_id": "e1", "type": "add_to_cart", "user_id": "u",
                               "item_id": "phone", "ts": T0}))
    ctx = book.get("u")
    entries = [{"item_id": f"c{n}", "score": 1.0 - n / 100, "kind": "cross_sell",
                "reason": "r", "anchor": "phone"} for n in range(20)]
    lists = {"phone": {"cross_sell": entries}}
    catalog = {f"c{n}": {"in_stock": n >= 6} for n in range(20)}
    cfg = ModelConfig(rebuy_weight=0)
    scored = score_for_user(ctx, lists, {"phone": None}, cfg)
    known: dict = {"phone": None}
    first = scored.unchecked(3, known)
    assert first == {"c0", "c1", "c2"}  # only the head is asked for
    known |= {j: catalog[j] for j in first}
    second = scored.unchecked(3, known)
    assert second == {"c3", "c4", "c5"}
    known |= {j: catalog[j] for j in second}
    third = scored.unchecked(3, known)
    assert third == {"c6", "c7", "c8"}
    known |= {j: catalog[j] for j in third}
    assert not scored.unchecked(3, known)
    assert [e["item_id"] for e in scored.cut(3, known)] == ["c6", "c7", "c8"]
    assert scored.cut(3, known) == rank_for_user(ctx, lists, catalog | {"phone": None}, 3, cfg)


def test_the_stream_reads_stock_for_the_heads_and_agrees_with_the_library(make_settings,
                                                                           workers):
    """A shop with most items out of stock: the worker walks down each list past many of them
    (more than `HEAD_SLACK`, so facts are read again) and must end with the library's lists,
    none of them offering an item out of stock. On one broker: the ranking is under test."""
    from cartwise.harness import produce, snapshot, wait_complete
    from cartwise.simulator import Shop
    from streams.topics import ensure_topics
    from tests.test_pipeline import START, oracle

    shop = Shop(seed=11)
    events = list(shop.events(250, start_ts=START))
    rng = random.Random(11)
    catalog = [dict(c, in_stock=rng.random() < 0.4) for c in shop.catalog]
    sold_out = {c["item_id"] for c in catalog if not c["in_stock"]}
    settings = make_settings("stock-heads")
    ensure_topics(settings)
    ends = produce(settings, events, catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w], timeout=240)
    snap = snapshot(settings)
    ref = oracle(events, catalog)
    shown = 0
    for user in {e["user_id"] for e in events if isinstance(e, dict)}:
        got = snap["users"][f"user:{user}"]["items"]
        assert got == ref.recommend(user, k=20), user
        assert not {e["item_id"] for e in got} & sold_out, user
        shown += len(got)
    assert shown > 100  # lists were made, past the sold-out items
