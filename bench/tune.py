"""Choose the default ModelConfig on the tuning part of each log only (docs/quality-protocol.md).

Coordinate ascent: starting from `START`, each setting in `GRID` is tried in turn with the
others fixed, and the value with the best score is kept. The score of a configuration is the
mean, over the logs, of its HR@20 divided by the starting configuration's HR@20 on that log,
so every log counts the same whatever its absolute level. A change must gain more than
`MIN_GAIN` to be kept: ties go to the value already held, so noise does not pick settings.

Only the tuning part is replayed (the first 30% of each log, the part `cartwise evaluate`
does not report), capped at `--cap` events to keep one configuration under a few minutes.

    .venv/bin/python -m bench.tune [--datasets a,b] [--cap 20000] [--jobs 2]

Writes bench/results/tuning.json: every configuration tried, its HR@20 per log, the choice.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cartwise import datasets
from cartwise.evaluate import evaluate, model_config
from models.recommender import CartwiseModel

OUT = Path(__file__).resolve().parent / "results" / "tuning.json"
REPORT_FROM = 0.3  # the tuning part, as in `cartwise evaluate`
MIN_GAIN = 0.005
START: dict[str, float] = {"revisit_weight": 1, "min_support": 0.25, "llr_min": 0,
                           "per_anchor_alternatives": 30, "max_anchors": 30,
                           "next_weight": 10, "anchor_decay": 0.5}
GRID: dict[str, list[float]] = {
    "next_weight": [3, 10, 30],
    "anchor_decay": [0.5, 0.7],
    "max_anchors": [10, 30],
    "revisit_weight": [0.5, 1, 2],
    "min_support": [0.25, 1],
    "viewed_weight": [0.6, 1.0],
}

_EVENTS: dict[str, tuple[list, list[str]]] = {}


def _tuning_part(name: str, cap: int) -> tuple[list, list[str]]:
    if name not in _EVENTS:
        events = datasets.load(name)
        _EVENTS[name] = (events[: min(cap, int(REPORT_FROM * len(events)))],
                         list(datasets.DATASETS[name].targets))
    return _EVENTS[name]


def hr20(args: tuple[str, int, dict[str, float]]) -> float:
    """HR@20 of one configuration over one log's tuning part (all of it is scored)."""
    name, cap, settings = args
    events, kinds = _tuning_part(name, cap)
    config = model_config([f"{k}={v}" for k, v in settings.items()])
    result = evaluate(events, kinds, [CartwiseModel(config)], report_from=0.0)
    label = "all" if len(kinds) > 1 else kinds[0]
    return result["models"]["cartwise"][label]["hr20"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default=",".join(datasets.DATASETS))
    p.add_argument("--cap", type=int, default=20_000)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    names = a.datasets.split(",")
    tried: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(a.jobs) as pool:

        def run(settings_list: list[dict[str, float]]) -> None:
            todo = [s for s in settings_list if json.dumps(s, sort_keys=True) not in tried]
            jobs = [(n, a.cap, s) for s in todo for n in names]
            for (n, _, s), v in zip(jobs, pool.map(hr20, jobs), strict=True):
                tried.setdefault(json.dumps(s, sort_keys=True), {})[n] = v

        def score(settings: dict[str, float]) -> float:
            got, base = tried[json.dumps(settings, sort_keys=True)], tried[start_key]
            return sum(got[n] / max(base[n], 1e-9) for n in names) / len(names)

        current = dict(START)
        start_key = json.dumps(current, sort_keys=True)
        run([current])
        for setting, values in GRID.items():
            options = [{**current, setting: v} for v in values]
            run(options)
            held = score(current)
            best = max(options, key=score)
            if score(best) > held + MIN_GAIN:
                current = best
            print(f"{setting:<24} -> {current.get(setting, '-')!s:<6} score "
                  f"{score(current):.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    out: dict[str, Any] = {
        "datasets": names, "cap": a.cap, "start": START, "min_gain": MIN_GAIN,
        "chosen": current,
        "chosen_hr20": tried[json.dumps(current, sort_keys=True)],
        "tried": [{"settings": json.loads(k), "hr20": v} for k, v in tried.items()],
        "seconds": time.perf_counter() - t0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["chosen"]), json.dumps(out["chosen_hr20"]))


if __name__ == "__main__":
    main()
