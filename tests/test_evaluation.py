"""The prequential replay's arithmetic on hand-checked cases, the baselines, the loaders and
`cartwise evaluate` on a generated fixture (the full evaluation is `make quality`)."""

from __future__ import annotations

import gzip
import math

import orjson
import pytest

from cartwise import datasets
from cartwise.cli import main
from cartwise.contract import validate_event
from models.baselines import (
    AssociationRules,
    MostPopular,
    SequentialRules,
    SessionKNN,
    VectorSessionKNN,
)
from models.evaluation import (
    Replay,
    blocks,
    compare,
    compare_blocks,
    metrics,
    paired_bootstrap,
    sign_test,
)

T0 = 1_700_000_000


def ev(n: int, etype: str, user: str, item: str, dt: float, session: str | None = None):  # noqa: ANN201
    d = {"event_id": f"e{n}", "type": etype, "user_id": user, "item_id": item, "ts": T0 + dt}
    if session:
        d["session_id"] = session
    return validate_event(d)


class Scripted:
    """Answers from a fixed list and records what it was asked, to check the replay's order."""

    def __init__(self, name: str, answer: list[str]) -> None:
        self.name, self.answer = name, answer
        self.calls: list[tuple[str, str]] = []

    def learn(self, event) -> None:  # noqa: ANN001
        self.calls.append(("learn", event.event_id))

    def recommend(self, user: str, k: int) -> list[str]:
        self.calls.append(("recommend", user))
        return self.answer[:k]


def test_metrics_by_hand():
    # ranks: hit at 1, miss, hit at 4, hit at 15 (in the top 20, not the top 10), miss
    m = metrics([1, 0, 4, 15, 0], [1, 1, 0, 1, 0])
    assert m["targets"] == 5
    assert m["hr5"] == pytest.approx(2 / 5)  # ranks 1 and 4
    assert metrics([6], [0])["hr5"] == 0.0 and metrics([6], [0])["hr10"] == 1.0
    assert m["hr10"] == pytest.approx(2 / 5)
    assert m["hr20"] == pytest.approx(3 / 5)
    assert m["mrr20"] == pytest.approx((1 + 1 / 4 + 1 / 15) / 5)
    assert m["new_hit_share"] == pytest.approx(2 / 3)  # hits 1 and 15 were new, 4 was not
    assert metrics([], [])["hr20"] == 0.0


def test_targets_ranks_and_the_reported_part():
    a = Scripted("a", ["x", "y", "z"])
    b = Scripted("b", ["z"])
    events = [
        ev(1, "view", "u", "x", 0),  # first view of a session: no target
        ev(2, "view", "u", "y", 10),  # next view, not asked for: no target
        ev(3, "add_to_cart", "u", "z", 20),  # cart target, z new to u; a ranks it 3, b 1
        ev(4, "purchase", "u", "z", 30),  # z is in the cart: checkout, not a target
        ev(5, "purchase", "u", "y", 40),  # not in the cart: purchase target; a 2, b miss
        ev(6, "add_to_cart", "v", "q", 50),  # reported part starts here; nobody has q
    ]
    replay = Replay([a, b], ["cart", "purchase"], report_from_ts=T0 + 50).run(events)
    t = replay.targets
    assert t.kind == ["cart", "purchase", "cart"]
    assert list(t.new) == [1, 0, 1]
    assert list(t.report) == [0, 0, 1]
    assert list(replay.ranks["a"]) == [3, 2, 0]
    assert list(replay.ranks["b"]) == [1, 0, 0]
    # each model was asked before it learned the event, and only at targets
    assert a.calls[:5] == [("learn", "e1"), ("learn", "e2"), ("recommend", "u"),
                           ("learn", "e3"), ("learn", "e4")]
    assert replay.metrics("a", replay.rows(["cart", "purchase"], report=False))["hr20"] == 1.0
    assert replay.metrics("b", replay.rows(["cart", "purchase"], report=False))["hr20"] == 0.5
    assert replay.rows(["cart"]) == [2]
    assert replay.coverage("a") == 3 / 4  # x, y, z shown in the reported part; 4 items seen


def test_discovery_and_basket_flags():
    a = Scripted("a", ["x"])
    p = {"event_id": "", "type": "purchase", "user_id": "c", "ts": T0}

    def line(n: int, item: str, order: str):  # noqa: ANN202 - an invoice line, as Online Retail
        return validate_event({**p, "event_id": f"p{n}", "order_id": order, "ts": T0 + n,
                               "items": [{"item_id": item}]})

    events = [
        ev(1, "add_to_cart", "u", "x", 0),  # empty cart: not basket; x new to u
        ev(2, "add_to_cart", "u", "y", 1),  # cart {x}: basket; new
        ev(3, "add_to_cart", "u", "x", 2),  # x already in the cart: not basket; not new
        line(10, "a", "o1"),  # first line of o1: not basket
        line(11, "b", "o1"),  # basket (o1 holds a)
        line(12, "a", "o2"),  # a new order: not basket, a not new to c
        line(13, "c", "o2"),  # basket
    ]
    replay = Replay([a], ["cart", "purchase"], report_from_ts=T0).run(events)
    t = replay.targets
    assert t.kind == ["cart"] * 3 + ["purchase"] * 4
    assert list(t.new) == [1, 1, 0, 1, 1, 0, 1]
    assert list(t.basket) == [0, 1, 0, 0, 1, 0, 1]
    assert replay.rows(["cart", "purchase"], only="basket") == [1, 4, 6]
    assert replay.rows(["purchase"], only="new") == [3, 4, 6]
    assert list(replay.ranks["a"]) == [1, 0, 1, 0, 0, 0, 0]


def test_new_for_you_ranks_leave_out_what_the_shopper_touched_before():
    a = Scripted("a", ["x", "v", "z", "w", "y"])
    order = validate_event({"event_id": "p1", "type": "purchase", "user_id": "u", "ts": T0 + 3,
                            "items": [{"item_id": "w"}, {"item_id": "v"}]})
    events = [
        ev(1, "view", "u", "x", 0),  # not a target kind here: x is the shopper's own after it
        ev(2, "add_to_cart", "u", "y", 1),  # y new: 5th as is; x left out, 4th new for you
        ev(3, "add_to_cart", "u", "x", 2),  # x not new: 1st as is, no new-for-you rank
        # w and v are bought in one order, new: the event's own lines are not "own" items, so
        # v keeps its place (1st new for you) and w is 3rd (x and y, carted before, left out)
        order,
    ]
    replay = Replay([a], ["cart", "purchase"], report_from_ts=T0).run(events)
    assert list(replay.targets.new) == [1, 0, 1, 1]
    assert list(replay.ranks["a"]) == [5, 1, 4, 2]
    assert list(replay.fresh["a"]) == [4, 0, 3, 1]
    rows = replay.rows(["cart", "purchase"], only="new")
    assert replay.metrics("a", rows, fresh=True)["mrr20"] == pytest.approx((1 / 4 + 1 / 3 + 1) / 3)
    assert replay.metrics("a", rows)["hr5"] == 1.0
    assert replay.metrics("a", rows, fresh=True)["hr5"] == 1.0


def test_each_metric_is_tested_against_the_baseline_best_at_it():
    from cartwise.evaluate import evaluate, table

    # 40 shoppers, each carts y after viewing x (new item, and y completes a cart with x).
    events = []
    for u in range(40):
        events.append(ev(3 * u, "add_to_cart", f"u{u}", "x", 3 * u))
        events.append(ev(3 * u + 1, "add_to_cart", f"u{u}", "y", 3 * u + 1))
    fillers = [f"f{n}" for n in range(10)]
    models = [Scripted("cartwise", [*fillers[:2], "y", "x"]),  # y at rank 3, x at 4
              Scripted("deep", [*fillers, "y", "x"]),  # y at 11: in the top 20, not the top 5
              Scripted("top", ["x", "y"]), Scripted("none", [])]  # top: x at 1, y at 2
    result = evaluate(events, ["cart"], models, report_from=0.0)
    sig = result["significance"]
    assert set(sig) == {"cart", "discovery", "new for you", "basket"}
    # "deep" and "top" tie at HR@20 (1.0): the tie goes to the better MRR@20
    assert sig["cart"]["hr20"]["baseline"] == "top"
    assert sig["cart"]["mrr20"]["baseline"] == "top"
    v = sig["basket"]["mrr20"]  # rank 3 against rank 2 in every window
    assert (v["wins"], v["losses"]) == (0, 20) and v["diff"] == pytest.approx(1 / 3 - 1 / 2)
    assert sig["basket"]["hr5"]["diff"] == 0.0
    assert result["models"]["deep"]["basket"]["hr5"] == 0.0
    assert result["models"]["deep"]["basket"]["hr20"] == 1.0
    text = table(result)
    assert "-- discovery" in text and "-- basket" in text
    assert "(basket, MRR@20): diff -0.1667" in text and "worse, beyond noise" in text


def test_quality_page_shows_every_group_and_its_verdicts():
    from bench.quality import page
    from cartwise.evaluate import evaluate

    events = []
    for u in range(40):
        events += [ev(2 * u, "add_to_cart", f"u{u}", "x", 2 * u),
                   ev(2 * u + 1, "add_to_cart", f"u{u}", "y", 2 * u + 1)]
    models = [Scripted("cartwise", ["y", "x"]), Scripted("sequential_rules", ["x", "q", "y"])]
    result = evaluate(events, ["cart"], models, report_from=0.0)
    result.update(description="two carts each", limit=80)
    text = page({"tiny": result}, "python -m bench.quality --limit 80")
    assert "| **cartwise** | 80 | 1.0000 | 1.0000 | 1.0000 | 0.7500 |" in text  # all targets
    assert "Basket completion" in text and "Discovery targets" in text
    # y completes each cart: rank 1 against 3, better in all 20 windows
    assert ("| basket | MRR@20 | sequential_rules | +0.6667 | +0.6667 .. +0.6667 | 20 / 0 | "
            "1.9e-06 | **better, beyond noise** |") in text
    assert ("| tiny | basket | +0.0000 (sequential_rules) no sig. difference | +0.0000 "
            "(sequential_rules) no sig. difference | +0.6667 (sequential_rules) better |") in text
    assert "The first 80 events of the log" in text
    assert "Not replayed in this run (`--no-ablations`)." in text


def test_progress_says_how_long_is_left(capsys):
    import sys

    from cartwise.evaluate import EtaProgress

    p = EtaProgress(200, stream=sys.stderr)  # not a terminal under pytest: plain lines
    p(0)
    p(100)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("  0/200 events (0%)")
    assert err[1].startswith("  100/200 events (50%)") and err[1].endswith("s left")


def test_next_view_targets_stay_within_a_session():
    s = Scripted("s", ["b"])
    events = [ev(1, "view", "u", "a", 0, "s1"), ev(2, "view", "u", "b", 5, "s1"),
              ev(3, "view", "u", "c", 10, "s2"),  # new session: no target
              ev(4, "view", "w", "a", 20),  # no session ids: by the 30 minute gap
              ev(5, "view", "w", "b", 20 + 1700), ev(6, "view", "w", "c", 20 + 1700 + 1900)]
    replay = Replay([s], ["view"], report_from_ts=T0).run(events)
    assert replay.targets.kind == ["view", "view"]
    assert list(replay.ranks["s"]) == [1, 1]


def test_statistics_by_hand():
    assert blocks([1, 0, 1, 1, 0, 0], 3) == [0.5, 1.0, 0.0]
    assert blocks([1, 1, 0, 0, 0], 2) == [1.0, 0.0]  # edges at 0, 2, 5
    assert sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 1024)
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    assert paired_bootstrap([0.5, 0.5], [0.5, 0.5]) == (0.0, 0.0, 0.0)
    mean, lo, hi = paired_bootstrap([0.3, 0.4, 0.5, 0.6], [0.2, 0.2, 0.2, 0.2])
    assert mean == pytest.approx(0.25) and 0.1 <= lo <= mean <= hi <= 0.4
    # A always hits, B never: all windows won, p = 2 / 2**20
    c = compare([1] * 40, [0] * 40, n_blocks=20)
    assert (c["wins"], c["losses"], c["diff"]) == (20, 0, 1.0)
    assert c["sign_p"] == pytest.approx(2 / 2**20)
    # MRR@20 and HR@5 per window: rank 1 then 8 against 2 then 2
    c = compare([1, 8] * 20, [2, 2] * 20, n_blocks=20, metric="mrr20")
    assert c["diff"] == pytest.approx((1 + 1 / 8) / 2 - 1 / 2) and c["wins"] == 20
    c = compare([1, 8] * 20, [2, 2] * 20, n_blocks=20, metric="hr5")
    assert c["diff"] == pytest.approx(-0.5) and c["losses"] == 20
    ranks_a, ranks_b = [1, 0, 3, 25, 0, 2] * 7, [0, 5, 0, 1, 0, 0] * 7
    assert compare(ranks_a, ranks_b, n_blocks=6) == compare_blocks(
        blocks([1.0 if 0 < r <= 20 else 0.0 for r in ranks_a], 6),
        blocks([1.0 if 0 < r <= 20 else 0.0 for r in ranks_b], 6))


def test_variants_of_the_model_are_never_the_best_baseline():
    from cartwise.evaluate import evaluate

    events = [ev(1, "view", "u", "A", 0), ev(2, "add_to_cart", "u", "B", 1),
              ev(3, "view", "v", "A", 2), ev(4, "add_to_cart", "v", "B", 3)]
    models = [Scripted("cartwise", []), Scripted("cartwise-ablation", ["B"]),
              Scripted("weak", []), Scripted("strong", ["B"])]
    result = evaluate(events, ["cart"], models, report_from=0.0)
    assert result["best_baseline"] == "strong"


def test_association_and_sequential_rules_by_hand():
    events = [ev(1, "view", "u", "a", 0, "s"), ev(2, "view", "u", "b", 1, "s"),
              ev(3, "view", "u", "c", 2, "s"), ev(4, "view", "w", "a", 3, "t"),
              ev(5, "view", "w", "c", 4, "t")]
    ar, sr = AssociationRules(), SequentialRules()
    for e in events:
        ar.learn(e)
        sr.learn(e)
    assert ar.rules["a"] == {"b": 1.0, "c": 2.0}
    assert ar.recommend("w", 5) == ["a", "b"]  # last item c: a twice, b once
    # SR: c after a at distance 2 (session s) and 1 (session t); b after a at distance 1
    assert sr.rules["a"] == {"b": 1.0, "c": 1.5}
    assert sr.rules["b"] == {"c": 1.0}
    assert "a" not in sr.rules.get("c", {})  # only forward rules
    assert sr.recommend("w", 5) == []  # nothing ever followed c


def test_session_knn_by_hand():
    past = [ev(1, "view", "p", "a", 0, "s1"), ev(2, "view", "p", "b", 1, "s1"),
            ev(3, "view", "q", "a", 2, "s2"), ev(4, "view", "q", "c", 3, "s2"),
            ev(5, "view", "q", "d", 4, "s2"), ev(6, "view", "u", "b", 5, "s3"),
            ev(7, "view", "u", "a", 6, "s3")]
    knn, vknn = SessionKNN(), VectorSessionKNN()
    for e in past:
        knn.learn(e)
        vknn.learn(e)
    # u's session {b, a}: s1 = {a, b} cosine 1; s2 = {a, c, d} cosine 1 / sqrt(6)
    q = knn.query(["b", "a"])
    assert knn.similarity(q, {"a", "b"}) == pytest.approx(1.0)
    assert knn.similarity(q, {"a", "c", "d"}) == pytest.approx(1 / math.sqrt(6))
    assert knn.recommend("u", 5) == ["a", "b", "c", "d"]
    # V-SKNN: b (older) weighs 1/2, a (newest) 1; s2 shares only a -> 1, s1 both -> 1.5
    q = vknn.query(["b", "a"])
    assert vknn.similarity(q, {"a", "c", "d"}) == 1.0
    assert vknn.similarity(q, {"a", "b"}) == 1.5


def test_most_popular_follows_decayed_counts():
    m = MostPopular(half_life_s=10.0)
    for n, (item, dt) in enumerate([("a", 0), ("a", 0), ("a", 0), ("b", 25), ("b", 26)]):
        m.learn(ev(n, "view", "u", item, dt))
    # at t=26: a = 3 * 2**-2.6 ~ 0.49, b = 2**-0.1 + 1 ~ 1.93
    assert m.recommend("x", 2) == ["b", "a"]


def _fixture(tmp_path):  # noqa: ANN001, ANN202
    from cartwise.simulator import Shop

    shop = Shop(seed=11)
    lines = [orjson.dumps(e) for e in shop.events(300, start_ts=T0) if isinstance(e, dict)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(lines)


def test_evaluate_command_on_a_generated_fixture(tmp_path, capsys):
    path, n = _fixture(tmp_path)
    out = tmp_path / "result.json"
    assert main(["evaluate", "--events", str(path), "--out", str(out),
                 "--models", "cartwise,association_rules,sknn"]) == 0
    result = orjson.loads(out.read_bytes())
    assert result["events"] == n
    assert set(result["models"]) == {"cartwise", "association_rules", "sknn"}
    # the same replay run directly gives the same numbers
    from cartwise.evaluate import evaluate, make_models

    events = datasets.load_events(datasets.jsonl(path))
    direct = evaluate(events, ["cart", "purchase"], make_models(["cartwise"]))
    assert direct["models"]["cartwise"]["all"] == result["models"]["cartwise"]["all"]
    assert result["models"]["cartwise"]["all"]["targets"] > 0
    assert "HR@20" in capsys.readouterr().out
    # Sampled: about one target in three is asked, every event still learned.
    assert main(["evaluate", "--events", str(path), "--out", str(out), "--sample", "3",
                 "--models", "cartwise"]) == 0
    sampled = orjson.loads(out.read_bytes())
    full_targets = result["models"]["cartwise"]["all"]["targets"]
    assert sampled["target_sample"] == 3
    assert 0 < sampled["models"]["cartwise"]["all"]["targets"] < full_targets


def test_evaluate_command_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"event_id": "1", "type": "view", "user_id": "u", "item_id": "i", '
                   '"ts": 1700000000}\n{"event_id": "2", "type": "teleport", "user_id": "u", '
                   '"item_id": "i", "ts": 1700000001}\n')
    assert main(["evaluate", "--events", str(bad)]) == 2
    assert "event 2: unknown_type (type)" in capsys.readouterr().err
    assert main(["evaluate", "--events", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["evaluate", "--dataset", "nope"]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    path, _ = _fixture(tmp_path)
    assert main(["evaluate", "--events", str(path), "--models", "magic"]) == 2
    assert main(["evaluate", "--events", str(path), "--targets", "wish"]) == 2
    assert main(["evaluate", "--events", str(path), "--set", "weights=1"]) == 2
    capsys.readouterr()
    assert main(["evaluate", "--events", str(path), "--sample", "0"]) == 2
    assert "--sample takes a whole number >= 1" in capsys.readouterr().err
    assert main(["evaluate", "--events", str(path), "--set", "max_anchors=many"]) == 2
    assert "not a number" in capsys.readouterr().err


def test_settings_reach_the_model():
    from cartwise.evaluate import make_models

    (m,) = make_models(["cartwise"], ["revisit_weight=2", "max_anchors=7"])
    assert m.rec.config.revisit_weight == 2.0 and m.rec.config.max_anchors == 7
    assert isinstance(m.rec.config.max_anchors, int)


def test_loaders_map_each_log_to_contract_events(tmp_path, monkeypatch):
    """Small files in each source's format, made here: what each loader keeps and maps."""
    root = tmp_path / "data"
    (root / "taobao_userbehavior").mkdir(parents=True)
    with gzip.open(root / "taobao_userbehavior" / "taobao_userbehavior_head_815users.csv.gz",
                   "wt") as f:
        f.write("user_id,item_id,category_id,behavior_type,timestamp\n"
                "1,10,5,pv,1511544070\n1,11,5,fav,1511544000\n1,10,5,cart,1511544080\n"
                "2,10,5,buy,1511544090\n")
    (root / "online_retail").mkdir()
    with gzip.open(root / "online_retail" / "online_retail_2010-12-01_to_2011-10-31.csv.gz",
                   "wt") as f:
        f.write("InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,"
                "Country\n"
                "536365,85123A,HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
                "536365,71053,LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom\n"
                "536365,71053,LANTERN,6,2010-12-01 08:26:00,3.39,17850.0,United Kingdom\n"
                "C536379,D,Discount,-1,2010-12-01 09:41:00,27.5,14527.0,United Kingdom\n"
                "536380,22961,JAM,24,2010-12-01 09:41:00,0.85,,United Kingdom\n")
    (root / "diginetica_sample").mkdir()
    (root / "diginetica_sample" / "sample_train-item-views.csv").write_text(
        "session_id;user_id;item_id;timeframe;eventdate\n"
        "2;NA;7;500;2016-05-09\n1;NA;8;0;2016-05-09\n1;NA;9;1000;2016-05-09\n")
    (root / "yoochoose_clicks_100k").mkdir()
    (root / "yoochoose_clicks_100k" / "yoochoose-clicks-100k_train_full.txt").write_text(
        "SessionId\tItemId\tTime\n1\t5\t1396860669.5\n")
    (root / "yoochoose_clicks_100k" / "yoochoose-clicks-100k_test.txt").write_text(
        "SessionId\tItemId\tTime\n2\t6\t1396860670\n")
    monkeypatch.setenv("CARTWISE_DATA_DIR", str(root))

    tb = datasets.load("taobao")
    assert [(e.type, e.user_id, e.lines[0].item_id) for e in tb] == [
        ("view", "1", "11"), ("view", "1", "10"), ("add_to_cart", "1", "10"),
        ("purchase", "2", "10")]  # fav -> view; sorted by time
    assert tb[0].category == "5"
    retail = datasets.load("online_retail")
    assert [(e.user_id, e.session_id, e.lines[0].item_id) for e in retail] == [
        ("c17850", "536365", "85123A"), ("c17850", "536365", "71053"),
        ("guest-536380", "536380", "22961")]  # repeat line and cancellation dropped
    assert retail[1].ts - retail[0].ts == pytest.approx(0.001, abs=1e-6)
    assert retail[0].lines[0].price == 2.55
    dg = datasets.load("diginetica")
    assert [(e.user_id, e.lines[0].item_id) for e in dg] == [("s1", "8"), ("s2", "7"),
                                                               ("s1", "9")]
    yc = datasets.load("yoochoose")
    assert [e.session_id for e in yc] == ["s1", "s2"]
    with pytest.raises(ValueError, match="unknown dataset"):
        datasets.load("retailrocket")


def test_sampled_targets_are_a_subset_with_the_same_ranks():
    from cartwise.simulator import Shop

    shop = Shop(seed=2)
    events = [validate_event(e) for e in shop.events(150, start_ts=1.7e9)
              if isinstance(e, dict)]
    full = Replay([AssociationRules()], ["cart", "purchase"], events[len(events) // 3].ts)
    part = Replay([AssociationRules()], ["cart", "purchase"], events[len(events) // 3].ts,
                  sample=3)
    for e in events:
        full.step(e)
        part.step(e)
    n_full, n_part = len(full.targets.kind), len(part.targets.kind)
    assert 0 < n_part < n_full / 2
    # Learning is the same, so each sampled target has the rank it has in the full replay.
    by_ts = {}
    for i, ts in enumerate(full.targets.ts):
        by_ts.setdefault(ts, []).append(full.ranks["association_rules"][i])
    for i, ts in enumerate(part.targets.ts):
        assert part.ranks["association_rules"][i] in by_ts[ts]


def test_quality_page_keeps_saved_baselines_only_for_the_same_targets():
    from bench.quality import kept_baselines

    def result(model_hr: dict[str, float], events: int = 100) -> dict:
        models = {m: {"purchase": {"hr20": v, "targets": 40}, "hr20_by_window": [v]}
                  for m, v in model_hr.items()}
        return {"events": events, "items": 9, "kinds": ["purchase"], "target_sample": 5,
                "window_ts": [1.0, 2.0], "models": models, "generated": "2026-11-01"}

    saved = result({"cartwise": 0.3, "sequential_rules": 0.4, "sknn": 0.2})
    new = result({"cartwise": 0.45, "cartwise-no_next": 0.35})
    merged = kept_baselines(new, saved)
    assert {m: r["purchase"]["hr20"] for m, r in merged["models"].items()} == {
        "cartwise": 0.45, "cartwise-no_next": 0.35, "sequential_rules": 0.4, "sknn": 0.2}
    assert merged["baselines_from"] == "2026-11-01"
    with pytest.raises(SystemExit, match="events"):
        kept_baselines(result({"cartwise": 0.45}, events=99), saved)
    fewer = result({"cartwise": 0.45})
    fewer["models"]["cartwise"]["purchase"]["targets"] = 39
    with pytest.raises(SystemExit, match="targets differ"):
        kept_baselines(fewer, saved)
