"""The published baselines on tiny logs, every number worked out by hand (pure logic)."""

from __future__ import annotations

import doctest
import math

import pytest

import models.baselines
from cartwise.contract import validate_event
from models.baselines import STAN, VSTAN, AssociationRules, SequentialRules

T0 = 1_700_000_000


def views(*rows: tuple[str, str, float]) -> list:
    """(session, item, seconds) rows as view events; the session is also the shopper."""
    return [validate_event({"event_id": f"e{n}", "type": "view", "user_id": s,
                            "session_id": s, "item_id": item, "ts": T0 + dt})
            for n, (s, item, dt) in enumerate(rows)]


def learned(model, events):  # noqa: ANN202
    for e in events:
        model.learn(e)
    return model


def test_rules_count_an_item_following_itself():
    # s: a, b, a (a repeated click); t: a, c
    log = views(("s", "a", 0), ("s", "b", 1), ("s", "a", 2), ("t", "a", 3), ("t", "c", 4))
    ar = learned(AssociationRules(), log)
    # AR, every pair of positions both ways: (a,b) once; the second a pairs with the first a
    # (a->a twice, both ways) and with b; t adds a<->c.
    assert ar.rules["a"] == {"b": 2.0, "a": 2.0, "c": 1.0}
    assert ar.rules["b"] == {"a": 2.0}
    assert ar.recommend("s", 3) == ["a", "b", "c"]  # last item a: a and b tie, by id
    assert ar.recommend("t", 3) == ["a"]
    sr = learned(SequentialRules(), log)
    # SR: b after a (1 step), a after b (1 step) and after a (2 steps: 1/2), c after a.
    assert sr.rules["a"] == {"b": 1.0, "a": 0.5, "c": 1.0}
    assert sr.rules["b"] == {"a": 1.0}
    assert sr.recommend("s", 3) == ["b", "c", "a"]


def test_sequential_rules_look_back_at_most_steps_positions():
    log = views(("s", "a", 0), ("s", "b", 1), ("s", "c", 2), ("s", "d", 3))
    sr = learned(SequentialRules(steps=2), log)
    assert sr.rules["a"] == {"b": 1.0, "c": 0.5}  # d is three steps after a
    assert sr.rules["b"] == {"c": 1.0, "d": 0.5}


# p1: a, b, c; r: b, e; q: c, d; the current session u: b, c (c newest).
NEIGHBOURS = views(("p1", "a", 0), ("p1", "b", 1), ("p1", "c", 2), ("r", "b", 5), ("r", "e", 6),
                   ("q", "c", 10), ("q", "d", 11), ("u", "b", 20), ("u", "c", 21))


def test_stan_by_hand():
    m = learned(STAN(), NEIGHBOURS)
    spw, inh, snh = 1.02, 2.05, 5 * 86400.0
    q = {"b": math.exp(-1 / spw), "c": 1.0}  # position weights, the newest item 1
    assert m.query(["b", "c"]) == pytest.approx(q)

    def sim(dot: float, size: int, age: float) -> float:  # s.n / sqrt(l(s) l(n)) * recency
        return dot / math.sqrt(2 * size) * math.exp(-age / snh)

    w_p1 = sim(q["b"] + q["c"], 3, 21 - 2)
    w_r = sim(q["b"], 2, 21 - 6)
    w_q = sim(q["c"], 2, 21 - 11)
    # session keys are shopper/session
    assert m.weight(m.query(["b", "c"]), "p1/p1") == pytest.approx(w_p1)
    assert m.weight(m.query(["b", "c"]), "q/q") == pytest.approx(w_q)
    # Each neighbour's items decay with their distance from the match, the newest item of u
    # the neighbour holds: c at position 2 of p1, b at 0 of r, c at 0 of q.
    d = math.exp(-1 / inh)
    expected = {"a": w_p1 * d * d, "b": w_p1 * d + w_r, "c": w_p1 + w_q, "e": w_r * d,
                "d": w_q * d}
    assert m.scores("u") == pytest.approx(expected)
    assert m.recommend("u", 5) == sorted(expected, key=lambda i: -expected[i])


def test_stan_prefers_the_recent_neighbour():
    # Two neighbours with the same items, one two days older: with a one-day recency scale,
    # the older one counts e^-2 as much.
    log = views(("old", "a", 0), ("old", "x", 1), ("new", "a", 2 * 86400),
                ("new", "y", 2 * 86400 + 1), ("u", "a", 2 * 86400 + 2))
    m = learned(STAN(snh_days=1.0), log)
    s = m.scores("u")
    assert s["x"] / s["y"] == pytest.approx(math.exp(-2))
    assert m.recommend("u", 3)[:2] == ["a", "y"]


def test_vstan_by_hand():
    m = learned(VSTAN(), NEIGHBOURS)
    stan = learned(STAN(), NEIGHBOURS)
    ipw, idf = 1.02, 5.0
    # Sessions so far: p1, r, q, u (4); holding: a 1, b 3, c 3, d 1, e 1.
    def item(i: str) -> float:
        return 1 + idf * math.log(4 / {"a": 1, "b": 3, "c": 3, "d": 1, "e": 1}[i])

    q = stan.query(["b", "c"])
    w = {n: stan.weight(q, f"{n}/{n}") for n in ("p1", "r", "q")}
    # r's match is b, one step before u's newest item: its items weigh e^(-1/ipw).
    w["r"] *= math.exp(-1 / ipw)
    d = math.exp(-1 / 2.05)
    expected = {"a": w["p1"] * d * d * item("a"), "b": (w["p1"] * d + w["r"]) * item("b"),
                "c": (w["p1"] + w["q"]) * item("c"), "e": w["r"] * d * item("e"),
                "d": w["q"] * d * item("d")}
    assert m.scores("u") == pytest.approx(expected)
    assert m.recommend("u", 5) == sorted(expected, key=lambda i: -expected[i])
    assert m.recommend("u", 5) != stan.recommend("u", 5)  # the IDF lifts the rare d and e


def test_the_docstring_examples_run():
    assert doctest.testmod(models.baselines).failed == 0
