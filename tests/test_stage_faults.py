"""Faults the stage machinery must survive or report (docs/architecture.md): a worker that
stops on Redis data loss says so in its stats, a checkpoint one record keeps failing costs
that record alone, a gap is passed over only where the broker has no record to give
(transaction markers, aborted or compacted records, retention), transactional producers
are read committed, and the catalog stage acknowledges only its own partitions and retries
its dead letters."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from types import SimpleNamespace

import orjson
import pytest
from kafka import KafkaProducer

from cartwise.contract import expected_partition
from cartwise.harness import (
    dead_letters,
    produce,
    snapshot,
    stop_worker,
    wait_complete,
    worker_counters,
    worker_env,
    worker_stats,
)
from cartwise.rebuild import running_workers
from cartwise.redisconn import connect, connect_async
from cartwise.simulator import Shop
from models.rules import utc_day
from streams import gaps as gaps_module
from streams import stage as stage_module
from streams.catalog_stage import CatalogStage
from streams.context_stage import ContextStage
from streams.stats import Stats
from streams.store import Keys, Store
from streams.topics import ensure_topics
from tests.test_checkpoint import recording_stage
from tests.test_pipeline import oracle

START = 1_755_000_000.0








@pytest.mark.both_brokers  # through workers; once, on Kafka: Redis is what fails here
@pytest.mark.one_broker("kafka")
def test_a_worker_stopped_by_redis_data_loss_publishes_why(make_settings, workers):
    """Exit 3 alone is not enough for an operator: the worker's last stats in Redis (what
    `cartwise stats` reads) count the state loss and say it stopped, and a stopped worker is
    not counted as running (its stats are fresh)."""
    settings = make_settings("lost-stats")
    shop = Shop(seed=21)
    events = list(shop.events(300, start_ts=START))
    ensure_topics(settings)  # not auto-created: Kafka would make one partition
    ends = produce(settings, events[:150], shop.catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w])
    r = connect(settings)
    for key in r.scan_iter(f"{settings.prefix}*"):  # Redis loses this deployment's data
        r.delete(key)
    produce(settings, events[150:])
    assert w.wait(60) == 3
    snaps = worker_stats(settings)
    assert [s.get("stopped") for s in snaps] == ["state_lost"]
    assert worker_counters(settings).get("state_lost") == 1
    # Its stats are seconds old, but it is not running: `cartwise rebuild` need not wait.
    assert running_workers(r, Keys(settings.prefix), time.time(), alive_s=3600) == []
    out = subprocess.run([sys.executable, "-m", "cartwise", "stats"], env=worker_env(settings),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"worker {snaps[0]['worker_id']} stopped itself: state_lost" in out.stderr


def _impression(user: str, n: int, ts: float) -> dict:
    return {"v": 1, "event_id": f"imp-{user}-{n}", "type": "impression", "user_id": user,
            "ts": ts, "request_id": f"rq-{n}", "items": [{"item_id": "x"}]}


@pytest.mark.both_brokers
@pytest.mark.one_broker("kafka")
def test_a_checkpoint_one_record_keeps_failing_costs_that_record_only(make_settings, workers):
    """A shopper's frequency-cap counter holds a non-number, so every checkpoint that adds to
    it fails in Redis. Retried forever it held the whole worker; now its records are
    dead-lettered as checkpoint_failed and every other event is applied, once."""
    settings = make_settings("cp-poison")
    shop = Shop(seed=23)
    events = list(shop.events(500, start_ts=START))
    users = sorted({e["user_id"] for e in events})
    victim = users[0]
    home = expected_partition(victim, settings.partitions)
    assert {expected_partition(u, settings.partitions) for u in users} - {home}
    ts = START + 100
    bad = [_impression(victim, n, ts + n) for n in range(2)]
    fine = [_impression(users[1], n, ts + n) for n in range(2)]
    r = connect(settings)
    r.hset(Keys(settings.prefix).shown(home, victim, utc_day(ts)), "x", b"not a number")
    stream = events[:200] + bad[:1] + fine + events[200:400] + bad[1:] + events[400:]
    ensure_topics(settings)
    ends = produce(settings, stream, shop.catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w], timeout=180)

    snap = snapshot(settings)
    ref = oracle(events, shop.catalog)
    for user in users:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    letters = [(orjson.loads(v), h) for v, h in dead_letters(settings)]
    assert sorted(e["event_id"] for e, _ in letters) == sorted(e["event_id"] for e in bad)
    for _, h in letters:
        assert h["cartwise-reason"] == b"checkpoint_failed"
        assert b"finite" in h["cartwise-detail"]
    total = worker_counters(settings)
    applied = sum(v for k, v in total.items() if k.startswith("applied."))
    assert applied == len(events) + len(fine)  # each once; the victim's impressions not
    assert total["dlq.checkpoint_failed"] == len(bad)
    assert total["context.checkpoint_isolations"] >= 1
    assert "context.checkpoint_stuck" not in total
    keys = Keys(settings.prefix)
    other = expected_partition(users[1], settings.partitions)
    assert r.hget(keys.shown(other, users[1], utc_day(ts)), "x") == b"2"


def _partition_zero_records(settings) -> list:
    """80 events of events partition 0 as the stage gets them, at offsets 0-79."""
    events = [e for e in Shop(seed=9).events(2000, start_ts=START)
              if expected_partition(e["user_id"], settings.partitions) == 0][:80]
    return [(orjson.dumps(e), 0, i, START + 10_000, e["user_id"].encode())
            for i, e in enumerate(events)]


async def _gap_stage(settings, prefix: str, found: str | int | None = "asked",
                     sent: list | None = None) -> tuple[ContextStage, list]:
    """A context stage over Redis with sends that succeed at once (recorded in `sent`),
    recorded seeks and a broker that, asked from an offset on, has the records from there
    or from `found` (the later) up to 79 ("asked": from there; None: nothing came in time)."""
    stage, seeks = await recording_stage(settings, prefix, sent)

    async def consumable(p: int, offset: int) -> list[int]:
        if found is None:
            return []
        return list(range(max(offset, 0 if found == "asked" else int(found)), 80))

    stage.consumable = consumable
    stage.assign({0})
    return stage, seeks


class Exited(BaseException):
    """os._exit, caught: the stage stopped the process."""


def test_a_checkpoint_that_fails_without_any_record_stops_the_worker(make_settings,
                                                                      monkeypatch):
    """When even a checkpoint that changes nothing fails (here the state generation keys
    have the wrong type: the global one and every partition's copy, which checkpoints
    check), no record is at fault: the worker stops with exit 4 and says why, instead of
    retrying forever or dead-lettering innocent records."""
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise Exited

    monkeypatch.setattr(stage_module.os, "_exit", exit_)
    monkeypatch.setattr(stage_module.Stage, "stopping", False, raising=False)
    settings = make_settings("cp-stuck")
    events = [e for e in Shop(seed=9).events(500, start_ts=START)
              if expected_partition(e["user_id"], settings.partitions) == 0][:20]
    recs = [(orjson.dumps(e), 0, i, START + 10_000, e["user_id"].encode())
            for i, e in enumerate(events)]
    stops: list[str] = []

    async def on_stop(reason: str) -> None:
        stops.append(reason)

    async def run() -> list:
        sent: list[str] = []
        stage, _ = await _gap_stage(settings, settings.prefix, sent=sent)
        stage.on_stop = on_stop
        r = stage.store.redis
        keys = stage.keys
        for key in (keys.generation, *keys.partition_generations(settings.partitions)):
            await r.delete(key)
            await r.hset(key, "not", "a string")
        with pytest.raises(Exited):  # retried forever before: a hang guard, not a timing
            await asyncio.wait_for(stage.handle(recs), 60)
        return sent

    sent = asyncio.run(run())
    assert exits == [4]
    assert stops == ["context.checkpoint_stuck"]
    assert settings.dlq_topic not in sent


def test_a_gap_is_passed_over_only_where_the_broker_has_no_record(make_settings,
                                                                   monkeypatch):
    """Seen again and again, a hole is not passed over while the broker has its record or
    answers nothing in time (it was skipped on timing before); where the broker's first
    record after it comes later (markers, aborted or compacted records, retention), the
    offsets up to that record are passed over, and no further."""
    monkeypatch.setattr(gaps_module, "GAP_CONFIRM_S", 0.0)
    monkeypatch.setattr(gaps_module, "GAP_RESEEK_S", 0.0)
    settings = make_settings("gap-probe")
    recs = _partition_zero_records(settings)

    async def sights(stage: ContextStage, batch: list) -> None:
        for _ in range(3 * gaps_module.GAP_CONFIRM):
            await stage.handle(batch)
            for _ in range(3):
                await asyncio.sleep(0)  # the probe and seek tasks run

    async def run() -> None:
        for name, found in (("kept:", "asked"), ("silent:", None)):
            kept, seeks = await _gap_stage(settings, settings.prefix + name, found=found)
            await kept.handle(recs[:30])
            await sights(kept, recs[50:70])
            assert kept.parts[0].applied == 29, name
            assert seeks[-1] == (0, 30)
            assert kept.stats.counters["context.gap_waits"] >= 1
            assert kept.stats.counters["context.gaps_accepted"] == 0

        cut, seeks = await _gap_stage(settings, settings.prefix + "cut:", found=45)
        await cut.handle(recs[:30])
        await sights(cut, recs[50:70])
        assert cut.parts[0].applied == 44  # 30-44 hold nothing; 45-49 exist: fetched again
        assert seeks[-1] == (0, 45)
        await cut.handle(recs[45:80])
        assert cut.parts[0].applied == 79
        assert cut.stats.counters["context.gaps_accepted"] == 1

    asyncio.run(run())


def test_a_stall_is_told_from_a_busy_or_retrying_partition(make_settings, monkeypatch):
    """The stall watch seeks back only where the consumer handed over the whole log and the
    stage holds nothing past what it applied; a partition still being fetched (a busy
    worker's), one whose batch is being retried, and one whose broker has nothing past the
    checkpoint (a transaction's last marker) are left alone, the last asked again less and
    less often."""
    monkeypatch.setattr(gaps_module, "STALL_S", 0.0)
    settings = make_settings("stall-watch")
    recs = _partition_zero_records(settings)

    async def twice(stage: ContextStage, ends: tuple[int | None, int | None]) -> None:
        for _ in range(2):  # first sight, then due (STALL_S is 0)
            await stage.find_stalls(lambda p: ends)
            for _ in range(3):
                await asyncio.sleep(0)  # the probe runs in the background

    async def run() -> None:
        stage, seeks = await _gap_stage(settings, settings.prefix + "a:")
        await stage.handle(recs[:30])
        await twice(stage, (80, 50))  # the consumer is still fetching: not a stall
        await twice(stage, (30, 29))  # caught up
        assert seeks == []
        stage.since[0].append(recs[40])  # a batch held, being retried: no fetch would help
        await twice(stage, (80, 80))
        assert seeks == []
        stage.since[0].pop()
        await twice(stage, (80, 80))  # handed over everything, nothing past 29 came: a stall
        assert seeks == [(0, 30)]
        assert stage.stats.counters["context.stalls_found"] == 1

        quiet, seeks = await _gap_stage(settings, settings.prefix + "b:", found=None)
        await quiet.handle(recs[:30])
        await twice(quiet, (31, 31))  # offset 30 holds no record the broker would give
        await twice(quiet, (31, 31))  # not due again yet: asked once
        assert seeks == []
        assert quiet.stalls[0].wait == 2 * gaps_module.Stall(0, 0, 0.0).wait
        assert "context.stalls_found" not in quiet.stats.counters

    asyncio.run(run())


def test_the_catalog_stage_acks_its_own_partitions_and_retries_dead_letters(make_settings):
    """Records of a partition taken away are neither applied nor acknowledged here, and a
    dead-letter send that fails is sent again instead of escaping the agent."""
    settings = make_settings("catalog-faults")
    sends: list[bytes] = []

    async def send(topic, value, partition, headers, key=None):  # noqa: ANN001, ANN202
        fut = asyncio.get_running_loop().create_future()
        sends.append(value)
        if len(sends) <= 2:
            fut.set_exception(RuntimeError("broker refused"))
        else:
            fut.set_result(None)
        return fut

    acked: list[int] = []

    async def ack(e: SimpleNamespace) -> None:
        acked.append(e.message.partition)

    async def run() -> dict:
        store = Store(connect_async(settings), settings.prefix)
        stage = CatalogStage(store, Stats("t"), send, settings)
        stage.ack = ack
        stage.assign({0})
        recs = [(orjson.dumps({"item_id": "a", "price": 1.0}), 0, 0, START, b"a"),
                (b"not json", 0, 1, START, b"b"),
                (orjson.dumps({"item_id": "c", "price": 1.0}), 1, 0, START, b"c")]
        events = [SimpleNamespace(message=SimpleNamespace(partition=p, offset=o))
                  for _, p, o, _, _ in recs]
        await asyncio.wait_for(stage.handle(recs, events), 30)
        return await store.hgetall(store.keys.catalog)

    facts = asyncio.run(run())
    assert set(facts) == {"a"}
    assert acked == [0, 0]
    assert len(sends) == 3 and len(set(sends)) == 1  # the one bad record, until it went


def _produce_in_transactions(settings, chunks: list[tuple[list[dict], bool]]) -> dict[int, int]:
    """Send each chunk in its own transaction, committed or (False) aborted after the broker
    has its records: every commit or abort leaves a control record, an offset with nothing to
    apply. Returns the last committed record's offset per partition."""
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks="all",
                             transactional_id=f"{settings.app_id}-tx")
    producer.init_transactions()
    ends: dict[int, int] = {}
    for events, commit in chunks:
        producer.begin_transaction()
        futures = [producer.send(settings.events_topic, orjson.dumps(e),
                                 key=e["user_id"].encode()) for e in events]
        producer.flush()  # written, then committed or aborted
        mds = [f.get(30) for f in futures]
        if not commit:
            producer.abort_transaction()
            continue
        producer.commit_transaction()
        for md in mds:
            ends[md.partition] = max(ends.get(md.partition, -1), md.offset)
    producer.close()
    return ends


def _assert_equals_library(settings, events: list[dict], catalog: list[dict]) -> None:
    snap = snapshot(settings)
    ref = oracle(events, catalog)
    for user in sorted({e["user_id"] for e in events}):
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    for item in ref.graph.rows:
        assert snap["items"][f"item:{item}"]["cross_sell"] == ref.graph.lists(item)[
            "cross_sell"], item
    assert _applied(settings) == len(events)


def _applied(settings) -> int:
    return sum(v for k, v in worker_counters(settings).items() if k.startswith("applied."))


@pytest.mark.both_brokers
def test_transaction_markers_do_not_stall_a_partition(make_settings, workers):
    """A transactional producer's commit markers are offsets without a record, between the
    events: refetching them forever stalled the partition. The worker asks the broker for the
    first record after the hole, skips the marker, and applies every event once."""
    settings = make_settings("tx-holes")
    shop = Shop(seed=31)
    events = list(shop.events(400, start_ts=START))
    ensure_topics(settings)
    produce(settings, [], shop.catalog)
    ends = _produce_in_transactions(settings, [(events[i:i + 40], True)
                                               for i in range(0, len(events), 40)])
    w = workers(settings)
    wait_complete(settings, ends, procs=[w], timeout=180)
    _assert_equals_library(settings, events, shop.catalog)
    assert worker_counters(settings).get("context.gaps_accepted", 0) >= 1


@pytest.mark.both_brokers
def test_aborted_transactions_are_not_applied(make_settings, workers, broker_name):
    """The workers read committed records only: events of an aborted transaction never
    count, and the holes they leave are skipped like markers."""
    if broker_name != "kafka":
        pytest.skip("Tansu hands aborted transactions' records to read_committed consumers")
    settings = make_settings("tx-aborted")
    shop = Shop(seed=37)
    events = list(shop.events(400, start_ts=START))
    ghosts = list(Shop(seed=38).events(120, start_ts=START))  # never committed
    ensure_topics(settings)
    produce(settings, [], shop.catalog)
    chunks = [(events[:150], True), (ghosts[:60], False), (events[150:300], True),
              (ghosts[60:], False), (events[300:], True)]
    ends = _produce_in_transactions(settings, chunks)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w], timeout=180)
    _assert_equals_library(settings, events, shop.catalog)


@pytest.mark.both_brokers
def test_a_worker_started_past_its_checkpoint_fetches_the_rest_again(make_settings, workers):
    """The group's committed offset is only where a new owner starts reading; Faust can move
    it past the checkpoint (its gap bookkeeping counts skipped offsets as done). A worker that
    starts at the end of the log is given no record that would show the hole: it compares the
    broker's end with what it applied and fetches the rest again (it waited forever before,
    on the Kafka CI run of the bounded-state test)."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
    from kafka.structs import OffsetAndMetadata

    settings = make_settings("past-checkpoint")
    shop = Shop(seed=23)
    events = list(shop.events(600, start_ts=START))
    ensure_topics(settings)
    ends = produce(settings, events[:300], shop.catalog)
    w = workers(settings, "first")
    wait_complete(settings, ends, procs=[w])
    deadline = time.monotonic() + 30  # its last counts published (once a second)
    while _applied(settings) < 300 and time.monotonic() < deadline:
        time.sleep(0.2)
    stop_worker(w)  # a clean stop: it leaves the group
    ends = produce(settings, events[300:])
    # Commit the end as a member of the group: Tansu refuses commits from outside it, and
    # keeps the group's protocol (Faust's assignor) after the last member left.
    class SameProtocol(RoundRobinPartitionAssignor):
        name = "faust"

    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=settings.app_id,
                             enable_auto_commit=False,
                             partition_assignment_strategy=[SameProtocol])
    try:
        consumer.subscribe([settings.events_topic])
        deadline = time.monotonic() + 60
        while not consumer.assignment() and time.monotonic() < deadline:
            consumer.poll(timeout_ms=500, max_records=1)
        assert len(consumer.assignment()) == settings.partitions
        consumer.commit({TopicPartition(settings.events_topic, p): OffsetAndMetadata(
            end + 1, "", -1) for p, end in ends.items()})
    finally:
        consumer.close()
    w = workers(settings, "second")
    wait_complete(settings, ends, procs=[w], timeout=120)
    _assert_equals_library(settings, events, shop.catalog)
    assert worker_counters(settings).get("context.stalls_found", 0) >= 1
