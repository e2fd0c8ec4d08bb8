"""The stream core's checkpoint rules, against the real redis-server: a stage applies a
partition's records in offset order without gaps, by the owner only, and a checkpoint is
written whole or not at all (docs/architecture.md). No broker is involved, so these run once,
not per broker."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import redis
import redis.asyncio as aioredis

from cartwise.contract import expected_partition
from cartwise.redisconn import connect, connect_async
from cartwise.simulator import Shop
from models import rowpatch
from models.config import ModelConfig
from streams.context_stage import ContextStage
from streams.stats import Stats
from streams.store import Keys, Ops, Store

START = 1_755_000_000.0


def _records(events: list[dict], partition: int) -> list[tuple]:
    return [(orjson.dumps(e), partition, i, START + 10_000, e["user_id"].encode())
            for i, e in enumerate(events)]


async def recording_stage(settings, prefix: str, sent: list | None = None,
                          config: ModelConfig | None = None
                          ) -> tuple[ContextStage, list[tuple[int, int]]]:
    """A context stage over Redis whose sends succeed at once (their topics recorded in `sent`
    when given) and whose seeks are recorded."""
    store = Store(connect_async(settings), prefix)
    await store.claim_generation(False, settings.partitions)

    async def send(topic, value, partition, headers, key=None):  # noqa: ANN001, ANN202
        if sent is not None:
            sent.append(topic)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    stage = ContextStage(store, config or ModelConfig(), Stats("t"), send, settings)
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
        ref, _ = await recording_stage(settings, settings.prefix + "ref:")
        ref.assign({0})
        await ref.handle(recs)
        await ref.checkpoint(0)
        stage, seeks = await recording_stage(settings, settings.prefix + "gap:")
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
        r = connect(settings)
        got = r.hgetall(Keys(settings.prefix + "gap:").contexts(0))
        want = r.hgetall(Keys(settings.prefix + "ref:").contexts(0))
        return got, want, seeks, stage.stats.counters

    got, want, seeks, stats = asyncio.run(run())
    assert len(want) > 10
    assert got == want
    assert stats["context.stale_records"] == 10


def test_a_worker_killed_before_deleting_forgotten_shoppers_leaves_it_to_the_next(make_settings):
    """A checkpoint that evicts shoppers records them; their list and profile keys (in other
    cluster slots) are deleted right after it. A worker killed in between (here: the step
    never runs) leaves the record, and the next owner of the partition deletes them: Redis
    ends with lists for exactly the shoppers the partition still holds."""
    settings = make_settings("forget")
    shop = Shop(seed=5)
    events = [e for e in shop.events(3000, start_ts=START)
              if expected_partition(e["user_id"], settings.partitions) == 0][:200]
    recs = _records(events, 0)
    config = ModelConfig(max_users=8)
    keys = Keys(settings.prefix)

    async def run() -> tuple[set, set, set, dict]:
        first, _ = await recording_stage(settings, settings.prefix, config=config)

        async def killed(partition: int, st: object) -> None:  # dies before the deletions
            return None

        first.after_checkpoint = killed
        first.assign({0})
        for n in range(0, len(recs), 10):  # lists written batch by batch, then evicted
            await first.handle(recs[n:n + 10])
        await first.checkpoint(0)
        r = connect(settings)
        pending = {u.decode() for u in r.hkeys(keys.forgotten(0))}
        left = {k.decode().removeprefix(keys.user("")) for k in r.scan_iter(keys.user("*"))}
        held = set(first.parts[0].book.users)
        assert pending and pending <= left  # the kill left their lists behind, recorded
        nxt, _ = await recording_stage(settings, settings.prefix, config=config)
        nxt.assign({0})
        await nxt.checkpoint(0)  # loads the partition; nothing new to write
        users = {k.decode().removeprefix(keys.user("")) for k in r.scan_iter(keys.user("*"))}
        profiles = {k.decode().removeprefix(keys.profile(""))
                    for k in r.scan_iter(keys.profile("*"))}
        return held, users, profiles, {"pending": r.hlen(keys.forgotten(0))}

    held, users, profiles, after = asyncio.run(run())
    assert len(held) == 8
    assert users == held and profiles <= held
    assert after == {"pending": 0}


def test_a_checkpoint_is_applied_whole_or_not_at_all(stack):
    """A step that would fail (an increment overflowing to infinity) fails before anything is
    written; the offset stays where it was and a retry of the same checkpoint works."""
    prefix = f"atomic-{time.monotonic_ns()}:"

    async def run() -> None:
        client = aioredis.Redis.from_url(stack.redis_url)
        store = Store(client, prefix)
        await store.claim_generation(False, 1)
        keys = store.keys
        counters = keys.experiment("e", 0)  # partition 0's, beside its contexts
        await client.hset(counters, "A|revenue2", repr(1.7e308))
        ops = Ops()
        ops.hset(keys.contexts(0), "u1", b"{}")
        ops.hincrbyfloat(counters, "A|orders", 1)
        ops.hincrbyfloat(counters, "A|revenue2", 1.7e308)
        with pytest.raises(redis.exceptions.ResponseError, match="finite"):
            await store.checkpoint("context", 0, -1, 41, ops)
        assert await client.get(keys.offset("context", 0)) is None
        assert not await client.hexists(keys.contexts(0), "u1")
        assert not await client.hexists(counters, "A|orders")
        with pytest.raises(ValueError, match="not finite"):
            Ops().hincrbyfloat(counters, "A|x", float("inf"))
        ok = Ops()
        ok.hset(keys.contexts(0), "u1", b"{}")
        assert await store.checkpoint("context", 0, -1, 41, ok) == (True, 41)
        assert await client.get(keys.offset("context", 0)) == b"41"
        await client.aclose()

    asyncio.run(run())


def test_a_checkpoint_keeps_the_order_of_its_writes(stack):
    """Fields of one hash travel grouped (one op per run of them, sliced inside the script
    for Lua's stack): 2,500 fields in one run, deletes between writes of the same field, and
    other keys in between end as if every op ran alone, in order."""
    prefix = f"order-{time.monotonic_ns()}:"

    async def run() -> None:
        client = aioredis.Redis.from_url(stack.redis_url)
        store = Store(client, prefix)
        await store.claim_generation(False, 1)
        rows, other = f"{prefix}rows", f"{prefix}other"
        ops = Ops()
        want: dict[str, bytes] = {}
        for i in range(2500):
            ops.hset(rows, f"i{i}", b"%d" % i)
            want[f"i{i}"] = b"%d" % i
        ops.hdel(rows, "i7")
        ops.hset(rows, "i7", b"again")  # a new run of the same key, after a delete
        ops.hset(other, "x", b"1")
        ops.hset(rows, "i8", b"last")  # and after another key
        ops.hdel(rows, "i9")
        want.update(i7=b"again", i8=b"last")
        del want["i9"]
        assert sum(a == "M" for a in ops.args) == 4  # grouped: not one op per field
        assert await store.checkpoint("context", 0, -1, 1, ops) == (True, 1)
        got = await client.hgetall(rows)
        assert {k.decode(): v for k, v in got.items()} == want
        assert await client.hget(other, "x") == b"1"
        await client.aclose()

    asyncio.run(run())


def test_a_partition_that_lost_its_generation_copy_stops_alone(stack):
    """In a Redis Cluster one node can lose its data alone: each checkpoint checks the
    generation copy beside its own partition's state, so that partition's checkpoints stop
    (the global token still there), the others' go on, a restarted worker refuses to start,
    and the API's stream watch sees the loss."""
    from api.metrics import ApiMetrics
    from api.services.stream import StreamWatch
    from cartwise.settings import Settings
    from streams.store import StateLost

    prefix = f"copies-{time.monotonic_ns()}:"

    async def run() -> None:
        client = aioredis.Redis.from_url(stack.redis_url)
        store = Store(client, prefix)
        await store.claim_generation(False, 2)
        keys = store.keys
        watch = StreamWatch(Settings(redis_url=stack.redis_url, prefix=prefix, partitions=2),
                            store, ApiMetrics())
        assert not await watch.generation_missing()
        await client.delete(keys.partition_generation("context", 1))
        assert await client.exists(keys.generation)
        with pytest.raises(StateLost):
            await store.checkpoint("context", 1, -1, 5, Ops())
        assert await client.get(keys.offset("context", 1)) is None
        assert await store.checkpoint("context", 0, -1, 5, Ops()) == (True, 5)
        assert await store.checkpoint("cooccurrence", 1, -1, 5, Ops()) == (True, 5)
        assert await watch.generation_missing()
        with pytest.raises(StateLost):  # the broker remembers progress: no new copy is made
            await Store(client, prefix).claim_generation(True, 2)
        await client.aclose()

    asyncio.run(run())


def test_a_patch_extends_its_stored_row_and_never_stands_alone(stack):
    """A row's patch is appended to its stored value (models/rowpatch.py), grouped per hash
    like whole writes; a patch of a row that is not stored fails the whole checkpoint before
    anything is written, since on its own it would read as the whole row."""
    prefix = f"patch-{time.monotonic_ns()}:"

    async def run() -> None:
        client = aioredis.Redis.from_url(stack.redis_url)
        store = Store(client, prefix)
        await store.claim_generation(False, 1)
        rows = store.keys.rows(0)
        ops = Ops()
        ops.hset(rows, "a", b'{"x":[1]}')
        ops.hset(rows, "b", b'{"y":[2]}')
        assert await store.checkpoint("cooccurrence", 0, -1, 1, ops) == (True, 1)
        ops = Ops()
        ops.hset(rows, "c", b'{"z":[3]}')
        ops.happend(rows, "a", b'{"x":[4]}')
        ops.happend(rows, "b", b'{"w":[5]}')
        ops.happend(rows, "a", b'{"v":[6]}')
        assert [a for a in ops.args if a in ("M", "P")] == ["M", "P"]  # one op per run
        assert await store.checkpoint("cooccurrence", 0, 1, 2, ops) == (True, 2)
        got = {k.decode(): v for k, v in (await client.hgetall(rows)).items()}
        assert got == {"a": b'{"x":[1]}\n{"x":[4]}\n{"v":[6]}', "b": b'{"y":[2]}\n{"w":[5]}',
                       "c": b'{"z":[3]}'}
        assert rowpatch.decode(got["a"]) == ({"x": [4], "v": [6]}, 2)
        ops = Ops()
        ops.hset(rows, "d", b'{"q":[1]}')
        ops.happend(rows, "gone", b'{"x":[7]}')
        with pytest.raises(redis.exceptions.ResponseError, match="no stored .* gone to patch"):
            await store.checkpoint("cooccurrence", 0, 2, 3, ops)
        assert await client.get(store.keys.offset("cooccurrence", 0)) == b"2"
        assert not await client.hexists(rows, "d") and not await client.hexists(rows, "gone")
        await client.aclose()

    asyncio.run(run())
