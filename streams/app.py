"""The Faust app: topics, the three agents and the timers. Agents only hand batches over."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
import orjson
from faust.types import TP

from cartwise.redisconn import connect_async
from cartwise.settings import Settings
from models.config import ModelConfig, model_config
from streams.catalog_stage import CatalogStage
from streams.context_stage import ContextStage
from streams.gaps import ISOLATION_LEVEL, prober
from streams.graph_stage import GraphStage
from streams.stats import Stats, watch_loop
from streams.store import StateLost, Store
from streams.topics import group_has_offsets

log = logging.getLogger("cartwise.app")
STATS_TTL_S = 86400

GENERATION_CHECK_S = 10.0  # how often a worker on a Redis Cluster checks every slot's sentinel


def _records(batch: list[Any]) -> list[tuple[bytes | None, int, int, float, bytes | None]]:
    return [(e.value, e.message.partition, e.message.offset, e.message.timestamp, e.key)
            for e in batch]


def internal_first(buffered: Any, events_topic: str) -> None:
    """Move the buffered fetches of every topic but the events topic to the front, keeping
    each group's order (`buffered`: aiokafka's per-partition fetch buffer, an OrderedDict).

    aiokafka hands buffered records over in the order their partitions' fetches arrived, and a
    partition is fetched again only once its buffer is drained. Under a backlog each events
    partition buffers up to `consumer_max_fetch_size` (1 MiB, thousands of events), so the pairs
    records stage 1 had just sent queued behind all of them: the item graph stage applied them
    3-7 s late and stayed a whole 30,000-event backlog behind (docs/operations.md). The pairs
    and catalog topics are small and produced by the workers themselves; serving them first
    cannot starve the events, and a partition's own records stay in their order.
    """
    for tp in [tp for tp in reversed(buffered) if tp.topic != events_topic]:
        buffered.move_to_end(tp, last=False)


def _tune_consumer(app: faust.App, fetch_max_wait_ms: int, events_topic: str) -> None:
    """Faust passes a fixed fetch_max_wait_ms=1500 to aiokafka; use ours instead. And read
    committed records only (Faust does so only in its exactly-once mode): an aborted
    transaction's events are never applied (docs/events.md, streams/gaps.py).

    A broker may hold an empty fetch for the whole wait (Tansu does), and each topic hop then
    adds up to that much delay between an event and its suggestions.

    And hand over the internal topics' records before the events backlog (`internal_first`).
    """
    from faust.transport.drivers import aiokafka as driver

    app._cartwise_fetch_max_wait_ms = fetch_max_wait_ms  # type: ignore[attr-defined]
    app._cartwise_events_topic = events_topic  # type: ignore[attr-defined]
    original = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, "_cartwise", False):
        return

    def create(self: Any, transport: Any) -> Any:
        consumer = original(self, transport)
        wait = getattr(self.app, "_cartwise_fetch_max_wait_ms", None)
        if wait is not None:
            consumer._fetch_max_wait_ms = wait
        consumer._isolation_level = ISOLATION_LEVEL  # read by start(), which comes later
        return consumer

    fetch = driver.AIOKafkaConsumerThread._fetch_records

    async def fetch_records(self: Any, consumer: Any, *args: Any, **kwargs: Any) -> Any:
        # In the consumer's own thread, where the fetcher fills this buffer: no race.
        events = getattr(self.app, "_cartwise_events_topic", None)
        buffered = getattr(getattr(consumer, "_fetcher", None), "_records", None)
        if events is not None and hasattr(buffered, "move_to_end"):
            internal_first(buffered, events)
        return await fetch(self, consumer, *args, **kwargs)

    create._cartwise = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._create_worker_consumer = create
    driver.AIOKafkaConsumerThread._fetch_records = fetch_records


def stream_config(settings: Settings) -> ModelConfig:
    """The workers' model settings (`CARTWISE_MODEL`); refuses what only the library does."""
    config = model_config(settings.model.split(","),
                          replenish_lead_s=settings.replenish_lead_days * 86400.0)
    if config.blend_rate > 0:
        # The learned blend (models/blend.py) is measured in the replay; in the stream its
        # weights would have to be folded across partitions first (docs/model.md).
        raise ValueError("CARTWISE_MODEL blend_rate is supported only by the library and "
                         "`cartwise evaluate` so far: remove it from CARTWISE_MODEL")
    return config


def create_app(settings: Settings | None = None, config: ModelConfig | None = None) -> faust.App:
    settings = settings or Settings.from_env()
    config = config or stream_config(settings)
    # Faust wants a directory even with in-memory tables; keep it out of the working tree.
    datadir = Path(tempfile.gettempdir()) / "cartwise-faust" / settings.app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=settings.faust_broker,
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        web_enabled=False,
        producer_acks=-1,
        producer_linger=settings.producer_linger_ms / 1000.0,
        producer_max_batch_size=settings.producer_batch_bytes,
        consumer_auto_offset_reset="earliest",
        store="memory://",
        datadir=datadir,
        broker_session_timeout=settings.session_timeout_s,
        broker_rebalance_timeout=settings.rebalance_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        # Records are acknowledged only once a Redis checkpoint covers them, and replays are
        # idempotent (docs/architecture.md): waiting for in-flight records at shutdown or
        # rebalance would wait for a checkpoint timer that has already stopped.
        stream_wait_empty=False,
        # One hand-over from the consumer is put into the stages' queues whole before the
        # next: unbounded, it was every record buffered (thousands per events partition), and
        # the pairs records sent meanwhile waited for all of it (`internal_first`).
        broker_max_poll_records=settings.poll_max_records,
    )
    _tune_consumer(app, settings.fetch_max_wait_ms, settings.events_topic)
    topics = {
        name: app.topic(name, key_type=bytes, value_type=bytes, internal=False)
        for name in (settings.events_topic, settings.pairs_topic, settings.catalog_topic,
                     settings.dlq_topic, settings.touchpoints_topic)
    }

    async def send(topic: str, value: bytes, partition: int | None,
                   headers: dict[str, bytes] | None, key: bytes | None = None) -> Any:
        return await topics[topic].send(key=key, value=value, partition=partition,
                                        headers=headers)

    redis = connect_async(settings)
    store = Store(redis, settings.prefix)
    stats = Stats(settings.worker_id)
    context = ContextStage(store, config, stats, send, settings)
    graph = GraphStage(store, config, stats, send, settings)
    graph.turns = context.turns  # shoppers first (streams/turns.py)
    catalog = CatalogStage(store, stats, send, settings)
    def catalog_changed(items: set[str]) -> None:
        for cache in (context.catalog_cache, graph.catalog_cache):
            cache.forget(items)

    catalog.on_change = catalog_changed
    graph.shoppers_lag = lambda: context.lag
    app.cartwise = {"context": context, "cooccurrence": graph, "catalog": catalog,
                    "stats": stats, "store": store}

    # The stages acknowledge records themselves, once a checkpoint covers them.
    @app.agent(topics[settings.events_topic], name="context")
    async def context_agent(stream: faust.StreamT) -> None:
        context.ack = stream.ack
        async for batch in stream.noack_take(settings.batch_max, settings.batch_within_s):
            await context.handle(_records(batch), batch)

    @app.agent(topics[settings.pairs_topic], name="cooccurrence")
    async def cooccurrence_agent(stream: faust.StreamT) -> None:
        graph.ack = stream.ack
        async for batch in stream.noack_take(settings.batch_max, settings.batch_within_s):
            await graph.handle(_records(batch), batch)

    @app.agent(topics[settings.catalog_topic], name="catalog")
    async def catalog_agent(stream: faust.StreamT) -> None:
        catalog.ack = stream.ack
        async for batch in stream.noack_take(settings.batch_max, settings.batch_within_s):
            await catalog.handle(_records(batch), batch)

    def seeker(topic: str) -> Any:
        async def seek(partition: int, offset: int) -> None:
            # In the consumer's own thread (a plain seek races its fetcher), and Faust's read
            # offset moves back too, or it would drop the records fetched again.
            await app.consumer.seek_wait({TP(topic, partition): offset})
        return seek

    async def claim() -> None:
        """The state generation: created on a new deployment, checked on every checkpoint."""
        loop = asyncio.get_running_loop()
        progress = await loop.run_in_executor(None, group_has_offsets, settings)
        await store.claim_generation(progress, settings.partitions)

    async def write_stats(stopped: str | None = None) -> None:
        """The worker's stats for `cartwise stats`; a stopping worker says why."""
        snap = stats.snapshot()
        if stopped:
            snap["stopped"] = stopped
        await redis.set(store.keys.stats(settings.worker_id), orjson.dumps(snap),
                        ex=STATS_TTL_S)

    for stage, topic in ((context, settings.events_topic), (graph, settings.pairs_topic)):
        stage.seek = seeker(topic)
        stage.consumable = prober(settings.bootstrap, topic)
        stage.claim = claim
        stage.on_stop = write_stats

    @app.task
    async def drop_monitor() -> None:
        """Faust's Monitor sensor feeds its web UI (disabled here) and costs work per event;
        our own stats (streams/stats.py) replace it."""
        if app.monitor in set(app.sensors):
            app.sensors.remove(app.monitor)

    @app.task
    async def loop_delay() -> None:
        """How long the event loop is held (`cartwise_loop_delay_seconds`, `cartwise lag`)."""
        await watch_loop(stats)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        for stage, topic in ((context, settings.events_topic), (graph, settings.pairs_topic),
                             (catalog, settings.catalog_topic)):
            stage.revoke({tp.partition for tp in revoked if tp.topic == topic})

    @app.on_partitions_assigned.connect
    async def on_assigned(sender: Any, assigned: set, **kwargs: Any) -> None:
        for stage, topic in ((context, settings.events_topic), (graph, settings.pairs_topic),
                             (catalog, settings.catalog_topic)):
            stage.assign({tp.partition for tp in assigned if tp.topic == topic})

    def end_of(topic: str) -> Callable[[int], tuple[int | None, int | None]]:
        """(high watermark, last offset handed over) of a partition (StallWatch). The
        second is Faust's read offset: not public, so read defensively."""
        read = getattr(app.consumer, "_read_offset", None)

        def ends(partition: int) -> tuple[int | None, int | None]:
            tp = TP(topic, partition)
            try:
                end = app.consumer.highwater(tp)
            except Exception:  # not assigned (any more) or no fetch answer yet
                end = None
            return end, None if read is None else read.get(tp)
        return ends

    async def guarded(name: str, coro: Any) -> None:
        t0 = time.perf_counter()
        try:
            await coro
            stats.add_time(f"timer.{name}", time.perf_counter() - t0)
        except Exception:
            stats.inc(f"{name}.errors")
            log.exception("%s failed; will run again at the next tick", name)

    @app.timer(settings.lists_interval_s)
    async def lists_timer() -> None:
        await guarded("lists", graph.publish_lists())

    @app.timer(settings.checkpoint_interval_s / 2)
    async def checkpoint_timer() -> None:
        await guarded("checkpoint", context.checkpoint_all())
        await guarded("checkpoint", graph.checkpoint_all())
        await guarded("gaps", context.refetch_gaps())
        await guarded("gaps", graph.refetch_gaps())
        await guarded("stalls", context.find_stalls(end_of(settings.events_topic)))
        await guarded("stalls", graph.find_stalls(end_of(settings.pairs_topic)))

    @app.timer(settings.touchpoint_check_s)
    async def touchpoints_timer() -> None:
        await guarded("touchpoints", context.send_touchpoints())

    @app.timer(settings.refresh_interval_s)
    async def refresh_timer() -> None:
        await guarded("refresh", context.refresh())

    if store.cluster:
        @app.timer(GENERATION_CHECK_S)
        async def generation_timer() -> None:
            """A cluster node can lose its data where no checkpoint of ours looks (lists, the
            catalog, versions): every slot keeps a copy of the generation (docs/redis.md)."""
            try:
                await store.check_generation()
            except StateLost as exc:
                await context.fatal(exc)
            except Exception as exc:  # an outage: checked again at the next tick
                stats.inc("generation.errors")
                log.warning("checking the state generation failed (%s: %s)",
                            type(exc).__name__, exc)

    @app.timer(1.0)
    async def publish_stats() -> None:
        stats.partitions = partition_gauges(app, settings, context, graph)
        await guarded("stats", write_stats())

    return app


def partition_gauges(app: faust.App, settings: Settings, context: ContextStage,
                     graph: GraphStage) -> list[dict[str, Any]]:
    """Lag and state size of the partitions this worker holds.

    The end offset is the high watermark of the consumer's own fetches (right on Tansu too,
    cartwise/lag.py); the lag counts from the checkpoint, which is what survives a crash.
    """
    out = []
    for stage, topic in ((context, settings.events_topic), (graph, settings.pairs_topic)):
        for p, st in list(stage.parts.items()):
            try:
                end = app.consumer.highwater(TP(topic, p))
            except Exception:  # not assigned (any more) or no fetch answer yet
                end = None
            size = len(st.book.users) if stage is context else len(st.graph.rows)
            out.append({"stage": stage.name, "topic": topic, "partition": p, "size": size,
                        "checkpoint": st.offset, "applied": st.applied,
                        "lag": None if end is None else max(0, end - (st.offset + 1))})
    return out
