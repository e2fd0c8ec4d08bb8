"""Prometheus metrics of a worker (docs/operations.md, "Metrics").

The agents never touch prometheus_client on the hot path: they count into Stats (plain
dicts), and this collector turns a Stats into metric families when Prometheus scrapes, on
prometheus_client's HTTP thread. It copies what it reads first, so a scrape never iterates a
dict the event loop is changing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from streams.stage import MODEL_VERSION
from streams.stats import Stats


def _copy(d: dict) -> dict:
    return _retry(lambda: dict(d))


def _retry(read: Callable[[], dict]) -> dict:
    for _ in range(5):
        try:
            return read()
        except RuntimeError:  # changed size while copying: try again
            continue
    return {}


class WorkerCollector:
    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        counters = _copy(s.counters)
        events = CounterMetricFamily("cartwise_events", "Events by outcome: applied (by type), "
                                     "duplicate, dead_lettered (by reason)",
                                     labels=["outcome", "type", "reason"])
        for name, n in sorted(counters.items()):
            head, _, tail = name.partition(".")
            if head == "applied":
                events.add_metric(["applied", tail, ""], n)
            elif head == "dlq":
                events.add_metric(["dead_lettered", "", tail], n)
            elif name == "duplicate":
                events.add_metric(["duplicate", "", ""], n)
        yield events
        errors = CounterMetricFamily("cartwise_errors", "Failed steps (each is retried)",
                                     labels=["step"])
        for name, n in sorted(counters.items()):
            if name.endswith(".errors"):
                errors.add_metric([name.removesuffix(".errors")], n)
        yield errors
        conflicts = CounterMetricFamily("cartwise_checkpoint_conflicts",
                                        "Checkpoints found moved by another worker",
                                        labels=["stage"])
        for name, n in sorted(counters.items()):
            if name.endswith(".checkpoint_conflicts"):
                conflicts.add_metric([name.removesuffix(".checkpoint_conflicts")], n)
        yield conflicts
        recovery = CounterMetricFamily(
            "cartwise_stream_recoveries", "What the stream core caught and handled: records of "
            "a partition no longer owned (stale_records), holes fetched again (gap_refetches), "
            "still there, or no answer, when the broker was asked (gap_waits) or holding no "
            "record to apply: transaction markers, aborted or compacted records, retention "
            "(gaps_accepted), checkpoints that failed and were redone (checkpoint_failures) or "
            "written record by record (checkpoint_isolations), events re-keyed to their "
            "shopper's partition (rekeyed), evidence of an older state generation skipped "
            "(old_generation)",
            labels=["stage", "kind"])
        kinds = ("stale_records", "gap_refetches", "gap_waits", "gaps_accepted",
                 "checkpoint_failures", "checkpoint_isolations", "rekeyed", "key_mismatch",
                 "old_generation")
        for name, n in sorted(counters.items()):
            stage, _, kind = name.partition(".")
            if kind in kinds:
                recovery.add_metric([stage, kind], n)
        yield recovery
        stops = CounterMetricFamily(
            "cartwise_worker_stops", "Why the worker stopped itself: Redis lost the state "
            "(state_lost, exit 3) or a checkpoint failed without any record (checkpoint_stuck, "
            "exit 4); also in its last stats in Redis (`cartwise stats`)", labels=["reason"])
        for name, n in sorted(counters.items()):
            if name == "state_lost" or name.endswith(".checkpoint_stuck"):
                stops.add_metric([name.rpartition(".")[2]], n)
        yield stops
        feedback = CounterMetricFamily("cartwise_feedback", "Suggestion feedback: impressions, "
                                       "clicks, impressions whose served record was gone "
                                       "(unserved), re-ranker examples learned",
                                       labels=["kind"])
        for name, n in sorted(counters.items()):
            if name.startswith("feedback."):
                feedback.add_metric([name.removeprefix("feedback.")], n)
        yield feedback
        seconds = CounterMetricFamily("cartwise_step_seconds", "Time spent per processing step "
                                      "(process, user_lists, checkpoint = Redis write)",
                                      labels=["step"])
        for name, v in sorted(_retry(s.step_seconds).items()):
            seconds.add_metric([name], v)
        yield seconds
        fresh = HistogramMetricFamily("cartwise_freshness_seconds", "From an event's broker "
                                      "timestamp to its suggestions written in Redis (list user, "
                                      "item), or to its batch reaching the context stage "
                                      "(received)",
                                      labels=["list"])
        for kind, h in sorted(s.freshness_histograms.items()):
            fresh.add_metric([kind], h.cumulative(), h.sum)
        yield fresh
        loop = HistogramMetricFamily("cartwise_loop_delay_seconds", "How much later than "
                                     "asked the worker's event loop woke a 50 ms sleeper: "
                                     "about what a record arriving while a batch, a timer or a "
                                     "collector pause held it waited")
        loop.add_metric([], s.loop_delay.cumulative(), s.loop_delay.sum)
        yield loop
        writes = HistogramMetricFamily("cartwise_redis_write_seconds", "One Redis write call "
                                       "(command or pipeline) that succeeded, by operation",
                                       labels=["op"])
        for op, h in sorted(_copy(s.redis_histograms).items()):
            writes.add_metric([op], h.cumulative(), h.sum)
        yield writes
        failed = CounterMetricFamily("cartwise_redis_write_errors", "Redis write calls that "
                                     "failed (each is retried), by operation", labels=["op"])
        for op, n in sorted(_copy(s.redis_errors).items()):
            failed.add_metric([op], n)
        yield failed
        parts: list[dict[str, Any]] = list(s.partitions)
        lag = GaugeMetricFamily("cartwise_consumer_lag", "Records after the last checkpoint, "
                                "per partition this worker owns", labels=["topic", "partition"])
        size = GaugeMetricFamily("cartwise_state_size", "Shoppers (context) or item rows "
                                 "(cooccurrence) held, per partition",
                                 labels=["stage", "partition"])
        for p in parts:
            if p.get("lag") is not None:
                lag.add_metric([p["topic"], str(p["partition"])], p["lag"])
            size.add_metric([p["stage"], str(p["partition"])], p["size"])
        yield lag
        yield size
        info = GaugeMetricFamily("cartwise_model_info", "Model version of the lists written",
                                 labels=["model"])
        info.add_metric([MODEL_VERSION], 1)
        yield info


def serve(stats: Stats, port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` from a daemon thread."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(stats))
    start_http_server(port, addr=host, registry=registry)
