"""Run and observe workers from outside: used by the tests, the benchmarks and the demo.

"Complete" means every event produced so far has gone all the way through: both stages have
checkpointed past it, every idle partition has settled its lists, and shopper lists were
refreshed against the final item lists. It is read from the checkpoints in Redis, never from
the broker's "latest offset" (Tansu 0.6 answers that one wrongly, docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from cartwise.producer import EventProducer
from cartwise.redisconn import Client, connect
from cartwise.settings import Settings
from models import rowpatch
from streams.store import Keys


def run_settings(base: str, topics_from: Settings | None = None, **overrides: Any) -> Settings:
    """Settings for a test or bench run named `base` (`broker` and `redis_url` among the
    overrides: its stack's), with its own prefix, group and topics (or the events and catalog
    topics of `topics_from`, to replay the same input), a 6 s session (Kafka's minimum) and
    refreshes of every shopper on every tick, so that a run is complete when its shoppers'
    lists follow the newest item lists."""
    src = topics_from
    values: dict[str, Any] = dict(
        prefix=f"{base}:", app_id=base,
        events_topic=src.events_topic if src else f"{base}.events",
        catalog_topic=src.catalog_topic if src else f"{base}.catalog",
        dlq_topic=f"{base}.dlq", touchpoints_topic=f"{base}.touchpoints",
        session_timeout_s=6.0, rebalance_timeout_s=6.0, heartbeat_interval_s=1.0,
        settle_idle_s=0.5, refresh_interval_s=0.5, refresh_window_s=1e9,
        refresh_max_users=1_000_000,
        # Complete means every shopper refreshed; budgeted slices are tested on their own.
        refresh_budget=1.0,
    )
    return Settings(**(values | overrides))


def worker_stats(settings: Settings) -> list[dict[str, Any]]:
    """The stats every worker of a run last published (a killed one's stay until they expire)."""
    r = connect(settings)
    raws = (r.get(k) for k in r.scan_iter(Keys(settings.prefix).stats_pattern))
    return [orjson.loads(raw) for raw in raws if raw]


def worker_counters(settings: Settings) -> dict[str, int]:
    """Every worker's counters of a run, summed."""
    total: dict[str, int] = {}
    for snap in worker_stats(settings):
        for name, v in snap.get("counters", {}).items():
            total[name] = total.get(name, 0) + v
    return total


def dead_letters(settings: Settings) -> list[tuple[bytes, dict[str, bytes]]]:
    """Every record on the dead-letter topic so far, with its headers."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    out = [(m.value, dict(m.headers)) for m in consumer]
    consumer.close()
    return out


def worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for f in dataclasses.fields(settings):
        if f.name != "worker_id":
            env[f"CARTWISE_{f.name.upper()}"] = str(getattr(settings, f.name))
    return env


def start_worker(settings: Settings, log_path: Path, name: str = "w") -> subprocess.Popen:
    env = worker_env(settings)
    env["CARTWISE_WORKER_ID"] = f"{name}-{time.monotonic_ns()}"
    log = open(log_path, "ab")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "cartwise", "worker", "--loglevel", "INFO"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def start_api(settings: Settings, log_path: Path, **env_extra: str) -> subprocess.Popen:
    """`cartwise api` in its own process group, configured like the workers."""
    env = worker_env(settings) | env_extra
    log = open(log_path, "ab")  # noqa: SIM115 - the process owns it
    return subprocess.Popen([sys.executable, "-m", "cartwise", "api"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Wait until `url` answers 200 (e.g. /ready), or fail with what went wrong."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout}s (last: {last})")


def stop_worker(proc: subprocess.Popen, hard: bool = False) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL if hard else signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def produce(
    settings: Settings, events: Iterable[dict | bytes], catalog: Iterable[dict] = ()
) -> dict[int, int]:
    """Send catalog then events; returns the last offset written to each events partition."""
    ends: dict[int, int] = {}
    with EventProducer(settings.bootstrap, settings.events_topic, settings.catalog_topic) as p:
        for item in catalog:
            p.catalog(item)
        futures = [p.send_raw(e, key=b"raw") if isinstance(e, bytes) else p.send(e)
                   for e in events]
        p.flush()
        for f in futures:
            md = f.get(30)
            ends[md.partition] = max(ends.get(md.partition, -1), md.offset)
    return ends


def progress(r: Client, settings: Settings) -> dict[str, Any]:
    keys = Keys(settings.prefix)
    n = settings.partitions
    ctx = [int(r.get(keys.offset("context", p)) or -1) for p in range(n)]
    metas = [orjson.loads(r.get(keys.meta(q)) or b'{"hwm": {}}') for q in range(n)]
    graph = [int(r.get(keys.offset("cooccurrence", q)) or -1) for q in range(n)]
    settled = [orjson.loads(r.get(keys.settled(q)) or b'{"offset": -2}') for q in range(n)]
    refreshed = [orjson.loads(r.get(keys.refreshed(p)) or b'{"version": -1}') for p in range(n)]
    return {"context": ctx, "hwm": [{int(k): v for k, v in m["hwm"].items()} for m in metas],
            "cooccurrence": graph, "settled": settled, "refreshed": refreshed,
            "lists_version": int(r.get(keys.lists_version) or 0)}


def is_complete(pr: dict[str, Any], ends: dict[int, int]) -> bool:
    if any(pr["context"][p] != end for p, end in ends.items()):
        return False
    for q, hwm in enumerate(pr["hwm"]):
        if any(hwm.get(p, -1) != end for p, end in ends.items()):
            return False
        if pr["settled"][q]["offset"] != pr["cooccurrence"][q]:
            return False
    return all(pr["refreshed"][p]["version"] >= pr["lists_version"] for p in ends)


def wait_committed(settings: Settings, timeout: float = 60.0) -> None:
    """Until the consumer group has committed progress to the broker (Faust commits every few
    seconds): what makes a Redis without state read as data loss."""
    from streams.topics import group_has_offsets

    deadline = time.monotonic() + timeout
    while not group_has_offsets(settings):
        assert time.monotonic() < deadline, "the consumer group committed no offsets"
        time.sleep(0.5)


def wait_complete(settings: Settings, ends: dict[int, int], timeout: float = 120.0,
                  procs: Iterable[subprocess.Popen] = ()) -> dict[str, Any]:
    r = connect(settings)
    deadline = time.monotonic() + timeout
    pr: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pr = progress(r, settings)
        if is_complete(pr, ends):
            return pr
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode} before completion")
        time.sleep(0.2)
    raise TimeoutError(f"not complete after {timeout}s: ends={ends} progress={pr} "
                       f"workers={_stuck_hints(settings)}")


def _stuck_hints(settings: Settings) -> list[dict[str, Any]]:
    """What each worker last said about itself: its partitions, checkpoints and the counters
    that tell a stuck partition from a slow one (gaps, conflicts, failures, stale records)."""
    hints = []
    try:
        for snap in worker_stats(settings):
            counters = {k: v for k, v in snap.get("counters", {}).items()
                        if any(w in k for w in ("gap", "conflict", "fail", "stale", "error",
                                                "dlq", "stopped"))}
            parts = [{k: p.get(k) for k in ("stage", "partition", "checkpoint", "applied", "lag")}
                     for p in snap.get("partitions", [])]
            hints.append({"worker": snap.get("worker_id"), "counters": counters,
                          "partitions": parts})
    except Exception as exc:  # the hint must never hide the timeout
        hints.append({"error": repr(exc)})
    return hints


def snapshot(settings: Settings) -> dict[str, Any]:
    """Everything a run produced: lists, contexts and counts, without wall-clock stamps."""
    r = connect(settings)
    keys = Keys(settings.prefix)

    def docs(pattern: str) -> dict[str, Any]:
        out = {}
        for key in r.scan_iter(pattern, count=1000):
            d = orjson.loads(r.get(key))
            # When a list was written, not what it says: an unchanged list is not rewritten.
            d.pop("generated_at", None)
            d.pop("as_of", None)
            out[key.decode().removeprefix(settings.prefix)] = d
        return out

    def hashes(make: Any, parse: Any = orjson.loads) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in range(settings.partitions):
            for k, v in r.hgetall(make(p)).items():
                out[k.decode()] = parse(v)
        return out

    return {
        "items": docs(keys.item("*")),
        "users": docs(keys.user("*")),
        "contexts": hashes(keys.contexts),
        # as the stage reads them: whole, with its patches (how they were written may differ)
        "rows": hashes(keys.rows, lambda v: rowpatch.decode(v)[0]),
        "marginals": orjson.loads(orjson.dumps(
            {k.decode(): orjson.loads(v) for k, v in r.hgetall(keys.marginals(0)).items()})),
        "meta": [orjson.loads(r.get(keys.meta(q)) or b"null")
                 for q in range(settings.partitions)],
    }


# -- chaos runs (tests/test_chaos.py, bench/chaos.py) -----------------------------------------


def full_snapshot(settings: Settings) -> dict[str, Any]:
    """`snapshot` plus what it leaves out: every pairs partition's copy of the item totals
    (`snapshot` reads partition 0's only) and the trending sorted sets, shop-wide ("trending")
    and per category ("trending_by_category", keyed "trending:{category}|{item}")."""
    r = connect(settings)
    keys = Keys(settings.prefix)
    out = snapshot(settings)
    out["marginals_all"] = {
        f"{q}:{k.decode()}": orjson.loads(v)
        for q in range(settings.partitions) for k, v in r.hgetall(keys.marginals(q)).items()}
    out["trending"] = {m.decode(): v for m, v in r.zrange(keys.trending(), 0, -1, withscores=True)}
    by_category: dict[str, float] = {}
    for key in r.scan_iter(keys.trending("*"), count=1000):
        name = key.decode().removeprefix(settings.prefix)
        for member, score in r.zrange(key, 0, -1, withscores=True):
            by_category[f"{name}|{member.decode()}"] = score
    out["trending_by_category"] = by_category
    return out


# Compared bit for bit: lists are rounded before sorting and contexts hold no float sums.
EXACT_KINDS = ("items", "users", "contexts")
# Float sums whose order differs between runs: compared to a relative `rel_tol`.
CLOSE_KINDS = ("rows", "marginals_all", "meta", "trending", "trending_by_category")


def _close(a: object, b: object, rel_tol: float) -> bool:
    import math

    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel_tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel_tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if not isinstance(a, float | int) or not isinstance(b, float | int):
        return a == b
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12)


def state_diff(got: dict[str, Any], want: dict[str, Any],
               rel_tol: float = 1e-9) -> dict[str, dict[str, list[str]]]:
    """Per kind of state (a `full_snapshot` key), the keys that differ between two runs:
    {"items": {"missing": [...], "extra": [...], "differ": [...]}, ...}; empty lists where
    the runs agree. `meta` (a list, one entry per pairs partition) is keyed by partition."""
    out: dict[str, dict[str, list[str]]] = {}
    for kind in (*EXACT_KINDS, *CLOSE_KINDS):
        g, w = got.get(kind), want.get(kind)
        if isinstance(g, list):
            g = {str(i): v for i, v in enumerate(g)}
        if isinstance(w, list):
            w = {str(i): v for i, v in enumerate(w)}
        g, w = g or {}, w or {}
        same = ((lambda a, b: a == b) if kind in EXACT_KINDS
                else (lambda a, b: _close(a, b, rel_tol)))
        out[kind] = {
            "missing": sorted(set(w) - set(g)),
            "extra": sorted(set(g) - set(w)),
            "differ": sorted(k for k in set(g) & set(w) if not same(g[k], w[k])),
        }
    return out


def diff_counts(diff: dict[str, dict[str, list[str]]]) -> dict[str, int]:
    """How many keys of each kind differ in any way (missing, extra or different)."""
    return {kind: sum(len(v) for v in d.values()) for kind, d in diff.items()}
