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
import redis

from cartwise.producer import EventProducer
from cartwise.settings import Settings
from streams.store import Keys


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


def progress(r: redis.Redis, settings: Settings) -> dict[str, Any]:
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


def wait_complete(settings: Settings, ends: dict[int, int], timeout: float = 120.0,
                  procs: Iterable[subprocess.Popen] = ()) -> dict[str, Any]:
    r = redis.Redis.from_url(settings.redis_url)
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
    raise TimeoutError(f"not complete after {timeout}s: ends={ends} progress={pr}")


def snapshot(settings: Settings) -> dict[str, Any]:
    """Everything a run produced: lists, contexts and counts, without wall-clock stamps."""
    r = redis.Redis.from_url(settings.redis_url)
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

    def hashes(make: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in range(settings.partitions):
            for k, v in r.hgetall(make(p)).items():
                out[k.decode()] = orjson.loads(v)
        return out

    return {
        "items": docs(keys.item("*")),
        "users": docs(keys.user("*")),
        "contexts": hashes(keys.contexts),
        "rows": hashes(keys.rows),
        "marginals": orjson.loads(orjson.dumps(
            {k.decode(): orjson.loads(v) for k, v in r.hgetall(keys.marginals(0)).items()})),
        "meta": [orjson.loads(r.get(keys.meta(q)) or b"null")
                 for q in range(settings.partitions)],
    }
