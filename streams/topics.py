"""Topic layout (docs/events.md): created up front so partition counts are what we chose."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from cartwise.settings import Settings

log = logging.getLogger("cartwise.topics")


def topic_plan(settings: Settings) -> dict[str, int]:
    p = settings.partitions
    return {settings.events_topic: p, settings.pairs_topic: p, settings.catalog_topic: p,
            settings.dlq_topic: 1, settings.touchpoints_topic: p, settings.config_topic: 1}


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic-level configs set at creation (docs/events.md, "Topics"); a topic not named takes
    the broker's defaults (Apache Kafka: delete after 7 days).

    The events topic is kept whole: `cartwise rebuild` replays it from offset 0. The catalog and
    config topics keep the newest record per key (compacted, never deleted by age). The pairs
    topic is internal and only read again after a crash or rebalance: a day is plenty.
    """
    day_ms = str(86_400_000)
    return {
        settings.events_topic: {"retention.ms": str(settings.events_retention_ms)},
        settings.catalog_topic: {"cleanup.policy": "compact"},
        settings.config_topic: {"cleanup.policy": "compact"},
        settings.pairs_topic: {"retention.ms": day_ms},
        settings.touchpoints_topic: {"retention.ms": str(7 * 86_400_000)},
    }


def ensure_topics(settings: Settings, timeout: float = 60.0,
                  only: Collection[str] | None = None) -> None:
    """Create missing topics (those in `only`, when given); waits for the broker up to
    `timeout` seconds. A topic that exists already is left as it is."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap,
                                     client_id=f"{settings.app_id}-admin")
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for broker %s: %s", settings.bootstrap, exc)
            time.sleep(1)
    try:
        existing = set(admin.list_topics())
        configs = topic_configs(settings)
        missing = [NewTopic(name, n, settings.replication_factor,
                            topic_configs=configs.get(name))
                   for name, n in topic_plan(settings).items()
                   if name not in existing and (only is None or name in only)]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


def group_has_offsets(settings: Settings) -> bool:
    """Whether the broker remembers progress of this app's consumer group on its own topics.

    A worker that finds no state generation in Redis asks this: committed offsets mean the
    state existed and Redis lost it; none mean a new deployment.
    """
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap,
                             client_id=f"{settings.app_id}-admin")
    try:
        if hasattr(admin, "list_group_offsets"):  # kafka-python 3
            offsets = admin.list_group_offsets({settings.app_id: None}).get(settings.app_id, {})
        else:
            offsets = admin.list_consumer_group_offsets(settings.app_id)
    finally:
        admin.close()
    ours = {settings.events_topic, settings.pairs_topic}
    return any(tp.topic in ours and meta.offset > 0 for tp, meta in offsets.items())
