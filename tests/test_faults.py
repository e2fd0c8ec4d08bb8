"""Faults on the embedded stack: Redis restarted mid-stream, a worker killed under load.

Each test reads a backlog that keeps arriving while the fault happens, and ends by checking
that nothing was lost: the final lists equal those of an undisturbed run over the same events
(the single-process library), and the lag drains to zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from cartwise.embedded import EmbeddedStack
from cartwise.harness import produce, progress, snapshot, stop_worker, wait_complete
from cartwise.lag import collect
from cartwise.simulator import Shop
from streams.topics import ensure_topics
from tests.test_pipeline import oracle

START = 1_760_000_000.0


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory) -> Iterator[EmbeddedStack]:
    """A stack of its own: these tests restart servers under everyone else's feet."""
    stack = EmbeddedStack(workdir=tmp_path_factory.mktemp("faults"),
                          redis_persistent=True).start()
    yield stack
    stack.close()


def first_half(stack: EmbeddedStack, make_settings, name: str, seed: int):  # noqa: ANN001, ANN201
    """Settings on the stack, a shop's events, and the first half of them produced."""
    settings = make_settings(name, broker=stack.broker, redis_url=stack.redis_url)
    ensure_topics(settings)
    shop = Shop(seed=seed)
    events = list(shop.events(1500, start_ts=START))
    ends = produce(settings, events[: len(events) // 2], shop.catalog)
    return settings, shop, events, ends


def second_half_in_background(settings, events: list, ends: dict):  # noqa: ANN001, ANN201
    """Start producing the second half; the returned function waits and merges its ends."""
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(
        produce(settings, events[len(events) // 2:])))
    thread.start()

    def join() -> None:
        thread.join()
        for p, end in out.items():
            ends[p] = max(ends.get(p, -1), end)

    return join


def assert_lists_match_the_library(settings, events: list, catalog: list) -> None:  # noqa: ANN001
    snap = snapshot(settings)
    ref = oracle(events, catalog)
    for item in ref.graph.rows:
        got = snap["items"][f"item:{item}"]
        want = ref.graph.lists(item)["cross_sell"]
        assert got["cross_sell"] == want, item
    users = {e["user_id"] for e in events}
    assert {k.removeprefix("user:") for k in snap["users"]} == users
    for user in users:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user


def test_redis_restart_mid_stream_loses_nothing(own_stack, make_settings, workers):
    settings, shop, events, ends = first_half(own_stack, make_settings, "redis-restart", 21)
    w = workers(settings)
    r = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 60
    while max(progress(r, settings)["context"]) < 0:  # the worker is under way
        assert time.monotonic() < deadline
        time.sleep(0.1)

    own_stack.stop("redis")
    join = second_half_in_background(settings, events, ends)  # arrives meanwhile
    time.sleep(3)  # workers retry against a Redis that is away
    own_stack.start_redis()
    join()
    wait_complete(settings, ends, timeout=180, procs=[w])
    assert w.poll() is None, "the worker must survive a Redis outage"
    assert_lists_match_the_library(settings, events, shop.catalog)


def test_killed_worker_hands_over_and_the_lag_drains(own_stack, make_settings, workers):
    settings, shop, events, ends = first_half(own_stack, make_settings, "kill", 22)
    a, b = workers(settings, "a"), workers(settings, "b")
    wait_complete(settings, ends, timeout=120, procs=[a, b])

    join = second_half_in_background(settings, events, ends)
    stop_worker(a, hard=True)  # SIGKILL: no goodbye to the group
    join()
    assert max(r.lag for r in collect(settings)) > 0  # b has not taken over yet
    wait_complete(settings, ends, timeout=180, procs=[b])
    deadline = time.monotonic() + 60
    while max(r.lag for r in collect(settings)) > 0:
        assert time.monotonic() < deadline, [r for r in collect(settings) if r.lag]
        time.sleep(0.5)
    assert_lists_match_the_library(settings, events, shop.catalog)
