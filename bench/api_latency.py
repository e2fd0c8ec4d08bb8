"""Lookup latency and throughput of the HTTP API, next to raw Redis GETs in the same run.

    make bench   # or: .venv/bin/python -m bench.api_latency --rounds 2 --processes 1,2

Setup: the embedded broker and Redis, a worker that turns simulated traffic into suggestion
lists (then stopped, so it takes no CPU during the measurement), and one `cartwise api`
process. The load generator is this process: minimal HTTP/1.1 and RESP clients on asyncio
over keep-alive loopback connections, the same code path for both targets.

1. Latency at a fixed rate (open loop, `--rate` requests/s over `--connections`
   connections): latency runs from the moment a request was *due*, so a stalled server is
   charged for the queue it causes (no coordinated omission). Targets, alternating each round:
   item suggestions, shopper suggestions, and a raw Redis GET of the same item documents.
   Next to the default API a second one runs with `CARTWISE_SERVED_TTL_S=0` (no served
   record, docs/experiments.md): the `*_noserved` arms show what keeping the re-ranker's
   features costs. The `*_rules` arms run with every business rule on, `*_experiment` with
   every shopper in a two-variant experiment.
2. Scale-out (`--processes 1,2`): raw Redis GET, then each count alone on the machine as
   `cartwise api --workers N` (the APIs of part 1 stopped): throughput (closed loop: as many
   item lookups as the connections complete in `--seconds`), then open loops at `--rate` and
   at `--high-rate` (near one process's saturation). Each arm also reports the CPU
   microseconds per lookup of the API processes, Redis and the load generator (this process's
   event-loop thread), read from /proc, how the API's CPU and connections spread over its
   processes, and the cores anything else kept busy (`others_cores`). With a core each for
   the processes, the generator and Redis, lookups/s grows with N; on fewer cores they share
   them, so CPU per lookup is the figure that carries over to sizing (1e6 /
   `api_us_per_lookup` = lookups/s per API core).

Results are printed and written to bench/results/api_latency.json, with the cores and load
average the run saw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import orjson
import redis

from api.auth import new_key
from bench.procstat import CpuMeter, connections, group_pids
from cartwise import harness
from cartwise.embedded import EmbeddedStack, free_port
from cartwise.settings import Settings
from cartwise.simulator import Shop
from streams.store import Keys
from streams.topics import ensure_topics

RESULTS = Path(__file__).parent / "results"


class HttpConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 key: str, port: int) -> None:
        self.r, self.w, self.key, self.port = reader, writer, key, port

    async def call(self, target: str) -> int:
        try:
            return await self.request(target)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            # The API closed it after its keep-alive timeout (65 s) while other arms ran
            # long: reconnect, as a client would.
            self.r, self.w = await asyncio.open_connection("127.0.0.1", self.port)
            return await self.request(target)

    async def request(self, target: str) -> int:
        self.w.write(f"GET {target} HTTP/1.1\r\nHost: bench\r\nX-API-Key: {self.key}\r\n\r\n"
                     .encode())
        head = await self.r.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.r.readexactly(length)
        return status


class RespConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    async def call(self, key: str) -> int:
        k = key.encode()
        self.w.write(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k))
        line = await self.r.readline()
        n = int(line[1:])
        if n >= 0:
            await self.r.readexactly(n + 2)
        return 200 if n >= 0 else 404


async def connect(kind: str, port: int, key: str, n: int) -> list:
    """Open `n` connections. Each HTTP one makes a request at once: the API closes a new
    connection that sends nothing within its header timeout (10 s) while other arms run."""
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conns.append(HttpConn(reader, writer, key, port) if kind == "http"
                     else RespConn(reader, writer))
        if kind == "http":
            await conns[-1].call("/health")
    return conns


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def open_loop(conns: list, targets: list[str], rate: float, seconds: float) -> dict:
    """Requests due every 1/rate s; latency from due time to the last byte of the answer."""
    queue: asyncio.Queue = asyncio.Queue()
    lat: list[float] = []
    errors = 0
    n_total = int(rate * seconds)

    async def run(conn: object) -> None:
        nonlocal errors
        while True:
            item = await queue.get()
            if item is None:
                return
            due, target = item
            status = await conn.call(target)
            lat.append(time.perf_counter() - due)
            errors += status >= 400

    workers = [asyncio.create_task(run(c)) for c in conns]
    start = time.perf_counter() + 0.05
    for i in range(n_total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, targets[i % len(targets)]))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    return {"requests": len(lat), "errors": errors, "achieved_rps": len(lat) / elapsed,
            "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
            "p999_ms": pct(lat, 0.999) * 1000, "mean_ms": statistics.fmean(lat) * 1000}


async def closed_loop(conns: list, targets: list[str], seconds: float) -> dict:
    done = 0
    stop = time.perf_counter() + seconds

    async def run(conn: object, offset: int) -> None:
        nonlocal done
        i = offset
        while time.perf_counter() < stop:
            await conn.call(targets[i % len(targets)])
            i += 1
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(run(c, n * 7) for n, c in enumerate(conns)))
    return {"requests": done, "rps": done / (time.perf_counter() - t0)}


async def measure_alone(args: argparse.Namespace, opening: Awaitable[list], targets: list[str],
                        meter: CpuMeter, label: str) -> dict:
    """Closed loop, then open loops at `--rate` and `--high-rate`, each with its CPU costs."""
    conns = await opening
    # Warm-up: every target once, so each API process has its catalog and trending copies.
    await open_loop(conns, targets, args.rate, len(targets) / args.rate)
    meter.start()
    row = await closed_loop(conns, targets, args.seconds)
    out = {"closed_loop": row | meter.stop(row["requests"])}
    print(f"{label:12s} closed loop {row['rps']:.0f} lookups/s", flush=True)
    for rate in (args.rate, args.high_rate):
        meter.start()
        row = await open_loop(conns, targets, rate, args.seconds)
        out[f"open_{rate:.0f}"] = row | meter.stop(row["requests"])
        print(f"{label:12s} at {rate:.0f}/s p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} "
              f"ms  p99.9 {row['p999_ms']:.2f} ms ({row['achieved_rps']:.0f}/s)", flush=True)
    for c in conns:
        c.w.close()
    return out


def start_api_processes(settings: Settings, n: int, log_path: Path) -> subprocess.Popen:
    """`cartwise api --workers n` in its own process group, so its CPU can be read."""
    log = open(log_path, "ab")  # noqa: SIM115 - the process owns it
    argv = [sys.executable, "-m", "cartwise", "api", "--workers", str(n)]
    return subprocess.Popen(argv, env=harness.worker_env(settings), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


async def connect_spread(port: int, key: str, n: int, pgid: int, processes: int) -> list:
    """Connections opened a little apart, as clients arrive, until every process holds some.

    One asyncio loop accepts everything queued when it wakes, so connections opened at once
    (or before a process listens) can all land on one process.
    """
    for _ in range(10):
        conns = []
        for _ in range(n):
            conns += await connect("http", port, key, 1)
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        held = [c for c in connections(group_pids(pgid), port).values() if c]
        if len(held) >= processes:
            return conns
        for c in conns:
            c.w.close()
        await asyncio.sleep(1.0)
    raise RuntimeError(f"connections reached only {len(held)} of {processes} API processes "
                       "(see bench/results/logs/api-*p.log)")


def scale_out(args: argparse.Namespace, settings: Settings, shop: Shop, key: str,
              redis_port: int, log_dir: Path) -> dict:
    """Raw Redis GET, then the API with each process count alone on the machine."""
    redis_pid = int(redis.Redis(port=redis_port).info("server")["process_id"])
    item_targets, _, redis_targets = make_targets(args, settings, shop)
    opening = connect("resp", redis_port, "", args.connections)
    out = {"redis_get": asyncio.run(measure_alone(args, opening, redis_targets,
                                                  CpuMeter(redis_pid), "Redis GET"))}
    for n in args.processes:
        settings_n = replace(settings, api_port=free_port())
        proc = start_api_processes(settings_n, n, log_dir / f"api-{n}p.log")
        try:
            harness.wait_http(f"http://127.0.0.1:{settings_n.api_port}/ready", proc)
            port = settings_n.api_port
            opening = connect_spread(port, key, args.connections, proc.pid, n)
            out[str(n)] = asyncio.run(measure_alone(
                args, opening, item_targets, CpuMeter(redis_pid, proc.pid, port),
                f"{n} process{'es' if n > 1 else ''}"))
        finally:
            harness.stop_worker(proc)
    return out


def prepare(stack: EmbeddedStack, users: int, log_dir: Path
            ) -> tuple[Settings, Settings, Shop, str, list]:
    key, entry = new_key("read")
    settings = Settings(broker=stack.broker, redis_url=stack.redis_url, prefix="bench:",
                        app_id="bench-api", events_topic="bench-api.events",
                        catalog_topic="bench-api.catalog", dlq_topic="bench-api.dlq",
                        session_timeout_s=6.0, rebalance_timeout_s=6.0,
                        heartbeat_interval_s=1.0, api_port=free_port(), api_keys=entry,
                        rate_read=1e9)
    ensure_topics(settings)
    shop = Shop(seed=11)
    events = list(shop.events(users, start_ts=time.time() - 86_400))
    ends = harness.produce(settings, events, shop.catalog)
    worker = harness.start_worker(settings, log_dir / "worker.log", "bench")
    try:
        harness.wait_complete(settings, ends, timeout=600, procs=[worker])
    finally:
        harness.stop_worker(worker)
    api = harness.start_api(settings, log_dir / "api.log")
    quiet = replace(settings, api_port=free_port(), served_ttl_s=0.0)
    api2 = harness.start_api(quiet, log_dir / "api-noserved.log")
    harness.wait_http(f"http://127.0.0.1:{settings.api_port}/ready", api)
    harness.wait_http(f"http://127.0.0.1:{quiet.api_port}/ready", api2)
    return settings, quiet, shop, key, [api, api2]


def bench_rules(shop: Shop, users: list[str]) -> dict:
    """A rules document with every rule in use, at a realistic size."""
    items = [c["item_id"] for c in shop.catalog]
    return {"block": items[::17], "exclude_categories": ["garden"],
            "pins": {i: items[n + 1: n + 3] for n, i in enumerate(items[:-3:5])},
            "boost": {"items": items[-5:], "slots": 1}, "frequency_cap": 1000,
            "price_ladder": {"steps": [{"min_orders": 1, "order": "price_ascending"},
                                       {"min_orders": 3, "order": "score"}],
                             "budget_quadrants": ["general_to_develop"]}}


def report(r: int, name: str, row: dict) -> None:
    print(f"round {r + 1} {name:15s} p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
          f"({row['achieved_rps']:.0f} req/s, {row['errors']} errors)", flush=True)


EXPERIMENT = {"bench": {"variants": [{"name": "plain", "settings": {"ranking": "plain"}},
                                     {"name": "auto", "settings": {"ranking": "auto"}}]}}


def make_targets(args: argparse.Namespace, settings: Settings, shop: Shop
                 ) -> tuple[list[str], list[str], list[str]]:
    """Item and shopper routes, and the Redis keys of the same item documents (seeded)."""
    rng = random.Random(1)
    items = [c["item_id"] for c in shop.catalog]
    users = [f"u-{u:05d}" for u in range(args.users)]
    item_targets = [f"/v1/items/{rng.choice(items)}/suggestions?k=10" for _ in range(5000)]
    user_targets = [f"/v1/users/{rng.choice(users)}/suggestions?k=10" for _ in range(5000)]
    keys = Keys(settings.prefix)
    return item_targets, user_targets, [keys.item(t.split("/")[3]) for t in item_targets]


async def measure(args: argparse.Namespace, settings: Settings, quiet: Settings, shop: Shop,
                  key: str, redis_port: int) -> dict:
    users = [f"u-{u:05d}" for u in range(args.users)]
    keys = Keys(settings.prefix)
    item_targets, user_targets, redis_targets = make_targets(args, settings, shop)
    http = await connect("http", settings.api_port, key, args.connections)
    http2 = await connect("http", quiet.api_port, key, args.connections)
    resp = await connect("resp", redis_port, "", args.connections)
    arms = {"api_item": (http, item_targets), "api_user": (http, user_targets),
            "api_item_noserved": (http2, item_targets), "api_user_noserved": (http2, user_targets),
            "redis_get": (resp, redis_targets)}
    # Warm-up: connections, the API's catalog and trending copies (every target once), the
    # interpreter's first calls. Steady state is what a storefront sees.
    for conns, targets in arms.values():
        await open_loop(conns, targets, args.rate, len(targets) / args.rate)
    store = redis.Redis(port=redis_port)
    rules = orjson.dumps(bench_rules(shop, users))
    rounds: list[dict] = []
    for r in range(args.rounds):
        row = {}
        for name, (conns, targets) in arms.items():
            row[name] = await open_loop(conns, targets, args.rate, args.seconds)
            report(r, name, row[name])
        # The same lookups with merchant rules in force (docs/rules.md): every rule on, so
        # this is the most a rules document can cost.
        store.set(keys.rules, rules)
        await asyncio.sleep(1.5)  # API processes re-read the rules every half second
        for name in ("api_item", "api_user"):
            conns, targets = arms[name]
            row[f"{name}_rules"] = await open_loop(conns, targets, args.rate, args.seconds)
            report(r, f"{name}_rules", row[f"{name}_rules"])
        store.delete(keys.rules)
        store.set(keys.experiments, orjson.dumps(EXPERIMENT))
        await asyncio.sleep(1.5)
        conns, targets = arms["api_user"]
        row["api_user_experiment"] = await open_loop(conns, targets, args.rate, args.seconds)
        report(r, "api_user_experiment", row["api_user_experiment"])
        store.delete(keys.experiments)
        await asyncio.sleep(1.5)
        rounds.append(row)
    for c in (*http, *http2, *resp):
        c.w.close()
    return {"rounds": rounds}


ARMS = ("api_item", "api_user", "api_item_noserved", "api_user_noserved", "api_item_rules",
        "api_user_rules", "api_user_experiment")


def summarise(result: dict, args: argparse.Namespace) -> dict:
    rounds = result["rounds"]

    def med(arm: str, f: str) -> float:
        return statistics.median(r[arm][f] for r in rounds)

    out: dict = {}
    for arm in ARMS if rounds else ():
        out[arm] = {
            "p50_ms": med(arm, "p50_ms"), "p99_ms": med(arm, "p99_ms"),
            "p99_minus_redis_p99_ms": statistics.median(
                r[arm]["p99_ms"] - r["redis_get"]["p99_ms"] for r in rounds),
        }
    if rounds:
        out["redis_get"] = {"p50_ms": med("redis_get", "p50_ms"),
                            "p99_ms": med("redis_get", "p99_ms")}
    scale = {}
    for name, arms in result["scale_out"].items():
        closed = arms["closed_loop"]
        row = {"lookups_per_s": closed["rps"]}
        for rate in (args.rate, args.high_rate):
            arm = arms[f"open_{rate:.0f}"]
            row |= {f"p{q}_ms_at_{rate:.0f}": arm[f"p{q}_ms"] for q in (50, 99, 999)}
        for part in ("api", "redis", "generator"):
            if f"{part}_us_per_lookup" in closed:
                row[f"{part}_us_per_lookup"] = closed[f"{part}_us_per_lookup"]
        if "api_us_per_lookup" in closed:
            row["lookups_per_s_per_api_core"] = 1e6 / closed["api_us_per_lookup"]
            row["api_cores_by_process"] = closed["api_cores_by_process"]
        row["others_cores"] = closed["others_cores"]
        scale[name] = row
    first = str(args.processes[0])
    for n in args.processes[1:]:
        scale[f"speedup_{n}_over_{first}"] = (scale[str(n)]["lookups_per_s"]
                                             / scale[first]["lookups_per_s"])
    out["scale_out"] = scale
    out["throughput_ratio_api_to_redis"] = (scale[first]["lookups_per_s"]
                                            / scale["redis_get"]["lookups_per_s"])
    return out


def process_counts(text: str) -> list[int]:
    try:
        counts = [int(n) for n in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2, got {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--high-rate", type=float, default=1750.0,
                        help="the second open-loop rate of the scale-out arms, near saturation")
    parser.add_argument("--processes", type=process_counts, default=[1, 2],
                        help="API process counts to compare, e.g. 1,2 (the default)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--users", type=int, default=2000)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    log_dir = RESULTS / "logs"
    log_dir.mkdir(exist_ok=True)
    machine = {"cores": os.cpu_count(), "loadavg_before": os.getloadavg(),
               "note": "the load generator (one asyncio thread) and Redis run on the same "
                       "cores as the API: see *_us_per_lookup for what each part costs"}
    with EmbeddedStack(workdir=log_dir / "stack") as stack:
        settings, quiet, shop, key, procs = prepare(stack, args.users, log_dir)
        redis_port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
        try:  # --rounds 0: the scale-out part alone
            result = (asyncio.run(measure(args, settings, quiet, shop, key, redis_port))
                      if args.rounds else {"rounds": []})
        finally:
            for p in procs:
                harness.stop_worker(p)
        result["scale_out"] = scale_out(args, settings, shop, key, redis_port, log_dir)
    machine["loadavg_after"] = os.getloadavg()
    result["summary"] = summarise(result, args)
    result["params"] = vars(args)
    result["machine"] = machine
    (RESULTS / "api_latency.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    s = result["summary"]
    print("\nmedian over rounds at", args.rate, "req/s:")
    for arm in (*ARMS, "redis_get") if args.rounds else ():
        extra = (f", p99 - Redis p99 {s[arm]['p99_minus_redis_p99_ms']:.2f} ms"
                 if arm != "redis_get" else "")
        print(f"  {arm:20s} p50 {s[arm]['p50_ms']:.2f} ms  p99 {s[arm]['p99_ms']:.2f} ms{extra}")
    print(f"  closed-loop throughput API / Redis: {s['throughput_ratio_api_to_redis']:.2f}")
    for name, row in s["scale_out"].items():
        if name.startswith("speedup"):
            print(f"  {name}: {row:.2f}x lookups/s (on {machine['cores']} cores)")
    print(f"  load average before/after: {machine['loadavg_before']} / "
          f"{machine['loadavg_after']}")


if __name__ == "__main__":
    main()
