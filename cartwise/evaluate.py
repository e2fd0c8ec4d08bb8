"""`cartwise evaluate`: the prequential replay of a real log, the model against the baselines.

The tuning part is the first `report_from` share of the events (by count, in time order);
metrics are reported on the rest. Every model learns from every event either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cartwise import datasets
from cartwise.contract import Event
from models.baselines import BASELINES, Model
from models.config import model_config
from models.evaluation import Replay, blocks, compare
from models.recommender import CartwiseModel

DEFAULT_MODELS = ("cartwise", *BASELINES)
FACTORIES: dict[str, Callable[[], Model]] = {"cartwise": CartwiseModel, **BASELINES}
WINDOWS = 20  # time blocks for the significance tests and the HR-over-time plot


def make_models(names: Sequence[str], overrides: Sequence[str] = ()) -> list[Model]:
    """Models by name; `overrides` ("field=value") change the default model's ModelConfig."""
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(FACTORIES)}")
    config = model_config(overrides)
    return [CartwiseModel(config) if n == "cartwise" else FACTORIES[n]() for n in names]




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
    out = summarize(replay, kinds, seconds)
    out["target_sample"] = sample
    return out


def summarize(replay: Replay, kinds: Sequence[str], seconds: float) -> dict[str, Any]:
    groups = {"all": list(kinds), **{k: [k] for k in kinds}} if len(kinds) > 1 else \
        {kinds[0]: list(kinds)}
    out: dict[str, Any] = {"events": replay.events, "items": len(replay.items),
                           "seconds": seconds, "kinds": list(kinds), "models": {}}
    rows = replay.rows(kinds)
    selected = {label: (replay.rows(ks), replay.rows(ks, report=False))
                for label, ks in groups.items()}
    for m in replay.models:
        res: dict[str, Any] = {"cost_us_per_event": replay.cost_us(m.name),
                               "coverage20": replay.coverage(m.name)}
        for label, (reported, tuning) in selected.items():
            res[label] = replay.metrics(m.name, reported)
            res[f"tune:{label}"] = replay.metrics(m.name, tuning)
        hits = [1.0 if 0 < replay.ranks[m.name][i] <= 20 else 0.0 for i in rows]
        res["hr20_by_window"] = blocks(hits, WINDOWS)
        out["models"][m.name] = res
    head = next(iter(groups))
    window_ts = blocks([replay.targets.ts[i] for i in rows], WINDOWS)
    out["window_ts"] = window_ts
    names = [m.name for m in replay.models]
    if "cartwise" in names and any(not n.startswith("cartwise") for n in names):
        # Variants of the model (ablations, "cartwise-...") are not baselines.
        best = max((n for n in names if not n.startswith("cartwise")),
                   key=lambda n: out["models"][n][head]["hr20"])
        out["best_baseline"] = best
        out["vs_best"] = compare([replay.ranks["cartwise"][i] for i in rows],
                                 [replay.ranks[best][i] for i in rows], WINDOWS)
    return out


def table(result: dict[str, Any]) -> str:
    kinds = result["kinds"]
    labels = (["all"] if len(kinds) > 1 else []) + list(kinds)
    lines = [f"{'model':<18} {'targets':>8} {'HR@10':>7} {'HR@20':>7} {'MRR@20':>7} "
             f"{'new':>5} {'cover':>6} {'us/ev':>8}  (reported part)"]
    for label in labels:
        lines.append(f"-- {label}")
        for name, res in result["models"].items():
            m = res[label]
            lines.append(f"{name:<18} {m['targets']:>8} {m['hr10']:>7.4f} {m['hr20']:>7.4f} "
                         f"{m['mrr20']:>7.4f} {m['new_hit_share']:>5.2f} "
                         f"{res['coverage20']:>6.3f} {res['cost_us_per_event']:>8.0f}")
    if "vs_best" in result:
        v = result["vs_best"]
        lines.append(f"cartwise vs {result['best_baseline']}: HR@20 diff {v['diff']:+.4f} "
                     f"(95% CI {v['ci95'][0]:+.4f} .. {v['ci95'][1]:+.4f}), wins {v['wins']}"
                     f"/{v['blocks']} windows, sign test p={v['sign_p']:.2g}")
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
