"""When a changed item list is rebuilt (`list_min_change`, `list_max_age_s`): the graph's rule,
the library that follows it, and the stream's pending lists that wait for it."""

from __future__ import annotations

from models import CrossSellRecommender, ItemGraph, ModelConfig
from streams.graph_stage import GraphPartition, GraphStage

T0 = 1_700_000_000.0
DAY = 86400.0
CFG = ModelConfig(half_life_s=10 * DAY, list_min_change=0.1, list_max_age_s=3 * DAY)


def _pair(other: str, w: float) -> tuple:
    # (item, other, all, buy, contexts all, contexts buy, next, before): a row mass of 2w
    return ("a", other, w, 0.0, 1.0, 0.0, w, 0.0)


def _wide(g: ItemGraph, ts: float = T0) -> None:
    g.apply(ts, [("a", 50.0, 0.0)], [_pair(f"n{i:02d}", 1.0) for i in range(50)])


def test_a_wide_row_is_rebuilt_once_a_tenth_of_its_evidence_is_new():
    g = ItemGraph(CFG)
    _wide(g)
    mark = g.list_mark("a")
    assert abs(mark[0] - 100.0) < 1e-9
    g.apply(T0 + 1, [], [_pair("n00", 4.0)])  # 8 of 108: under a tenth
    assert not g.list_due("a", mark)
    g.apply(T0 + 2, [], [_pair("z", 2.0)])  # 12 of 112: over
    assert g.list_due("a", mark)
    assert g.list_due("a", None)  # never computed
    assert ItemGraph(ModelConfig(list_min_change=0)).list_due("a", mark)  # every change


def test_decay_alone_is_no_change_until_the_list_is_too_old():
    g = ItemGraph(CFG)
    _wide(g)
    mark = g.list_mark("a")
    g.apply(T0 + 2 * DAY, [], [_pair("n01", 0.5)])  # evidence has faded by 2**-0.2 since
    assert not g.list_due("a", mark)
    g.apply(T0 + 3 * DAY, [], [_pair("n01", 0.01)])
    assert g.list_due("a", mark)  # list_max_age_s


def test_the_rule_holds_across_a_rebase_of_the_stored_counts():
    cfg = ModelConfig(half_life_s=DAY, trending_half_life_s=DAY, list_min_change=0.1,
                      list_max_age_s=1e12)
    g = ItemGraph(cfg)
    _wide(g)
    mark = g.list_mark("a")
    landmark = g.landmark
    later = T0 + 40 * DAY  # past the rebase step: every stored count is rescaled
    g.apply(later, [], [_pair("n02", 100.0 * 2.0**-40 * 0.02)])
    assert g.landmark != landmark
    assert not g.list_due("a", mark)
    g.apply(later, [], [_pair("n03", 100.0 * 2.0**-40 * 0.2)])
    assert g.list_due("a", mark)


def test_a_pruned_reloaded_or_recycled_row_is_rebuilt_whatever_its_mass():
    g = ItemGraph(ModelConfig(list_min_change=0.5, max_neighbours=40))
    _wide(g)  # 50 neighbours over the bound of 40: pruned as it came
    assert len(g.rows["a"]) <= 40
    mark = g.list_mark("a")
    assert not g.list_due("a", mark)
    raw = g.row_json("a")
    g.load_row("a", raw)
    assert g.list_due("a", mark)
    mark = g.list_mark("a")
    g.repeat("a", 7 * DAY)  # a shopper bought it again: its published cycle may change
    assert g.list_due("a", mark)


def test_the_library_serves_a_list_until_it_changed_enough_and_settles_it():
    rec = CrossSellRecommender(ModelConfig(list_min_change=0.5, list_max_age_s=1e12),
                               list_interval_s=1e-9)
    n = 0

    def basket(user: str, items: list[str]) -> None:
        nonlocal n
        for item in items:
            n += 1
            rec.learn_one({"event_id": str(n), "type": "add_to_cart", "user_id": user,
                           "item_id": item, "ts": T0 + n})

    for u in range(6):
        basket(f"u{u}", ["a", "b", "c"])
    before = [e["item_id"] for e in rec.related("a", "next")]
    basket("u9", ["a", "z"])  # a little new evidence: a row that gained under half
    assert [e["item_id"] for e in rec.related("a", "next")] == before
    rec.settle()  # every list against the current counts, as an idle stream does
    assert "z" in [e["item_id"] for e in rec.related("a", "next")]
    # without an interval the library recomputes every changed list: `related` is exact
    exact = CrossSellRecommender(ModelConfig(list_min_change=0.5))
    rec = exact
    for u in range(6):
        basket(f"u{u}", ["a", "b", "c"])
    rec.related("a", "next")
    basket("u9", ["a", "z"])
    assert "z" in [e["item_id"] for e in rec.related("a", "next")]


def test_the_stream_leaves_unchanged_rows_out_of_pending_until_they_change():
    g = ItemGraph(CFG)
    _wide(g)
    g.apply(T0, [("b", 1.0, 0.0)], [("b", "a", 1.0, 0.0, 1.0, 0.0, 1.0, 0.0)])
    st = GraphPartition(offset=0, graph=g, hwm={})
    st.marks["a"] = g.list_mark("a")
    g.apply(T0 + 1, [], [_pair("n00", 1.0)])
    st.pending = {"a": 1.0, "b": 2.0}
    parked: list[str] = []
    assert list(GraphStage._lists_due(st, 100.0, 1.0, parked)) == ["b"]
    assert parked == ["a"]
    st.computed_at["b"] = 99.5  # written half a second ago: waits, not parked
    parked.clear()
    assert list(GraphStage._lists_due(st, 100.0, 1.0, parked)) == []
    assert parked == ["a"]


def test_a_parked_row_comes_back_once_its_list_is_too_old():
    g = ItemGraph(CFG)
    _wide(g)
    st = GraphPartition(offset=0, graph=g, hwm={})
    st.marks["a"] = g.list_mark("a")
    st.parked["a"] = 123.0  # its oldest evidence not yet in its list
    GraphStage.sweep_parked(st)
    assert st.parked == {"a": 123.0} and not st.pending
    g.apply(T0 + 3 * DAY, [("x", 1.0, 0.0)], [])  # only time passes for "a"
    GraphStage.sweep_parked(st)
    assert st.pending == {"a": 123.0} and not st.parked
