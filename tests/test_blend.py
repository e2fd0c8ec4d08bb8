"""The learned weights of the evidence kinds (models/blend.py) and the blend they drive."""

from __future__ import annotations

import math

import pytest

from cartwise.contract import validate_event
from cartwise.simulator import Shop
from models.blend import BLEND_KINDS, LOG_BOUND, KindWeights, steps
from models.config import ModelConfig, model_config
from models.ranking import anchors, rank_for_user
from models.recommender import CrossSellRecommender

T0 = 1.7e9


def _shop_events(n_users: int = 120, seed: int = 5) -> list:
    return [validate_event(e) for e in Shop(seed=seed).events(n_users, start_ts=T0)
            if isinstance(e, dict)]


def test_the_kind_that_ranked_the_pick_higher_gains_weight():
    learner = KindWeights(rate=0.5)
    # "n" leads on cross_sell evidence, the picked "p" has only next evidence.
    parts = {"n": {"cross_sell": 1.0}, "p": {"next": 0.5}}
    learner.learn_one(T0, parts, ["n", "p"], ["p"])
    w = learner.weights()
    assert w["next"] > 1.0 > w["cross_sell"]
    assert w["alternatives"] == w["revisit"] == w["rebuy"] == 1.0  # no evidence, no step
    assert learner.steps == 1
    # Weighted as learned, p's score comes closer to n's.
    assert learner.predict_one(parts["p"]) / learner.predict_one(parts["n"]) > 0.5


def test_only_relative_weights_move_and_they_stay_bounded():
    learner = KindWeights(rate=50.0)
    parts = {"n": {"cross_sell": 1.0}, "p": {"next": 1e-6, "revisit": 1e-6}}
    for i in range(200):
        learner.learn_one(T0 + i, parts, ["n", "p"], ["p"])
    theta = {k: math.log(v) for k, v in learner.weights().items()}
    assert all(abs(t) <= LOG_BOUND + 1e-12 for t in theta.values())
    assert theta["cross_sell"] == pytest.approx(-LOG_BOUND)
    # The loss ignores the scale of the weights: an event's steps sum to zero.
    step, pairs = steps(dict.fromkeys(BLEND_KINDS, 1.5),
                        {"n": {"cross_sell": 1.0, "next": 0.2}, "m": {"revisit": 0.1},
                         "p": {"next": 0.7, "alternatives": 0.05}}, ["n", "m", "p"], ["p"], 5)
    assert pairs == 2
    assert step["next"] > 0 > step["cross_sell"]
    assert sum(step.values()) == pytest.approx(0.0, abs=1e-12)


def test_a_busier_shop_moves_its_weights_no_faster():
    """An epoch's move does not grow with the events in it, so one rate fits every shop."""
    parts = {"n": {"cross_sell": 1.0}, "p": {"next": 0.5, "cross_sell": 0.1}}
    moved = []
    for n_events in (3, 300):
        learner = KindWeights(rate=0.2, epoch_s=600.0)
        for i in range(n_events):
            learner.learn_one(T0 + i, parts, ["n", "p"], ["p"])
        learner.learn_one(T0 + 600, {}, [], [])
        moved.append(learner.weights())
    assert moved[0]["next"] > 1.0
    assert moved[1] == pytest.approx(moved[0], rel=1e-9)


def test_a_pick_without_evidence_teaches_nothing():
    learner = KindWeights(rate=1.0)
    learner.learn_one(T0, {"n": {"cross_sell": 1.0}}, ["n"], ["unknown"])
    assert learner.steps == 0
    assert set(learner.weights().values()) == {1.0}


def test_an_epoch_applies_its_steps_as_one_sum_whatever_their_order():
    """Partitions may compute an epoch's steps in any interleaving: the weights after the
    epoch must not depend on it, and no step of an epoch sees another's effect."""
    events = [
        ({"a": {"cross_sell": 1.0}, "b": {"next": 0.3}}, ["a", "b"], ["b"]),
        ({"c": {"next": 2.0}, "d": {"alternatives": 0.5, "cross_sell": 0.1}}, ["c", "d"],
         ["d"]),
        ({"e": {"revisit": 1.0}, "f": {"cross_sell": 0.4}}, ["e", "f"], ["f"]),
    ]
    results = []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        learner = KindWeights(rate=0.7, epoch_s=600.0)
        for i in order:
            learner.learn_one(T0 + 10 + i, *events[i])
        assert set(learner.weights().values()) == {1.0}  # the epoch is still open
        learner.learn_one(T0 + 600, {}, [], [])  # an event of the next epoch closes it
        results.append(learner.weights())
    assert results[0] != dict.fromkeys(BLEND_KINDS, 1.0)
    for other in results[1:]:
        assert other == pytest.approx(results[0], rel=1e-12)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="blend rate"):
        KindWeights(rate=-1.0)


def test_default_config_keeps_the_fixed_blend():
    assert ModelConfig().blend_rate == 0.0
    assert CrossSellRecommender().blend is None


def test_unit_weights_and_parts_change_nothing_and_parts_add_up_to_the_score():
    rec = CrossSellRecommender(ModelConfig(rebuy_weight=0.3))
    for e in _shop_events():
        rec.learn_one(e)
    checked = 0
    kinds = set()
    for user, ctx in list(rec.contexts.users.items())[:60]:
        rec.recommend(user, 20)  # brings the anchors' lists up to date
        lists = {a: rec._lists.get(a) for a in anchors(ctx, rec.config)}
        parts: dict[str, dict[str, float]] = {}
        ones = dict.fromkeys(BLEND_KINDS, 1.0)
        same = rank_for_user(ctx, lists, rec.catalog, 20, rec.config, ones, parts)
        assert same == rank_for_user(ctx, lists, rec.catalog, 20, rec.config)
        for e in same:
            kinds |= parts[e["item_id"]].keys()
            assert sum(parts[e["item_id"]].values()) == pytest.approx(e["score"], rel=1e-6)
            checked += 1
    assert checked > 100
    assert {"cross_sell", "next", "revisit"} <= kinds


def test_the_recommender_learns_the_weights_from_its_own_stream_deterministically():
    events = _shop_events()
    config = model_config(["blend_rate=0.05", "blend_epoch_s=60"])
    runs = []
    for _ in range(2):
        rec = CrossSellRecommender(config)
        for e in events:
            rec.learn_one(e)
        runs.append(rec)
    first, second = runs
    weights = first.blend_weights()
    assert weights is not None and first.blend is not None
    assert first.blend.steps > 50
    assert weights != dict.fromkeys(BLEND_KINDS, 1.0)
    assert weights == second.blend_weights()
    # The lists are ranked with the learned weights: not the fixed blend's order for everyone.
    fixed = CrossSellRecommender()
    for e in events:
        fixed.learn_one(e)
    users = list(first.contexts.users)
    assert all(first.recommend(u, 20) == second.recommend(u, 20) for u in users)
    assert any([e["item_id"] for e in first.recommend(u, 20)]
               != [e["item_id"] for e in fixed.recommend(u, 20)] for u in users)


def test_a_shoppers_first_event_teaches_nothing():
    rec = CrossSellRecommender(model_config(["blend_rate=1"]))
    for n, user in enumerate(("u1", "u2", "u3")):
        rec.learn_one({"event_id": f"e{n}", "type": "view", "user_id": user,
                       "item_id": "a", "ts": T0 + n})
    assert rec.blend is not None and rec.blend.steps == 0
