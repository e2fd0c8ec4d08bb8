"""Pure serving logic: trending scores, answer assembly, keys and rate limits (no I/O)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from api.auth import KeyConfigError, KeyRing, RateLimiter, TokenBucket, allows, new_key
from api.fastpath import FastPath
from models import serving
from models.config import ModelConfig
from models.graph import ItemGraph
from models.trending import relative_popularity, trending_entries

DAY = 86400.0


def test_trending_follows_the_shop_faster_than_the_counts_behind_item_lists():
    cfg = ModelConfig(half_life_s=60 * DAY, trending_half_life_s=14 * DAY)
    g = ItemGraph(cfg)
    t0 = 1_700_000_000.0
    g.apply(t0, [("old", 8.0, 0.0)], ())
    g.apply(t0 + 56 * DAY, [("new", 1.0, 0.0)], ())
    # 56 days on: "old" is 8 / 2**4 = 0.5 at the trending half-life, 8 / 2**(56/60) for lists.
    scores = g.trending(["old", "new"])
    assert 2 ** (scores["new"] - scores["old"]) == pytest.approx(1 / 0.5)
    assert g.counts("old")["all"] == pytest.approx(8 * 2 ** (-56 / 60))
    # A marginal checkpointed before trending had its own counter starts from the list count.
    again = ItemGraph(cfg)
    again.load_meta(g.meta())
    again.load_marg("old", b"[3.0, 0.0, 1700000000.0]")
    assert again.marg["old"] == [3.0, 0.0, t0, 3.0]


def test_trending_scores_do_not_depend_on_the_landmark_or_on_when_they_are_read():
    cfg = ModelConfig()
    g = ItemGraph(cfg)
    t0 = 1_700_000_000.0
    g.apply(t0, [("a", 4.0, 0.0), ("b", 1.0, 0.0)], ())
    g.apply(t0 + 7 * DAY, [("b", 1.0, 0.0)], ())
    before = g.trending(["a", "b"])
    # a: 4 at t0; b: 1 at t0 and 1 a half-life later. At t0 + 14d: a = 2, b = 0.5 + 2**-0.5.
    ratio = 2 ** (before["a"] - before["b"])
    assert ratio == pytest.approx(2.0 / (0.5 + 2 ** -0.5))
    # A rebase 40 half-lives later moves the landmark; old scores stay valid as they are.
    g.apply(t0 + 40 * cfg.trending_half_life_s, [("c", 1.0, 0.0)], ())
    after = g.trending(["a", "b", "c"])
    assert after["a"] == pytest.approx(before["a"]) and after["b"] == pytest.approx(before["b"])
    # c, one event now, beats a's four events 40 half-lives ago.
    assert after["c"] > after["a"]
    assert math.isclose(2 ** (after["c"] - after["a"]), 2 ** 40 / 4, rel_tol=1e-9)


def test_trending_entries_skip_excluded_and_out_of_stock_and_scale_to_the_top():
    ranked = [("x", 10.0), ("y", 9.0), ("z", 8.0), ("w", 7.0)]
    catalog = {"y": {"in_stock": False}}
    got = trending_entries(ranked, catalog, 2, exclude={"x"}, category="toys", top_score=10.0)
    assert [e["item_id"] for e in got] == ["z", "w"]
    assert got[0]["score"] == pytest.approx(0.25) and got[0]["kind"] == "trending"
    assert got[0]["reason"] == "popular in toys right now"
    assert got[0]["evidence"] == {"category": "toys"}  # worded at read time
    assert "evidence" not in trending_entries(ranked, {}, 1)[0]  # shop-wide: nothing to say
    assert relative_popularity(12.0, 10.0) == 1.0  # never above the top


def entry(item: str, score: float, kind: str = "cross_sell") -> dict:
    return {"item_id": item, "score": score, "kind": kind, "reason": "r", "extra": 1}


def test_in_stock_drops_unavailable_items_and_internal_fields():
    catalog = {"b": {"in_stock": False}}
    got = serving.in_stock([entry("a", 3), entry("b", 2), entry("c", 1)], catalog, 5, {"c"})
    assert got == [{"item_id": "a", "score": 3, "kind": "cross_sell", "reason": "r"}]
    # The facts a reason is worded from travel with the entry; scoring internals do not.
    evidence = {"share": 0.4, "shoppers": 20.0, "out_of": 50.0}
    rich = entry("a", 3) | {"anchor": "p", "evidence": evidence, "lift": 2.0}
    assert serving.in_stock([rich], {}, 1) == [{"item_id": "a", "score": 3, "kind": "cross_sell",
                                               "reason": "r", "anchor": "p",
                                               "evidence": evidence}]


def test_upsell_is_dearer_same_category_and_needs_a_price():
    doc = {"alternatives": [entry("cheap", 0.5, "alternatives"), entry("dear", 0.4,
                                                                      "alternatives"),
                            entry("other-cat", 0.3, "alternatives"),
                            entry("no-price", 0.2, "alternatives")]}
    catalog = {"cheap": {"price": 50, "category": "c"}, "dear": {"price": 150, "category": "c"},
               "other-cat": {"price": 300, "category": "d"}, "no-price": {"category": "c"}}
    anchor = {"price": 100.0, "category": "c"}
    got = serving.upsell("a", doc, anchor, catalog, 5)
    assert [e["item_id"] for e in got] == ["dear"]
    assert got[0]["price_ratio"] == 1.5 and got[0]["kind"] == "upsell"
    # The anchor is named at read time; the price step is a field, never text.
    assert got[0]["anchor"] == "a" and "%" not in got[0]["reason"]
    assert serving.upsell("a", doc, {"category": "c"}, catalog, 5) == []
    assert serving.upsell_trending([("dear", 1.0), ("cheap", 2.0)], anchor, catalog) == [
        ("dear", 1.0)]


def test_fill_tops_up_from_the_category_first_then_shop_wide_without_repeats():
    entries = [{"item_id": "a", "score": 1, "kind": "cross_sell", "reason": "r"}]
    sets = [([("a", 5.0), ("b", 4.0)], "toys"), ([("b", 9.0), ("c", 8.0), ("d", 7.0)], None)]
    got, used = serving.fill(entries, sets, {}, 4, exclude={"d"})
    assert [e["item_id"] for e in got] == ["a", "b", "c"]
    assert used == "trending:toys"
    full, none = serving.fill(entries, sets, {}, 1, exclude=set())
    assert full == entries and none is None
    _, shop_wide = serving.fill([], [([], "toys"), ([("z", 1.0)], None)], {}, 1, set())
    assert shop_wide == "trending"


def test_placements_and_user_exclusions():
    items = [entry("a", 2), entry("b", 1, "alternatives")]
    assert [e["item_id"] for e in serving.for_placement(items, "cart")] == ["a"]
    assert len(serving.for_placement(items, "home")) == 2
    doc = {"context": {"recent": ["r"], "cart": {"c": 1}, "bought": ["durable", "pods"]}}
    catalog = {"pods": {"consumable": True}}
    assert serving.user_exclusions(doc, catalog) == {"r", "c", "durable"}


def test_keyring_hashes_keys_and_roles_nest():
    key, entry_ = new_key("ingest")
    ring = KeyRing(f" {entry_} ,")
    assert key not in entry_ and ring.role_of(key)[0] == "ingest"
    assert ring.role_of(key + "x") is None
    assert allows("admin", "read") and allows("ingest", "read") and not allows("read", "ingest")
    for bad in ("owner:sha256:" + "0" * 64, "read:md5:abc", "read:sha256:" + "g" * 64):
        with pytest.raises(KeyConfigError):
            KeyRing(bad)


def test_token_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=10.0, burst=20.0)
    assert all(b.take(0.0) == 0.0 for _ in range(20))
    assert b.take(0.0) == pytest.approx(0.1)  # the next token in a tenth of a second
    assert b.take(0.1) == 0.0
    limiter = RateLimiter({"read": 1.0})
    assert limiter.take("k1", "read", 0.0) == 0 and limiter.take("k2", "read", 0.0) == 0


@pytest.mark.parametrize(("kind", "query", "expected"), [
    ("items", b"", ("cross_sell", 10)),
    ("items", b"kind=upsell&k=5", ("upsell", 5)),
    ("users", b"placement=cart", ("cart", 10)),
    ("items", b"k=0", None), ("items", b"k=51", None), ("items", b"k=-1", None),
    ("items", b"k=5&k=6", None), ("items", b"kind=everything", None),
    ("users", b"kind=upsell", None), ("items", b"utm=1", None),
])
def test_fast_path_takes_only_requests_it_can_answer_itself(kind, query, expected):
    fp = FastPath(None, SimpleNamespace(settings=SimpleNamespace(max_k=50)), [])
    assert fp._parse(kind, "pho-000", query) == expected
    assert fp._parse(kind, "x" * 129, b"") is None
