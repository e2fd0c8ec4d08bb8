"""The timers' budgets (docs/architecture.md, "Budgets"): under load work slows, never stops.

On one broker: what is tested here is the workers' own scheduling, not the broker. Its ticks are
short (`TICK_S`): with no budget the run takes a fixed number of ticks (one step each), so the
tick length sets the wall time, not what is proved.
"""

from __future__ import annotations

from cartwise.harness import produce, snapshot, wait_complete
from cartwise.simulator import Shop
from streams.topics import ensure_topics
from tests.test_pipeline import START, oracle

TICK_S = 0.05  # the lists and refresh timers' interval here (0.2 s and 0.5 s otherwise)


def test_budgets_used_up_by_waiting_still_let_lists_through(make_settings, workers):
    """Budgets of zero: every tick's budget is gone before a list is built (as when Redis is
    slow under load). Lists and refreshes must slow down, never stop: the first partition of
    each tick still does one step, until the run ends equal to the library's."""
    shop = Shop(seed=8)
    events = list(shop.events(40, start_ts=START))
    settings = make_settings("zero-budget", lists_budget=0.0, refresh_budget=0.0,
                             lists_interval_s=TICK_S, refresh_interval_s=TICK_S)
    ensure_topics(settings)
    ends = produce(settings, events, shop.catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w], timeout=240)
    snap = snapshot(settings)
    ref = oracle(events, shop.catalog)
    assert len(ref.graph.rows) > 10
    for item in ref.graph.rows:
        got = snap["items"].get(f"item:{item}")
        assert got is not None, item
        assert got["cross_sell"] == ref.graph.lists(item)["cross_sell"], item
    for user in {e["user_id"] for e in events}:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
