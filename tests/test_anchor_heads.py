"""How much of each anchor's lists the blend reads (`anchor_heads`), and what the stream
fetches catalog facts for (`listed` with the anchors' places)."""

from __future__ import annotations

from models import ModelConfig
from models.ranking import blend, head, listed


def _lists(anchor: str, n: int) -> dict:
    return {"cross_sell": [{"item_id": f"{anchor}-{i}", "score": 1.0 - i / 100, "kind":
                            "cross_sell", "reason": "r", "anchor": anchor} for i in range(n)],
            "alternatives": [], "next": []}


def test_an_older_anchor_reads_a_shorter_head():
    cfg = ModelConfig(per_anchor_cross_sell=20, anchor_heads=0.5)
    assert [head(cfg, "cross_sell", r) for r in range(7)] == [20, 10, 5, 3, 1, 1, 1]
    flat = ModelConfig(per_anchor_cross_sell=20, anchor_heads=1.0)
    assert {head(flat, "cross_sell", r) for r in range(12)} == {20}


def test_the_blend_reads_only_each_anchors_head():
    cfg = ModelConfig(per_anchor_cross_sell=20, anchor_heads=0.5, next_weight=0.0,
                      revisit_weight=0.0, rebuy_weight=0.0)
    lists = {a: _lists(a, 20) for a in ("a", "b", "c")}
    seeds = [("a", True), ("b", True), ("c", True)]
    got = {e["item_id"] for e in blend(seeds, lists, {}, 100, set(), set(), cfg)}
    assert got == {f"a-{i}" for i in range(20)} | {f"b-{i}" for i in range(10)} \
        | {f"c-{i}" for i in range(5)}
    # what the stream fetches facts for: each list's head at its newest place
    assert listed(lists, cfg, {"a": 0, "b": 1, "c": 2}) == got
    assert listed(lists, cfg, {"a": 2, "b": 2, "c": 0}) == {f"a-{i}" for i in range(5)} \
        | {f"b-{i}" for i in range(5)} | {f"c-{i}" for i in range(20)}
    assert len(listed(lists, cfg)) == 60  # no places given: every head whole
