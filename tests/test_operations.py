"""Operations tooling: consumer lag against a known backlog on the real broker and Redis."""

from __future__ import annotations

import time

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


def test_lag_says_when_the_broker_is_unreachable(make_settings, monkeypatch, capsys):
    from cartwise.embedded import free_port

    settings = make_settings("lag-down", broker=f"127.0.0.1:{free_port()}")
    for key, value in worker_env(settings).items():
        monkeypatch.setenv(key, value)
    assert cli_main(["lag"]) == 2
    assert "cannot read the broker" in capsys.readouterr().err
