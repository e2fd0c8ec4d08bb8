"""Chaos soak: workers SIGKILLed and restarted under load, compared with an uninterrupted run.

    .venv/bin/python -m bench.chaos --seeds 5 --kills 10 --events 30000

The claim under attack (docs/architecture.md): a killed worker resumes with exactly the state
of an uninterrupted run, N workers equal one, nothing is skipped. Per seed:

1. Simulated shop events (`cartwise.simulator.Shop(seed)`, some invalid records and
   duplicates) are generated up front. The catalog and the first part (the backlog) are
   produced to fresh topics.
2. Chaos run: `--workers` workers share the `--partitions` partitions. A seeded schedule
   (`random.Random(seed)`) SIGKILLs a random live worker after a random gap and restarts it
   after a random short pause, `--kills` times, starting once the workers are mid-backlog. A
   producer thread adds the rest of the events (the live part) in small chunks meanwhile.
3. Once every produced event has gone through (read from the checkpoints in Redis,
   `harness.wait_complete`), one uninterrupted worker (its own consumer group and Redis
   prefix) reads the same topics from the start: the reference.
4. Everything is compared (`harness.full_snapshot`, `harness.state_diff`): item lists,
   shopper lists and contexts exactly; item rows, every partition's item totals, the
   checkpoint meta and the trending sets to a relative 1e-9. Per-category trending entries
   are reported but do not fail a seed (`TIMING_DEPENDENT`: they differ between two
   uninterrupted runs too). A chaos run not complete `--timeout` s after the last kill is
   reported stuck (some evidence never arrives) and compared as it stands. An item list that
   differs only in the last rounded digit of some numbers (`ORDER_DEPENDENT`, below) is
   reported apart and does not fail a seed either.

A seed fixes the events and the kill schedule (victims, gaps, pauses), not where the kills
land relative to the workers' batches: the same seed can pass once and fail the next time.
A summary table is printed and written to bench/results/chaos.json; worker logs go to
bench/results/logs/chaos/. The scenario (`run_seed`) is shared with tests/test_chaos.py.
"""

from __future__ import annotations

import argparse
import math
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import orjson
from kafka.partitioner.default import murmur2

from cartwise.harness import (
    diff_counts,
    full_snapshot,
    produce,
    progress,
    run_settings,
    start_worker,
    state_diff,
    stop_worker,
    wait_complete,
    worker_counters,
)
from cartwise.redisconn import Client, connect
from cartwise.settings import Settings
from cartwise.simulator import Shop
from models.config import ModelConfig
from streams.topics import ensure_topics

RESULTS = Path(__file__).parent / "results"
START = 1_760_000_000.0

# (settings, name) -> a started worker process; the caller owns cleanup of what it started.
Starter = Callable[[Settings, str], subprocess.Popen]


@dataclass
class ChaosConfig:
    seed: int
    events: int = 20_000  # records in all, backlog and live, invalid ones and duplicates too
    workers: int = 3
    kills: int = 10
    live_fraction: float = 0.5  # of the events produced during the kills, not before
    live_chunks: int = 60
    # The first kill lands once a seeded share (drawn from this range) of the backlog is
    # checkpointed: mid-backlog, while batches are buffered. Later kills follow seeded gaps.
    first_kill_at: tuple[float, float] = (0.1, 0.6)
    gap_s: tuple[float, float] = (0.5, 3.0)  # between a restart and the next kill
    pause_s: tuple[float, float] = (0.05, 1.0)  # a killed worker stays down this long
    bad_rate: float = 0.002
    dup_rate: float = 0.01
    timeout_s: float = 240.0  # for each run to complete after the last kill
    # Settings for the chaos run's workers (the reference keeps the defaults), e.g.
    # {"checkpoint_interval_s": 2.0}: the claim holds for any configuration.
    overrides: dict[str, Any] = field(default_factory=dict)
    # A folder to write both runs' snapshots to (seed<N>-chaos.json, seed<N>-reference.json),
    # to see how differing keys differ; None writes nothing.
    dump: Path | None = None


@dataclass
class ChaosResult:
    seed: int
    workers: int
    partitions: int
    kills: int
    events: int
    backlog: int
    live: int
    complete: bool
    kill_log: list[dict[str, Any]] = field(default_factory=list)
    # Keys differing from the reference, per kind of state (harness.state_diff).
    mismatches: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    # Event ids in the reference's contexts (each keeps its newest ids) missing from the chaos
    # run's: a lower bound on the events skipped. And differing contexts per events partition.
    lost_event_ids: int = 0
    contexts_by_partition: dict[int, int] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # RECOVERY_COUNTERS of the chaos run
    chaos_s: float = 0.0
    reference_s: float = 0.0
    error: str | None = None
    broker: str = "tansu"

    @property
    def ok(self) -> bool:
        return self.complete and self.error is None and not any(
            n for kind, n in self.mismatches.items() if kind not in NOT_HELD)


# Differs between two *uninterrupted* runs too, so it is reported, not held against the claim:
# an item's per-category trending entry needs the catalog, and an item whose last change was
# scored before the catalog reached Redis stays in the shop-wide set only (streams/graph_stage.py
# `_trending`; the catalog is read through a cache of `lists_interval_s * 25`).
TIMING_DEPENDENT = ("trending_by_category",)

# An item list's numbers are rounded (`score_digits` significant digits, G² to 4 decimals) from
# counts that are float sums in arrival order: two runs hold them equal to a relative 1e-9
# only (harness.CLOSE_KINDS; the reference's own totals differ from the library's in the last
# bits). Rounding makes lists equal except where a value lies within that noise of a rounding
# midpoint: there it rounds up in one run and down in the other. Seed 21: the lift of the pair
# gar-000/lap-009 is 3.990007445 +- 1e-14 (total view count 555327.8195380325 in the chaos
# run, ...0346 in the reference, ...0344 in the library), shown as 3.99000744 in one and
# 3.99000745 in the other, in both items' lists. Such a list (same items, same order, every
# other field equal, numbers at most one unit of their last rounded digit apart) is moved from
# "items" to this kind: reported, not held against the claim. Anything more still fails.
LAST_DIGIT = "items_last_digit"
ORDER_DEPENDENT = (LAST_DIGIT,)
NOT_HELD = (*TIMING_DEPENDENT, *ORDER_DEPENDENT)


def last_digit_apart(a: Any, b: Any, digits: int, key: str | None = None) -> bool:
    """Whether two list documents are equal but for numbers at most one unit of their last
    rounded digit apart (`digits` significant digits; "llr" to 4 decimals, models/itemlists.py):
    same keys, same entries in the same order, every string and flag equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(last_digit_apart(a[k], b[k], digits, k) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(last_digit_apart(x, y, digits, key)
                                        for x, y in zip(a, b, strict=True))
    if (isinstance(a, float) and isinstance(b, float) and a != b
            and math.isfinite(a) and math.isfinite(b) and a * b > 0):
        # The smaller's unit: 9.99999999 and 10.0000000 are one unit of the former apart.
        small = min(abs(a), abs(b))
        unit = 1e-4 if key == "llr" else 10.0 ** (math.floor(math.log10(small)) - digits + 1)
        return abs(a - b) <= unit * (1 + 1e-6)
    return type(a) is type(b) and a == b


def last_digit_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two documents `last_digit_apart` differ: "path: a != b" for each number."""
    if isinstance(a, dict):
        return [p for k in a for p in last_digit_paths(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list):
        return [p for n, (x, y) in enumerate(zip(a, b, strict=True))
                for p in last_digit_paths(x, y, f"{path}[{n}]")]
    return [] if a == b else [f"{path.lstrip('.')}: {a!r} != {b!r}"]


def split_last_digit(diff: dict[str, dict[str, list[str]]], got: dict[str, Any],
                     want: dict[str, Any], digits: int) -> dict[str, list[str]]:
    """Move the item lists that are `last_digit_apart` from diff["items"]["differ"] to
    diff[LAST_DIGIT]; returns, per moved key, where its numbers differ (chaos != reference)."""
    moved = {k: last_digit_paths(got[k], want[k])
             for k in diff["items"]["differ"] if last_digit_apart(got[k], want[k], digits)}
    diff["items"]["differ"] = [k for k in diff["items"]["differ"] if k not in moved]
    diff[LAST_DIGIT] = {"differ": sorted(moved)}
    return moved


def make_events(seed: int, n: int, bad_rate: float, dup_rate: float) -> tuple[Shop, list]:
    shop = Shop(seed=seed)
    gen = shop.events(10**7, start_ts=START, bad_rate=bad_rate, dup_rate=dup_rate)
    return shop, [next(gen) for _ in range(n)]


def merge_ends(*parts: dict[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for ends in parts:
        for p, o in ends.items():
            out[p] = max(out.get(p, -1), o)
    return out


def checkpointed(r: Client, settings: Settings) -> int:
    """Events covered by the context stage's checkpoints."""
    return sum(o + 1 for o in progress(r, settings)["context"])


# Worker counters that show the recovery paths at work (streams/stage.py), summed over every
# worker process of a run (a killed one counts up to its last published stats).
RECOVERY_COUNTERS = ("checkpoint_conflicts", "stale_records", "gap_refetches", "gaps_accepted",
                     "stalls_found", "checkpoint_failures", "errors")


def recovery_counters(settings: Settings) -> dict[str, int]:
    return {name: v for name, v in sorted(worker_counters(settings).items())
            if name.rpartition(".")[2] in RECOVERY_COUNTERS}


class LiveTraffic(threading.Thread):
    """Produces `events` in `chunks` pieces, one every `every_s`; records the end offsets."""

    def __init__(self, settings: Settings, events: list, chunks: int, every_s: float) -> None:
        super().__init__(daemon=True, name="live-traffic")
        self.settings, self.events, self.every_s = settings, events, every_s
        size = max(1, -(-len(events) // max(1, chunks)))
        self.chunks = [events[i:i + size] for i in range(0, len(events), size)]
        self.ends: dict[int, int] = {}
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.chunks:
                self.ends = merge_ends(self.ends, produce(self.settings, chunk))
                self.sent += len(chunk)
                time.sleep(self.every_s)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc


def run_seed(cfg: ChaosConfig, make: Callable[..., Settings], start: Starter,
             log: Callable[[str], None] = print) -> ChaosResult:
    """One seed of the scenario. `make(name, topics_from=None)` returns fresh Settings (own
    topics, consumer group and prefix); `start(settings, name)` starts a worker."""
    rng = random.Random(cfg.seed)
    shop, events = make_events(cfg.seed, cfg.events, cfg.bad_rate, cfg.dup_rate)
    n_live = int(len(events) * cfg.live_fraction)
    backlog, live = events[:len(events) - n_live], events[len(events) - n_live:]
    src = make(f"chaos{cfg.seed}-src")
    ensure_topics(src)
    settings = make(f"chaos{cfg.seed}", topics_from=src, **cfg.overrides)
    ensure_topics(settings)
    res = ChaosResult(seed=cfg.seed, workers=cfg.workers, partitions=settings.partitions,
                      kills=0, events=len(events), backlog=len(backlog), live=len(live),
                      complete=False)
    backlog_ends = produce(src, backlog, shop.catalog)
    r = connect(settings)

    t0 = time.monotonic()
    procs = {f"w{i}": start(settings, f"w{i}") for i in range(cfg.workers)}
    # Spread the live traffic over the expected length of the kill phase.
    phase_s = cfg.kills * (sum(cfg.gap_s) + sum(cfg.pause_s)) / 2
    traffic = LiveTraffic(src, live, cfg.live_chunks, phase_s / max(1, cfg.live_chunks))
    first_at = rng.uniform(*cfg.first_kill_at) * len(backlog)
    deadline = time.monotonic() + 120
    while checkpointed(r, settings) < first_at:
        if time.monotonic() > deadline:
            raise TimeoutError("the workers made no progress on the backlog in 120 s")
        for name, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {p.returncode} before any kill")
        if traffic.ident is None and checkpointed(r, settings) > 0:
            traffic.start()  # live traffic begins once the workers are reading
        time.sleep(0.02)
    if traffic.ident is None:
        traffic.start()
    for k in range(cfg.kills):
        if k:
            time.sleep(rng.uniform(*cfg.gap_s))
        victim = rng.choice(sorted(procs))
        done = checkpointed(r, settings)
        stop_worker(procs[victim], hard=True)
        pause = rng.uniform(*cfg.pause_s)
        res.kill_log.append({"t": round(time.monotonic() - t0, 2), "victim": victim,
                             "checkpointed": done, "produced": len(backlog) + traffic.sent,
                             "down_s": round(pause, 2)})
        log(f"seed {cfg.seed} kill {k + 1}/{cfg.kills}: {victim} at "
            f"{res.kill_log[-1]['t']}s, {done} events checkpointed of "
            f"{len(backlog) + traffic.sent} produced, down {pause:.2f}s")
        res.kills += 1
        time.sleep(pause)
        procs[victim] = start(settings, victim)
    traffic.join(timeout=300)
    if traffic.error is not None or traffic.is_alive():
        raise RuntimeError(f"live traffic failed: {traffic.error!r}")
    ends = merge_ends(backlog_ends, traffic.ends)
    assert sum(e + 1 for e in ends.values()) == len(events), (ends, len(events))
    try:
        wait_complete(settings, ends, timeout=cfg.timeout_s, procs=list(procs.values()))
        res.complete = True
    except (TimeoutError, RuntimeError) as exc:
        res.error = f"chaos run: {exc}"
        log(f"seed {cfg.seed}: {res.error}")
    res.chaos_s = round(time.monotonic() - t0, 1)
    time.sleep(1.5)  # let the workers publish their final counters
    res.counters = recovery_counters(settings)
    got = full_snapshot(settings)
    for p in procs.values():
        stop_worker(p, hard=True)

    t1 = time.monotonic()
    ref = make(f"chaos{cfg.seed}-ref", topics_from=src)
    ensure_topics(ref)
    w = start(ref, "ref")
    try:
        wait_complete(ref, ends, timeout=cfg.timeout_s, procs=[w])
    finally:
        stop_worker(w, hard=True)
    res.reference_s = round(time.monotonic() - t1, 1)
    want = full_snapshot(ref)
    if cfg.dump is not None:
        cfg.dump.mkdir(parents=True, exist_ok=True)
        for name, snap in (("chaos", got), ("reference", want)):
            (cfg.dump / f"seed{cfg.seed}-{name}.json").write_bytes(
                orjson.dumps(snap, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS))
    diff = state_diff(got, want)
    rounding = split_last_digit(diff, got["items"], want["items"], ModelConfig().score_digits)
    res.mismatches = diff_counts(diff)
    res.lost_event_ids = len(
        {e for c in want["contexts"].values() for e in c.get("e", ())}
        - {e for c in got["contexts"].values() for e in c.get("e", ())})
    for user in {u for d in diff["contexts"].values() for u in d}:
        # The producer's partitioner (kafka-python's default for keyed records).
        p = (murmur2(user.encode()) & 0x7FFFFFFF) % settings.partitions
        res.contexts_by_partition[p] = res.contexts_by_partition.get(p, 0) + 1
    res.examples = {f"{kind}.{how}": keys[:5] for kind, d in diff.items()
                    for how, keys in d.items() if keys}
    log(f"seed {cfg.seed}: {res.kills} kills, {res.events} events ({res.backlog} backlog + "
        f"{res.live} live), complete={res.complete}, worker counters {res.counters}, "
        f"mismatches {res.mismatches}, event ids lost (lower bound) {res.lost_event_ids}, "
        f"differing contexts by partition {res.contexts_by_partition}, chaos {res.chaos_s}s, "
        f"reference {res.reference_s}s")
    if res.examples:
        log(f"seed {cfg.seed}: examples {res.examples}")
    if rounding:
        log(f"seed {cfg.seed}: item lists one unit of a rounded digit apart (not held, "
            f"ORDER_DEPENDENT): {rounding}")
    return res


COLUMNS = ("broker", "seed", "workers", "partitions", "kills", "events", "complete", "items",
           "users", "contexts", "rows", "marginals_all", "meta", "trending", "trending_by_category",
           LAST_DIGIT, "lost_event_ids", "conflicts", "stale", "refetches", "gaps_accepted",
           "stalls", "chaos_s", "ok")


def table(results: list[ChaosResult]) -> str:
    rows = [COLUMNS]
    for res in results:
        def total(suffix: str, res: ChaosResult = res) -> int:
            return sum(v for k, v in res.counters.items() if k.endswith(suffix))

        d = asdict(res) | {"ok": res.ok, "conflicts": total(".checkpoint_conflicts"),
                           "stale": total(".stale_records"), "refetches": total(".gap_refetches"),
                           "gaps_accepted": total(".gaps_accepted"),
                           "stalls": total(".stalls_found")}
        rows.append(tuple(str(res.mismatches.get(c, "-")) if c not in d else str(d[c])
                          for c in COLUMNS))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True))
                     for row in rows)


def _shown(path: Path) -> str:
    """A path as the results file shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent.resolve()))
    except ValueError:
        return path.name


def run_broker(broker: str, args: argparse.Namespace, overrides: dict[str, Any], run_id: int,
               logs: Path) -> list[ChaosResult]:
    """Every seed of the soak on one broker's fresh stack."""
    from cartwise.embedded import EmbeddedStack

    results: list[ChaosResult] = []
    started: list[subprocess.Popen] = []
    with EmbeddedStack(broker_kind=broker) as stack:
        def make(name: str, topics_from: Settings | None = None, **overrides: Any) -> Settings:
            defaults = {"broker": stack.broker, "redis_url": stack.redis_url,
                        "partitions": args.partitions}
            return run_settings(f"{name}-{broker}-{run_id}", topics_from,
                                **(defaults | overrides))

        for seed in range(args.first_seed, args.first_seed + args.seeds):
            def start(settings: Settings, name: str, seed: int = seed) -> subprocess.Popen:
                proc = start_worker(settings, logs / f"{broker}-seed{seed}-{name}.log", name)
                started.append(proc)
                return proc

            cfg = ChaosConfig(seed=seed, events=args.events, workers=args.workers,
                              kills=args.kills, gap_s=tuple(args.gap),
                              pause_s=tuple(args.pause), live_fraction=args.live_fraction,
                              live_chunks=args.live_chunks,
                              first_kill_at=tuple(args.first_kill_at),
                              overrides=overrides,
                              timeout_s=args.timeout, dump=args.dump)
            try:
                results.append(replace(run_seed(cfg, make, start), broker=broker))
            except Exception as exc:  # noqa: BLE001 - one seed's failure is a result too
                print(f"seed {seed}: failed: {exc!r}")
                results.append(ChaosResult(seed=seed, workers=args.workers,
                                           partitions=args.partitions, kills=0,
                                           events=args.events, backlog=0, live=0,
                                           complete=False, error=repr(exc), broker=broker))
            finally:
                for proc in started:
                    stop_worker(proc, hard=True)
                started.clear()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 1..N")
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--gap", type=float, nargs=2, default=(0.5, 3.0), metavar=("MIN", "MAX"),
                    help="seconds between a restart and the next kill")
    ap.add_argument("--pause", type=float, nargs=2, default=(0.05, 1.0), metavar=("MIN", "MAX"),
                    help="seconds a killed worker stays down")
    ap.add_argument("--live-fraction", type=float, default=0.5)
    ap.add_argument("--live-chunks", type=int, default=60)
    ap.add_argument("--first-kill-at", type=float, nargs=2, default=(0.1, 0.6),
                    metavar=("MIN", "MAX"), help="share of the backlog checkpointed")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds for a run to complete after the last kill; a run still "
                         "incomplete then is reported stuck and compared as it is")
    ap.add_argument("--broker", default="tansu",
                    help="tansu, kafka or tansu,kafka: every seed on each (Kafka needs Java 17+, "
                         "cartwise/kafka_broker.py)")
    ap.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    ap.add_argument("--logs", type=Path, default=RESULTS / "logs" / "chaos")
    ap.add_argument("--dump", type=Path, default=None, metavar="DIR",
                    help="write both runs' full snapshots per seed to DIR, to inspect how "
                         "differing keys differ")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a Settings field for the chaos run's workers, e.g. "
                         "checkpoint_interval_s=2 (repeatable)")
    args = ap.parse_args()
    logs = args.logs
    logs.mkdir(parents=True, exist_ok=True)
    run_id = int(time.time())
    names = {f.name for f in fields(Settings)}
    overrides: dict[str, Any] = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in names:
            ap.error(f"--set {item}: Settings has no field {name!r}")
        default = getattr(Settings(), name)
        overrides[name] = (value.lower() in ("1", "true", "yes", "on")
                           if isinstance(default, bool) else type(default)(value))

    results: list[ChaosResult] = []
    for broker in [b.strip() for b in args.broker.split(",") if b.strip()]:
        results += run_broker(broker, args, overrides, run_id, logs)
    print()
    print(table(results))
    failed = [f"{r.broker}-{r.seed}" for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)}/{len(results)} seeds equal to the reference"
          + (f"; differing: {failed}" if failed else ""))
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps({
        "args": vars(args) | {"gap": list(args.gap), "pause": list(args.pause),
                              "out": _shown(args.out), "logs": _shown(args.logs),
                              "dump": args.dump and _shown(args.dump),
                              "first_kill_at": list(args.first_kill_at)},
        "seeds": [asdict(r) | {"ok": r.ok} for r in results],
    }, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
