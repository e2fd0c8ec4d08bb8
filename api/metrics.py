"""Prometheus metrics of one API process (/metrics, on CARTWISE_METRICS_PORT when set; names
in docs/operations.md)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Lookups take about a millisecond: buckets resolve the sub-millisecond range.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # A registry per app: tests run several apps in one process.
        self.registry = CollectorRegistry()
        self.requests = Counter("cartwise_api_requests", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("cartwise_api_request_seconds", "Time to answer a request",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ingest = Counter("cartwise_api_ingested", "Records received by POST routes",
                              ["kind", "outcome", "reason"], registry=self.registry)
        self.fallback = Counter("cartwise_api_fallback", "Answers topped up with trending items",
                                ["source"], registry=self.registry)
        self.served_lost = Counter("cartwise_api_served_lost", "Served documents (re-ranker "
                                   "features of an answer) not written: that answer's "
                                   "feedback cannot train", registry=self.registry)
        self.served_skipped = Counter("cartwise_api_served_skipped", "Answers served without "
                                      "a served record: over CARTWISE_SERVED_RATE",
                                      registry=self.registry)
        self.answers = Counter("cartwise_api_answers", "Suggestion answers by experiment "
                               "variant and ranking used", ["experiment", "variant", "ranking"],
                               registry=self.registry)
        self.rate_limited = Counter("cartwise_api_rate_limited", "Requests refused with 429",
                                    ["role"], registry=self.registry)

        self.stream_lag = Gauge("cartwise_stream_lag", "Records the workers have not applied "
                                "yet (cartwise lag), as last checked by this API process",
                                ["topic", "partition"], registry=self.registry)
        self.stream_stalled = Gauge("cartwise_stream_stalled", "1 when the partition's progress "
                                    "has not moved for stall_after_s while records wait",
                                    ["topic", "partition"], registry=self.registry)

        self.state_lost = Gauge("cartwise_state_lost", "1 when Redis has no state generation "
                                "while the consumer group has committed offsets: Redis lost the "
                                "workers' state (docs/operations.md)", registry=self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
