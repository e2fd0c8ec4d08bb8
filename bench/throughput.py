"""Throughput, freshness and memory of one worker on the embedded broker and Redis.

    make bench            # or: .venv/bin/python -m bench.throughput --events 60000
    .venv/bin/python -m bench.throughput --broker tansu,kafka   # both brokers, one run

1. Throughput: a backlog of simulated shop events is produced once. A no-op Faust agent
   (the baseline) and the cartwise worker (both stages, Redis checkpoints, suggestion lists)
   each consume all of it, alternating, `--rounds` times. Reported: events/s of each and the
   ratio worker / no-op (the figure that means something on a shared, noisy machine).
2. Freshness: a fresh worker gets a steady `--rate` events/s for `--seconds`; reported are the
   p50/p99 seconds from an event's broker timestamp to the shopper's list and to the item
   lists being written in Redis.
3. Memory: peak RSS (VmHWM) of each process, worker next to the no-op agent.

Results are printed and written to bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import orjson
import redis

from cartwise.embedded import EmbeddedStack
from cartwise.harness import produce, progress, start_worker, stop_worker
from cartwise.producer import EventProducer
from cartwise.redisconn import connect
from cartwise.settings import Settings
from cartwise.simulator import Shop
from streams.store import Keys
from streams.topics import ensure_topics

RESULTS = Path(__file__).parent / "results"


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process; NaN once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def await_result(proc: subprocess.Popen, redis_url: str, key: str, log: Path,
                 timeout: float, poll: float) -> tuple[bytes, float]:
    """Wait for a no-op agent subprocess to publish its result under `key`, then stop it.

    Returns the result and the agent's peak RSS in MB.
    """
    r = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while (raw := r.get(key)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no-op agent failed; see {log}")
            time.sleep(poll)
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    return raw, rss


def settings_for(stack: EmbeddedStack, name: str, topics: Settings | None = None,
                 **overrides: object) -> Settings:
    s = Settings(**overrides,broker=stack.broker, redis_url=stack.redis_url, prefix=f"{name}:",
                 app_id=name, session_timeout_s=6.0, rebalance_timeout_s=6.0,
                 heartbeat_interval_s=1.0,
                 events_topic=topics.events_topic if topics else f"{name}.events",
                 catalog_topic=topics.catalog_topic if topics else f"{name}.catalog",
                 dlq_topic=f"{name}.dlq")
    ensure_topics(s)
    return s


def run_noop(stack: EmbeddedStack, topic: str, n: int, name: str, log: Path,
             mode: str = "iterate") -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.noop", "--broker", stack.broker, "--redis-url",
         stack.redis_url, "--topic", topic, "--app-id", name, "--n", str(n), "--mode", mode],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
    raw, rss = await_result(proc, stack.redis_url, f"bench:{name}", log, 600, 0.05)
    d = orjson.loads(raw)
    return {"events_per_s": (d["n"] - 1) / (d["last"] - d["first"]), "peak_rss_mb": rss,
            "cpu_us_per_event": 1e6 * d["cpu_s"] / d["n"]}


def run_worker(settings: Settings, ends: dict[int, int], n: int, log: Path) -> dict:
    proc = start_worker(settings, log, settings.app_id)
    r = connect(settings)
    try:
        deadline = time.monotonic() + 600
        while True:
            pr = progress(r, settings)
            done = all(pr["context"][p] == e for p, e in ends.items()) and all(
                all(h.get(p, -1) == e for p, e in ends.items()) for h in pr["hwm"])
            if done:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker failed; see {log}")
            time.sleep(0.5)  # slow polling: the bench must not compete for the CPU
        time.sleep(1.5)  # let the stats timer publish the last batch's times
        # From the first batch to the last batch applied, as the worker saw them: neither
        # the polling interval nor the checkpoint interval adds to the measured time.
        stats = [orjson.loads(r.get(k)) for k in r.scan_iter(Keys(settings.prefix).stats_pattern)]
        first = min(s["first_batch_at"] for s in stats if s["first_batch_at"])
        cpu_first = min(s["first_batch_cpu"] for s in stats if s["first_batch_at"])
        t_done = max(s["last_batch_at"] for s in stats if s["last_batch_at"])
        cpu_done = max(s["last_batch_cpu"] for s in stats if s["last_batch_at"])
        rss = peak_rss_mb(proc.pid)
    finally:
        stop_worker(proc)
    seconds: dict[str, float] = {}
    for st in stats:
        for k, v in st["seconds"].items():
            seconds[k] = round(seconds.get(k, 0.0) + v, 3)
    return {"events_per_s": n / (t_done - first), "peak_rss_mb": rss,
            "cpu_us_per_event": 1e6 * (cpu_done - cpu_first) / n,
            "wall_s": round(t_done - first, 3), "step_seconds": seconds}


def freshness(stack: EmbeddedStack, rate: float, seconds: float, log: Path,
              **overrides: object) -> dict:
    settings = settings_for(stack, f"fresh{int(time.time())}", **overrides)
    shop = Shop(seed=5)
    produce(settings, [], shop.catalog)
    proc = start_worker(settings, log, "fresh")
    r = connect(settings)
    try:
        # Warm up until the worker has joined and written something.
        with EventProducer(settings.bootstrap, settings.events_topic) as p:
            events = shop.events(1_000_000, start_ts=time.time(), mean_gap_s=0.0)
            keys = Keys(settings.prefix)
            offsets = [keys.offset("context", q) for q in range(settings.partitions)]
            while not any(r.get(key) for key in offsets):
                ev = next(events)
                ev["ts"] = time.time()
                p.send(ev)
                p.flush()
                time.sleep(0.1)
            start = time.time()
            sent = 0
            while (now := time.time()) - start < seconds:
                ahead = start + sent / rate - now
                if ahead > 0:
                    time.sleep(ahead)
                ev = next(events)
                ev["ts"] = time.time()
                p.send(ev)
                sent += 1
            p.flush()
        time.sleep(3)
        stats = [orjson.loads(r.get(k)) for k in r.scan_iter(Keys(settings.prefix).stats_pattern)]
        rss = peak_rss_mb(proc.pid)
    finally:
        stop_worker(proc)
    fresh = stats[0]["freshness_s"]
    return {"rate": rate, "seconds": seconds, "sent": sent, "achieved_rate": sent / seconds,
            "user_p50_ms": fresh["user"]["p50"] * 1000, "user_p99_ms": fresh["user"]["p99"] * 1000,
            "item_p50_ms": fresh["item"]["p50"] * 1000, "item_p99_ms": fresh["item"]["p99"] * 1000,
            "samples": fresh["user"]["n"], "peak_rss_mb": rss}


def measure(broker: str, args: argparse.Namespace, logs: Path) -> dict:
    """The whole measurement on one broker: its own stack, backlog, rounds and freshness."""
    with EmbeddedStack(broker_kind=broker) as stack:
        topics = settings_for(stack, "backlog")
        shop = Shop(seed=1)
        events = []
        gen = shop.events(10**7, start_ts=1_750_000_000.0)
        while len(events) < args.events:
            events.append(next(gen))
        t = time.time()
        ends = produce(topics, events, shop.catalog)
        produce_s = time.time() - t
        n = sum(e + 1 for e in ends.values())
        print(f"[{broker}] backlog: {n} events in {len(ends)} partitions "
              f"(produced in {produce_s:.1f}s)")
        rounds = []
        for i in range(args.rounds):
            noop = run_noop(stack, topics.events_topic, n, f"noop{i}",
                            logs / f"{broker}-noop{i}.log")
            work = run_worker(settings_for(stack, f"worker{i}", topics), ends, n,
                              logs / f"{broker}-worker{i}.log")
            ratio = work["events_per_s"] / noop["events_per_s"]
            cpu_ratio = noop["cpu_us_per_event"] / work["cpu_us_per_event"]
            rounds.append({"noop": noop, "worker": work, "ratio": ratio, "cpu_ratio": cpu_ratio})
            print(f"[{broker}] round {i}: no-op {noop['events_per_s']:.0f} ev/s, worker "
                  f"{work['events_per_s']:.0f} ev/s, ratio {ratio:.2f}; CPU per event no-op "
                  f"{noop['cpu_us_per_event']:.0f} us, worker {work['cpu_us_per_event']:.0f} us "
                  f"(ratio {cpu_ratio:.2f}); peak RSS no-op "
                  f"{noop['peak_rss_mb']:.0f} MB, worker {work['peak_rss_mb']:.0f} MB")
            print(f"  worker wall {work['wall_s']}s, time by step: {work['step_seconds']}")
        fresh = freshness(stack, args.rate, args.seconds, logs / f"{broker}-fresh.log")
        print(f"[{broker}] freshness at {fresh['achieved_rate']:.0f} ev/s: shopper list p50 "
              f"{fresh['user_p50_ms']:.0f} ms p99 {fresh['user_p99_ms']:.0f} ms; item lists "
              f"p50 {fresh['item_p50_ms']:.0f} ms p99 {fresh['item_p99_ms']:.0f} ms "
              f"({fresh['samples']} samples); worker peak RSS {fresh['peak_rss_mb']:.0f} MB")
    result = {
        "broker": broker, "events": n, "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds) if rounds else None,
        "cpu_ratio_median": statistics.median(r["cpu_ratio"] for r in rounds) if rounds else None,
        "freshness": fresh,
    }
    if rounds:
        print(f"[{broker}] median ratio worker / no-op: events/s {result['ratio_median']:.2f}, "
              f"CPU per event {result['cpu_ratio_median']:.2f}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--broker", default="tansu",
                    help="tansu, kafka or tansu,kafka (each measured in turn, same run)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    logs = RESULTS / "logs"
    logs.mkdir(exist_ok=True)
    brokers = [b.strip() for b in args.broker.split(",") if b.strip()]
    results = [measure(b, args, logs) for b in brokers]
    # The first broker's figures at the top level, as before; every broker's under by_broker.
    out = dict(results[0])
    out["by_broker"] = {r["broker"]: r for r in results}
    out["command"] = "python -m bench.throughput " + " ".join(sys.argv[1:])
    (RESULTS / "throughput.json").write_bytes(orjson.dumps(out, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
