"""The co-occurrence stage's checkpoints reload to exactly what the stage held, against the real
redis-server: rows written whole or as patches of changed entries, across prunes, forgotten
items, closed epochs and a rebase of the stored counts (docs/redis.md, "Item rows"). No broker
is involved: the context stage's evidence messages are captured and handed over directly."""

from __future__ import annotations

import asyncio
import random
import time

import orjson
import pytest

from cartwise.contract import expected_partition
from cartwise.redisconn import connect_async
from cartwise.simulator import Shop
from models import rowpatch
from models.config import ModelConfig
from models.graph import ItemGraph
from streams.context_stage import ContextStage
from streams.graph_stage import GraphPartition, GraphStage
from streams.stats import Stats
from streams.store import Store

START = 1_755_000_000.0
DAY = 86400.0
# Small bounds, so that rows are pruned, items forgotten and epochs closed many times.
CONFIG = ModelConfig(max_neighbours=24, max_items=150, prune_epoch_s=120.0)


async def _stage(cls: type, settings, prefix: str, sent: list | None = None):  # noqa: ANN001
    store = Store(connect_async(settings), prefix)
    await store.claim_generation(False, settings.partitions)

    async def send(topic, value, partition, headers, key=None):  # noqa: ANN001, ANN202
        if sent is not None:
            sent.append((topic, value, partition))
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(None)
        return fut

    return cls(store, CONFIG, Stats("t"), send, settings)


def _events(seed: int) -> list[tuple[dict, float]]:
    """(event, broker time): two stretches of a shop, the second 460 days later, past the
    decay's rebase step (models/graph.py: every stored count is rescaled there)."""
    shop = Shop(seed=seed)
    out = [(e, START + 10_000) for e in shop.events(900, start_ts=START)]
    later = START + 460 * DAY
    out += [(e, later + 10_000) for e in shop.events(900, start_ts=later)]
    return out


def _state(g) -> dict:  # noqa: ANN001
    """What a graph holds; an open epoch without evidence (only "now" moved) is nothing."""
    return {"rows": g.rows, "marg": g.marg, "cycles": g.cycles,
            "open_rows": {e: r for e, r in g.open_rows.items() if r},
            "open_marg": {e: m for e, m in g.open_marg.items() if m}, "seen": g.seen_epoch,
            "total": g.total, "landmark": g.landmark, "now": g.now, "closed": g.closed}


@pytest.mark.parametrize("seed", [3, 11, 29])
def test_a_reloaded_partition_holds_exactly_what_was_checkpointed(make_settings, seed):
    """Checkpoints at random batch boundaries; after each, a fresh stage loads the partition
    and must hold the same rows, totals, open evidence and clocks, number for number."""
    settings = make_settings(f"graphckpt{seed}")
    rng = random.Random(seed)

    async def run() -> tuple[int, int, dict]:
        sent: list = []
        ctx = await _stage(ContextStage, settings, settings.prefix, sent)
        ctx.assign(set(range(settings.partitions)))
        events = _events(seed)
        offsets: dict[int, int] = {}
        for e, broker_ts in events:
            p = expected_partition(e["user_id"], settings.partitions)
            o = offsets.get(p, 0)
            offsets[p] = o + 1
            await ctx.handle([(orjson.dumps(e), p, o, broker_ts, e["user_id"].encode())])
        pairs = [(value, q) for topic, value, q in sent if topic == settings.pairs_topic]
        assert pairs
        graph = await _stage(GraphStage, settings, settings.prefix)
        graph.assign({0})
        recs = [(v, 0, i, START, None) for i, (v, _) in enumerate(q for q in pairs if q[1] == 0)]
        reloads = rebased = patches = 0
        i = 0
        landmark = None
        while i < len(recs):
            n = rng.randint(1, 40)
            await graph.handle(recs[i:i + n])
            i += n
            if rng.random() < 0.5 or i >= len(recs):
                graph.last_checkpoint[0] = 0.0  # due now
                await graph.checkpoint(0)
                live = graph.parts[0].graph
                if landmark is not None and live.landmark != landmark:
                    rebased += 1
                landmark = live.landmark
                fresh = await _stage(GraphStage, settings, settings.prefix)
                fresh.assign({0})
                loaded = await fresh._catch_up(0)
                assert loaded.offset == graph.parts[0].offset
                stored = await fresh.store.hgetall(fresh.keys.rows(0))
                patches += sum(rowpatch.SEPARATOR in v for v in stored.values())
                got, want = _state(loaded.graph), _state(live)
                for part in want:
                    assert got[part] == want[part], f"{part} after record {i}"
                reloads += 1
        return reloads, rebased, patches, graph.stats.counters

    reloads, rebased, patches, counters = asyncio.run(run())
    assert reloads > 10 and rebased == 1
    assert patches > 0  # rows were patched, not only written whole
    assert counters["cooccurrence.rows_checkpointed"] > 0


def test_a_checkpoint_written_while_a_partition_loads_makes_it_load_again(make_settings):
    """A load reads many hashes, then the offset. Another worker still writing the partition
    (a rebalance overlap) may checkpoint in between: state older than the offset, and the
    records in between never applied. The stage loads again until the offset stood still."""
    settings = make_settings("loadrace")

    async def run() -> tuple[int, int]:
        stage = await _stage(GraphStage, settings, settings.prefix)
        r = stage.store.redis
        key = stage.keys.offset("cooccurrence", 0)
        await r.set(key, 5)
        reads = stage.store.hgetall
        calls = 0

        async def racing(k: str) -> dict:
            nonlocal calls
            calls += 1
            if calls == 1:  # the other worker's checkpoint lands during the first load
                await r.set(key, 9)
            return await reads(k)

        stage.store.hgetall = racing  # type: ignore[method-assign]
        stage.assign({0})
        st = await stage._catch_up(0)
        return st.offset, stage.stats.counters["cooccurrence.load_retries"]

    assert asyncio.run(run()) == (9, 1)


def test_an_item_list_whose_write_failed_is_redone_not_parked(make_settings):
    """A row that changed enough has its list rebuilt; if writing it fails, the list is built
    again at the next tick (its mark stays the old one), never parked as if it were written."""
    settings = make_settings("listfail", lists_min_interval_s=0.0)
    config = ModelConfig(list_min_change=0.1)

    async def run() -> tuple[dict, dict, int]:
        stage = await _stage(GraphStage, settings, settings.prefix)
        stage.config = config
        g = ItemGraph(config, sources=0)
        g.apply(START, [("a", 20.0, 0.0)] + [(f"n{i}", 1.0, 0.0) for i in range(20)],
                [("a", f"n{i}", 1.0, 0.0, 1.0, 0.0, 1.0, 0.0) for i in range(20)])
        st = GraphPartition(offset=-1, graph=g, hwm={}, applied=-1)
        stage.parts[0] = st
        stage.assign({0})
        g.marg_touched.clear()
        st.pending = {"a": time.time()}
        await stage.publish_lists()
        first = orjson.loads(await stage.store.redis.get(stage.keys.item("a")))
        # A tenth more evidence, on a new neighbour: the list changes and is due again.
        g.apply(START + 60, [("a", 4.0, 0.0), ("z", 4.0, 0.0)],
                [("a", "z", 4.0, 0.0, 4.0, 0.0, 4.0, 0.0)])
        g.marg_touched.clear()
        st.pending = {"a": time.time()}
        real = stage.store.pipeline
        failures = [ConnectionError("Redis went away")]

        def failing() -> object:
            pipe = real()
            execute = pipe.execute

            async def once(*args: object, **kw: object) -> object:
                if failures:
                    raise failures.pop()
                return await execute(*args, **kw)

            pipe.execute = once
            return pipe

        stage.store.pipeline = failing  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await stage.publish_lists()
        assert "a" in st.pending  # still to do
        await stage.publish_lists()  # the next tick: rebuilt and written, not parked
        second = orjson.loads(await stage.store.redis.get(stage.keys.item("a")))
        return first, second, stage.stats.counters["cooccurrence.lists_unchanged"]

    first, second, unchanged = asyncio.run(run())
    assert unchanged == 0
    shown = {e["item_id"] for kind in ("cross_sell", "alternatives", "next")
             for e in second.get(kind, [])}
    was = {e["item_id"] for kind in ("cross_sell", "alternatives", "next")
           for e in first.get(kind, [])}
    assert "z" in shown and "z" not in was
