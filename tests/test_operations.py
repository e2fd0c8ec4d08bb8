"""Operations tooling: consumer lag against a known backlog on the real broker and Redis."""

from __future__ import annotations

import time

import httpx
import pytest
from kafka import KafkaConsumer, TopicPartition

from cartwise.cli import main as cli_main
from cartwise.harness import produce, wait_complete, worker_env
from cartwise.lag import PartitionLag, collect, format_table, lag_of
from cartwise.simulator import Shop
from streams.topics import ensure_topics

START = 1_760_000_000.0


def test_lag_arithmetic():
    assert lag_of(100, committed=None, checkpoint=None) == 100  # never read
    assert lag_of(100, committed=40, checkpoint=None) == 60
    assert lag_of(100, committed=40, checkpoint=90) == 10  # the checkpoint is what counts
    assert lag_of(100, committed=100, checkpoint=100) == 0
    table = format_table([PartitionLag("g", "t", 0, 12, None, 10, 2)])
    assert table.splitlines()[1].split() == ["g", "t", "0", "12", "-", "10", "2"]


@pytest.mark.both_brokers
def test_lag_counts_a_known_backlog_then_drains(make_settings, workers, monkeypatch, capsys):
    settings = make_settings("lag")
    ensure_topics(settings)
    shop = Shop(seed=9)
    events = list(shop.events(150, start_ts=START))
    ends = produce(settings, events, shop.catalog)  # sent in a burst: multi-record batches
    for key, value in worker_env(settings).items():
        monkeypatch.setenv(key, value)

    rows = {(r.topic, r.partition): r for r in collect(settings)}
    for p in range(settings.partitions):
        row = rows[(settings.events_topic, p)]
        assert row.end == ends.get(p, -1) + 1, p  # the true end, whatever ListOffsets says
        assert (row.lag, row.checkpoint, row.committed) == (row.end, None, None)
    assert sum(r.lag for r in rows.values() if r.topic == settings.events_topic) == len(events)
    assert sum(r.lag for r in rows.values() if r.topic == settings.catalog_topic) == len(
        shop.catalog)
    listed = KafkaConsumer(bootstrap_servers=settings.bootstrap).end_offsets(
        [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)])
    print("broker's ListOffsets:", {tp.partition: v for tp, v in listed.items()},
          "true ends:", {p: e + 1 for p, e in ends.items()})

    assert cli_main(["lag", "--max-lag", "10"]) == 1
    assert settings.events_topic in capsys.readouterr().out

    w = workers(settings)
    wait_complete(settings, ends, procs=[w])
    deadline = time.monotonic() + 60
    while (worst := max(r.lag for r in collect(settings))) > 0:  # Kafka commits trail a bit
        assert time.monotonic() < deadline, f"lag stuck at {worst}"
        time.sleep(0.5)
    assert cli_main(["lag", "--max-lag", "0"]) == 0
    out = capsys.readouterr().out
    assert "freshness" in out
    assert "last minute): held p99" in out  # the worker's loop probe, with its stats


@pytest.mark.both_brokers
def test_list_offsets_is_the_high_watermark(broker_name, make_settings):
    """ListOffsets(latest), what `KafkaConsumer.end_offsets` asks, against the true end of each
    partition (last acknowledged offset + 1) and against the end `cartwise lag` reports."""
    settings = make_settings("offsets")
    ensure_topics(settings)
    events = list(Shop(seed=12).events(400, start_ts=START))
    ends = produce(settings, events)  # a burst: batches of several records each
    tps = [TopicPartition(settings.events_topic, p) for p in range(settings.partitions)]
    true_end = {tp: ends.get(tp.partition, -1) + 1 for tp in tps}
    assert sum(true_end.values()) == len(events)
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        listed = consumer.end_offsets(tps)
    finally:
        consumer.close()
    reported = {TopicPartition(r.topic, r.partition): r.end for r in collect(settings)
                if r.topic == settings.events_topic}
    assert reported == true_end  # `cartwise lag` is right on both brokers
    if broker_name == "tansu" and listed != true_end:
        # A known Tansu 0.6 fault (cartwise/lag.py): the base offset of the last batch + 1.
        assert all(listed[tp] <= true_end[tp] for tp in tps)
        pytest.xfail(f"Tansu's ListOffsets {listed} falls short of the true ends {true_end}")
    assert listed == true_end


def test_lag_says_when_the_broker_is_unreachable(make_settings, monkeypatch, capsys):
    from cartwise.embedded import free_port

    settings = make_settings("lag-down", broker=f"127.0.0.1:{free_port()}")
    for key, value in worker_env(settings).items():
        monkeypatch.setenv(key, value)
    assert cli_main(["lag"]) == 2
    assert "cannot read the broker" in capsys.readouterr().err


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.mark.both_brokers
@pytest.mark.one_broker("tansu")
def test_worker_metrics_count_what_happened(make_settings, workers):
    from cartwise.embedded import free_port

    settings = make_settings("metrics", metrics_port=free_port())
    ensure_topics(settings)
    shop = Shop(seed=4)
    events = list(shop.events(80, start_ts=START, bad_rate=0.05))
    ends = produce(settings, events, shop.catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w])
    time.sleep(1.5)  # the stats timer copies lag and state sizes once a second
    m = scrape(settings.metrics_port)

    def events_total(outcome: str, type_: str = "", reason: str = "") -> float:
        return m.get(("cartwise_events_total", (("outcome", outcome), ("reason", reason),
                                                ("type", type_))), 0.0)

    valid = [e for e in events if isinstance(e, dict)]
    for etype in ("view", "add_to_cart", "purchase"):
        assert events_total("applied", etype) == sum(e["type"] == etype for e in valid)
    bad = len(events) - len(valid)
    assert bad > 0
    assert sum(v for (name, labels), v in m.items() if name == "cartwise_events_total"
               and ("outcome", "dead_lettered") in labels) == bad
    assert m[("cartwise_loop_delay_seconds_count", ())] >= 1  # the probe runs in the worker
    fresh_count = m[("cartwise_freshness_seconds_count", (("list", "user"),))]
    assert fresh_count == len(events)  # one observation per record of the events topic
    lags = {labels: v for (name, labels), v in m.items() if name == "cartwise_consumer_lag"}
    assert len(lags) == 2 * settings.partitions and all(v == 0 for v in lags.values())
    assert m[("cartwise_model_info", (("model", "cooc-3"),))] == 1
    sizes = [v for (name, labels), v in m.items() if name == "cartwise_state_size"
             and ("stage", "context") in labels]
    assert sum(sizes) == len({e["user_id"] for e in valid})
    for op in ("context.checkpoint", "cooccurrence.checkpoint", "user_lists", "item_lists",
               "catalog"):
        n = m[("cartwise_redis_write_seconds_count", (("op", op),))]
        assert n >= 1, op
        assert m[("cartwise_redis_write_seconds_bucket", (("le", "+Inf"), ("op", op)))] == n
        assert m[("cartwise_redis_write_seconds_sum", (("op", op),))] > 0
    assert not any(name == "cartwise_redis_write_errors_total" for name, _ in m)
    # Where the time goes: the agents' batches, each timer, and the collector's pauses.
    steps = {dict(labels)["step"] for name, labels in m
             if name == "cartwise_step_seconds_total"}
    assert {"context.batch_apply", "cooccurrence.batch_checkpoint", "timer.lists",
            "timer.checkpoint", "gc.gen0", "gc.gen2"} <= steps, steps


def test_stall_detector_flags_only_partitions_that_wait_without_progress():
    from cartwise.lag import StallDetector

    d = StallDetector(after_s=60)

    def row(partition: int, checkpoint: int | None, lag: int) -> PartitionLag:
        return PartitionLag("g", "t", partition, (checkpoint or 0) + lag, None, checkpoint, lag)

    assert d.update(0, [row(0, 10, 5), row(1, 10, 0), row(2, 10, 5)]) == []
    # p0 stuck with records waiting; p1 idle but caught up; p2 moving.
    stalled = d.update(61, [row(0, 10, 9), row(1, 10, 0), row(2, 20, 5)])
    assert [(r.partition, idle) for r, idle in stalled] == [(0, 61)]
    assert d.update(130, [row(0, 11, 9), row(1, 10, 0), row(2, 20, 5)]) == [
        (row(2, 20, 5), 69)]


@pytest.mark.both_brokers
def test_api_reports_a_stalled_stream_in_ready_and_metrics(make_settings, workers):
    import asyncio

    from api.auth import new_key
    from tests.test_api import in_process

    _, entry = new_key("read")
    settings = make_settings("stall", api_keys=entry, stall_check_s=0.5, stall_after_s=1.0)
    ensure_topics(settings)
    produce(settings, list(Shop(seed=2).events(20, start_ts=START)))  # and no worker

    async def run() -> tuple[dict, str]:
        async with in_process(settings) as c:
            deadline = time.monotonic() + 30
            while (ready := (await c.get("/ready")).json())["stream"]["status"] != "stalled":
                assert time.monotonic() < deadline, ready
                await asyncio.sleep(0.2)
            return ready, (await c.get("/metrics")).text

    ready, metrics = asyncio.run(run())
    assert ready["ready"] is True  # lookups still work: a stuck worker is not the API's fault
    topics = {s["topic"] for s in ready["stream"]["stalled"]}
    assert settings.events_topic in topics
    assert all(s["lag"] > 0 for s in ready["stream"]["stalled"])
    first = ready["stream"]["stalled"][0]
    line = (f'cartwise_stream_stalled{{partition="{first["partition"]}",'
            f'topic="{first["topic"]}"}} 1.0')
    assert line in metrics.splitlines()


def test_the_producer_linger_and_batch_size_reach_fausts_producer(monkeypatch):
    """CARTWISE_PRODUCER_LINGER_MS / _BATCH_BYTES configure the worker's producer (Faust's
    default sends every message at once, which left shoppers' lists seconds late)."""
    from cartwise.settings import Settings
    from streams.app import create_app

    assert Settings().producer_linger_ms == 5
    monkeypatch.setenv("CARTWISE_PRODUCER_LINGER_MS", "20")
    monkeypatch.setenv("CARTWISE_PRODUCER_BATCH_BYTES", "65536")
    app = create_app(Settings.from_env(app_id="linger-test"))
    assert app.conf.producer_linger == 0.02
    assert app.conf.producer_max_batch_size == 65536
