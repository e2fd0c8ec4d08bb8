"""Crash and scale-out on the real broker: same events, same final state, however it is run.

One backlog is produced once; several independent runs (each its own consumer group and Redis
prefix) read it: an uninterrupted single worker (the reference), a worker killed with SIGKILL
mid-backlog and restarted, and two workers sharing four partitions.
"""

from __future__ import annotations

import math
import time
from typing import Any

import orjson
import pytest

from cartwise.harness import produce, progress, snapshot, stop_worker, wait_complete
from cartwise.redisconn import connect
from cartwise.settings import Settings
from cartwise.simulator import Shop
from streams.topics import ensure_topics

START = 1_760_000_000.0
pytestmark = pytest.mark.both_brokers  # the stream suites run on Tansu and Kafka


@pytest.fixture(scope="module")
def backlog(make_settings):
    # 2,000 shoppers, about 18,000 events: every catalog item (200) gets a row and 128 a
    # cross-sell list, and a kill at 30% leaves some 12,000 events to replay after it; more
    # shoppers only add time (3,000 took a third longer and proved the same).
    shop = Shop(seed=11)
    events = list(shop.events(2000, start_ts=START, bad_rate=0.002, dup_rate=0.01))
    topics = make_settings("backlog")
    ensure_topics(topics)
    ends = produce(topics, events, shop.catalog)
    return topics, ends, len(events)


@pytest.fixture(scope="module")
def reference(backlog, make_settings, tmp_path_factory):
    from cartwise.harness import start_worker

    topics, ends, _ = backlog
    settings = make_settings("reference", topics_from=topics)
    ensure_topics(settings)
    w = start_worker(settings, tmp_path_factory.mktemp("ref") / "w.log", "ref")
    try:
        wait_complete(settings, ends, timeout=240, procs=[w])
    finally:
        stop_worker(w, hard=True)
    return snapshot(settings)


def assert_same_state(got: dict, want: dict) -> None:
    assert got["items"] == want["items"]
    assert got["users"] == want["users"]
    assert got["contexts"] == want["contexts"]
    # Counts are float sums whose order differs between runs: equal to 1e-9, not bit for bit.
    for name in ("rows", "marginals", "meta"):
        assert _close(got[name], want[name]), name


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if not isinstance(a, float | int) or not isinstance(b, float | int):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def test_reference_run_is_not_trivial(reference, backlog):
    assert len(reference["items"]) > 100
    assert sum(bool(d["cross_sell"]) for d in reference["items"].values()) > 20
    assert sum(bool(d["items"]) for d in reference["users"].values()) > 1000


# Each broker kills one way: the same exactness, half the time (tests/conftest.py, one_broker).
@pytest.mark.parametrize("stretched", [
    pytest.param(False, id="every-interval", marks=pytest.mark.one_broker("kafka")),
    pytest.param(True, id="stretched", marks=pytest.mark.one_broker("tansu"))])
def test_sigkill_mid_backlog_then_restart_gives_the_same_state(
    backlog, reference, make_settings, workers, stretched
):
    """`stretched`: a checkpoint budget so small that every partition waits the most intervals
    for its next checkpoint (streams/stage.py, `checkpoint_every`): the kill then lands with up
    to four intervals of applied, unacknowledged work, all of it redone from the checkpoint.
    Its checkpoints move in jumps that may cover the rest of the backlog at once, so the kill
    follows what the worker has applied in memory (its published freshness samples, one per
    record) instead."""
    topics, ends, total = backlog
    overrides = {"checkpoint_budget": 1e-6} if stretched else {}
    settings = make_settings("crash-stretched" if stretched else "crash", topics_from=topics,
                             **overrides)
    ensure_topics(settings)
    r = connect(settings)
    w = workers(settings, "before-crash")
    deadline = time.monotonic() + 120
    done_at_kill = 0
    while time.monotonic() < deadline:
        pr = progress(r, settings)
        done_at_kill = applied(r, settings) if stretched else sum(o + 1 for o in pr["context"])
        if done_at_kill >= 0.3 * total:
            break
        time.sleep(0.02)
    stop_worker(w, hard=True)
    # The kill must land mid-backlog, or this test proves nothing.
    assert 0 < done_at_kill < total
    assert not any(o == ends[p] for p, o in enumerate(progress(r, settings)["cooccurrence"]))
    w2 = workers(settings, "after-crash")
    wait_complete(settings, ends, timeout=240, procs=[w2])
    assert_same_state(snapshot(settings), reference)


def applied(r: Any, settings: Settings) -> int:
    """Records of the events topic the workers have applied in memory, as their stats last
    said (one freshness sample each; the backlog is below the 20,000 a worker keeps)."""
    n = 0
    for key in r.scan_iter(f"{settings.prefix}stats:*"):
        if raw := r.get(key):
            n += orjson.loads(raw)["freshness_s"]["user"]["n"]
    return n


@pytest.mark.one_broker("kafka")
def test_two_workers_over_four_partitions_give_the_same_state(
    backlog, reference, make_settings, workers
):
    topics, ends, _ = backlog
    settings = make_settings("scale", topics_from=topics)
    ensure_topics(settings)
    assert settings.partitions == 4
    procs = [workers(settings, "a"), workers(settings, "b")]
    wait_complete(settings, ends, timeout=240, procs=procs)
    assert_same_state(snapshot(settings), reference)
    r = connect(settings)
    time.sleep(1.5)  # let both publish their final counters
    applied = []
    for key in r.scan_iter(f"{settings.prefix}stats:*"):
        counters = orjson.loads(r.get(key))["counters"]
        applied.append(sum(v for k, v in counters.items() if k.startswith("applied.")))
    assert len(applied) == 2 and all(n > 0 for n in applied), applied
