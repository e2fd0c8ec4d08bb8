"""Pure model logic: contexts and their evidence, decayed counts, list building, ranking."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from cartwise.contract import ContractError, validate_event
from models import ContextBook, CrossSellRecommender, ItemGraph, ModelConfig, ShopperContext
from models.itemlists import KINDS
from models.ranking import rank_for_user, repeat_share
from models.scoring import round_sig, top_rounded

T0 = 1_700_000_000.0
DAY = 86400.0


def event(n, etype, item, user="u", ts=T0, session="s1", **kw):
    d = {"event_id": f"e{n}", "type": etype, "user_id": user, "item_id": item, "ts": ts, **kw}
    if session:
        d["session_id"] = session
    return validate_event(d)


# -- contexts -------------------------------------------------------------------------------


def test_evidence_follows_event_weights_and_channels():
    book = ContextBook()
    assert book.learn(event(1, "view", "A")) == (T0, [("A", 1.0, 0.0)], [])
    assert book.learn(event(2, "view", "B")) == (
        T0, [("B", 1.0, 0.0)],
        # A's row: B picked 1 step after A (next); B's row: A picked 1 step before B (before).
        [("B", "A", 1.0, 0.0, 1.0, 0.0, 0.0, 1.0), ("A", "B", 1.0, 0.0, 1.0, 0.0, 1.0, 0.0)])
    # Carting B: stronger in both channels, but A was only viewed, so no pair grows. B was
    # the item just viewed: picked again right after itself, a first repeat in this context.
    assert book.learn(event(3, "add_to_cart", "B")) == (
        T0, [("B", 2.0, 3.0)], [("B", "B", 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)])
    # Carting A too: now the pair is a buy-together pair, counted once as a new buy pair.
    assert book.learn(event(4, "add_to_cart", "A")) == (
        T0, [("A", 2.0, 3.0)],
        [("A", "B", 2.0, 3.0, 0.0, 1.0, 0.0, 0.0), ("B", "A", 2.0, 3.0, 0.0, 1.0, 0.0, 0.0)])
    # Buying both (purchase weight 5) adds the difference only.
    order = validate_event({"event_id": "e5", "type": "purchase", "user_id": "u", "ts": T0,
                            "session_id": "s1", "items": [{"item_id": "A"}, {"item_id": "B"}]})
    assert book.learn(order) == (
        T0, [("A", 2.0, 2.0), ("B", 2.0, 2.0)],
        # A was carted last: buying it is its checkout, not a pick of it again.
        [("B", "A", 2.0, 2.0, 0.0, 0.0, 0.0, 0.0), ("A", "B", 2.0, 2.0, 0.0, 0.0, 0.0, 0.0)])
    ctx = book.get("u")
    assert ctx.cart == {} and set(ctx.bought) == {"A", "B"}


def test_next_evidence_counts_steps_back_within_the_session():
    book = ContextBook(ModelConfig(next_steps=2))
    for n, item in enumerate("ABC"):
        book.learn(event(n, "view", item))
    out = book.learn(event(9, "view", "D"))
    # D comes 1 step after C, 2 after B; A is beyond next_steps. The earlier item's row hears
    # of it as "next", D's own row as "before": the same steps, seen the other way round.
    nexts = {(p[0], p[1]): p[6] for p in out[2]}
    assert nexts == {("C", "D"): 1.0, ("B", "D"): 0.5, ("A", "D"): 0.0,
                     ("D", "C"): 0.0, ("D", "B"): 0.0, ("D", "A"): 0.0}
    befores = {(p[0], p[1]): p[7] for p in out[2]}
    assert befores == {("D", "C"): 1.0, ("D", "B"): 0.5, ("D", "A"): 0.0,
                       ("C", "D"): 0.0, ("B", "D"): 0.0, ("A", "D"): 0.0}
    # A second look at B is not a new pick: neither next nor before evidence.
    assert all(p[6] == p[7] == 0.0 for p in book.learn(event(10, "add_to_cart", "B"))[2])


def test_an_item_picked_again_right_after_itself_is_next_evidence_of_itself():
    book = ContextBook()
    book.learn(event(1, "view", "A"))
    out = book.learn(event(2, "view", "A"))  # a re-click: A right after A
    assert out[2] == [("A", "A", 0.0, 0.0, 1.0, 0.0, 1.0, 0.0)]
    # A second repeat in the same context: more picks, no second shopper context.
    assert book.learn(event(3, "view", "A"))[2] == [("A", "A", 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)]
    book.learn(event(4, "view", "B"))  # B right after A: one pick, not a repeat
    # A again, but B came between: a return, not a repeat; another session: neither.
    assert all(p[0] != p[1] for p in book.learn(event(5, "view", "A"))[2])
    assert book.learn(event(6, "view", "A", session="s2"))[2] == []
    # Carting the item just viewed is a pick of it again; buying it from the cart is not.
    assert book.learn(event(7, "add_to_cart", "A", session="s2"))[2] == [
        ("A", "A", 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)]
    assert all(p[0] != p[1] for p in book.learn(event(8, "purchase", "A", session="s2"))[2])
    # The partition's picks by hand: the three repeats of A, and B one step after A: 3 of 4.
    assert book.picks == [3.0, 4.0]
    assert book.repeat_rate() == pytest.approx(3 / 4)
    # It survives a checkpoint of the context (the repeat count of A too).
    again = ContextBook()
    again.load("u", book.get("u").to_json())
    assert again.get("u").items["A"].r == 3


def test_the_next_list_counts_picks_before_the_item_at_before_weight():
    # A's row by hand: B picked right after A (next 1), C two steps after (0.5), D right
    # before A (before 1), E before and after (0.5 each). Totals: after 2, before 1.5.
    row = [("A", "B", 1, 0, 1, 0, 1.0, 0.0), ("A", "C", 1, 0, 1, 0, 0.5, 0.0),
           ("A", "D", 1, 0, 1, 0, 0.0, 1.0), ("A", "E", 1, 0, 1, 0, 0.5, 0.5),
           ("A", "A", 0, 0, 1, 0, 1.0, 0.0)]  # a repeat: 1 of the 3 picks after A
    marginals = [(i, 1, 0) for i in "ABCDE"]
    g = ItemGraph(ModelConfig(min_support=0.5, before_weight=0.5))  # not the default
    g.apply(T0, marginals, row)
    lists = g.lists("A")
    # near total = 3 (after, with the repeat) + 0.5 x 1.5 (before) = 3.75
    got = {e["item_id"]: e["score"] for e in lists["next"]}
    assert got == pytest.approx({"B": 1 / 3.75, "E": 0.75 / 3.75, "C": 0.5 / 3.75,
                                 "D": 0.5 / 3.75})
    # The repeat share and the picks stay those of the picks after A alone.
    assert lists["repeat"] == pytest.approx(1 / 3) and lists["picks"] == 3.0
    # before_weight 0: the directed list of before (D, picked only before A, is no entry).
    g0 = ItemGraph(ModelConfig(min_support=0.5, before_weight=0.0))
    g0.apply(T0, marginals, row)
    assert {e["item_id"]: e["score"] for e in g0.lists("A")["next"]} == pytest.approx(
        {"B": 1 / 3, "E": 0.5 / 3, "C": 0.5 / 3})
    # A checkpoint written before "before" existed (5 fields a row entry) loads as none.
    g0.load_row("Z", b'{"A": [1.0, 0.0, 1.0, 0.0, 1.0]}')
    assert g0.rows["Z"]["A"] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # So does an open epoch's evidence, which new evidence of the same epoch is added to.
    g1 = ItemGraph(ModelConfig(min_support=0.5), sources=1)
    g1.load_open(0, "r", "Z", b'{"A": [1.0, 0.0, 1.0, 0.0, 1.0]}')
    g1.apply(T0, [], [("Z", "A", 1, 0, 0, 0, 0.0, 1.0)], 0, 1.0)
    assert g1.open_rows[0]["Z"]["A"][4:] == [1.0, pytest.approx(g1.rows["Z"]["A"][5])]


def test_an_items_repeat_share_is_its_own_part_of_the_picks_after_it():
    g = ItemGraph(ModelConfig(min_support=0.5))
    g.apply(T0, [("A", 1, 0), ("B", 1, 0)],
            [("A", "A", 0, 0, 1, 0, 1.0), ("A", "A", 0, 0, 0, 0, 1.0),
             ("A", "B", 1, 0, 1, 0, 1.0), ("A", "B", 0, 0, 0, 0, 1.0)])
    lists = g.lists("A")
    # Of 4 picks right after A, 2 were A: a share, never an entry of A's own lists.
    assert lists["repeat"] == 0.5 and lists["picks"] == 4.0
    assert [e["item_id"] for e in lists["next"]] == ["B"]
    assert lists["next"][0]["score"] == 0.5
    assert all(e["item_id"] != "A" for kind in KINDS for e in lists[kind])
    # Below the support floor (shopper contexts, not picks), the share says nothing.
    g2 = ItemGraph(ModelConfig(min_support=2))
    g2.apply(T0, [("A", 1, 0)], [("A", "A", 0, 0, 1, 0, 3.0)])
    assert g2.lists("A")["repeat"] == 0.0


def test_repeat_share_is_drawn_toward_the_partitions_share_by_the_prior():
    # 10 picks after the item, 40% of them itself, against a partition that repeats 10%:
    # (0.4 * 10 + 5 * 0.1) / (10 + 5) by hand.
    assert repeat_share({"repeat": 0.4, "picks": 10.0}, 0.1, 5.0) == pytest.approx(0.3)
    assert repeat_share(None, 0.1, 5.0) == pytest.approx(0.1)  # no lists yet: the partition's
    assert repeat_share({"repeat": 0.4, "picks": 10.0}, 0.1, 0.0) == pytest.approx(0.4)
    assert repeat_share(None, 0.0, 0.0) == 0.0


def test_the_item_the_shopper_is_on_comes_back_only_on_repeat_evidence():
    cfg = ModelConfig(revisit_weight=20.0, repeat_weight=300.0, repeat_prior=5.0,
                      anchor_decay=0.5, viewed_weight=0.6, next_weight=0.0)
    book = ContextBook(cfg)
    book.learn(event(1, "view", "older"))
    book.learn(event(2, "view", "now"))
    ctx = book.get("u")
    none = {"cross_sell": [], "alternatives": [], "next": []}
    # Shoppers never pick "now" again right after it, in a shop that never repeats: it is
    # not suggested; the item seen before it is, at 20 x 0.5.
    got = rank_for_user(ctx, {"now": {**none, "repeat": 0.0, "picks": 50.0}}, {}, 10, cfg,
                        repeat_rate=0.0)
    assert [(e["item_id"], e["score"]) for e in got] == [("older", 10.0)]
    # A third of the picks after it are itself: 300 x 0.6 x (1/3 x 10 + 5 x 0.3) / 15.
    got = rank_for_user(ctx, {"now": {**none, "repeat": 1 / 3, "picks": 10.0}}, {}, 10, cfg,
                        repeat_rate=0.3)
    assert [e["item_id"] for e in got] == ["now", "older"]
    assert got[0]["score"] == pytest.approx(300 * 0.6 * (10 / 3 + 1.5) / 15)
    assert got[0]["kind"] == "revisit"


def test_next_list_is_the_share_of_picks_right_after_an_item():
    g = ItemGraph(ModelConfig(min_support=0.5))
    g.apply(T0, [("A", 1, 0), ("B", 1, 0), ("C", 1, 0)],
            [("A", "B", 1, 0, 1, 0, 1.0), ("A", "C", 1, 0, 1, 0, 0.5),
             ("B", "A", 1, 0, 1, 0, 0.0), ("C", "A", 1, 0, 1, 0, 0.0)])
    nxt = g.lists("A")["next"]
    assert [e["item_id"] for e in nxt] == ["B", "C"]
    assert [e["score"] for e in nxt] == pytest.approx([1 / 1.5, 0.5 / 1.5])
    assert nxt[0]["reason"] == "often picked in the same visit"
    assert nxt[0]["anchor"] == "A" and nxt[0]["evidence"]["share"] == pytest.approx(1 / 1.5)
    assert g.lists("B")["next"] == []
    # Evidence and checkpoints written before "next" existed still load, with no next count.
    g.apply(T0, [], [("B", "C", 1, 0, 1, 0)])
    g.load_row("C", b'{"A": [1.0, 0.0, 1.0, 0.0]}')
    assert g.rows["B"]["C"][4:] == [0.0, 0.0]
    assert g.rows["C"]["A"] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_duplicates_are_applied_once():
    book = ContextBook()
    assert book.learn(event(1, "view", "A")) is not None
    assert book.learn(event(1, "view", "A")) is None
    assert list(book.get("u").seen) == ["e1"]


def test_earlier_sessions_count_less_and_old_items_leave():
    cfg = ModelConfig()
    book = ContextBook(cfg)
    book.learn(event(1, "view", "A", session="s1"))
    out = book.learn(event(2, "view", "B", session="s2", ts=T0 + 3600))
    f = cfg.history_factor
    # ...and a pick in another session is neither a "next" nor a "before" pick.
    assert ("B", "A", f, 0.0, f, 0.0, 0.0, 0.0) in out[2] \
        and ("A", "B", f, 0.0, f, 0.0, 0.0, 0.0) in out[2]
    later = T0 + cfg.history_s + 7200
    out = book.learn(event(3, "view", "C", session="s3", ts=later))
    assert out == (later, [("C", 1.0, 0.0)], [])
    assert list(book.get("u").items) == ["C"]


def test_sessions_are_derived_from_gaps_when_apps_send_none():
    cfg = ModelConfig()
    book = ContextBook(cfg)
    book.learn(event(1, "view", "A", session=None))
    book.learn(event(2, "view", "B", session=None, ts=T0 + 60))
    book.learn(event(3, "view", "C", session=None, ts=T0 + 60 + cfg.session_gap_s + 1))
    sessions = [t.session for t in book.get("u").items.values()]
    assert sessions[0] == sessions[1] != sessions[2]


def test_cart_follows_add_and_remove():
    book = ContextBook()
    book.learn(event(1, "add_to_cart", "A", quantity=3))
    book.learn(event(2, "remove_from_cart", "A", quantity=1))
    assert book.get("u").cart == {"A": 2}
    book.learn(event(3, "remove_from_cart", "A", quantity=5))
    assert book.get("u").cart == {}


def test_memory_bounds_on_context_items_and_shoppers():
    cfg = ModelConfig(context_max_items=3, max_users=10)
    book = ContextBook(cfg)
    for n, item in enumerate("ABCDE"):
        book.learn(event(n, "view", item, ts=T0 + n))
    assert list(book.get("u").items) == ["C", "D", "E"]
    for n in range(25):
        book.learn(event(100 + n, "view", "A", user=f"x{n:02d}", ts=T0 + 100 + n))
    assert len(book.users) <= 10
    assert "x24" in book.users and "x00" not in book.users and "x00" in book.evicted


def test_context_round_trips_through_json():
    book = ContextBook()
    book.learn(event(1, "add_to_cart", "A"))
    book.learn(event(2, "view", "B"))
    ctx = book.get("u")
    assert ShopperContext.from_json(ctx.to_json()) == ctx


# -- item graph -----------------------------------------------------------------------------


def test_counts_halve_every_half_life_across_rebases():
    cfg = ModelConfig(half_life_s=DAY)
    g = ItemGraph(cfg)
    g.apply(T0, [("A", 8.0, 0.0)], [("A", "B", 8.0, 4.0, 1.0, 1.0)])
    for days in (1, 3, 40):  # 40 half-lives crosses the rebase step
        g.apply(T0 + days * DAY, [("Z", 0.0, 0.0)], [])
        c = g.counts("A")
        assert math.isclose(c["all"], 8.0 * 2.0**-days, rel_tol=1e-12)
        assert math.isclose(c["pairs"]["B"][1], 4.0 * 2.0**-days, rel_tol=1e-12)


def _graph_from(pairs, buy=True, config=None):
    """Baskets as lists of items; each basket one shopper carting (or viewing) them all."""
    rec = CrossSellRecommender(config or ModelConfig(llr_min=3.84))
    n = 0
    for u, basket in enumerate(pairs):
        for item in basket:
            n += 1
            rec.learn_one({"event_id": str(n), "type": "add_to_cart" if buy else "view",
                           "user_id": f"u{u}", "item_id": item, "ts": T0 + n})
    rec.settle()
    return rec


def test_a_single_co_occurrence_is_a_suggestion_only_while_fresh_or_never_when_strict():
    baskets = [["A", "B"]] + [[f"x{i}", f"y{i}"] for i in range(50)] * 3
    rec = _graph_from(baskets)  # default: support 1 >= min_support 0.25, for now
    assert [e["item_id"] for e in rec.related("A")] == ["B"]
    # Two half-lives later its support (0.25) is at the floor; a moment later below it.
    later = T0 + 2 * rec.config.half_life_s + 1000
    rec.learn_one({"event_id": "late", "type": "view", "user_id": "z", "item_id": "z",
                   "ts": later})
    rec.settle()
    assert rec.related("A") == []
    strict = _graph_from(baskets, config=ModelConfig(min_support=2.0, llr_min=6.63))
    assert strict.related("A") == []


def test_complements_and_alternatives_are_told_apart():
    baskets = [["phone", "case"]] * 20 + [["tv", f"n{i}"] for i in range(40)]
    views = [["laptopA", "laptopB"]] * 15 + [["tv", f"v{i}"] for i in range(40)]
    rec = CrossSellRecommender(ModelConfig(llr_min=3.84))
    n = 0
    for u, basket in enumerate(baskets + views):
        etype = "add_to_cart" if u < len(baskets) else "view"
        for item in basket:
            n += 1
            rec.learn_one({"event_id": str(n), "type": etype, "user_id": f"u{u}",
                           "item_id": item, "ts": T0 + n})
    rec.settle()
    cross = rec.related("phone", "cross_sell")
    assert [e["item_id"] for e in cross] == ["case"]
    assert cross[0]["kind"] == "cross_sell" and cross[0]["lift"] > 1 and cross[0]["llr"] > 3.84
    assert cross[0]["anchor"] == "phone" and cross[0]["evidence"]["share"] == pytest.approx(1.0)
    assert cross[0]["reason"] == "often bought together"
    assert rec.related("phone", "alternatives") == []  # bought together: not an alternative
    alts = rec.related("laptopA", "alternatives")
    assert [e["item_id"] for e in alts] == ["laptopB"]
    assert rec.related("laptopA", "cross_sell") == []
    with pytest.raises(ValueError):
        rec.related("phone", "upsell-ish")


def test_lists_are_ranked_by_confidence_then_id():
    baskets = [["A", "B"]] * 6 + [["A", "C"]] * 3 + [["A", "D"]] * 3 + [["x", "y"]] * 30
    rec = _graph_from(baskets, config=ModelConfig(llr_min=3.84, half_life_s=1e15))
    got = [(e["item_id"], e["score"]) for e in rec.related("A")]
    assert [i for i, _ in got] == ["B", "C", "D"]
    assert got[0][1] == pytest.approx(0.5) and got[1][1] == pytest.approx(0.25) == got[2][1]


def test_graph_memory_bounds():
    cfg = ModelConfig(max_neighbours=8, max_items=20)
    g = ItemGraph(cfg)
    g.apply(T0, [], [("A", f"n{i}", float(i), 0.0, 1.0, 0.0) for i in range(30)])
    assert len(g.rows["A"]) <= 8
    assert "n29" in g.rows["A"] and "n0" not in g.rows["A"]  # the strongest survive
    for i in range(40):
        g.apply(T0 + i, [(f"i{i:02d}", 1.0, 0.0)], [])
    assert len(g.marg) <= 20 and "i39" in g.marg and "i00" not in g.marg


# -- ranking --------------------------------------------------------------------------------


# Ranking arithmetic, checked by hand with round numbers: no revisits, no next picks.
RANK = ModelConfig(anchor_decay=0.8, viewed_weight=0.6, revisit_weight=0.0, next_weight=0.0,
                   rebuy_weight=0.0)


def _lists(*entries):
    return {"cross_sell": [{"item_id": i, "score": s, "kind": "cross_sell", "reason": f"r-{i}"}
                           for i, s in entries], "alternatives": []}


def test_ranking_excludes_what_must_never_be_suggested():
    book = ContextBook()
    book.learn(event(1, "purchase", "old-durable", ts=T0))
    book.learn(event(2, "purchase", "old-pods", ts=T0))
    later = T0 + 10 * DAY  # the purchases have left the context but are remembered as bought
    book.learn(event(3, "add_to_cart", "phone", ts=later))
    book.learn(event(4, "add_to_cart", "in-cart", ts=later + 1))
    ctx = book.get("u")
    lists = {"phone": _lists(("case", 0.9), ("in-cart", 0.8), ("old-durable", 0.7),
                             ("old-pods", 0.6), ("sold-out", 0.5), ("phone", 0.4),
                             ("charger", 0.3))}
    catalog = {"old-pods": {"consumable": True}, "sold-out": {"in_stock": False},
               "old-durable": {"consumable": False}}
    got = rank_for_user(ctx, lists, catalog, k=10, config=RANK)
    assert [e["item_id"] for e in got] == ["case", "old-pods", "charger"]
    # phone is the second newest anchor ("in-cart" came later): its evidence counts 0.8.
    assert got[0] == {"item_id": "case", "score": 0.72, "kind": "cross_sell", "reason": "r-case"}


def test_ranking_blends_anchors_and_offers_alternatives_only_for_viewed_items():
    book = ContextBook()
    book.learn(event(1, "view", "tv", ts=T0))
    book.learn(event(2, "add_to_cart", "phone", ts=T0 + 1))
    ctx = book.get("u")
    lists = {
        "phone": _lists(("case", 0.5), ("cable", 0.2)),
        "tv": {"cross_sell": [{"item_id": "cable", "score": 0.5, "kind": "cross_sell",
                               "reason": "tv-cable"}],
               "alternatives": [{"item_id": "tv2", "score": 0.4, "kind": "alternatives",
                                 "reason": "tv-alt"}]},
    }
    got = {e["item_id"]: e for e in rank_for_user(ctx, lists, {}, k=10, config=RANK)}
    # phone is newest and carted (weight 1); tv is older (0.8) and only viewed (0.6).
    assert got["case"]["score"] == pytest.approx(0.5)
    assert got["cable"]["score"] == pytest.approx(0.2 + 0.5 * 0.8 * 0.6)
    assert got["cable"]["reason"] == "tv-cable"  # the larger contribution explains it
    assert got["tv2"]["kind"] == "alternatives"
    assert got["tv2"]["score"] == pytest.approx(0.4 * 0.8 * 0.6 * 0.5)


def test_next_picks_are_blended_only_with_a_next_weight():
    book = ContextBook()
    book.learn(event(1, "view", "tv", ts=T0))
    ctx = book.get("u")
    lists = {"tv": {"next": [{"item_id": "soundbar", "score": 0.5, "kind": "next",
                              "reason": "tv-next"}]}}
    assert rank_for_user(ctx, lists, {}, k=10, config=RANK) == []
    cfg = replace(RANK, next_weight=3)
    assert rank_for_user(ctx, lists, {}, k=10, config=cfg) == [
        {"item_id": "soundbar", "score": pytest.approx(0.5 * 0.6 * 3), "kind": "next",
         "reason": "tv-next"}]


def test_library_api_validates_and_deduplicates():
    rec = CrossSellRecommender()
    with pytest.raises(ContractError):
        rec.learn_one({"type": "view"})
    e = {"event_id": "1", "type": "view", "user_id": "u", "item_id": "A", "ts": T0}
    assert rec.learn_one(e) is True
    assert rec.learn_one(e) is False
    assert rec.recommend("nobody") == []


def test_top_rounded_equals_rounding_and_sorting_everything():
    rng = random.Random(3)
    base = [rng.choice([0.1, 0.5, 1.0, 3.0]) for _ in range(400)]
    # Values equal after rounding to 9 digits but not before, so ids must break the tie.
    cands = [(b * (1 + rng.choice([0.0, 1e-12, -1e-12, 1e-3])), f"i{n:03d}")
             for n, b in enumerate(base)]
    for n in (1, 7, 50, 1000):
        naive = sorted(((round_sig(c[0], 9), c) for c in cands), key=lambda t: (-t[0], t[1][1]))
        assert top_rounded(cands, n, 9) == naive[:n]


def test_viewed_items_come_back_as_revisits_carted_ones_do_not():
    book = ContextBook()
    book.learn(event(1, "view", "tv", ts=T0))
    book.learn(event(2, "view", "lamp", ts=T0 + 1))
    book.learn(event(3, "add_to_cart", "phone", ts=T0 + 2))
    ctx = book.get("u")
    cfg = replace(RANK, revisit_weight=2.0)
    got = rank_for_user(ctx, {}, {}, k=10, config=cfg)
    # Anchors newest first: phone (carted: never a revisit), lamp (decay 0.8), tv (0.8²).
    assert [(e["item_id"], e["kind"]) for e in got] == [("lamp", "revisit"), ("tv", "revisit")]
    assert got[0]["score"] == pytest.approx(2.0 * 0.8)
    assert got[1]["score"] == pytest.approx(2.0 * 0.8**2)
    assert rank_for_user(ctx, {}, {}, k=10, config=RANK) == []
    # A revisit that an anchor's list also points to adds both, and still says what it is.
    got = rank_for_user(ctx, {"phone": _lists(("tv", 0.5))}, {}, k=10, config=cfg)
    assert got[0]["item_id"] == "tv" and got[0]["kind"] == "revisit"
    assert got[0]["score"] == pytest.approx(2.0 * 0.8**2 + 0.5)



def test_only_the_newest_list_anchors_are_blended_older_ones_still_come_back():
    book = ContextBook()
    for n, item in enumerate(["tv", "lamp", "phone"]):
        book.learn(event(n + 1, "view", item, ts=T0 + n))
    ctx = book.get("u")
    # Every anchor's list points somewhere; only the newest two may be read.
    lists = {"phone": _lists(("case", 0.5)), "lamp": _lists(("bulb", 0.5)),
             "tv": _lists(("cable", 0.5))}
    cfg = replace(RANK, revisit_weight=2.0, list_anchors=2)
    got = {e["item_id"]: e for e in rank_for_user(ctx, lists, {}, k=10, config=cfg)}
    assert set(got) == {"case", "bulb", "lamp", "tv"}  # tv's list unread, tv itself back
    assert got["tv"]["kind"] == "revisit"
    assert got["tv"]["score"] == pytest.approx(2.0 * 0.8**2)
    # With every anchor's list read, tv's cable comes in at the third anchor's weight.
    wide = {e["item_id"]: e for e in rank_for_user(ctx, lists, {}, k=10,
                                                    config=replace(cfg, list_anchors=30))}
    assert set(wide) == set(got) | {"cable"}
    assert wide["cable"]["score"] == pytest.approx(0.5 * 0.6 * 0.8**2)
    assert {j: e["score"] for j, e in wide.items() if j != "cable"} == \
        {j: e["score"] for j, e in got.items()}


# -- bounds that do not depend on arrival order ---------------------------------------------


def _source_sequences(cfg: ModelConfig, partitions: int) -> list[list[tuple]]:
    """Per events partition, in its own order: (ts, totals, pairs, clock) of each event, as
    the context stage sends them to the item stage."""
    from cartwise.contract import expected_partition, validate_event
    from cartwise.simulator import Shop
    from models.context import ContextBook

    books = [ContextBook(cfg) for _ in range(partitions)]
    clocks: list[float | None] = [None] * partitions
    seqs: list[list[tuple]] = [[] for _ in range(partitions)]
    for raw in Shop(seed=17).events(500, start_ts=1_755_000_000.0):
        e = validate_event(raw)
        p = expected_partition(e.user_id, partitions)
        evidence = books[p].learn(e)
        if evidence is None:
            continue
        ts, marginals, pairs = evidence
        clocks[p] = ts if clocks[p] is None else max(clocks[p], ts)
        seqs[p].append((ts, marginals, pairs, clocks[p]))
    return seqs


def _interleaved(cfg: ModelConfig, seqs: list[list[tuple]], seed: int, most: int) -> ItemGraph:
    """Messages of 1..`most` events from a random source at a time, each source in order."""
    rng = random.Random(seed)
    g = ItemGraph(cfg, sources=len(seqs))
    pos = [0] * len(seqs)
    while left := [p for p in range(len(seqs)) if pos[p] < len(seqs[p])]:
        p = rng.choice(left)
        batch = seqs[p][pos[p]:pos[p] + rng.randint(1, most)]
        pos[p] += len(batch)
        for ts, marginals, _, clock in batch:  # the item stage's order: totals, then pairs
            g.apply(ts, marginals, (), p, clock, close=False)
        for ts, _, pairs, clock in batch:
            g.apply(ts, (), pairs, p, clock, close=False)
        g.advance(max(b[0] for b in batch), p, batch[-1][3])
    return g


@pytest.mark.parametrize("bounds", [dict(max_neighbours=12), dict(max_items=60),
                                    dict(max_neighbours=12, max_items=60)])
def test_bounded_graph_is_the_same_whatever_order_evidence_arrives_in(bounds):
    cfg = ModelConfig(**bounds)
    seqs = _source_sequences(cfg, 4)
    runs = [_interleaved(cfg, seqs, seed, most) for seed, most in ((1, 1), (2, 50), (3, 7))]
    first = runs[0]
    assert first.closed is not None  # epochs were closed, so the bounds applied
    if "max_neighbours" in bounds:
        assert max(len(r) for r in first.rows.values()) <= 4 * cfg.max_neighbours
        assert any(len(r) > cfg.max_neighbours for r in
                   _interleaved(ModelConfig(), seqs, 1, 1).rows.values())  # a bound reached
    if "max_items" in bounds:
        assert len(first.seen_epoch) <= cfg.max_items
    want = {i: first.lists(i) for i in sorted(first.rows)}
    for g in runs[1:]:
        assert {i: g.lists(i) for i in sorted(g.rows)} == want
        assert g.seen_epoch == first.seen_epoch


def test_a_large_batch_of_evidence_is_cut_into_messages_of_whole_events():
    import orjson

    from streams.evidence import pairs_messages

    marginals = [(o, 1.0e9 + o, [(f"i{o}-{k}", 1.0, 0.0) for k in range(30)], 1.0e9 + o)
                 for o in range(0, 400, 2)]
    pairs = [(o, 1.0e9 + o, [(f"i{o}", f"j{k}", 1.0, 0.0, 1.0, 0.0, 0.0) for k in range(50)],
              1.0e9 + o) for o in range(0, 400, 4)]
    msgs = [orjson.loads(m) for m in pairs_messages(3, "g", 401, 1.0e9, 2.0e9, 2.0e9,
                                                    marginals, pairs, [], limit=64 * 1024)]
    assert len(msgs) > 3
    assert all(len(orjson.dumps(m)) < 2 * 64 * 1024 for m in msgs)
    # Every event once, in order; each message's `last` covers its events; only the last one
    # moves "now" and the clock.
    assert [e[0] for m in msgs for e in m["m"]] == [e[0] for e in marginals]
    assert [e[0] for m in msgs for e in m["p"]] == [e[0] for e in pairs]
    for m in msgs[:-1]:
        assert max(e[0] for e in m["m"] + m["p"]) == m["last"] and m["n"] is None
    assert msgs[-1]["last"] == 401 and msgs[-1]["n"] == 2.0e9 == msgs[-1]["c"]
    assert [m["last"] for m in msgs] == sorted(m["last"] for m in msgs)


def test_a_batch_of_evidence_in_one_message_carries_its_marginals_encoded_once():
    """The marginals go to every pairs partition: encoded once per batch and spliced into each
    partition's message, which reads as if encoded whole."""
    import orjson

    from streams.evidence import marginals_of, pairs_messages

    marginals = [(o, 1.0e9 + o, [(f"i{o}", 1.0, 0.0)], 1.0e9 + o) for o in range(5)]
    shared = marginals_of(marginals)
    for pairs in ([], [(2, 1.0e9 + 2, [("i2", "i1", 1.0, 0.0, 1.0, 0.0, 0.0, 0.0)], 1.0e9)]):
        (one,) = pairs_messages(3, "g", 4, 1.0e9, 2.0e9, 2.0e9, shared, pairs, [(1, "i1", 9.0)])
        assert orjson.loads(one) == {
            "src": 3, "g": "g", "last": 4, "t": 1.0e9, "n": 2.0e9, "c": 2.0e9,
            "m": orjson.loads(orjson.dumps(marginals)),
            "p": orjson.loads(orjson.dumps(pairs)), "r": [[1, "i1", 9.0]]}
        assert pairs_messages(3, "g", 4, 1.0e9, 2.0e9, 2.0e9, marginals, pairs,
                              [(1, "i1", 9.0)]) == [one]
    (empty,) = pairs_messages(3, "g", 4, 1.0e9, None, None, marginals_of([]), [], [])
    assert orjson.loads(empty)["m"] == [] and orjson.loads(empty)["n"] is None
