"""Runtime settings, read from CARTWISE_* environment variables (docs/operations.md)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields

from models.segments import SegmentConfig


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CARTWISE_{name.upper()}", default)


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"CARTWISE_{name.upper()} must be true or false, not {raw!r}")


DEFAULT_PASSWORDS = frozenset({"change-me"})  # placeholders of the deploy examples


def _password(url: str) -> str | None:
    """The password of a redis://[user:password@]host URL, if it has one."""
    from urllib.parse import unquote, urlsplit

    try:
        given = urlsplit(url).password
    except ValueError:
        return None
    return unquote(given) if given is not None else None


@dataclass(frozen=True)
class Settings:
    broker: str = "kafka://127.0.0.1:9092"  # comma-separated host:port list, kafka:// optional
    redis_url: str = "redis://127.0.0.1:6379/0"
    # A Redis Cluster at redis_url (any node; the others are found from it): the workers and
    # the API use a cluster client and write each slot's keys apart (docs/redis.md, "Cluster").
    redis_cluster: bool = False
    prefix: str = "cw:"  # every Redis key starts with it (docs/redis.md)
    app_id: str = "cartwise"  # Kafka consumer group; also names the internal pairs topic
    events_topic: str = "cartwise.events"
    catalog_topic: str = "cartwise.catalog"
    dlq_topic: str = "cartwise.dlq"
    touchpoints_topic: str = "cartwise.touchpoints"  # reminders for CRM / SMS (docs/events.md)
    # The API's rules and experiment definitions, compacted: `cartwise rebuild` reads them
    # back after Redis lost its data (docs/operations.md).
    config_topic: str = "cartwise.config"
    # Copies of each partition; -1 is the broker's default.replication.factor (set it to 3 on a
    # production cluster of three brokers or more).
    replication_factor: int = -1
    # The events topic's retention; -1 keeps it whole, which the exact rebuild after a Redis data
    # loss needs (docs/operations.md).
    events_retention_ms: int = -1
    partitions: int = 4  # of the events and pairs topics; the most workers that share work
    batch_max: int = 1000
    # Upper bound on a fetch's wait for new records (Faust hard-codes 1500 ms; see
    # docs/architecture.md): it bounds the delay each topic hop can add when traffic is light.
    fetch_max_wait_ms: int = 10
    # Records the consumer hands over at once. The pairs records stage 1 sends wait for the
    # hand-over before theirs to reach the stages' queues: unbounded, under a backlog the item
    # graph stage ran seconds behind (docs/operations.md, "The item graph stage under a backlog").
    poll_max_records: int = 500
    # How long the producer waits to fill a batch, and a batch's size. Each events batch sends
    # one evidence message per pairs partition; sent at once (0, Faust's default), shopper
    # lists at a steady 1,000 events/s were 2.6-2.9 s old at p50 against 0.5-0.6 s with 5 ms
    # (bench/scale.py, docs/operations.md).
    producer_linger_ms: int = 5
    producer_batch_bytes: int = 16384
    batch_within_s: float = 0.05
    # State reaches Redis (with the input offset) at most this often; a crash replays less.
    checkpoint_interval_s: float = 1.0
    # Share of the worker's time that encoding one stage's checkpoints may take; a partition
    # whose last one took more waits longer for its next (streams/stage.py, `checkpoint_every`).
    checkpoint_budget: float = 0.05
    lists_interval_s: float = 0.2  # how often changed item lists are published
    lists_min_interval_s: float = 1.0  # one item's list is recomputed at most this often
    # Share of each `lists_interval_s` tick that building lists may take, over all partitions:
    # under load lists wait (oldest evidence first) instead of stalling shoppers' lists.
    lists_budget: float = 0.3
    # While shoppers' lists are behind (the oldest event of the last batch older than
    # `behind_after_s` when its lists were written), item lists take this share instead: the
    # shopper's own next list comes first, item lists catch up when traffic eases.
    lists_budget_behind: float = 0.05
    behind_after_s: float = 0.1
    settle_idle_s: float = 1.0  # idle time after which a partition recomputes all its lists
    refresh_interval_s: float = 10.0  # how often recently active shoppers' lists are refreshed
    refresh_window_s: float = 3600.0  # "recently active", in event time
    refresh_max_users: int = 200  # per partition per refresh: bounds its cost under load
    # Share of each `refresh_interval_s` that refreshing may take, over all partitions; a pass
    # that needs more goes on at the next tick (docs/architecture.md).
    refresh_budget: float = 0.05
    trending_size: int = 500  # items kept in each trending set (shop-wide and per category)
    # Group membership: a killed worker's partitions move after `session_timeout_s`.
    session_timeout_s: float = 30.0
    rebalance_timeout_s: float = 30.0
    heartbeat_interval_s: float = 3.0
    # Prometheus /metrics on this port. A worker: 0 turns it off (several workers on one host
    # need different ports). The API: 0 serves /metrics on its public port (the demo, local
    # runs); any other port moves it there, off the public one (production, docs/api.md).
    metrics_port: int = 0
    # HTTP API (docs/api.md).
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Comma-separated "role:sha256:<hex>" entries; `cartwise api-key ROLE` makes one.
    api_keys: str = ""
    api_auth: str = "on"  # "off" serves every route without a key: local development only
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser
    max_body_bytes: int = 1_048_576
    max_batch: int = 500  # events or catalog records per POST
    max_k: int = 50  # the most suggestions one request may ask for
    # Requests per second per API key (bursts of twice as many), per API process.
    rate_read: float = 2000.0
    rate_ingest: float = 500.0
    rate_admin: float = 50.0
    # Events per second per API key through POST /v1/events (bursts of twice as many, and at
    # least one full batch), per API process: the ingest limit counts events, not requests.
    rate_events: float = 1000.0
    # Slow senders (docs/api.md, "Limits"): a request's headers must arrive within
    # `header_timeout_s` of its first byte (or of the connection), its body within
    # `body_timeout_s` of the headers; else the connection is closed (408).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # Request body bytes one API process holds at once, all requests together; bodies beyond
    # it are refused (503 server_busy): memory stays bounded under many slow or large bodies.
    body_buffer_bytes: int = 64 * 1_048_576
    # Open connections per API process; more are answered 503 and closed at once.
    max_connections: int = 2048
    # Served records (re-ranker features of an answer, docs/experiments.md) written per
    # second per API process; answers beyond it go out without one. With `served_ttl_s` it
    # bounds the records Redis holds: served_rate x served_ttl_s per process.
    served_rate: float = 500.0
    # The API checks the workers' progress this often; a partition whose checkpoint has not
    # moved for `stall_after_s` while records wait is reported stalled (/ready, metrics).
    stall_check_s: float = 15.0
    stall_after_s: float = 120.0
    # Who touched each item lately (cw:buyers / cw:viewers), for GET /v1/audiences; off saves
    # two Redis writes per item per batch (docs/audiences.md).
    audience_index: bool = True
    audience_index_size: int = 1000  # newest shoppers kept per item and channel
    # Repurchase cycles (docs/replenishment.md): reminders this long before the expected
    # run-out; touchpoints found this late (a worker was down, an old log replayed) are
    # dropped instead of sent; how often the workers look for touchpoints to send.
    replenish_lead_days: float = 7.0
    # Model settings other than their defaults, "NAME=NUMBER,..." (models/config.py); the API
    # and the workers must run with the same.
    model: str = ""
    touchpoint_max_late_s: float = 86400.0
    touchpoint_check_s: float = 10.0
    # Suggestion feedback (docs/experiments.md): a click, add-to-cart or purchase of a shown item
    # within the attribution window counts as a conversion; a shown item with none of them
    # within the label window is a negative example for the re-ranker. The API keeps what it
    # served (features per item) for `served_ttl_s`; "plain" ranking turns the re-ranker off
    # outside experiments, "auto" uses it once it beats the plain order on
    # `reranker_min_examples` held-out examples.
    attribution_window_s: float = 7 * 86400.0
    feedback_label_s: float = 1800.0
    served_ttl_s: float = 600.0
    ranking: str = "auto"
    reranker_min_examples: int = 500
    # RFM segments (docs/segments.md): the window, and the amount x frequency thresholds.
    segment_window_days: float = 90.0
    segment_frequent_orders: int = 2
    segment_high_spend: float = 600.0
    segment_mid_spend: float = 300.0
    produce_timeout_s: float = 5.0  # how long POST /v1/events waits for the broker's ack
    # The demo storefront page (served at /demo) is on only when both keys are set. They are
    # handed to the browser in clear: never set them in production.
    demo_read_key: str = ""
    demo_ingest_key: str = ""
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self) -> None:
        # The compose file and the Kubernetes example ship `change-me` as a placeholder: a
        # service must not run on a password everyone knows (docs/production.md).
        if _password(self.redis_url) in DEFAULT_PASSWORDS:
            raise ValueError("CARTWISE_REDIS_URL uses the placeholder password 'change-me': "
                             "set a real one (REDIS_PASSWORD in docker-compose, the "
                             "cartwise-secrets Secret in Kubernetes)")
        # Partition keys carry a hash tag in braces (docs/redis.md): one in the prefix would
        # become the tag of every key and put the whole state in one cluster slot.
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"CARTWISE_PREFIX={self.prefix!r} contains a brace: Redis Cluster "
                             "reads braces as a hash tag; use letters, digits, ':' or '-'")
        # Apache Kafka refuses a group session outside its broker limits (6 s to 30 min by
        # default) and the worker would then idle without consuming: say so up front.
        if not 6.0 <= self.session_timeout_s <= 1800.0:
            raise ValueError(f"CARTWISE_SESSION_TIMEOUT_S={self.session_timeout_s:g} is outside "
                             "6..1800 s, the range Apache Kafka accepts by default")
        if self.poll_max_records < 1:
            raise ValueError(f"CARTWISE_POLL_MAX_RECORDS={self.poll_max_records} must be at "
                             "least 1 (500 is the default)")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
            elif f"CARTWISE_{f.name.upper()}" in os.environ:
                raw = _env(f.name, "")
                kind = type(getattr(cls, f.name, "")) if f.name != "worker_id" else str
                if kind is bool:
                    values[f.name] = _flag(f.name, raw)
                else:
                    values[f.name] = kind(raw) if kind in (int, float) else raw
        return cls(**values)

    @property
    def segments(self) -> SegmentConfig:
        return SegmentConfig(self.segment_window_days, self.segment_frequent_orders,
                             self.segment_high_spend, self.segment_mid_spend)

    @property
    def bootstrap(self) -> list[str]:
        return [h.removeprefix("kafka://") for h in self.broker.split(",") if h]

    @property
    def faust_broker(self) -> str:
        return ";".join(f"kafka://{h}" for h in self.bootstrap)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def pairs_topic(self) -> str:
        return f"{self.app_id}-pairs"
