"""RFM segments: the arithmetic on hand-checked cases, the order history the context keeps,
and the admin profile route over the real stream."""

from __future__ import annotations

import pickle
import random
import time

import pytest
from river import cluster

from cartwise.contract import prepare_event
from models.config import ModelConfig
from models.context import ContextBook, ShopperContext
from models.interests import InterestClusters, SparseKMeans, label, preferences
from models.segments import (
    DAY,
    GENERAL_TO_DEVELOP,
    GENERAL_VALUE,
    IMPORTANT_TO_DEVELOP,
    IMPORTANT_VALUE,
    SegmentConfig,
    quadrant,
    rfm,
)
from tests.conftest import Served

CFG = SegmentConfig()
NOW = 1_700_000_000.0


@pytest.mark.parametrize(("orders", "spent", "want"), [
    (2, 600.0, IMPORTANT_VALUE),
    (5, 5000.0, IMPORTANT_VALUE),
    (1, 600.0, IMPORTANT_TO_DEVELOP),
    (2, 599.99, GENERAL_VALUE),
    (2, 300.0, GENERAL_VALUE),
    (2, 299.0, GENERAL_TO_DEVELOP),
    (1, 599.0, GENERAL_TO_DEVELOP),
    (0, 0.0, None),
])
def test_quadrants_follow_the_spec_thresholds(orders, spent, want):
    assert quadrant(orders, spent, CFG) == want


def test_thresholds_are_configurable_and_checked():
    strict = SegmentConfig(window_days=30, frequent_orders=3, high_spend=1000, mid_spend=100)
    assert quadrant(2, 2000, strict) == IMPORTANT_TO_DEVELOP
    assert quadrant(3, 150, strict) == GENERAL_VALUE
    with pytest.raises(ValueError, match="mid_spend"):
        SegmentConfig(high_spend=100, mid_spend=200)
    with pytest.raises(ValueError, match="window"):
        SegmentConfig(window_days=0)


def test_rfm_counts_only_the_window_and_recency_from_the_last_order():
    orders = [[NOW - 200 * DAY, 900.0], [NOW - 60 * DAY, 250.0], [NOW - 10 * DAY, None],
              [NOW - 2.5 * DAY, 400.0]]
    got = rfm(orders, NOW, CFG)
    assert (got.frequency, got.monetary, got.unpriced_orders) == (3, 650.0, 1)
    assert got.recency_days == 2.5 and got.quadrant == IMPORTANT_VALUE
    # Seen from a time before the last two orders: they do not exist yet.
    earlier = rfm(orders, NOW - 30 * DAY, CFG)
    assert (earlier.frequency, earlier.monetary, earlier.recency_days) == (1, 250.0, 30.0)
    assert earlier.quadrant == GENERAL_TO_DEVELOP
    never = rfm([], NOW, CFG)
    assert (never.recency_days, never.frequency, never.quadrant) == (None, 0, None)


def purchase(user: str, ts: float, lines: list[tuple[str, int, float | None]], n: int):
    return prepare_event({"type": "purchase", "user_id": user, "event_id": f"o{n}", "ts": ts,
                          "items": [{"item_id": i, "quantity": q, "price": p}
                                    for i, q, p in lines]}, ts)[0]


def test_context_keeps_one_order_per_purchase_event_in_time_order_and_bounded():
    cfg = ModelConfig(orders_keep_s=100 * DAY, orders_max=3)
    book = ContextBook(cfg)
    book.learn(purchase("u", NOW, [("a", 2, 10.0), ("b", 1, 5.5)], 1))
    book.learn(purchase("u", NOW, [("a", 2, 10.0)], 1))  # the same event again: ignored
    book.learn(purchase("u", NOW - DAY, [("c", 1, None)], 2))  # late, unpriced
    assert book.get("u").orders == [[NOW - DAY, None], [NOW, 25.5]]
    book.learn(purchase("u", NOW + DAY, [("d", 1, 1.0)], 3))
    book.learn(purchase("u", NOW + 2 * DAY, [("e", 1, 2.0)], 4))
    assert [o[1] for o in book.get("u").orders] == [25.5, 1.0, 2.0]  # at most 3
    book.learn(purchase("u", NOW + 150 * DAY, [("f", 1, 3.0)], 5))
    assert book.get("u").orders == [[NOW + 150 * DAY, 3.0]]  # older than 100 days: gone
    again = ShopperContext.from_json(book.get("u").to_json())
    assert again.orders == book.get("u").orders


def test_a_context_checkpointed_before_orders_were_kept_still_loads():
    raw = b'{"i": [], "c": {}, "b": {"a": 1.0}, "e": [], "t": 1.0, "s": "", "n": 0}'
    assert ShopperContext.from_json(raw).orders == []


def test_profile_route_segments_shoppers_from_their_purchases(served: Served):
    now = time.time()
    events = [
        # Two orders, 700 in the window: important value.
        {"type": "purchase", "user_id": "rfm-a", "event_id": "rfm-a1", "ts": now - 40 * DAY,
         "items": [{"item_id": "pho-000", "quantity": 1, "price": 350.0}]},
        {"type": "purchase", "user_id": "rfm-a", "event_id": "rfm-a2", "ts": now - 3 * DAY,
         "items": [{"item_id": "aud-001", "quantity": 2, "price": 175.0}]},
        # One big order in the window, one long before it: important to develop.
        {"type": "purchase", "user_id": "rfm-b", "event_id": "rfm-b1", "ts": now - 200 * DAY,
         "items": [{"item_id": "pho-001", "quantity": 1, "price": 50.0}]},
        {"type": "purchase", "user_id": "rfm-b", "event_id": "rfm-b2", "ts": now - 1 * DAY,
         "items": [{"item_id": "pho-002", "quantity": 1, "price": 650.0}]},
    ]
    assert served.post("/v1/events", events).status_code == 202
    deadline = time.monotonic() + 30
    while served.r.get(f"{served.settings.prefix}profile:rfm-b") is None or \
            served.r.get(f"{served.settings.prefix}profile:rfm-a") is None:
        assert time.monotonic() < deadline, "profiles never reached Redis"
        time.sleep(0.2)
    deadline = time.monotonic() + 30
    while len(served.get("/v1/users/rfm-b/profile", key="admin").json()["bought"]) < 2:
        assert time.monotonic() < deadline, "second order never reached the profile"
        time.sleep(0.2)
    a = served.get("/v1/users/rfm-a/profile", key="admin").json()
    assert a["rfm"]["frequency"] == 2 and a["rfm"]["monetary"] == 700.0
    assert a["rfm"]["quadrant"] == IMPORTANT_VALUE and 2.9 < a["rfm"]["recency_days"] < 3.1
    b = served.get("/v1/users/rfm-b/profile", key="admin").json()
    assert (b["rfm"]["frequency"], b["rfm"]["monetary"]) == (1, 650.0)
    assert b["rfm"]["quadrant"] == IMPORTANT_TO_DEVELOP and b["orders_kept"] == 2
    assert b["segment_config"]["window_days"] == 90.0
    missing = served.get("/v1/users/nobody-bought/profile", key="admin")
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "path.user_id"
    assert served.get("/v1/users/rfm-a/profile", key="read").status_code == 403


# -- interest clusters ------------------------------------------------------------------------

def test_preferences_are_shares_of_touch_weight_per_category():
    catalog = {"a": {"category": "coffee"}, "b": {"category": "coffee"},
               "c": {"category": "books"}, "d": {}}
    got = preferences([("a", 1.0), ("b", 3.0), ("c", 4.0), ("d", 5.0), ("x", 2.0)], catalog)
    assert got == {"coffee": 0.5, "books": 0.5}
    assert preferences([("d", 1.0)], catalog) == {}
    assert label({"coffee": 0.7, "books": 0.25, "toys": 0.05}) == "coffee+books"
    assert label({}) == "mixed"


def test_interest_clusters_separate_tastes_and_survive_a_checkpoint():
    clusters = InterestClusters()
    kinds = [{"coffee": 0.9, "books": 0.1}, {"phones": 0.8, "audio": 0.2}]
    for _ in range(50):
        for prefs in kinds:
            clusters.learn(prefs)
    coffee, phones = clusters.learn(kinds[0]), clusters.learn(kinds[1])
    assert coffee["cluster"].startswith("coffee") and phones["cluster"].startswith("phones")
    assert coffee["categories"] == {"coffee": 0.9, "books": 0.1}
    again = InterestClusters.from_bytes(clusters.to_bytes())
    assert again.learn(kinds[0])["cluster"] == coffee["cluster"]
    assert clusters.learn({}) is None


class _DenseKMeans:
    """The same online k-means written plainly: every centre a dict of values, every value
    moved on every step. What SparseKMeans must compute, at a cost that follows the catalog."""

    def __init__(self, n: int, rate: float) -> None:
        self.centers: list[dict[str, float]] = [{} for _ in range(n)]
        self.rate = rate

    def predict_one(self, x: dict[str, float]) -> int:
        def distance(c: int) -> float:
            centre = self.centers[c]
            keys = centre.keys() | x.keys()
            return sum((centre.get(k, 0.0) - x.get(k, 0.0)) ** 2 for k in keys)

        return min(range(len(self.centers)), key=distance)

    def learn_predict_one(self, x: dict[str, float]) -> int:
        c = self.predict_one(x)
        centre = self.centers[c]
        for k in centre:
            centre[k] *= 1.0 - self.rate
        for k, v in x.items():
            centre[k] = centre.get(k, 0.0) + self.rate * v
        return c


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sparse_kmeans_assigns_and_names_like_a_dense_k_means(seed: int):
    """The scaled, norm-caching k-means must agree with the plain one on a wide, long-tailed
    catalog: the same closest centre, the same centre values and the same names."""
    rng = random.Random(seed)
    cats = [f"c{i}" for i in range(600)]
    ours = SparseKMeans(n_clusters=8, halflife=0.1, mu=0.0, sigma=0.0, seed=seed)
    plain = _DenseKMeans(8, 0.1)
    agree = 0
    for n in range(3000):
        picked = {cats[min(int(rng.paretovariate(0.8)), 599)] for _ in range(rng.randint(1, 6))}
        w = [rng.random() + 0.01 for _ in picked]
        x = {c: v / sum(w) for c, v in zip(sorted(picked), w, strict=True)}
        a, b = ours.learn_predict_one(x), plain.learn_predict_one(x)
        agree += a == b
        if n % 97 == 0:  # the cached label and norm equal ones computed from the whole centre
            c = ours.predict_one(x)
            values = ours.centre(c)
            assert ours.label(c) == label(values)
            assert ours.scale[c] ** 2 * ours.norms[c] == pytest.approx(
                sum(v * v for v in values.values()))
            if a == b:
                assert values == pytest.approx(
                    {k: plain.centers[b].get(k, 0.0) for k in values}, abs=1e-9)
    # Float rounding may flip a near tie now and then; anything more is a different algorithm.
    assert agree >= 2990
    back = InterestClusters.from_bytes(pickle.dumps((cluster.KMeans(n_clusters=8), 7)))
    assert isinstance(back.model, SparseKMeans) and back.learned == 7


def test_a_cluster_forgets_the_tastes_its_members_left():
    """Centres shrink in the categories their new members lack: once shoppers move on from
    tea to coffee, the cluster is named after coffee, not a mix of everything it has seen."""
    km = SparseKMeans(n_clusters=2, halflife=0.1, mu=0.0, sigma=0.0, seed=1)
    for n in range(200):
        km.learn_predict_one({f"tea{n % 20}": 0.5, "cups": 0.5})
    c = km.learn_predict_one({"tea1": 0.5, "cups": 0.5})
    assert km.label(c) == "cups"
    for _ in range(60):
        km.learn_predict_one({"coffee": 0.7, "cups": 0.3})
    c = km.predict_one({"coffee": 0.7, "cups": 0.3})
    assert km.label(c) == "coffee+cups"
    assert km.centre(c).get("tea3", 0.0) < 0.01


@pytest.mark.parametrize("seed", [4, 5])
def test_sparse_kmeans_names_every_centre_from_its_candidates(seed: int):
    """Only keys that may be named are kept as candidates; every centre's label must still
    equal one read from the whole centre while tastes move and new categories rise."""
    rng = random.Random(seed)
    km = SparseKMeans(n_clusters=8, halflife=0.1, mu=0.0, sigma=0.01, seed=seed)
    named = set()
    for n in range(3000):
        # tastes of 4 categories out of 32; every 200 shoppers each taste moves one on
        taste = rng.randrange(8) + n // 200
        picked = {f"c{(4 * taste + min(int(rng.paretovariate(1.5)) - 1, 3)) % 32}"
                  for _ in range(rng.randint(1, 3))}
        w = [rng.random() + 0.01 for _ in picked]
        km.learn_predict_one({c: v / sum(w) for c, v in zip(sorted(picked), w, strict=True)})
        for c in km.centers:
            want = label(dict(km.centers[c]))
            assert km.label(c) == want, (n, c)
            named.add(want)
    assert len(named) > 20  # the check saw many names come and go
    # a checkpoint pickled before centres had a scale (their values as they are) loads
    names = {c: km.label(c) for c in km.centers}
    for c, centre in km.centers.items():
        for k in centre:
            centre[k] *= km.scale[c]
    del km.scale, km.moves
    back = InterestClusters.from_bytes(pickle.dumps((km, 9)))
    assert back.model.scale == dict.fromkeys(back.model.centers, 1.0)
    assert {c: back.model.label(c) for c in back.model.centers} == names
    assert back.learn({"c1": 1.0}) is not None


def test_profile_route_names_a_browsing_shoppers_interest(served: Served):
    facts = {c["item_id"]: c for c in served.shop.catalog}
    items = [i for i, c in facts.items() if c["category"] == "coffee"][:3]
    now = time.time()
    events = [{"type": "view", "user_id": "int-a", "item_id": i, "event_id": f"int-a{n}",
               "ts": now + n} for n, i in enumerate(items)]
    assert served.post("/v1/events", events).status_code == 202
    deadline = time.monotonic() + 30
    while (resp := served.get("/v1/users/int-a/profile", key="admin")).status_code != 200 or \
            len(resp.json()["interest"]["categories"]) < 1:
        assert time.monotonic() < deadline, "interest never reached the profile"
        time.sleep(0.2)
    body = resp.json()
    assert body["interest"]["categories"] == {"coffee": 1.0}
    assert body["interest"]["cluster"]
    assert body["rfm"]["frequency"] == 0 and body["rfm"]["quadrant"] is None
