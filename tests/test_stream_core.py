"""Attacks on the stream core's promise: nothing skipped, nothing applied twice or elsewhere,
no record able to stop a worker, a checkpoint applied whole or not at all, Redis data loss
caught. Through the real broker and redis-server (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from kafka import KafkaConsumer, KafkaProducer

from cartwise.contract import expected_partition
from cartwise.embedded import EmbeddedStack
from cartwise.harness import produce, snapshot, wait_complete, worker_env
from cartwise.simulator import Shop
from models.config import ModelConfig
from streams.context_stage import ContextStage
from streams.stats import Stats
from streams.store import Keys, Ops, Store
from streams.topics import ensure_topics, group_has_offsets
from tests.test_pipeline import oracle

START = 1_755_000_000.0
pytestmark = pytest.mark.both_brokers  # the stream suites run on Tansu and Kafka


def dead_letters(settings) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = KafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    out = [(m.value, dict(m.headers)) for m in consumer]
    consumer.close()
    return out


def counters(settings) -> dict[str, int]:
    r = redis.Redis.from_url(settings.redis_url)
    total: dict[str, int] = {}
    for k in r.scan_iter(f"{settings.prefix}stats:*"):
        for name, v in orjson.loads(r.get(k))["counters"].items():
            total[name] = total.get(name, 0) + v
    return total


def wait_counter(settings, name: str, at_least: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = counters(settings).get(name, 0)
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.3)


def test_poison_records_and_wrong_keys_stop_nothing_and_lose_nothing(make_settings, workers):
    """Tombstones, a record near the broker's size limit, a record whose processing fails
    (it points at a corrupt Redis document), and a tenth of the shoppers sent unkeyed to the
    wrong partition: every good event is applied once, to its shopper's own context."""
    settings = make_settings("poison")
    ensure_topics(settings)
    shop = Shop(seed=5)
    events = list(shop.events(600, start_ts=START))
    n = settings.partitions
    users = sorted({e["user_id"] for e in events})
    misrouted = set(random.Random(5).sample(users, len(users) // 10))
    # A corrupt "what was served" record: reading it fails, so does the impression's batch.
    r = redis.Redis.from_url(settings.redis_url)
    r.set(Keys(settings.prefix).served("rq-corrupt"), b"\x00not json")
    victim = events[10]["user_id"]
    impression = {"v": 1, "event_id": "imp-1", "type": "impression", "user_id": victim,
                  "ts": START + 5, "request_id": "rq-corrupt", "items": [{"item_id": "x"}]}
    produce(settings, [], shop.catalog)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks="all",
                             max_request_size=4 << 20)
    futures = []
    for i, e in enumerate(events):
        value = orjson.dumps(e)
        u = e["user_id"]
        if u in misrouted:
            wrong = (expected_partition(u, n) + 1) % n
            futures.append(producer.send(settings.events_topic, value, partition=wrong))
        else:
            futures.append(producer.send(settings.events_topic, value, key=u.encode()))
        if i in (50, 300):
            for p in range(n):
                futures.append(producer.send(settings.events_topic, None, key=b"gone",
                                             partition=p))
        if i == 100:
            futures.append(producer.send(settings.events_topic,
                                         b'{"pad":"' + b"x" * 1_000_000 + b'"}', partition=1))
        if i == 200:
            futures.append(producer.send(settings.events_topic, orjson.dumps(impression),
                                         key=victim.encode()))
    producer.flush()
    ends: dict[int, int] = {}
    for f in futures:
        md = f.get(30)
        ends[md.partition] = max(ends.get(md.partition, -1), md.offset)
    producer.close()
    w = workers(settings)
    # Re-keyed events land again at the end of their own partition: wait for those too.
    rekeyed = sum(1 for e in events if e["user_id"] in misrouted)
    assert wait_counter(settings, "context.rekeyed", rekeyed, timeout=120) == rekeyed
    # Re-sent at least once (a retried batch sends again; the context drops the repeat by
    # event id): read where each partition ends now.
    consumer = KafkaConsumer(settings.events_topic, bootstrap_servers=settings.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    for m in consumer:
        ends[m.partition] = max(ends.get(m.partition, -1), m.offset)
    consumer.close()
    wait_complete(settings, ends, procs=[w])

    snap = snapshot(settings)
    ref = oracle(events, shop.catalog)
    for user in users:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    for item in ref.graph.rows:
        assert snap["items"][f"item:{item}"]["cross_sell"] == ref.graph.lists(item)[
            "cross_sell"], item
    # Each misrouted shopper's context lives in the partition that owns them, and only there.
    keys = Keys(settings.prefix)
    for user in misrouted:
        homes = [p for p in range(n) if r.hexists(keys.contexts(p), user)]
        assert homes == [expected_partition(user, n)], user

    letters = dead_letters(settings)
    reasons = [h["cartwise-reason"].decode() for _, h in letters]
    assert reasons.count("tombstone") == 2 * n
    big = [(v, h) for v, h in letters if h["cartwise-reason"] == b"oversized"]
    assert len(big) == 1 and big[0][1]["cartwise-truncated"] == b"1"
    assert int(big[0][1]["cartwise-original-bytes"]) > 1_000_000 > len(big[0][0])
    failed = [(v, h) for v, h in letters if h["cartwise-reason"] == b"processing_failed"]
    assert [orjson.loads(v)["event_id"] for v, _ in failed] == ["imp-1"]
    assert b"JSONDecodeError" in failed[0][1]["cartwise-detail"]
    applied = wait_counter(settings, "applied.view", 1)
    assert applied > 0
    total = counters(settings)
    assert sum(v for k, v in total.items() if k.startswith("applied.")) == len(events)


def _records(events: list[dict], partition: int) -> list[tuple]:
    return [(orjson.dumps(e), partition, i, START + 10_000, e["user_id"].encode())
            for i, e in enumerate(events)]


async def _stage(settings, prefix: str) -> tuple[ContextStage, list[tuple[int, int]]]:
    client = aioredis.Redis.from_url(settings.redis_url)
    store = Store(client, prefix)
    await store.claim_generation(False)
    sent: list = []

    async def send(topic, value, partition, headers, key=None):  # noqa: ANN001, ANN202
        sent.append((topic, partition))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    stage = ContextStage(store, ModelConfig(), Stats("t"), send, settings)
    seeks: list[tuple[int, int]] = []

    async def seek(p: int, offset: int) -> None:
        seeks.append((p, offset))

    stage.seek = seek
    return stage, seeks


def test_records_after_a_gap_or_a_revoke_are_never_applied(make_settings):
    """A batch fetched before a rebalance (or past a hole) must not land on the checkpoint:
    the stage asks for the missing records again and ends equal to a straight run."""
    settings = make_settings("gaps")
    shop = Shop(seed=9)
    events = [e for e in shop.events(2000, start_ts=START)
              if expected_partition(e["user_id"], settings.partitions) == 0][:120]
    recs = _records(events, 0)

    async def run() -> tuple[dict, dict, list, list]:
        ref, _ = await _stage(settings, settings.prefix + "ref:")
        ref.assign({0})
        await ref.handle(recs)
        await ref.checkpoint(0)
        stage, seeks = await _stage(settings, settings.prefix + "gap:")
        stage.assign({0})
        await stage.handle(recs[:30])
        await stage.checkpoint(0)
        await stage.handle(recs[50:70])  # 30-49 never came: must wait for them
        assert stage.parts[0].applied == 29 and seeks[-1] == (0, 30)
        await stage.handle(recs[30:80])  # the refetch
        assert stage.parts[0].applied == 79
        await stage.checkpoint(0)
        stage.revoke({0})
        await stage.handle(recs[80:90])  # fetched before the revoke: not ours any more
        assert 0 not in stage.parts
        stage.assign({0})
        await stage.handle(recs[95:110])  # back again, resuming past a hole
        assert stage.parts[0].applied == 79 and seeks[-1] == (0, 80)
        await stage.handle(recs[80:])
        await stage.checkpoint(0)
        r = redis.Redis.from_url(settings.redis_url)
        got = r.hgetall(Keys(settings.prefix + "gap:").contexts(0))
        want = r.hgetall(Keys(settings.prefix + "ref:").contexts(0))
        return got, want, seeks, stage.stats.counters

    got, want, seeks, stats = asyncio.run(run())
    assert len(want) > 10
    assert got == want
    assert stats["context.stale_records"] == 10


def test_a_checkpoint_is_applied_whole_or_not_at_all(stack):
    """A step that would fail (an increment overflowing to infinity) fails before anything is
    written; the offset stays where it was and a retry of the same checkpoint works."""
    prefix = f"atomic-{time.monotonic_ns()}:"

    async def run() -> None:
        client = aioredis.Redis.from_url(stack.redis_url)
        store = Store(client, prefix)
        await store.claim_generation(False)
        keys = store.keys
        await client.hset(keys.experiment("e"), "A|revenue2", repr(1.7e308))
        ops = Ops()
        ops.hset(keys.contexts(0), "u1", b"{}")
        ops.hincrbyfloat(keys.experiment("e"), "A|orders", 1)
        ops.hincrbyfloat(keys.experiment("e"), "A|revenue2", 1.7e308)
        with pytest.raises(redis.exceptions.ResponseError, match="finite"):
            await store.checkpoint("context", 0, -1, 41, ops)
        assert await client.get(keys.offset("context", 0)) is None
        assert not await client.hexists(keys.contexts(0), "u1")
        assert not await client.hexists(keys.experiment("e"), "A|orders")
        with pytest.raises(ValueError, match="not finite"):
            Ops().hincrbyfloat(keys.experiment("e"), "A|x", float("inf"))
        ok = Ops()
        ok.hset(keys.contexts(0), "u1", b"{}")
        assert await store.checkpoint("context", 0, -1, 41, ok) == (True, 41)
        assert await client.get(keys.offset("context", 0)) == b"41"
        await client.aclose()

    asyncio.run(run())


@pytest.fixture
def own_stack(tmp_path, broker_name):
    s = EmbeddedStack(workdir=tmp_path / "stack", redis_persistent=True,
                      broker_kind=broker_name).start()
    yield s
    s.close()


def test_catalog_records_read_during_a_redis_outage_are_kept(own_stack, make_settings, workers):
    settings = make_settings("catalog-outage", broker=own_stack.broker,
                             redis_url=own_stack.redis_url)
    ensure_topics(settings)
    items = [{"item_id": f"c{i}", "price": float(i), "category": "k"} for i in range(210)]
    produce(settings, [], items[:10])
    workers(settings)
    r = redis.Redis.from_url(settings.redis_url)
    key = Keys(settings.prefix).catalog
    deadline = time.monotonic() + 60
    while r.hlen(key) < 10:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    own_stack.stop("redis")
    produce(settings, [], items[10:])
    time.sleep(3)  # the worker reads them and fails to write them
    own_stack.start_redis()
    r = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + 60
    while r.hlen(key) < len(items) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert r.hlen(key) == len(items)
    # A tombstone on the compacted catalog topic removes the item.
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap, acks="all")
    producer.send(settings.catalog_topic, None, key=b"c0").get(30)
    producer.close()
    deadline = time.monotonic() + 60
    while r.hexists(key, "c0") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not r.hexists(key, "c0") and r.hlen(key) == len(items) - 1


def test_redis_data_loss_stops_the_workers_and_rebuild_restores_the_state(
        make_settings, workers):
    settings = make_settings("loss")
    ensure_topics(settings)
    shop = Shop(seed=13)
    events = list(shop.events(800, start_ts=START))
    ends = produce(settings, events[:400], shop.catalog)
    w = workers(settings, "before")
    wait_complete(settings, ends, procs=[w])
    # The group has committed its progress to the broker (Faust commits every few seconds).
    deadline = time.monotonic() + 60
    while not group_has_offsets(settings):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = redis.Redis.from_url(settings.redis_url)
    # Redis loses everything of this deployment (a flush, a failover to an empty replica).
    for key in r.scan_iter(f"{settings.prefix}*"):
        r.delete(key)
    more = produce(settings, events[400:])
    assert w.wait(60) == 3  # stops at its next checkpoint
    again = workers(settings, "restarted")
    assert again.wait(60) == 3  # and a restarted worker refuses to start over an empty Redis
    time.sleep(5.5)  # their stats go stale: the rebuild checks no worker is running
    env = worker_env(settings)
    out = subprocess.run([sys.executable, "-m", "cartwise", "rebuild"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "from offset 0 of its 4 partitions" in out.stdout
    ends = {p: max(ends.get(p, -1), more.get(p, -1)) for p in set(ends) | set(more)}
    w2 = workers(settings, "after")
    wait_complete(settings, ends, procs=[w2], timeout=180)
    snap = snapshot(settings)
    ref = oracle(events, shop.catalog)
    for item in ref.graph.rows:
        got = snap["items"][f"item:{item}"]
        want = ref.graph.lists(item)
        assert got["cross_sell"] == want["cross_sell"], item
        assert got["alternatives"] == want["alternatives"], item
    for user in {e["user_id"] for e in events}:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user


BOUNDS = "max_neighbours=12,max_items=60,max_users=40"


def test_bounded_state_is_the_same_however_it_is_run(make_settings, workers):
    """Rows past `max_neighbours`, more items than `max_items`, more shoppers than
    `max_users` per partition: one worker, two workers and the library end equal, although
    evidence reaches the item stage in a different order in each run."""
    shop = Shop(seed=17)
    events = list(shop.events(500, start_ts=START))
    topics = make_settings("bounds", model=BOUNDS)
    ensure_topics(topics)
    ends = produce(topics, events, shop.catalog)
    snaps, runs = [], []
    for n_workers in (1, 2):
        settings = make_settings(f"bounds-{n_workers}", topics_from=topics, model=BOUNDS)
        ensure_topics(settings)
        procs = [workers(settings, f"w{n_workers}-{i}") for i in range(n_workers)]
        wait_complete(settings, ends, procs=procs, timeout=240)
        snaps.append(snapshot(settings))
        runs.append(settings)
    one, two = snaps
    cfg = ModelConfig(max_neighbours=12, max_items=60, max_users=40)
    ref = oracle(events, shop.catalog, config=cfg)
    # The bounds were reached, or this proves nothing.
    assert max(len(row) for row in ref.graph.rows.values()) >= 12
    assert len({i for e in events for i in [e.get("item_id")] if i}) > 60
    assert sum(len(b.users) for b in ref.contexts.books) < len({e["user_id"] for e in events})
    assert one["items"] == two["items"]
    assert one["users"] == two["users"]
    assert one["contexts"] == two["contexts"]
    for item in ref.graph.rows:
        want = ref.graph.lists(item)
        got = one["items"].get(f"item:{item}")
        assert got is not None, item
        for kind in ("cross_sell", "alternatives", "next"):
            assert got[kind] == want[kind], (item, kind)
    for user in ref.contexts.users:
        assert one["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    # Redis holds no more per-shopper documents than the workers hold shoppers: the lists and
    # profiles of evicted shoppers are gone, so Redis memory follows `max_users`.
    kept = set(ref.contexts.users)
    r = redis.Redis.from_url(topics.redis_url)
    for settings, snap in zip(runs, snaps, strict=True):
        assert {k.removeprefix("user:") for k in snap["users"]} == kept
        profiles = {k.decode().removeprefix(Keys(settings.prefix).profile(""))
                    for k in r.scan_iter(Keys(settings.prefix).profile("*"), count=1000)}
        assert profiles and profiles <= kept
