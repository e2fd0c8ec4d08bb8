"""Experiments: deterministic assignment, validation, and the report's statistics."""

from __future__ import annotations

import math

import pytest

from models.experiments import (
    Experiment,
    ExperimentError,
    choose,
    compare,
    mean_ci,
    parse_counters,
    report,
    wilson,
)

DEF = {"variants": [{"name": "control", "settings": {"ranking": "plain"}},
                    {"name": "treatment", "weight": 3, "settings": {"ranking": "auto"}}]}


def test_assignment_is_deterministic_and_follows_the_weights():
    exp = Experiment.parse("e1", DEF)
    users = [f"u{n}" for n in range(20_000)]
    first = [exp.assign(u).name for u in users]
    assert first == [exp.assign(u).name for u in users]  # same answer every call
    share = first.count("treatment") / len(users)
    # 3:1 weights: 0.75 within five binomial standard deviations
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / len(users))
    # another experiment id splits the same shoppers independently
    other = Experiment.parse("e2", DEF)
    agree = sum(a == other.assign(u).name for a, u in zip(first, users, strict=True))
    assert abs(agree / len(users) - (0.75**2 + 0.25**2)) < 0.02


def test_traffic_share_and_schedule():
    exp = Experiment.parse("half", DEF | {"traffic": 0.5, "start": 2e9, "end": 2.1e9})
    inside = sum(exp.assign(f"u{n}") is not None for n in range(10_000)) / 10_000
    assert abs(inside - 0.5) < 0.03
    assert not exp.active(1.9e9) and exp.active(2.05e9) and not exp.active(2.1e9)
    exps = {"half": exp}
    assert choose(exps, "u1", 1.9e9) is None
    assert choose(exps, None, 2.05e9) is None


@pytest.mark.parametrize(("doc", "field"), [
    ({"variants": [{"name": "a"}]}, "variants"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variants[1].name"),
    ({"variants": [{"name": "a"}, {"name": "b", "weight": 0}]}, "variants[1].weight"),
    ({"variants": [{"name": "a"}, {"name": "b", "settings": {"ranking": "x"}}]},
     "variants[1].settings.ranking"),
    ({"variants": [{"name": "a"}, {"name": "b", "settings": {"colour": 1}}]},
     "variants[1].settings.colour"),
    (DEF | {"traffic": 1.5}, "traffic"),
    (DEF | {"start": 2e9, "end": 1.9e9}, "end"),
    (DEF | {"metric": "happiness"}, "metric"),
    (DEF | {"owner": "me"}, "owner"),
])
def test_bad_definitions_name_the_field(doc, field):
    with pytest.raises(ExperimentError) as info:
        Experiment.parse("x", doc)
    assert info.value.field == field


def test_wilson_interval_matches_hand_computed_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))


def test_mean_interval_from_sums():
    values = [3.0, 5.0, 7.0, 9.0]
    mean, lo, hi, _ = mean_ci(sum(values), sum(v * v for v in values), len(values))
    sd = math.sqrt(sum((v - 6.0) ** 2 for v in values) / 3)
    assert mean == 6.0
    assert hi - mean == pytest.approx(1.959964 * sd / 2, rel=1e-6)
    assert lo == pytest.approx(2 * mean - hi)


def test_two_proportion_test_against_a_hand_computed_z():
    a = {"converters": 10.0, "shoppers": 100.0}
    b = {"converters": 30.0, "shoppers": 100.0}
    out = compare("conversion_rate", a, b)
    pooled = 0.2
    z = 0.2 / math.sqrt(pooled * 0.8 * (2 / 100))
    assert out["difference"] == pytest.approx(0.2)
    assert out["p_value"] == pytest.approx(math.erfc(z / math.sqrt(2)))


def counters(converters_a: int, converters_b: int, n: int) -> dict[str, dict[str, float]]:
    return {"control": {"shoppers": n, "converters": converters_a, "impressions": 2 * n},
            "treatment": {"shoppers": n, "converters": converters_b, "impressions": 2 * n}}


def test_report_calls_a_winner_only_when_it_is_clear():
    exp = Experiment.parse("e", DEF)
    clear = report(exp, counters(20, 60, 200), 0.0)
    assert clear["winner"] == "treatment"
    assert clear["variants"][1]["vs_control"]["significant"] is True
    close = report(exp, counters(20, 24, 200), 0.0)
    assert close["winner"] is None and close["verdict"].startswith("not significant yet")
    few = report(exp, counters(1, 30, 50), 0.0)  # big gap, too few shoppers
    assert few["winner"] is None and "fewer than 100" in few["verdict"]
    worse = report(exp, counters(60, 20, 200), 0.0)
    assert worse["winner"] == "control"


def test_counters_hash_round_trip():
    raw = {b"control|shoppers": b"3", b"treat-1|revenue": b"12.5"}
    assert parse_counters(raw) == {"control": {"shoppers": 3.0},
                                   "treat-1": {"revenue": 12.5}}
