"""Cost per event at realistic scale: one backlog, the no-op agent, 1/2/4 workers, a grocery.

    .venv/bin/python -m bench.scale                  # default size: 20k items, 30k shoppers,
                                                     # 60k events
    .venv/bin/python -m bench.scale --full           # 50k items, 500k shoppers, 1M events
    .venv/bin/python -m bench.scale --workers 1 --profile

One embedded broker and Redis (cartwise/embedded.py). The workload is
`cartwise.simulator.RealisticShop` (Zipf-like popularity, categories with complements in
partner categories, interleaved sessions), produced once as a backlog with the project's
EventProducer (validated, larger producer batches); the produce rate is reported.

1. Baseline: a no-op Faust agent (like bench/noop.py, plus a mark at every tenth) drains it.
2. For each worker count in `--workers` (default 1,2,4) a fresh consumer group drains the
   same backlog, the catalog already in Redis (a shop's catalog is there before its traffic;
   `preload_catalog`). While it runs, the bench polls the Redis checkpoints
   (`harness.progress`) and the workers' CPU time (/proc/<pid>/stat) every `--poll` s and
   interpolates both at every tenth of the backlog (by stage 1's checkpoints; what stage 2
   still does after stage 1 is done is the "tail"): events/s and CPU us/event per tenth show
   whether the cost of an event grows with the state the workers hold. Also: the whole
   backlog (the workers' own first/last batch stamps, as bench/throughput.py), peak RSS
   (VmHWM) per worker, Redis memory (INFO used_memory; keys and bytes per key kind), Faust's
   timer overruns from the worker logs, and events applied per backlog event (above 1: work
   redone after partitions moved between workers).
3. Freshness on the big state: after the backlog, the single worker gets a steady `--rate`
   events/s for `--seconds` s (mostly returning shoppers); the bench waits until stage 1 has
   applied all of it (`caught_up_s`), then reads p50/p99 from event to the shopper's list in
   Redis from the worker's own samples (its last 20,000 events: keep rate x seconds above
   that, so that no backlog event is among them).
4. `--profile`: one more single-worker pass over the backlog under py-spy (sampling,
   --nonblocking), so the measured runs are not slowed: one window over the first fifth of
   the backlog, one over the last, one over a steady `--rate` afterwards ("live"); top
   functions by self and total time in each, and the functions whose cost per event grew
   most from the first window to the last.
5. `--warm`: one more single worker on a topic of two backlogs, the second of mostly
   returning shoppers, timed per tenth of the second alone: the cost of an event on a worker
   that already holds the state (`warm_pass`); with `--profile` the py-spy windows go there.
6. Dense catalog: a grocery log (`RealisticShop(mode="dense")`: 300 items, baskets of 10-30)
   replayed prequentially through the library (models.evaluation.Replay with CartwiseModel:
   what `cartwise evaluate --events FILE --models cartwise` runs): ms per event, whole and per
   tenth.

Results: a printed table and bench/results/scale.json; worker logs, the grocery log and
py-spy's raw samples in bench/results/logs/ (not committed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import redis

from bench import plain_consumer

if TYPE_CHECKING:
    from cartwise.redisconn import Client

RESULTS = Path(__file__).parent / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
FRESHNESS_SAMPLES = 20_000  # what a worker keeps (streams/stats.py)
# py-spy windows of the --profile pass, by share of the backlog through stage 1: what an
# event costs early (little state) against late (the most state).
# The late one stops short of the end, where partitions go idle one by one and settle (every
# list recomputed once): an end-of-backlog cost, not one per event.
PROFILE_WINDOWS = (("early", 0.0, 0.2), ("late", 0.7, 0.9))

DEFAULT = {"items": 20_000, "shoppers": 30_000, "events": 60_000, "dense_events": 2_000}
FULL = {"items": 50_000, "shoppers": 500_000, "events": 1_000_000, "dense_events": 20_000}


# -- processes --------------------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def settings_for(stack: Any, name: str, partitions: int, topics: Any = None) -> Any:
    from cartwise.settings import Settings
    from streams.topics import ensure_topics

    # CARTWISE_* variables around the bench reach its workers (`from_env`): the way to measure
    # a setting. The results record them (`env`).
    s = Settings.from_env(
        broker=stack.broker, redis_url=stack.redis_url, prefix=f"{name}:", app_id=name,
        partitions=partitions, session_timeout_s=6.0, rebalance_timeout_s=6.0,
        heartbeat_interval_s=1.0,
        events_topic=topics.events_topic if topics else f"{name}.events",
        catalog_topic=topics.catalog_topic if topics else f"{name}.catalog",
        dlq_topic=f"{name}.dlq", touchpoints_topic=f"{name}.touchpoints",
        config_topic=f"{name}.config", worker_id=name)
    ensure_topics(s)
    return s


# -- the backlog ------------------------------------------------------------------------------


def produce_backlog(settings: Any, shop: Any, n: int, start_ts: float, part: int = 0,
                    known_shoppers: int = 0, new_shoppers: int | None = None,
                    firsts: dict[int, int] | None = None) -> tuple[dict, dict]:
    """Catalog, then `n` events, through the project's EventProducer (validated) with larger
    batches; the end offset of each partition comes from the acks (never the broker's
    "latest offset"). With `firsts` (a later part of the same topic), the first offset of
    each partition goes there, and the catalog is not sent again. `part`,
    `known_shoppers` and `new_shoppers`: `RealisticShop.events`."""
    from cartwise.producer import EventProducer

    ends: dict[int, int] = {}
    failed: list[BaseException] = []

    def acked(md: Any) -> None:
        if md.offset > ends.get(md.partition, -1):
            ends[md.partition] = md.offset
        if firsts is not None and md.offset < firsts.get(md.partition, md.offset + 1):
            firsts[md.partition] = md.offset

    t0 = time.perf_counter()
    with EventProducer(settings.bootstrap, settings.events_topic, settings.catalog_topic,
                       linger_ms=50, batch_size=256 << 10) as p:
        for item in shop.catalog() if firsts is None else ():  # a later part: sent already
            p.catalog(item)
        t_cat = time.perf_counter()
        last_ts = start_ts
        for ev in shop.events(n, start_ts=start_ts, part=part, known_shoppers=known_shoppers,
                              new_shoppers=new_shoppers):
            p.send(ev).add_callback(acked).add_errback(failed.append)
            last_ts = max(last_ts, ev["ts"])
        p.flush()
    t1 = time.perf_counter()
    if failed:
        raise RuntimeError(f"{len(failed)} sends failed, first: {failed[0]!r}")
    info = {"events": n, "seconds": round(t1 - t0, 2), "events_per_s": round(n / (t1 - t_cat)),
            "last_ts": last_ts}
    if firsts is None:
        info |= {"catalog_items": shop.items, "catalog_seconds": round(t_cat - t0, 2)}
    return ends, info


# -- no-op agent (runs as `python -m bench.scale --noop-agent ...`) --------------------------


def noop_agent(args: argparse.Namespace) -> None:
    import faust

    app = faust.App(args.app_id, broker=f"kafka://{args.broker}", value_serializer="raw",
                    web_enabled=False, consumer_auto_offset_reset="earliest",
                    broker_session_timeout=6.0, broker_rebalance_timeout=6.0,
                    broker_heartbeat_interval=1.0,
                    datadir=tempfile.mkdtemp(prefix="cartwise-noop-"))  # not the cwd
    topic = app.topic(args.topic, value_type=bytes, internal=False)
    n = args.n
    bounds = {round(k * n / 10) for k in range(1, 11)}
    marks: list[tuple[int, float, float]] = []
    count = [0]

    @app.agent(topic)
    async def noop(stream: Any) -> None:
        async for _ in stream:
            count[0] += 1
            c = count[0]
            if c == 1 or c in bounds:
                marks.append((c, time.time(), time.process_time()))
                if c == n:
                    redis.Redis.from_url(args.redis_url).set(f"bench:{args.app_id}",
                                                             orjson.dumps(marks))

    faust.Worker(app, loglevel="WARNING", quiet=True).execute_from_commandline()


def run_noop(stack: Any, topic: str, n: int, name: str, log: Path) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.scale", "--noop-agent", "--broker", stack.broker,
         "--redis-url", stack.redis_url, "--topic", topic, "--app-id", name, "--n", str(n)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    from bench.throughput import await_result

    raw, rss = await_result(proc, stack.redis_url, f"bench:{name}", log, 3600, 0.2)
    marks = orjson.loads(raw)  # (count, time, cpu) at the first event and every tenth
    (c0, t0, cpu0), (cn, tn, cpun) = marks[0], marks[-1]
    tenths = [tenth(a[0], b[0], a[1], b[1], a[2], b[2]) for a, b in zip(marks, marks[1:],
                                                                        strict=False)]
    return {"events_per_s": (cn - c0) / (tn - t0), "cpu_us_per_event": 1e6 * (cpun - cpu0) / cn,
            "wall_s": round(tn - t0, 2), "peak_rss_mb": round(rss, 1), "tenths": tenths}


def tenth(e0: float, e1: float, t0: float, t1: float, c0: float, c1: float) -> dict:
    de = max(e1 - e0, 1e-9)
    return {"events": round(de), "events_per_s": round(de / max(t1 - t0, 1e-9), 1),
            "cpu_us_per_event": round(1e6 * (c1 - c0) / de, 1)}


def tenths(samples: list[tuple], start: tuple[float, float], n0: int, n: int
           ) -> tuple[list[dict], list[tuple[float, float]]]:
    """Events/s and CPU per event in each tenth of events n0..n through stage 1, and the
    (time, cpu) marks between the tenths; `samples` and `start` as for `interpolate`."""
    marks = [start if not n0 else interpolate(samples, n0, start)] + [
        interpolate(samples, n0 + b * (n - n0) / 10, start) for b in range(1, 11)]
    return [tenth(n0 + i * (n - n0) / 10, n0 + (i + 1) * (n - n0) / 10, a[0], b[0], a[1], b[1])
            for i, (a, b) in enumerate(zip(marks, marks[1:], strict=False))], marks


# -- workers ----------------------------------------------------------------------------------


def through_both(pr: dict, ends: dict[int, int]) -> tuple[int, int]:
    """Events applied by stage 1 (checkpoint offsets) and by stage 2 (for each source
    partition, the lowest high-water mark over the pairs partitions: every pairs partition
    hears of every batch)."""
    ctx = sum(min(pr["context"][p], e) + 1 for p, e in ends.items())
    graph = sum(min(min((h.get(p, -1) for h in pr["hwm"]), default=-1), e) + 1
                for p, e in ends.items())
    return ctx, graph


def interpolate(samples: list[tuple], target: float,
                start: tuple[float, float]) -> tuple[float, float]:
    """(time, cpu) when stage 1 had applied `target` events, linear between the polls around
    it; polls are (time, cpu, events through stage 1, events through stage 2)."""
    prev = (start[0], start[1], 0)
    for s in samples:
        if s[2] >= target:
            if s[2] == prev[2]:
                return s[0], s[1]
            f = (target - prev[2]) / (s[2] - prev[2])
            return prev[0] + f * (s[0] - prev[0]), prev[1] + f * (s[1] - prev[1])
        if s[0] >= start[0]:
            prev = s
    return samples[-1][0], samples[-1][1]


def timer_overruns(logs: list[Path]) -> dict[str, dict]:
    """Faust's "Timer X is overlapping" warnings in worker logs: how often, the longest."""
    out: dict[str, dict] = {}
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        for m in re.finditer(r"Timer \S*?(\w+) is overlapping \(interval=([\d.]+) "
                             r"runtime=([\d.]+)\)", text):
            d = out.setdefault(m[1], {"interval_s": float(m[2]), "count": 0, "max_s": 0.0,
                                      "total_s": 0.0})
            d["count"] += 1
            d["max_s"] = round(max(d["max_s"], float(m[3])), 3)
            d["total_s"] = round(d["total_s"] + float(m[3]), 3)
    return out


def key_kinds(r: Client, prefix: str, sample: int = 200) -> dict[str, dict]:
    """Keys and estimated bytes per kind (the key's first part after the prefix; for a
    partition's state, "state:" and its name), from MEMORY USAGE of up to `sample` keys of
    each kind."""
    counts: Counter[str] = Counter()
    sizes: dict[str, list[int]] = {}
    for key in r.scan_iter(f"{prefix}*", count=5000):
        name = key.decode().removeprefix(prefix)
        # Partition keys carry a hash tag (`{context:3}`, streams/store.py): not a kind.
        parts = re.sub(r"\{[^}]*\}:?", "", name).split(":")
        kind = ":".join(parts[:2]) if parts[0] == "state" and "{" in name else parts[0]
        counts[kind] += 1
        got = sizes.setdefault(kind, [])
        if len(got) < sample:
            got.append(r.memory_usage(key, samples=0) or 0)
    return {k: {"keys": n, "est_mb": round(n * sum(sizes[k]) / len(sizes[k]) / 2**20, 1)}
            for k, n in counts.most_common()}


def preload_catalog(r: Client, prefix: str, shop: Any) -> None:
    """The catalog facts the catalog stage would write (streams/catalog_stage.py), written
    before the workers start: a shop's catalog is there before its traffic, and the workers'
    catalog stage (reading the catalog topic beside the backlog) only rewrites the same."""
    from cartwise.contract import validate_catalog
    from streams.store import Keys

    key = Keys(prefix).catalog
    facts: dict[str, bytes] = {}
    for item in shop.catalog():
        facts[item["item_id"]] = orjson.dumps(validate_catalog(item).as_dict())
        if len(facts) >= 5000:
            r.hset(key, mapping=facts)
            facts = {}
    if facts:
        r.hset(key, mapping=facts)


def drop_prefix(r: Client, prefix: str) -> None:
    batch = []
    for key in r.scan_iter(f"{prefix}*", count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            r.unlink(*batch)
            batch = []
    if batch:
        r.unlink(*batch)


def run_workers(stack: Any, topics: Any, name: str, ends: dict[int, int], k: int, logs: Path,
                poll: float, partitions: int, shop: Any = None, freshness: dict | None = None,
                profile: dict | None = None, measure_from: dict[int, int] | None = None) -> dict:
    """`k` workers of a fresh consumer group drain the topic up to `ends` (see the module's
    docstring). `measure_from` (the first offset of a later part of the topic, per
    partition): the tenths are of that part alone, everything before it builds state."""
    from bench.throughput import peak_rss_mb
    from cartwise.harness import progress, start_worker, stop_worker
    from cartwise.redisconn import connect

    settings = settings_for(stack, name, partitions, topics)
    r = connect(settings)
    n = sum(e + 1 for e in ends.values())
    n0 = sum(measure_from.values()) if measure_from else 0  # events before the part timed
    mem0 = r.info("memory")["used_memory"]
    if shop is not None:
        preload_catalog(r, settings.prefix, shop)
    procs = [start_worker(settings, logs / f"{name}-{i}.log", f"{name}-{i}") for i in range(k)]
    samples: list[tuple[float, float, int, int]] = []
    out: dict[str, Any] = {"workers": k}
    windows: list[dict] = []  # profiler windows: [start share, end share) of the backlog
    if profile is not None:
        windows = [{"name": w, "from": a, "to": b, "raw": logs / f"{name}-py-spy-{w}.txt"}
                   for w, a, b in profile["windows"]]
    try:
        deadline = time.monotonic() + 6 * 3600
        while True:
            pr = progress(r, settings)
            ctx, graph = through_both(pr, ends)
            samples.append((time.time(), sum(cpu_s(p.pid) for p in procs), ctx, graph))
            for w in windows:
                if "spy" not in w and ctx > 0 and ctx >= n0 + w["from"] * (n - n0):
                    w["spy"] = py_spy(profile, procs[0].pid, w["raw"], logs / f"{name}.py-spy.log")
                    w["start"] = samples[-1]
                elif "spy" in w and "stop" not in w and (ctx >= n0 + w["to"] * (n - n0)):
                    w["spy"].send_signal(signal.SIGINT)
                    w["stop"] = samples[-1]
            if ctx == n and graph == n:
                break
            for p in procs:
                if p.poll() is not None:
                    raise RuntimeError(f"worker exited with {p.returncode}; see {logs}/{name}-*")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {ctx}/{graph} of {n} after the deadline")
            time.sleep(poll)
        for w in windows:
            if "spy" in w:
                w["spy"].wait(120)
        time.sleep(2.5)  # the stats timer publishes the last batch's stamps
        stats = [orjson.loads(v) for key in r.scan_iter(f"{settings.prefix}stats:*")
                 if (v := r.get(key))]
        stats = [s for s in stats if s.get("first_batch_at")]
        first = min(s["first_batch_at"] for s in stats)
        done = max(s["last_batch_at"] for s in stats)
        cpu_first = sum(s["first_batch_cpu"] for s in stats)
        cpu_done = sum(s["last_batch_cpu"] for s in stats)
        out |= {"events": n, "events_per_s": round(n / (done - first), 1),
                "cpu_us_per_event": round(1e6 * (cpu_done - cpu_first) / n, 1),
                "wall_s": round(done - first, 2)}
        start = (first, cpu_first)
        # Tenths of the backlog by stage 1's checkpoints (stage 2 may lag: its work lands in
        # the tenth in which it runs); the tail is from stage 1's end to both stages' end.
        out["tenths"], marks = tenths(samples, start, n0, n)
        if n0:  # the part timed as a whole
            out["measured"] = {"from_event": n0} | tenth(n0, n, marks[0][0], marks[-1][0],
                                                          marks[0][1], marks[-1][1])
        # How far the item graph stage fell behind the shoppers' (by its checkpointed
        # progress; docs/operations.md): its work lands late, in later tenths or in the tail.
        out["stage2_behind_max"] = max((a - b for _, _, a, b in samples if a > n0), default=0)
        end = samples[-1]
        out["tail"] = {"seconds": round(end[0] - marks[-1][0], 2),
                       "cpu_s": round(end[1] - marks[-1][1], 2)}
        out["peak_rss_mb"] = [round(peak_rss_mb(p.pid), 1) for p in procs]
        # The raw polls: seconds and CPU seconds since the first batch, events through stage
        # 1 and through stage 2.
        out["polls"] = [(round(t - first, 2), round(c - cpu_first, 2), a, b)
                        for t, c, a, b in samples if t >= first]
        out["timer_overruns"] = timer_overruns([logs / f"{name}-{i}.log" for i in range(k)])
        seconds: dict[str, float] = {}
        for st in stats:
            for key, v in st.get("seconds", {}).items():
                seconds[key] = round(seconds.get(key, 0.0) + v, 2)
        out["step_seconds"] = dict(sorted(seconds.items(), key=lambda kv: -kv[1]))
        counters: Counter[str] = Counter()
        for st in stats:
            counters.update(st.get("counters", {}))
        out["counters"] = dict(sorted(counters.items()))
        # Events applied by stage 1 over the backlog: above 1 is work redone (a partition
        # replayed from its checkpoint after it moved between workers).
        applied = sum(v for c, v in counters.items() if c.startswith("applied.")
                      or c.startswith("context.applied."))
        out["applied_per_event"] = round(applied / n, 3)
        out["users_ranked_per_event"] = round(counters.get("context.users_ranked", 0) / n, 3)
        mem1 = r.info("memory")["used_memory"]
        out["redis"] = {"used_memory_mb": round(mem1 / 2**20, 1),
                        "run_mb": round((mem1 - mem0) / 2**20, 1),
                        "keys": key_kinds(r, settings.prefix)}
        out["state"] = [s.get("partitions") for s in stats]
        if freshness is not None:
            # A steady rate on a settled worker: the backlog's deferred work (item lists
            # published in slices, stage 2's tail, the settle passes) ran into the first
            # seconds of the steady phase and made its first events 20-30 s late.
            out["quiet"] = wait_quiet(procs)
            live = None
            if profile is not None:  # where the time goes at a steady rate, on the big state
                live = {"name": "live", "raw": logs / f"{name}-py-spy-live.txt",
                        "spy": py_spy(profile, procs[0].pid, logs / f"{name}-py-spy-live.txt",
                                      logs / f"{name}.py-spy.log"),
                        "start": (time.time(), cpu_s(procs[0].pid), 0, 0)}
                windows.append(live)
            cpu0 = sum(cpu_s(p.pid) for p in procs)
            out["freshness"] = measure_freshness(settings, r, **freshness)
            # The steady rate's CPU per event, to set beside the backlog's (small batches).
            out["freshness"]["cpu_us_per_event"] = round(
                1e6 * (sum(cpu_s(p.pid) for p in procs) - cpu0)
                / max(1, out["freshness"]["sent"]), 1)
            if live is not None:
                live["spy"].send_signal(signal.SIGINT)
                live["stop"] = (time.time(), cpu_s(procs[0].pid), out["freshness"]["sent"], 0)
                live["spy"].wait(120)
            out["peak_rss_mb_after_freshness"] = [round(peak_rss_mb(p.pid), 1) for p in procs]
        if windows:
            out["profile"] = {w["name"]: window_profile(w) for w in windows if "stop" in w}
    finally:
        for w in windows:
            spy = w.get("spy")
            if spy is not None and spy.poll() is None:
                spy.send_signal(signal.SIGINT)
                try:
                    spy.wait(60)
                except subprocess.TimeoutExpired:
                    spy.kill()
        for p in procs:
            stop_worker(p)
    drop_prefix(r, settings.prefix)
    return out


def _ms_of(fresh: dict, kind: str, q: str) -> float | None:
    v = (fresh.get(kind) or {}).get(q)  # a worker before "received" has none
    return None if v is None else round(v * 1000, 1)


def loop_held(before: list[int] | None, after: list[int] | None) -> dict:
    """The worker's event-loop checks between two of its stats snapshots (`loop_delay_s.counts`,
    per bucket of streams/stats.py `LOOP_BUCKETS`): how many, the share of them held over 50 ms,
    and the bucket bound that 99% of them stayed within (None: above the last)."""
    from streams.stats import LOOP_BUCKETS

    if not before or not after:
        return {}  # a worker older than the probe
    diff = [a - b for a, b in zip(after, before, strict=True)]
    n = sum(diff)
    if n <= 0:
        return {"loop_checks": 0}
    over = sum(diff[LOOP_BUCKETS.index(0.05) + 1:])
    seen, p99 = 0, None
    for bound, k in zip(LOOP_BUCKETS, diff, strict=False):
        seen += k
        if seen >= 0.99 * n:
            p99 = round(bound * 1000)
            break
    return {"loop_checks": n, "loop_held_over_50ms_share": round(over / n, 4),
            "loop_held_p99_at_most_ms": p99}


def start_plain_consumer(settings: Any) -> tuple[subprocess.Popen, Path]:
    """A plain consumer of the events topic beside the worker, positioned at its end."""
    out = Path(tempfile.mkdtemp(prefix="cartwise-plain-")) / "ages.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.plain_consumer", "--broker", ",".join(settings.bootstrap),
         "--topic", settings.events_topic, "--partitions", str(settings.partitions),
         "--out", str(out), "--fetch-max-wait-ms", str(settings.fetch_max_wait_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ready = out.with_name(out.name + ".ready")
    deadline = time.time() + 30
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    return proc, out


def stop_plain_consumer(proc: subprocess.Popen, out: Path) -> dict:
    out.with_name(out.name + ".stop").touch()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return {}
    return orjson.loads(out.read_bytes()) if out.exists() else {}


def _loop_counts(r: Client, settings: Any) -> list[int] | None:
    from cartwise.cli import worker_stats

    snaps = worker_stats(r, settings)
    return (snaps[0].get("loop_delay_s") or {}).get("counts") if snaps else None


def wait_quiet(procs: list[subprocess.Popen], share: float = 0.25, window_s: float = 2.0,
               limit_s: float = 900.0) -> dict:
    """Wait until the workers use less than `share` of a core over `window_s` (at most
    `limit_s`): how long that took and the CPU seconds they spent meanwhile."""
    t0, c0 = time.time(), sum(cpu_s(p.pid) for p in procs)
    last_t, last_c = t0, c0
    while time.time() - t0 < limit_s:
        time.sleep(window_s)
        t, c = time.time(), sum(cpu_s(p.pid) for p in procs)
        if (used := (c - last_c) / (t - last_t)) < share:
            # `idle_share`: the timers' cost with no events, a floor under every rate
            return {"seconds": round(t - t0, 1), "cpu_s": round(c - c0, 1), "quiet": True,
                    "idle_share": round(used, 3)}
        last_t, last_c = t, c
    return {"seconds": round(time.time() - t0, 1),
            "cpu_s": round(sum(cpu_s(p.pid) for p in procs) - c0, 1), "quiet": False}


def redis_calls(r: Client) -> dict[str, int]:
    """Calls per Redis command since the server started (`INFO commandstats`)."""
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in r.info("commandstats").items()}


def measure_freshness(settings: Any, r: Client, shop: Any, rate: float, seconds: float,
                      known_shoppers: int, new_share: float) -> dict:
    """A steady `rate` events/s on top of the state the worker holds; the worker's own
    event-to-list samples afterwards."""
    from cartwise.producer import EventProducer

    n = int(rate * seconds) + 1
    events = shop.events(n, start_ts=time.time(), part=1, known_shoppers=known_shoppers,
                         new_shoppers=int(n * new_share), mean_gap_s=0.0)
    from cartwise.harness import progress, worker_counters

    sent = 0
    ends: dict[int, int] = {}

    acks: list[float] = []  # seconds from send to the broker's acknowledgement

    def acked(sent_at: float, md: Any) -> None:  # kafka-python: partial(f, *args)(value)
        acks.append(time.time() - sent_at)
        if md.offset > ends.get(md.partition, -1):
            ends[md.partition] = md.offset

    loop_before = _loop_counts(r, settings)
    calls_before = redis_calls(r)
    ranked_before = worker_counters(settings).get("context.users_ranked", 0)
    plain = start_plain_consumer(settings)
    with EventProducer(settings.bootstrap, settings.events_topic) as p:
        start = time.time()
        while (now := time.time()) - start < seconds:
            ahead = start + sent / rate - now
            if ahead > 0:
                time.sleep(ahead)
            ev = next(events)
            ev["ts"] = time.time()
            p.send(ev).add_callback(acked, ev["ts"])
            sent += 1
        p.flush()
    stopped = time.time()
    elapsed = stopped - start
    # Wait for stage 1 to apply everything sent (the shopper lists are written with it), so
    # every freshness sample the worker keeps is a live event's.
    caught_up = None
    while time.time() - stopped < 300:
        ctx = progress(r, settings)["context"]
        if all(ctx[q] >= e for q, e in ends.items()):
            caught_up = round(time.time() - stopped, 1)
            break
        time.sleep(0.2)
    floor = stop_plain_consumer(*plain)
    calls = {c: n - calls_before.get(c, 0) for c, n in redis_calls(r).items()}
    time.sleep(2.5)  # the worker publishes its stats every second
    from cartwise.cli import worker_stats

    stats = worker_stats(r, settings)
    fresh = stats[0]["freshness_s"]
    ms = {k: (None if v is None else round(v * 1000, 1)) for k, v in fresh["user"].items()
          if k != "n"}
    return {"rate": rate, "seconds": seconds, "sent": sent,
            "achieved_rate": round(sent / elapsed, 1),
            # after the last send, until stage 1's checkpoints covered all of it (None: not
            # within 300 s); includes up to one checkpoint interval
            "caught_up_s": caught_up,
            "user_p50_ms": ms["p50"], "user_p99_ms": ms["p99"], "user_max_ms": ms["max"],
            "user_recent_p99_ms": ms["recent_p99"], "samples": fresh["user"]["n"],
            # the same events' batches reaching the context stage: the rest is processing
            "received_p50_ms": _ms_of(fresh, "received", "p50"),
            "received_p99_ms": _ms_of(fresh, "received", "p99"),
            # the same records' age when a plain consumer beside the worker got them: the
            # broker's part of `received` (bench/plain_consumer.py)
            "plain_consumer_p50_ms": floor.get("p50_ms"),
            "plain_consumer_p99_ms": floor.get("p99_ms"),
            "plain_consumer_over_1s": floor.get("over_1s"),
            "plain_consumer_over_1s_by_partition": floor.get("over_1s_by_partition"),
            "plain_consumer_skipped_older": floor.get("skipped_older"),
            # the bench's producer: send to the broker's acknowledgement
            "producer_ack": plain_consumer.ages_summary(acks)
            | {"over_1s": sum(a > 1.0 for a in acks)},
            "only_steady_samples": sent >= FRESHNESS_SAMPLES,
            # shoppers ranked per event (a batch ranks each of its shoppers once)
            "users_ranked_per_event": round(
                (worker_counters(settings).get("context.users_ranked", 0) - ranked_before)
                / max(1, sent), 3),
            # Redis commands per event over the steady phase and the catch-up (every client:
            # the worker, the bench's own polling is a few per second)
            "redis_calls_per_event": round(sum(calls.values()) / max(1, sent), 2),
            "redis_calls_per_event_by_command": {
                c: round(n / max(1, sent), 3) for c, n in sorted(calls.items(),
                                                                 key=lambda x: -x[1])[:12]},
            # Item lists: the last 1,000 written (a worker keeps 20,000 samples, one per list
            # written, and writes fewer than that during the steady phase: older ones would be
            # the backlog's)
            "item_recent_p50_ms": round((fresh["item"]["recent_p50"] or 0) * 1000, 1),
            "item_recent_p99_ms": round((fresh["item"]["recent_p99"] or 0) * 1000, 1),
            # How long the worker's event loop was held, over the steady phase and the catch-up
            # (docs/operations.md, "Where a steady event waits before ranking")
            **loop_held(loop_before, (stats[0].get("loop_delay_s") or {}).get("counts"))}


# -- profile ----------------------------------------------------------------------------------


def py_spy(profile: dict, pid: int, raw: Path, log: Path) -> subprocess.Popen:
    """py-spy sampling a running process until SIGINT (then it writes `raw`)."""
    return subprocess.Popen(
        [profile["py_spy"], "record", "--pid", str(pid), "--rate", str(profile["rate"]),
         "--nonblocking", "--format", "raw", "-o", str(raw)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115


def window_profile(w: dict) -> dict:
    """One profiler window: its share of the backlog, the worker's CPU per event in it, and
    the functions' shares of the samples (so share x CPU per event = us per event)."""
    (t0, c0, e0, _), (t1, c1, e1, _) = w["start"], w["stop"]
    us = 1e6 * (c1 - c0) / max(e1 - e0, 1)
    return {"from_event": e0, "to_event": e1, "seconds": round(t1 - t0, 1),
            "cpu_us_per_event": round(us, 1)} | top_functions(w["raw"])


def growth(early: dict, late: dict, n: int = 15) -> list[tuple[str, float, float]]:
    """Functions whose cost per event (total time: the function and what it calls) grew most
    from the early to the late window: (function, us/event early, us/event late)."""
    ue, ul = early["cpu_us_per_event"] / 100, late["cpu_us_per_event"] / 100
    te, tl = dict(early["all_total"]), dict(late["all_total"])
    generic = ("(asyncio/", "(<frozen", "(mode/", "(cartwise/", "(threading", "(faust/",
               "(python3", "(lib/")
    rows = [(f, round(te.get(f, 0.0) * ue, 1), round(tl.get(f, 0.0) * ul, 1))
            for f in set(te) | set(tl) if not any(g in f for g in generic)]
    return sorted(rows, key=lambda r: r[1] - r[2])[:n]


def top_functions(raw: Path, n: int = 15) -> dict:
    """Self and total share of samples (%) per function from py-spy's raw (collapsed)
    output; `all_total`: every function with at least 0.5%."""
    self_: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    if not raw.exists():
        return {"samples": 0, "self": [], "total": [], "all_total": []}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        samples += c
        frames = []
        for f in stack.split(";"):
            # "function (path/file.py:123)" -> "function (file.py)"
            func, _, where = f.partition(" (")
            path = where.rstrip(")").rsplit(":", 1)[0]
            short = "/".join(Path(path).parts[-2:]) if path else ""
            frames.append(f"{func} ({short})" if short else func)
        self_[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    samples = max(samples, 1)
    return {"samples": samples,
            "self": [(f, round(100 * c / samples, 1)) for f, c in self_.most_common(n)],
            "total": [(f, round(100 * c / samples, 1)) for f, c in total.most_common(n + 10)],
            "all_total": [(f, round(100 * c / samples, 2)) for f, c in total.most_common()
                          if c / samples >= 0.005]}


# -- dense catalog replay ---------------------------------------------------------------------


def dense_replay(n: int, seed: int, out_file: Path) -> dict:
    """The grocery log through the library path: written as JSON lines, loaded as
    `cartwise evaluate --events FILE` loads it, replayed with the cartwise model alone."""
    from cartwise.evaluate import load
    from cartwise.simulator import RealisticShop
    from models.evaluation import Replay
    from models.recommender import CartwiseModel

    shop = RealisticShop(seed=seed, mode="dense")
    with open(out_file, "wb") as f:
        for ev in shop.events(n, start_ts=1_750_000_000.0):
            f.write(orjson.dumps(ev) + b"\n")
    events, kinds = load(None, out_file)
    model = CartwiseModel()
    replay = Replay([model], kinds, events[int(0.3 * len(events))].ts)
    bounds = [round(k * len(events) / 10) for k in range(1, 11)]
    marks = [(0, time.perf_counter(), 0.0)]
    for i, e in enumerate(events, 1):
        replay.step(e)
        if i in bounds:
            marks.append((i, time.perf_counter(), replay.seconds[model.name]))
    tenths = [round(1000 * (b[2] - a[2]) / (b[0] - a[0]), 3) for a, b in zip(marks, marks[1:],
                                                                               strict=False)]
    pairs = len(model.rec.graph.rows)
    return {"events": len(events), "items": shop.items, "shoppers": shop.shoppers,
            "log": str(out_file.name), "ms_per_event": round(replay.cost_us(model.name) / 1000, 3),
            "wall_s": round(marks[-1][1] - marks[0][1], 1), "ms_per_event_by_tenth": tenths,
            "rows": pairs}


def warm_pass(stack: Any, shop: Any, n: int, run: str, logs: Path,
              args: argparse.Namespace, profile: dict | None = None) -> dict:
    """One worker on a topic of two backlogs of `n` events, the second of mostly returning
    shoppers (a quarter as many new ones per event); the tenths are of the second alone.

    A cold backlog's tenths mix two things: the cost of the state a worker holds, and the
    cost of shoppers' lists filling up as the shop's item lists and the shoppers' contexts
    grow from nothing (bounded: models/ranking.py, `head`). Here the second backlog starts
    on a worker that has built that state, as one taking over a running shop's partitions
    does: flat tenths mean the cost of an event stopped growing with the state. `profile`:
    py-spy windows (as `run_workers`) over the second backlog.
    """
    topics = settings_for(stack, f"{run}warmlog", args.partitions)
    gap = shop.mean_gap_s
    # The second part starts where the first ended in event time; both end about a minute ago.
    ends, first = produce_backlog(topics, shop, n, time.time() - 60 - 2 * n * gap)
    firsts: dict[int, int] = {}
    later, produced = produce_backlog(topics, shop, n, first["last_ts"] + gap, part=2,
                                      known_shoppers=shop.shoppers,
                                      new_shoppers=shop.shoppers // 4, firsts=firsts)
    for q in ends:
        firsts.setdefault(q, ends[q] + 1)  # a partition the second part left empty
    ends = {q: max(ends.get(q, -1), later.get(q, -1)) for q in ends.keys() | later.keys()}
    out = run_workers(stack, topics, f"{run}warm", ends, 1, logs, args.poll, args.partitions,
                      shop=shop, measure_from=firsts, profile=profile)
    out["produce"] = produced
    if profile is not None and "early" in out.get("profile", {}) and "late" in out["profile"]:
        out["profile"]["growth"] = growth(out["profile"]["early"], out["profile"]["late"])
    return out


# -- main -------------------------------------------------------------------------------------


def table(res: dict) -> str:
    lines = []
    pr = res["produce"]
    lines.append(f"backlog: {pr['events']} events, {res['shop']['items']} items, "
                 f"{res['shop']['shoppers']} shoppers, {res['partitions']} partitions; "
                 f"produced at {pr['events_per_s']} events/s")
    noop = res["noop"]
    head = f"{'run':<10} {'ev/s':>8} {'us/ev':>7} {'ratio':>6}  per tenth: ev/s | CPU us/event"
    lines += [head, "-" * len(head)]

    def row(label: str, d: dict) -> None:
        ratio = d["events_per_s"] / noop["events_per_s"]
        lines.append(f"{label:<10} {d['events_per_s']:>8.0f} {d['cpu_us_per_event']:>7.0f} "
                     f"{ratio:>6.2f}  " + " ".join(f"{t['events_per_s']:.0f}" for t in d["tenths"]))
        lines.append(f"{'':<35}" + " ".join(f"{t['cpu_us_per_event']:.0f}" for t in d["tenths"]))

    row("no-op", noop)
    for k, d in res["workers"].items():
        row(f"{k} worker" + ("s" if k != "1" else ""), d)
    one = res["workers"].get("1")
    if one:
        t = one["tenths"]
        lines.append(f"1 worker CPU us/event: tenth 1 {t[0]['cpu_us_per_event']:.0f}, "
                     f"tenth 2 {t[1]['cpu_us_per_event']:.0f}, last {t[-1]['cpu_us_per_event']:.0f}"
                     f" (last/second {t[-1]['cpu_us_per_event'] / t[1]['cpu_us_per_event']:.2f});"
                     f" stage 2 at most {one['stage2_behind_max']} events behind, then "
                     f"{one['tail']['cpu_s']} CPU s after stage 1")
        lines.append(f"peak RSS: worker {one['peak_rss_mb']} MB, no-op {noop['peak_rss_mb']} MB; "
                     f"Redis used_memory {one['redis']['used_memory_mb']} MB "
                     f"(this run {one['redis']['run_mb']} MB)")
        f = one.get("freshness")
        if f:
            lines.append(f"freshness at {f['achieved_rate']:.0f} ev/s for {f['seconds']:.0f} s on "
                         f"the big state: shopper list p50 {f['user_p50_ms']} ms, p99 "
                         f"{f['user_p99_ms']} ms; last 1,000 item lists p50 "
                         f"{f['item_recent_p50_ms']} ms, p99 {f['item_recent_p99_ms']} ms; "
                         f"caught up {f['caught_up_s']} s after the last event was sent")
    if len(res["workers"]) > 1 and one:
        base = one["events_per_s"]
        lines.append("scale-out: " + ", ".join(
            f"{k}: {d['events_per_s'] / base:.2f}x ({d['cpu_us_per_event']:.0f} us/ev CPU, "
            f"{d['applied_per_event']} applied/ev)"
            for k, d in res["workers"].items()) + f" on {os.cpu_count()} cores")
    w = res.get("warm")
    if w:
        t = [x["cpu_us_per_event"] for x in w["tenths"]]
        lines.append(f"warm (a second backlog on the state the first built): "
                     f"{w['measured']['events_per_s']:.0f} ev/s, "
                     f"{w['measured']['cpu_us_per_event']:.0f} us/event; CPU us/event per tenth "
                     f"{' '.join(f'{x:.0f}' for x in t)} (last/second {t[-1] / t[1]:.2f}); "
                     f"stage 2 at most {w['stage2_behind_max']} events behind")
    d = res.get("dense")
    if d:
        lines.append(f"dense replay: {d['events']} events, {d['items']} items: "
                     f"{d['ms_per_event']} ms/event; per tenth {d['ms_per_event_by_tenth']}")
    p = res.get("profile")
    for name, w in (p or {}).get("windows", {}).items():
        lines.append(f"profile {name} (events {w['from_event']}-{w['to_event']}, "
                     f"{w['cpu_us_per_event']:.0f} us/event, {w['samples']} samples), top self: "
                     + "; ".join(f"{f} {s}%" for f, s in w["self"][:6]))
    if p and p.get("growth"):
        lines.append("grew most (us/event early -> late, incl. callees): " + "; ".join(
            f"{f} {a:.0f}->{b:.0f}" for f, a, b in p["growth"][:8]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help=f"the full size: {FULL} (default {DEFAULT})")
    ap.add_argument("--items", type=int)
    ap.add_argument("--shoppers", type=int)
    ap.add_argument("--events", type=int)
    ap.add_argument("--dense-events", type=int, help="grocery log length (0: skip)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4", help="worker counts, comma-separated")
    ap.add_argument("--rate", type=float, default=1000.0, help="freshness: events/s")
    ap.add_argument("--seconds", type=float, default=25.0,
                    help="freshness: how long (0: skip); rate x seconds > 20,000 keeps backlog "
                    "events out of the worker's samples")
    ap.add_argument("--poll", type=float, default=0.5, help="progress polling interval, s")
    ap.add_argument("--profile", action="store_true",
                    help="an extra 1-worker pass under py-spy (with --warm: the warm pass)")
    ap.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    ap.add_argument("--skip-noop", action="store_true")
    ap.add_argument("--warm", action="store_true",
                    help="one more 1-worker pass: per tenth of a second backlog, on the "
                    "state the first built")
    ap.add_argument("--out", default=str(RESULTS / "scale.json"))
    # internal: the no-op agent subprocess
    ap.add_argument("--noop-agent", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    ap.add_argument("--topic", help=argparse.SUPPRESS)
    ap.add_argument("--app-id", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.noop_agent:
        noop_agent(args)
        return

    from cartwise.embedded import EmbeddedStack
    from cartwise.simulator import RealisticShop

    size = dict(FULL if args.full else DEFAULT)
    for k in size:
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    py_spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.profile and not Path(py_spy_bin).exists():
        sys.exit("--profile needs py-spy: .venv/bin/pip install py-spy")
    RESULTS.mkdir(exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    run = f"s{int(time.time()) % 100000}"
    shop = RealisticShop(seed=args.seed, items=size["items"], shoppers=size["shoppers"])
    res: dict[str, Any] = {"command": "python -m bench.scale " + " ".join(sys.argv[1:]),
                           "env": {k: v for k, v in sorted(os.environ.items())
                                   if k.startswith("CARTWISE_")},
                           "cores": os.cpu_count(), "partitions": args.partitions,
                           "shop": shop.describe(), "size": size}
    with EmbeddedStack() as stack:
        topics = settings_for(stack, f"{run}backlog", args.partitions)
        gap = shop.mean_gap_s
        # The backlog ends a minute ago: the live events that follow continue its event time.
        start_ts = time.time() - size["events"] * gap - 60
        ends, res["produce"] = produce_backlog(topics, shop, size["events"], start_ts)
        n = sum(e + 1 for e in ends.values())
        print(f"backlog: {n} events in {len(ends)} partitions, produced at "
              f"{res['produce']['events_per_s']} events/s ({res['produce']['seconds']} s)",
              flush=True)
        if not args.skip_noop:
            res["noop"] = run_noop(stack, topics.events_topic, n, f"{run}noop",
                                   logs / f"{run}noop.log")
            print(f"no-op: {res['noop']['events_per_s']:.0f} ev/s, "
                  f"{res['noop']['cpu_us_per_event']:.0f} us/event", flush=True)
        def fresh_args(k: int) -> dict | None:
            if k != 1 or args.seconds <= 0:
                return None
            # A quarter as many new shoppers per event as in the backlog: mostly returning.
            return {"shop": shop, "rate": args.rate, "seconds": args.seconds,
                    "known_shoppers": shop.shoppers,
                    "new_share": shop.shoppers / size["events"] / 4}

        res["workers"] = {}
        # The single worker goes last: its freshness phase adds live events to the topic,
        # which a later run would drain as well (more events than the backlog it is timed on).
        for k in sorted(counts, key=lambda k: (k == 1, -k)):
            d = run_workers(stack, topics, f"{run}w{k}", ends, k, logs, args.poll,
                            args.partitions, shop=shop, freshness=fresh_args(k))
            res["workers"][str(k)] = d
            print(f"{k} worker(s): {d['events_per_s']:.0f} ev/s, {d['cpu_us_per_event']:.0f} "
                  f"us/event; per tenth us/event "
                  f"{[t['cpu_us_per_event'] for t in d['tenths']]}", flush=True)
            if d.get("freshness"):
                print(f"  freshness: {d['freshness']}", flush=True)
        spy = {"py_spy": py_spy_bin, "rate": args.profile_rate, "windows": PROFILE_WINDOWS}
        if args.profile and not args.warm:
            d = run_workers(stack, topics, f"{run}prof", ends, 1, logs, args.poll,
                            args.partitions, shop=shop, freshness=fresh_args(1), profile=spy)
            prof = d.get("profile", {})
            res["profile"] = {"rate_hz": args.profile_rate, "windows": prof,
                              "freshness_under_profiler": d.get("freshness"),
                              "events_per_s_under_profiler": d["events_per_s"],
                              "tenths_us_per_event": [t["cpu_us_per_event"]
                                                      for t in d["tenths"]]}
            if "early" in prof and "late" in prof:
                res["profile"]["growth"] = growth(prof["early"], prof["late"])
        if args.warm:
            res["warm"] = warm_pass(stack, shop, size["events"], run, logs, args,
                                    spy if args.profile else None)
            m = res["warm"]["measured"]
            t = [x["cpu_us_per_event"] for x in res["warm"]["tenths"]]
            print(f"warm: {m['events_per_s']:.0f} ev/s, {m['cpu_us_per_event']:.0f} us/event "
                  f"over the second {m['events']} events; per tenth us/event {t}", flush=True)
    if size["dense_events"]:
        print("dense replay ...", flush=True)
        res["dense"] = dense_replay(size["dense_events"], args.seed, logs / "dense.jsonl")
    if "noop" in res:
        print(table(res))
    Path(args.out).write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
