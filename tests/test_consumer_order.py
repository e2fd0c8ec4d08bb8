"""The workers' consumer hands over the internal topics' records before an events backlog
(`internal_first` in streams/app.py): the item graph stage keeps pace under a backlog."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from cartwise.settings import Settings
from streams.app import create_app, internal_first
from streams.topics import ensure_topics


def test_internal_topics_move_to_the_front_in_their_order():
    tp = TopicPartition
    buffered = OrderedDict((t, t.partition) for t in [
        tp("ev", 2), tp("pairs", 1), tp("ev", 0), tp("catalog", 0), tp("ev", 1), tp("pairs", 0)])
    internal_first(buffered, "ev")
    assert list(buffered) == [tp("pairs", 1), tp("catalog", 0), tp("pairs", 0),
                              tp("ev", 2), tp("ev", 0), tp("ev", 1)]
    assert all(t.partition == v for t, v in buffered.items())  # entries move with their keys


def test_the_worker_bounds_a_hand_over_and_orders_it():
    app = create_app(Settings(app_id="order-check", poll_max_records=321))
    assert app.conf.broker_max_poll_records == 321
    from faust.transport.drivers import aiokafka as driver

    assert driver.AIOKafkaConsumerThread._fetch_records.__name__ == "fetch_records"


def test_poll_max_records_must_be_positive():
    with pytest.raises(ValueError, match="CARTWISE_POLL_MAX_RECORDS=0"):
        Settings(poll_max_records=0)


def test_a_real_fetch_buffer_hands_the_pairs_over_first(make_settings: Callable[..., Settings]):
    """On a real broker and aiokafka's own fetch buffer: with every partition's first fetch
    buffered (a backlog of events, a few pairs records), the first hand-over of 500 records
    holds every pairs record. Without `internal_first` they sit wherever their fetches landed,
    behind up to 1,500 events each."""
    settings = make_settings("order")
    ensure_topics(settings, only={settings.events_topic, settings.pairs_topic})
    n = settings.partitions

    async def run() -> dict[TopicPartition, int]:
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap)
        await producer.start()
        try:
            for p in range(n):
                for _ in range(1500):
                    await producer.send(settings.events_topic, b"e" * 200, partition=p)
                await producer.send(settings.pairs_topic, b"pairs", partition=p)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        tps = [TopicPartition(t, p) for t in (settings.events_topic, settings.pairs_topic)
               for p in range(n)]
        consumer.assign(tps)
        await consumer.start()
        try:
            buffered = consumer._fetcher._records
            deadline = time.monotonic() + 30
            while len(buffered) < len(tps):
                assert time.monotonic() < deadline, f"only {len(buffered)} partitions fetched"
                await asyncio.sleep(0.05)
            internal_first(buffered, settings.events_topic)
            got = await consumer.getmany(max_records=500)
        finally:
            await consumer.stop()
        return {tp: len(recs) for tp, recs in got.items()}

    got = asyncio.run(run())
    assert {tp.partition for tp in got if tp.topic == settings.pairs_topic} == set(range(n))
    assert sum(got.values()) == 500
