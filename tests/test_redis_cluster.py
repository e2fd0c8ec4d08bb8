"""The workers and the API on a real three-master Redis Cluster (cartwise/rediscluster.py).

A cluster refuses any command or script over keys of several hash slots (CROSSSLOT), and each
node holds only its slots' keys: a run here shows every write and read the pipeline and the
API make is routed per slot, that each stage partition's checkpoint keys share one slot (their
hash tag), and that the result is still exactly what the library computes.

The end-to-end test runs on one broker (the module is not `both_brokers`): what it checks is
the Redis side, which is the same whichever broker feeds the workers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from api.auth import new_key
from api.metrics import ApiMetrics
from api.services.stream import StreamWatch
from cartwise.embedded import free_port
from cartwise.harness import (
    produce,
    snapshot,
    start_api,
    stop_worker,
    wait_committed,
    wait_complete,
    wait_http,
    worker_counters,
    worker_stats,
)
from cartwise.rebuild import rebuild, running_workers
from cartwise.rediscluster import LocalRedisCluster, slot_ranges
from cartwise.redisconn import connect, connect_async
from cartwise.settings import Settings
from cartwise.simulator import Shop
from streams.store import CONTEXT, GRAPH, Keys, Store, tag
from streams.topics import ensure_topics
from tests.test_pipeline import oracle

START = 1_750_000_000.0
TAG = re.compile(r"\{([^{}]+)\}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    c = LocalRedisCluster(parent=tmp_path_factory.mktemp("redis-cluster")).start()
    yield c
    c.stop()


def owner(cluster: LocalRedisCluster, slot: int) -> int:
    """The port of the master that serves `slot` (node n was given the n-th slot range)."""
    for port, slots in zip(cluster.ports, slot_ranges(len(cluster.ports)), strict=True):
        if slot in slots:
            return port
    raise AssertionError(slot)


def keys_by_node(cluster: LocalRedisCluster, prefix: str) -> dict[int, list[str]]:
    """Every key under `prefix`, by the port of the node that holds it (each node asked
    alone: a node answers SCAN with its own keys only)."""
    out = {}
    for port in cluster.ports:
        with cluster.node(port) as r:
            out[port] = sorted(k.decode() for k in r.scan_iter(f"{prefix}*", count=1000))
    return out


def test_the_fixture_is_a_three_master_cluster_that_routes_by_slot(cluster):
    rc = RedisCluster.from_url(cluster.url)
    try:
        assert {n.port for n in rc.get_primaries()} == set(cluster.ports)
        # One key in each master's slot range.
        probes: dict[int, str] = {}
        n = 0
        while len(probes) < len(cluster.ports):
            key = f"probe:{n}"
            probes.setdefault(owner(cluster, key_slot(key.encode())), key)
            n += 1
        for port, key in probes.items():
            assert rc.set(key, str(port))
        for port, key in probes.items():
            assert rc.get(key) == str(port).encode()
            assert rc.get_node_from_key(key).port == port
            # The key lives on its master alone; another node redirects (MOVED).
            with cluster.node(port) as r:
                assert r.get(key) == str(port).encode()
            other = next(p for p in cluster.ports if p != port)
            with cluster.node(other) as r, pytest.raises(redis.exceptions.MovedError):
                r.get(key)
        # Keys of several slots in one command: the server refuses it (CROSSSLOT), as it
        # would refuse a checkpoint script over another partition's keys.
        with cluster.node(cluster.ports[0]) as r:
            with pytest.raises(redis.exceptions.ResponseError, match="same slot"):
                r.execute_command("MGET", "probe:{x}a", "probe:{y}b")
        assert rc.delete(*probes.values()) == len(probes)
    finally:
        rc.close()


def test_pipeline_and_api_on_a_redis_cluster_match_the_library(cluster, make_settings, workers,
                                                               tmp_path):
    read_key, read_entry = new_key("read")
    settings = make_settings("cluster", redis_cluster=True, redis_url=cluster.url,
                             api_port=free_port(), api_keys=read_entry)
    assert settings.partitions == 4
    ensure_topics(settings)
    shop = Shop(seed=11)  # the simulator's small default shop
    events = list(shop.events(200, start_ts=START, dup_rate=0.02))
    ends = produce(settings, events, shop.catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w])
    rc = connect(settings)
    assert isinstance(rc, RedisCluster)

    # What the stream wrote equals what the library computes (as tests/test_pipeline.py).
    snap = snapshot(settings)
    ref = oracle(events, shop.catalog)
    assert snap["items"], "no item lists were written"
    for item in ref.graph.rows:
        got = snap["items"].get(f"item:{item}")
        assert got is not None, item
        expected = ref.graph.lists(item)
        assert got["cross_sell"] == expected["cross_sell"], item
        assert got["alternatives"] == expected["alternatives"], item
    assert any(d["cross_sell"] for d in snap["items"].values())
    users = {e["user_id"] for e in events if isinstance(e, dict)}
    assert {k.removeprefix("user:") for k in snap["users"]} == users
    for user in users:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    trending = {m.decode(): v for m, v in rc.zrange(f"{settings.prefix}trending", 0, -1,
                                                    withscores=True)}
    want = dict(ref.trending(k=settings.trending_size))
    assert trending.keys() == want.keys()
    assert all(abs(trending[i] - want[i]) < 1e-9 for i in trending)

    # Every valid event applied once, none dead-lettered (a batch failing on a cluster error
    # would be retried, then dead-lettered record by record). Workers publish their counters
    # once a second: wait for a snapshot that counts every record.
    valid = [e for e in events if isinstance(e, dict)]
    unique = {e["event_id"] for e in valid}
    deadline = time.monotonic() + 30
    while True:
        counters = worker_counters(settings)
        applied = sum(v for k, v in counters.items() if k.startswith("applied."))
        dead = sum(v for k, v in counters.items() if k.startswith("dlq."))
        if applied + dead + counters.get("duplicate", 0) >= len(valid):
            break
        assert time.monotonic() < deadline, counters
        time.sleep(0.2)
    assert (applied, dead, counters.get("duplicate", 0)) == (
        len(unique), 0, len(valid) - len(unique)), counters

    # Each stage partition's state keys share the slot of its hash tag...
    keys = Keys(settings.prefix)
    for p in range(settings.partitions):
        context = [keys.offset(CONTEXT, p), keys.contexts(p), keys.touchpoints(p),
                   keys.clusters(p), keys.reranker_state(p), keys.refreshed(p),
                   keys.partition_generation(CONTEXT, p), keys.shown(p, "u", "20250101"),
                   keys.due(p), keys.experiment("x", p), keys.reranker(p)]
        graph = [keys.offset(GRAPH, p), keys.rows(p), keys.marginals(p), keys.open_evidence(p),
                 keys.seen_epochs(p), keys.cycles(p), keys.meta(p), keys.settled(p),
                 keys.partition_generation(GRAPH, p)]
        for stage, names in ((CONTEXT, context), (GRAPH, graph)):
            slot = key_slot(tag(stage, p).encode())
            assert {key_slot(k.encode()) for k in names} == {slot}, (stage, p, names)
        # ...and the checkpointed ones are there, on the master serving that slot.
        written = [keys.offset(CONTEXT, p), keys.contexts(p), keys.refreshed(p),
                   keys.partition_generation(CONTEXT, p), keys.offset(GRAPH, p), keys.rows(p),
                   keys.marginals(p), keys.meta(p), keys.settled(p),
                   keys.partition_generation(GRAPH, p)]
        for key in written:
            with cluster.node(owner(cluster, key_slot(key.encode()))) as r:
                assert r.exists(key), key
    # Every tagged key Redis holds is one of a stage partition's, and each tag's keys lie on
    # one node; keys (state and lookups) landed on all three masters.
    held = keys_by_node(cluster, settings.prefix)
    assert all(held.values()), {port: len(k) for port, k in held.items()}
    tags = {tag(s, p).strip("{}") for s in (CONTEXT, GRAPH) for p in range(settings.partitions)}
    nodes_of_tag: dict[str, set[int]] = defaultdict(set)
    for port, names in held.items():
        for name in names:
            found = TAG.search(name)
            if found and name.endswith(":sentinel"):  # one per slot: each on its slot's node
                assert owner(cluster, key_slot(name.encode())) == port, name
            elif found:
                assert found.group(1) in tags, name
                nodes_of_tag[found.group(1)].add(port)
    assert nodes_of_tag.keys() == tags
    assert all(len(ports) == 1 for ports in nodes_of_tag.values()), nodes_of_tag
    assert {p for ports in nodes_of_tag.values() for p in ports} == set(cluster.ports)
    sentinels = [k for names in held.values() for k in names if k.endswith(":sentinel")]
    assert len(sentinels) == 16384

    # The API reads through a cluster client: an item's and a shopper's suggestions are the
    # lists Redis holds (in stock, in order), as tests/test_api.py checks on one Redis.
    api = start_api(settings, tmp_path / "api.log")
    try:
        base = f"http://127.0.0.1:{settings.api_port}"
        wait_http(base + "/ready", api)
        headers = {"X-API-Key": read_key}
        in_stock = {c["item_id"] for c in shop.catalog if c["in_stock"]}

        def doc(kind: str, id_: str) -> dict | None:
            raw = rc.get(f"{settings.prefix}{kind}:{id_}")
            return None if raw is None else orjson.loads(raw)

        item = next(i for i in shop.complements
                    if (d := doc("item", i)) and len(d["cross_sell"]) >= 3 and d["alternatives"])
        stored = doc("item", item)
        for kind in ("cross_sell", "alternatives"):
            resp = httpx.get(f"{base}/v1/items/{item}/suggestions", headers=headers,
                             params={"kind": kind, "k": 5}, timeout=10)
            assert resp.status_code == 200, resp.text
            got = [e for e in resp.json()["items"] if e["kind"] != "trending"]
            want_items = [e for e in stored[kind] if e["item_id"] in in_stock][:5]
            assert [(e["item_id"], e["score"]) for e in got] == [
                (e["item_id"], e["score"]) for e in want_items], kind

        user = next(u for u in sorted(users) if (d := doc("user", u)) and d["items"])
        stored = doc("user", user)
        resp = httpx.get(f"{base}/v1/users/{user}/suggestions", headers=headers,
                         params={"k": 20}, timeout=10)
        assert resp.status_code == 200, resp.text
        got_ids = [e["item_id"] for e in resp.json()["items"] if e["kind"] != "trending"]
        assert got_ids == [e["item_id"] for e in stored["items"]
                           if e["item_id"] in in_stock][:20]
        assert got_ids
        # Nothing was retried on a Redis error along the way (a CROSSSLOT script or command, a
        # redirection a plain client cannot follow): those would be logged, not failed.
        for log in (tmp_path / "w.log", tmp_path / "api.log"):
            text = log.read_text(errors="replace")
            assert not re.search(r"Traceback|CROSSSLOT|same slot|MOVED|RedisError", text), (
                log.name, text[-4000:])
    finally:
        stop_worker(api)
        rc.close()
        print("--- api.log (last lines) ---",
              *(tmp_path / "api.log").read_text(errors="replace").splitlines()[-30:], sep="\n")


def test_cluster_stop_removes_its_processes_and_dir(tmp_path):
    c = LocalRedisCluster(parent=tmp_path).start()
    workdir, procs = c.workdir, list(c.procs)
    assert workdir is not None and workdir.is_dir()
    c.stop()
    assert not workdir.exists()
    assert all(p.poll() is not None for p in procs)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            redis.Redis(port=c.ports[0], socket_connect_timeout=0.2).ping()
        except redis.exceptions.ConnectionError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a node still answers after stop()")



# What a node without any partition's state holds, here: lookups and derived lists (the
# global keys are put elsewhere, below), and worker stats (rewritten every second).
LOOKUPS = ("item:", "user:", "profile:", "trending", "viewers:", "buyers:", "stats:")


async def api_sees_loss(settings: Settings) -> bool:
    """What an API process reports: the generation or a slot's sentinel is gone."""
    client = connect_async(settings)
    try:
        watch = StreamWatch(settings, Store(client, settings.prefix), ApiMetrics())
        return await watch.generation_missing()
    finally:
        await client.aclose()


@pytest.fixture
def lone_cluster(tmp_path: Path) -> Iterator[LocalRedisCluster]:
    """A cluster of the test's own, for a test that flushes and restarts its nodes."""
    c = LocalRedisCluster(parent=tmp_path).start()
    yield c
    c.stop()


def test_a_node_losing_its_data_stops_the_workers_and_rebuild_restores_the_state(
        lone_cluster, make_settings, workers, tmp_path):
    """docs/redis.md, "Cluster": a node that lost its data stops the workers, and `cartwise
    rebuild` restores it; as the single-Redis test does (tests/test_stream_core.py), on the
    three-primary cluster.

    Two partitions over three primaries: the stage partitions' hash tags pick two nodes, the
    third holds no partition's state. The global keys (the generation token, the catalog, the
    versions) are put on a node that keeps its data, by the choice of prefix. First the node
    without state loses its data (only lookups: lists, profiles, the audience index, which no
    checkpoint reads): the slot sentinels show it, the worker stops, the rebuild brings every
    key back. Then a node with state restarts empty: the worker stops, a restarted one
    refuses (its partitions' generation copies are gone), and after the rebuild a new worker
    ends where the library does.
    """
    cluster = lone_cluster
    settings = make_settings("cluster-loss", redis_cluster=True, redis_url=cluster.url,
                             partitions=2)
    n = settings.partitions
    homes = {(s, p): owner(cluster, key_slot(tag(s, p).encode()))
             for s in (CONTEXT, GRAPH) for p in range(n)}
    stateless, = (port for port in cluster.ports if port not in homes.values())
    keeper, victim = (port for port in cluster.ports if port in homes.values())

    def global_keys(prefix: str) -> list[str]:
        k = Keys(prefix)
        return [k.generation, k.catalog, k.lists_version, k.catalog_version]

    base = settings.prefix.removesuffix(":")
    prefix = next(p for p in (f"{base}.{i}:" for i in itertools.count()) if all(
        owner(cluster, key_slot(k.encode())) == keeper for k in global_keys(p)))
    settings = dataclasses.replace(settings, prefix=prefix)
    keys = Keys(prefix)
    copies = {(s, p): keys.partition_generation(s, p) for s, p in homes}
    ensure_topics(settings)
    shop = Shop(seed=13)
    events = list(shop.events(600, start_ts=START))
    ends = produce(settings, events[:300], shop.catalog)
    w = workers(settings, "before")
    wait_complete(settings, ends, procs=[w])
    wait_committed(settings)
    rc = connect(settings)
    generation = rc.get(keys.generation)
    assert generation and [rc.get(k) for k in copies.values()] == [generation] * len(copies)

    # 1. The node without state loses its data (FLUSHALL: it keeps its slots).
    lost = [k for k in keys_by_node(cluster, prefix)[stateless] if not k.endswith(":sentinel")]
    assert lost and all(k.removeprefix(prefix).startswith(LOOKUPS) for k in lost), lost
    assert any(k.startswith(keys.item("")) for k in lost)
    with cluster.node(stateless) as r:
        r.flushall()
    more = produce(settings, events[300:450])
    ends = {p: max(ends.get(p, -1), more.get(p, -1)) for p in set(ends) | set(more)}
    # The checkpoints pass (every partition's state is intact), but the sentinels of that
    # node's slots are gone: the worker stops and says so.
    assert w.wait(60) == 3
    text = (tmp_path / "before.log").read_text(errors="replace")
    assert re.search(r"\d+ cluster slots \(first: \[\d+", text), text[-2000:]
    assert [rc.get(k) for k in [keys.generation, *copies.values()]] == (
        [generation] * (1 + len(copies)))
    stopped = {s["worker_id"].split("-")[0]: s.get("stopped") for s in worker_stats(settings)}
    assert stopped == {"before": "state_lost"}, stopped
    assert asyncio.run(api_sees_loss(settings))  # the API's /ready says state_lost too
    report = rebuild(settings)
    w1 = workers(settings, "rebuilt")
    wait_complete(settings, ends, procs=[w1], timeout=180)
    ref = oracle(events[:450], shop.catalog, partitions=n)
    snap = snapshot(settings)
    for item in ref.graph.rows:
        got = snap["items"].get(f"item:{item}")
        assert got is not None, item
        want = ref.graph.lists(item)
        assert (got["cross_sell"], got["alternatives"]) == (
            want["cross_sell"], want["alternatives"]), item
    for user in {e["user_id"] for e in events[:450]}:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    # Everything the loss took is back (lists, the audience index, the profiles).
    assert [k for k in lost if not k.startswith(keys.stats("")) and not rc.exists(k)] == []
    generation = report.generation.encode()
    assert not asyncio.run(api_sees_loss(settings))
    w = w1

    # 2. A node with state restarts empty (no persistence, no replica): its partitions'
    # generation copies are gone, the others' stay.
    cluster.restart_empty(cluster.ports.index(victim))
    assert {sp: rc.get(k) is not None for sp, k in copies.items()} == {
        sp: home != victim for sp, home in homes.items()}
    rest = produce(settings, events[450:])
    assert w.wait(60) == 3  # at its next checkpoint there, or the sentinels' next check
    text = (tmp_path / "rebuilt.log").read_text(errors="replace")
    said = re.findall(r"(context|cooccurrence) partition (\d+): the state generation under "
                      r"prefix '[^']+' is gone", text)
    assert all(homes[(s, int(p))] == victim for s, p in said), said
    assert said or re.search(r"\d+ cluster slots \(first", text), text[-2000:]
    again = workers(settings, "restarted")
    assert again.wait(60) == 3  # and a restarted worker refuses: copies are missing
    text = (tmp_path / "restarted.log").read_text(errors="replace")
    missing = sum(home == victim for home in homes.values())
    assert f"no state generation for {missing} of {len(copies)} partition states" in text
    # Both published why they stopped, so neither counts as running for the rebuild.
    stopped = {s["worker_id"].split("-")[0]: s.get("stopped") for s in worker_stats(settings)}
    # ("before" too, unless its stats key lived on the node that restarted empty.)
    assert stopped.keys() - {"before"} == {"rebuilt", "restarted"}, stopped
    assert set(stopped.values()) == {"state_lost"}, stopped
    assert not running_workers(rc, keys, time.time())
    report = rebuild(settings)
    assert f"from offset 0 of its {n} partitions" in report.summary()
    # A new generation, beside every partition's state on its node, and the global token.
    for (s, p), home in homes.items():
        with cluster.node(home) as r:
            assert r.get(copies[(s, p)]) == report.generation.encode(), (s, p)
    assert rc.get(keys.generation) == report.generation.encode()
    ends = {p: max(ends.get(p, -1), rest.get(p, -1)) for p in set(ends) | set(rest)}
    w2 = workers(settings, "after")
    wait_complete(settings, ends, procs=[w2], timeout=180)
    snap = snapshot(settings)
    ref = oracle(events, shop.catalog, partitions=n)
    for item in ref.graph.rows:
        got = snap["items"][f"item:{item}"]
        want = ref.graph.lists(item)
        assert got["cross_sell"] == want["cross_sell"], item
        assert got["alternatives"] == want["alternatives"], item
    for user in {e["user_id"] for e in events}:
        assert snap["users"][f"user:{user}"]["items"] == ref.recommend(user, k=20), user
    trending = {m.decode(): v for m, v in rc.zrange(keys.trending(), 0, -1, withscores=True)}
    want_trending = dict(ref.trending(k=settings.trending_size))
    assert trending.keys() == want_trending.keys()
    assert all(abs(trending[i] - want_trending[i]) < 1e-9 for i in trending)
    # Everything the first loss took is back (the audience index, the profiles).
    assert [k for k in lost if not k.startswith(keys.stats("")) and not rc.exists(k)] == []
