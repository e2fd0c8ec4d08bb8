"""Faults on the embedded stack: Redis or the broker restarted mid-stream, a worker killed.

Each test reads a backlog that keeps arriving around the fault, and ends by checking that
nothing was lost: the final lists equal those of an undisturbed run over the same events
(the single-process library), and the lag drains to zero. Run on both brokers: Tansu keeps its
log in an S3 server beside it, so that restarting it is a restart, not the loss of every topic;
Apache Kafka keeps its own on disk, as in production (no S3 server).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from cartwise.embedded import EmbeddedStack, free_port
from cartwise.harness import produce, progress, snapshot, stop_worker, wait_complete
from cartwise.lag import collect
from cartwise.redisconn import connect
from cartwise.simulator import Shop
from models.graph import KINDS
from streams.topics import ensure_topics
from tests.conftest import start_stack
from tests.test_operations import scrape
from tests.test_pipeline import oracle

START = 1_760_000_000.0
pytestmark = pytest.mark.both_brokers


@pytest.fixture(scope="module")
def own_stack(broker_name, tmp_path_factory) -> Iterator[EmbeddedStack]:
    """A stack of its own: these tests restart servers under everyone else's feet."""
    stack = start_stack(lambda: tmp_path_factory.mktemp("faults"), broker_kind=broker_name,
                        redis_persistent=True)
    yield stack
    stack.close()


@pytest.fixture
def durable_stack(broker_name, tmp_path) -> Iterator[EmbeddedStack]:
    """A broker that keeps its log across a restart: Tansu's in an S3 server, Kafka's on disk."""
    stack = start_stack(lambda: tmp_path / "stack", redis_persistent=True,
                        broker_kind=broker_name, broker_storage="s3")
    yield stack
    stack.close()


def first_half(stack: EmbeddedStack, make_settings, name: str, seed: int,  # noqa: ANN001, ANN201
               n: int = 1500, **overrides):  # noqa: ANN003
    """Settings on the stack, a shop's events, and the first half of them produced."""
    settings = make_settings(name, broker=stack.broker, redis_url=stack.redis_url, **overrides)
    ensure_topics(settings)
    shop = Shop(seed=seed)
    events = list(shop.events(n, start_ts=START))
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


def wait_under_way(settings) -> None:  # noqa: ANN001
    """Until a worker has checkpointed some of the backlog, not all of it."""
    r = connect(settings)
    deadline = time.monotonic() + 60
    while max(progress(r, settings)["context"]) < 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def assert_lag_drains(settings) -> None:  # noqa: ANN001
    deadline = time.monotonic() + 60
    while max(r.lag for r in collect(settings)) > 0:
        assert time.monotonic() < deadline, [r for r in collect(settings) if r.lag]
        time.sleep(0.5)


def assert_lists_match_the_library(settings, events: list, catalog: list) -> None:  # noqa: ANN001
    snap = snapshot(settings)
    ref = oracle(events, catalog)
    for item in ref.graph.rows:
        got = snap["items"][f"item:{item}"]
        want = ref.graph.lists(item)
        for kind in KINDS:
            assert got[kind] == want[kind], (item, kind)
    users = {e["user_id"] for e in events}
    assert {k.removeprefix("user:") for k in snap["users"]} == users
    for user in users:
        doc = snap["users"][f"user:{user}"]
        want_ctx = ref.contexts.users[user].public()
        assert doc["context"] == want_ctx, (user, doc["context"], want_ctx)
        assert doc["items"] == ref.recommend(user, k=20), (user, doc)


@pytest.mark.one_broker("tansu")
def test_redis_restart_mid_stream_loses_nothing(own_stack, make_settings, workers):
    # Half the usual shoppers (some 3,400 events on each side of the outage): what is tested
    # is a Redis that goes away under a stream in flight, which they keep busy throughout.
    settings, shop, events, ends = first_half(own_stack, make_settings, "redis-restart", 21,
                                              n=750, metrics_port=free_port())
    w = workers(settings)
    wait_under_way(settings)
    own_stack.stop("redis")
    join = second_half_in_background(settings, events, ends)  # arrives meanwhile
    time.sleep(3)  # workers retry against a Redis that is away
    own_stack.start_redis()
    join()
    wait_complete(settings, ends, timeout=180, procs=[w])
    assert w.poll() is None, "the worker must survive a Redis outage"
    assert_lists_match_the_library(settings, events, shop.catalog)
    m = scrape(settings.metrics_port)
    failed = sum(v for (name, _), v in m.items()
                 if name in ("cartwise_redis_write_errors_total", "cartwise_errors_total"))
    assert failed > 0, "the outage must show in the error metrics"


@pytest.mark.one_broker("tansu")
def test_killed_worker_hands_over_and_the_lag_drains(own_stack, make_settings, workers):
    # Half the usual shoppers: what is tested is the hand-over after the session timeout,
    # which any lag on the killed worker's partitions shows, not the volume behind it.
    settings, shop, events, ends = first_half(own_stack, make_settings, "kill", 22, n=750)
    a, b = workers(settings, "a"), workers(settings, "b")
    wait_complete(settings, ends, timeout=120, procs=[a, b])

    join = second_half_in_background(settings, events, ends)
    stop_worker(a, hard=True)  # SIGKILL: no goodbye to the group
    join()
    assert max(r.lag for r in collect(settings)) > 0  # b has not taken over yet
    wait_complete(settings, ends, timeout=180, procs=[b])
    assert_lag_drains(settings)
    assert_lists_match_the_library(settings, events, shop.catalog)


def test_broker_restart_mid_stream_workers_reconnect(durable_stack, make_settings, workers):
    own_stack = durable_stack
    # Every fetch is an object listing in the S3 server: fewer events, and fetches that wait.
    settings, shop, events, ends = first_half(own_stack, make_settings, "broker-restart", 23,
                                              n=200, fetch_max_wait_ms=500)
    a, b = workers(settings, "a"), workers(settings, "b")
    wait_under_way(settings)
    own_stack.stop("broker")
    time.sleep(3)  # the workers retry against a broker that is away
    own_stack.start_broker()
    for p, end in produce(settings, events[len(events) // 2:]).items():
        ends[p] = max(ends.get(p, -1), end)
    wait_complete(settings, ends, timeout=180, procs=[a, b])
    assert a.poll() is None and b.poll() is None, "workers must outlive a broker restart"
    assert_lag_drains(settings)
    assert_lists_match_the_library(settings, events, shop.catalog)


def test_a_stack_whose_port_is_taken_starts_again_on_fresh_ports(tmp_path, monkeypatch):
    """A port `free_port` found free can be taken before the server binds it (two xdist
    workers start stacks at once): the fixtures' start_stack retries on fresh ports."""
    import tests.conftest as conftest

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))  # bound, not listening: Redis cannot bind it
    port = taken.getsockname()[1]
    made: list[EmbeddedStack] = []

    def first_on_the_taken_port(**options: object) -> EmbeddedStack:
        s = EmbeddedStack(**options, **({} if made else {"redis_port": port}))  # type: ignore
        made.append(s)
        return s

    monkeypatch.setattr(conftest, "EmbeddedStack", first_on_the_taken_port)
    try:
        stack = start_stack(lambda: tmp_path / f"stack{len(made)}")
        try:
            assert [s.redis_port for s in made][:1] == [port] and len(made) == 2
            assert redis.Redis.from_url(stack.redis_url).ping()
        finally:
            stack.close()
    finally:
        taken.close()
