"""`cartwise evaluate`: the prequential replay of a real log, the model against the baselines.

The tuning part is the first `report_from` share of the events (by count, in time order);
metrics are reported on the rest. Every model learns from every event either way. Metrics are
given overall, per target kind, on discovery targets (items new to the shopper) and on
basket-completion targets (models/evaluation.py), each with a significance test against the
best baseline on that group and metric.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from cartwise import datasets
from cartwise.contract import Event
from models.baselines import BASELINES, Model
from models.config import model_config
from models.evaluation import Replay, blocks, compare_blocks, score
from models.recommender import CartwiseModel

DEFAULT_MODELS = ("cartwise", *BASELINES)
FACTORIES: dict[str, Callable[[], Model]] = {"cartwise": CartwiseModel, **BASELINES}
WINDOWS = 20  # time blocks for the significance tests and the HR-over-time plot
# group label -> Replay.rows(only=...); "new for you" ranks discovery targets with the
# shopper's own items left out of every model's top 20 (Replay.fresh).
SUBSETS = {"discovery": "new", "new for you": "new", "basket": "basket"}
FRESH = frozenset({"new for you"})
TESTED = ("hr5", "hr20", "mrr20")  # metrics tested against the best baseline


def make_models(names: Sequence[str], overrides: Sequence[str] = ()) -> list[Model]:
    """Models by name; `overrides` ("field=value") change the default model's ModelConfig."""
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(FACTORIES)}")
    config = model_config(overrides)
    return [CartwiseModel(config) if n == "cartwise" else FACTORIES[n]() for n in names]


class EtaProgress:
    """A replay's progress with the time left, on stderr: a rich bar on a terminal, else a
    line per call (logs stay readable). Call with the events done so far."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total, self.stream = total, stream or sys.stderr
        self.t0 = time.perf_counter()
        self._bar: Any = None
        if self.stream.isatty():
            try:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )
            except ImportError:  # rich is optional: plain lines then
                return
            self._bar = Progress("replay", BarColumn(), MofNCompleteColumn(), "events",
                                 TimeElapsedColumn(), "left", TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task("replay", total=total)
            self._bar.start()

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=n)
            if n >= self.total:
                self._bar.stop()
            return
        elapsed = time.perf_counter() - self.t0
        left = f", about {elapsed * (self.total - n) / n:.0f} s left" if n else ""
        print(f"  {n:,}/{self.total:,} events ({100 * n / max(self.total, 1):.0f}%), "
              f"{elapsed:.0f} s{left}", file=self.stream, flush=True)


def evaluate(events: Sequence[Event], kinds: Sequence[str], models: Sequence[Model],
             report_from: float = 0.3, progress: Callable[[int], None] | None = None,
             sample: int = 1) -> dict[str, Any]:
    if not events:
        raise ValueError("no events to replay")
    if not 0.0 <= report_from < 1.0:
        raise ValueError("report_from must be in [0, 1)")
    split_ts = events[int(report_from * len(events))].ts
    if sample < 1:
        raise ValueError("sample must be >= 1")
    replay = Replay(models, kinds, split_ts, sample=sample)
    t0 = time.perf_counter()
    for n, e in enumerate(events):
        replay.step(e)
        if progress is not None and n % 10_000 == 0:
            progress(n)
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress(len(events))
    out = summarize(replay, kinds, seconds)
    out["target_sample"] = sample
    return out


def summarize(replay: Replay, kinds: Sequence[str], seconds: float) -> dict[str, Any]:
    groups = {"all": list(kinds), **{k: [k] for k in kinds}} if len(kinds) > 1 else \
        {kinds[0]: list(kinds)}
    head = next(iter(groups))
    out: dict[str, Any] = {"events": replay.events, "items": len(replay.items),
                           "seconds": seconds, "kinds": list(kinds), "models": {}}
    selected = {label: (replay.rows(ks), replay.rows(ks, report=False))
                for label, ks in groups.items()}
    for label, only in SUBSETS.items():
        reported = replay.rows(kinds, only=only)
        if reported:  # no basket targets in a click log: no basket group
            selected[label] = (reported, replay.rows(kinds, report=False, only=only))
    tested = [head, *(label for label in SUBSETS if label in selected)]
    for m in replay.models:
        res: dict[str, Any] = {"cost_us_per_event": replay.cost_us(m.name),
                               "coverage20": replay.coverage(m.name)}
        for label, (reported, tuning) in selected.items():
            res[label] = replay.metrics(m.name, reported, label in FRESH)
            res[f"tune:{label}"] = replay.metrics(m.name, tuning, label in FRESH)
        res["windows"] = {}
        for label in tested:
            ranks = (replay.fresh if label in FRESH else replay.ranks)[m.name]
            res["windows"][label] = {metric: blocks([score(ranks[i], metric)
                                                     for i in selected[label][0]], WINDOWS)
                                     for metric in TESTED}
        res["hr20_by_window"] = res["windows"][head]["hr20"]
        out["models"][m.name] = res
    out["window_ts"] = blocks([replay.targets.ts[i] for i in selected[head][0]], WINDOWS)
    against_best(out)
    return out


def head_group(result: dict[str, Any]) -> str:
    """The headline group: all targets, or the one kind."""
    return "all" if len(result["kinds"]) > 1 else result["kinds"][0]


def against_best(result: dict[str, Any]) -> None:
    """Per tested group and metric, the baseline best at it and cartwise's paired test
    against it over the time windows (`significance`); `best_baseline` and `vs_best` keep the
    headline HR@20. Variants of the model ("cartwise-...") are not baselines."""
    models = result["models"]
    names = [n for n in models if not n.startswith("cartwise")]
    if "cartwise" not in models or not names:
        return
    sig: dict[str, dict[str, Any]] = {}
    for label, per_metric in models["cartwise"].get("windows", {}).items():
        sig[label] = {}
        for metric in per_metric:
            # ties go to the baseline better at the top of the list
            best = max(names, key=lambda n: (models[n][label][metric],
                                             models[n][label]["mrr20"], n))
            sig[label][metric] = {"baseline": best, **compare_blocks(
                models["cartwise"]["windows"][label][metric],
                models[best]["windows"][label][metric])}
    result["significance"] = sig
    head = head_group(result)
    best = max(names, key=lambda n: (models[n][head]["hr20"], models[n][head].get("mrr20", 0),
                                     n))
    result["best_baseline"] = best
    result["vs_best"] = compare_blocks(models["cartwise"]["hr20_by_window"],
                                       models[best]["hr20_by_window"])


def verdict(v: dict[str, Any]) -> str:
    """Better or worse only when the interval excludes zero and the sign test agrees."""
    if v["ci95"][0] > 0 and v["sign_p"] < 0.05:
        return "better, beyond noise"
    if v["ci95"][1] < 0 and v["sign_p"] < 0.05:
        return "worse, beyond noise"
    return "not significantly different"


NAMES = {"hr5": "HR@5", "hr10": "HR@10", "hr20": "HR@20", "mrr20": "MRR@20"}


def table(result: dict[str, Any]) -> str:
    kinds = result["kinds"]
    labels = (["all"] if len(kinds) > 1 else []) + list(kinds)
    labels += [g for g in SUBSETS if g in result["models"].get("cartwise", next(
        iter(result["models"].values())))]
    lines = [f"{'model':<24} {'targets':>8} {'HR@5':>7} {'HR@10':>7} {'HR@20':>7} "
             f"{'MRR@20':>7} {'new':>5} {'cover':>6} {'us/ev':>8}  (reported part)"]
    for label in labels:
        lines.append(f"-- {label}")
        for name, res in result["models"].items():
            m = res[label]
            lines.append(f"{name:<24} {m['targets']:>8} {m['hr5']:>7.4f} {m['hr10']:>7.4f} "
                         f"{m['hr20']:>7.4f} {m['mrr20']:>7.4f} {m['new_hit_share']:>5.2f} "
                         f"{res['coverage20']:>6.3f} {res['cost_us_per_event']:>8.0f}")
    for label, per_metric in result.get("significance", {}).items():
        for metric, v in per_metric.items():
            lines.append(f"cartwise vs {v['baseline']} ({label}, {NAMES[metric]}): diff "
                         f"{v['diff']:+.4f} (95% CI {v['ci95'][0]:+.4f} .. {v['ci95'][1]:+.4f}),"
                         f" wins {v['wins']}/{v['blocks']} windows, sign test p="
                         f"{v['sign_p']:.2g}: {verdict(v)}")
    return "\n".join(lines)


def load(dataset: str | None, events_file: Path | None) -> tuple[list[Event], list[str]]:
    """Events and default target kinds of a named dataset or a JSON-lines export."""
    if (dataset is None) == (events_file is None):
        raise ValueError("give exactly one of --dataset NAME or --events FILE")
    if dataset is not None:
        events = datasets.load(dataset)  # checks the name
        return events, list(datasets.DATASETS[dataset].targets)
    assert events_file is not None
    if not events_file.exists():
        raise FileNotFoundError(f"{events_file} not found")
    return datasets.load_events(datasets.jsonl(events_file), str(events_file)), \
        ["cart", "purchase"]
