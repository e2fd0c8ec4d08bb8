"""The benchmark's own measuring tools (bench/procstat.py, bench/api_latency.py): a figure is
only as good as the code that takes it."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

import pytest

from bench.api_latency import process_counts
from bench.plain_consumer import ages_summary, late_records
from bench.procstat import connections, cpu_s
from bench.scale import loop_held, wait_quiet
from models.evaluation import new_rank


def test_connections_counts_the_established_sockets_a_process_holds_on_a_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert connections([os.getpid()], port) == {os.getpid(): 0}
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            # Both ends are ours: the accepted sockets listen on `port` as their local port.
            assert connections([os.getpid()], port) == {os.getpid(): 3}
        finally:
            for s in clients + accepted:
                s.close()


def test_cpu_time_of_a_process_grows_and_of_a_gone_one_is_zero():
    before = cpu_s(os.getpid())
    sum(i * i for i in range(300_000))
    assert cpu_s(os.getpid()) > before
    assert cpu_s(2**22 + 7) == 0.0  # above the kernel's pid limit: no such process


@pytest.mark.parametrize("text", ["0,2", "", "one", "1,-1"])
def test_process_counts_refuse_what_is_not_a_list_of_positive_counts(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected counts like 1,2"):
        process_counts(text)
    assert process_counts("1,2") == [1, 2]


def test_a_new_items_rank_counts_only_what_the_shopper_never_touched():
    recs = ["seen-1", "a", "seen-2", "b", "c"]
    own = {"seen-1", "seen-2", "elsewhere"}
    assert [new_rank(recs, i, own) for i in ("a", "b", "c")] == [1, 2, 3]
    assert new_rank(recs, "missing", own) == 0
    assert new_rank(recs, "b", ()) == 4  # nothing left out: the plain rank


def test_a_paced_grocery_runs_one_basket_at_a_time_and_shoppers_come_back_after_days():
    from cartwise.simulator import RealisticShop

    def run(**kw):  # noqa: ANN003, ANN202
        return list(RealisticShop(seed=3, mode="dense", **kw).events(3000, start_ts=0.0))

    hours = run()
    days = run(return_gap_s=1200.0, mean_gap_s=30.0)
    assert days == run(return_gap_s=1200.0, mean_gap_s=30.0)  # deterministic
    # One basket at a time: a session never resumes once another has started.
    order = [e["session_id"] for e in days]
    starts = list(dict.fromkeys(order))
    assert [s for i, s in enumerate(order) if i == 0 or s != order[i - 1]] == starts
    # Interleaved by default (five open at once).
    sessions = [e["session_id"] for e in hours]
    runs = [s for i, s in enumerate(sessions) if i == 0 or s != sessions[i - 1]]
    assert len(runs) > len(set(sessions))
    # The quiet time between baskets stretches the log from hours to days.
    assert hours[-1]["ts"] < 86400 < 2 * 86400 < days[-1]["ts"]


def test_the_scale_bench_measures_a_setting_set_around_it(monkeypatch):
    """`CARTWISE_BATCH_WITHIN_S=0.02 python -m bench.scale` must reach the workers (their
    environment is built from these settings); what the bench fixes itself stays fixed."""
    from types import SimpleNamespace

    import streams.topics
    from bench.scale import settings_for

    monkeypatch.setattr(streams.topics, "ensure_topics", lambda settings: None)
    monkeypatch.setenv("CARTWISE_BATCH_WITHIN_S", "0.02")
    monkeypatch.setenv("CARTWISE_PARTITIONS", "3")
    s = settings_for(SimpleNamespace(broker="127.0.0.1:1", redis_url="redis://127.0.0.1:2"),
                     "b", 8)
    assert s.batch_within_s == 0.02 and s.partitions == 8 and s.app_id == "b"


def test_the_warm_pass_times_only_the_later_part_of_the_topic():
    """`bench.scale --warm`: the tenths are of the second backlog alone. A worker that drains
    the first 1,000 events at 100 us each and the next 1,000 at 300 us each shows 300 us in
    every tenth of the part measured, and the whole topic's cost in the plain tenths."""
    from bench.scale import tenths

    samples, t, cpu = [], 0.0, 0.0
    for done in range(0, 2001, 50):  # (time, cpu s, through stage 1, through stage 2)
        samples.append((t, cpu, done, done))
        step = 100e-6 if done < 1000 else 300e-6
        t, cpu = t + 50 * step * 2, cpu + 50 * step
    later, marks = tenths(samples, (0.0, 0.0), 1000, 2000)
    assert [round(x["cpu_us_per_event"]) for x in later] == [300] * 10
    assert [round(x["events_per_s"]) for x in later] == [1667] * 10
    assert marks[0] == (samples[20][0], samples[20][1])  # where the second part starts
    whole, _ = tenths(samples, (0.0, 0.0), 0, 2000)
    assert [round(x["cpu_us_per_event"]) for x in whole] == [100] * 5 + [300] * 5


def test_loop_held_counts_only_the_checks_between_two_snapshots():
    from streams.stats import LOOP_BUCKETS, Stats

    stats = Stats("w")
    for i in range(500):  # before: a loop held long and often
        stats.observe_loop(0.3, at=float(i))
    before = stats.snapshot()["loop_delay_s"]["counts"]
    for i, delay in enumerate([0.001] * 90 + [0.02] * 8 + [0.07, 0.2]):
        stats.observe_loop(delay, at=500.0 + i)
    after = stats.snapshot()["loop_delay_s"]["counts"]
    assert len(after) == len(LOOP_BUCKETS) + 1
    assert loop_held(before, after) == {"loop_checks": 100, "loop_held_over_50ms_share": 0.02,
                                        "loop_held_p99_at_most_ms": 100}
    stats.observe_loop(60.0, at=700.0)  # above the last bucket
    assert loop_held(after, stats.snapshot()["loop_delay_s"]["counts"])[
        "loop_held_p99_at_most_ms"] is None
    assert loop_held(None, after) == {}
    assert loop_held(after, after) == {"loop_checks": 0}


def test_ages_summary_reads_percentiles_in_ms():
    ages = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert ages_summary(list(reversed(ages))) == {"n": 100, "p50_ms": 51.0, "p99_ms": 99.0,
                                                  "max_ms": 100.0}
    assert ages_summary([]) == {"n": 0}


def test_late_records_are_told_apart_by_partition_and_offset_range():
    late = [(3, 1200), (3, 1190), (0, 7), (3, 1195)]
    assert late_records(late) == {"over_1s": 4, "over_1s_by_partition": {
        "0": {"n": 1, "offsets": [7, 7]}, "3": {"n": 3, "offsets": [1190, 1200]}}}
    assert late_records([]) == {"over_1s": 0, "over_1s_by_partition": {}}


def test_wait_quiet_waits_for_a_busy_process_and_not_for_an_idle_one():
    """The steady phase starts once the worker is quiet; a process that keeps a core busy
    never is (within the limit), one that sleeps is at the first window."""
    code = "import sys, time\nif sys.argv[1] == 'busy':\n    while True: pass\ntime.sleep(60)"
    busy = subprocess.Popen([sys.executable, "-c", code, "busy"])
    idle = subprocess.Popen([sys.executable, "-c", code, "idle"])
    try:
        # A low bar, so that a loaded machine's share of a core still clears it.
        got = wait_quiet([busy], share=0.02, window_s=0.5, limit_s=2.0)
        assert got["quiet"] is False and got["cpu_s"] > 0
        got = wait_quiet([idle], window_s=0.5, limit_s=5.0)
        assert got["quiet"] is True and got["idle_share"] < 0.25
    finally:
        busy.kill()
        idle.kill()
