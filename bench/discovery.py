"""Discovery targets scored two ways: each model's top 20 as is, and without the shopper's own
items (what a "new for you" answer shows: `placement=new`, docs/api.md).

    python -m bench.discovery [--datasets yoochoose,diginetica]

Why: the default model puts the shopper's own items (revisits, the item they are on when
shoppers re-pick it) at the head of its list, which is what wins the overall top and what
costs discovery targets their slots. Scoring every model with its own items left out tells the
two apart: how well new items are ordered, against how many slots they get. The same replay as
docs/quality.md (prequential, metrics on the last 70%); writes bench/results/discovery.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from cartwise import datasets
from models.baselines import BASELINES
from models.evaluation import K, Replay
from models.recommender import CartwiseModel

OUT = Path(__file__).resolve().parent / "results" / "discovery.json"


def run(name: str) -> dict[str, Any]:
    """Every model's ranks of the reported part's discovery targets, as the replay records
    them: as ranked (`Replay.ranks`) and new for you (`Replay.fresh`)."""
    events = datasets.load(name)
    split = events[int(0.3 * len(events))].ts
    models = [CartwiseModel(), *(cls() for n, cls in BASELINES.items() if n != "most_popular")]
    kinds = datasets.DATASETS[name].targets
    replay = Replay(models, kinds, split).run(events)
    rows = replay.rows(kinds, only="new")
    out: dict[str, Any] = {}
    for m in models:
        n = max(1, len(rows))
        ranked = {"as_is": [replay.ranks[m.name][i] for i in rows],
                  "own_left_out": [replay.fresh[m.name][i] for i in rows]}
        out[m.name] = {"targets": len(rows)} | {
            f"{label}_{metric}": round(value, 4)
            for label, rs in ranked.items()
            for metric, value in (
                ("hr5", sum(0 < r <= 5 for r in rs) / n),
                ("hr20", sum(0 < r <= K for r in rs) / n),
                ("mrr20", sum(1 / r for r in rs if r) / n))}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="yoochoose,diginetica")
    a = p.parse_args()
    result: dict[str, Any] = {"generated": time.strftime("%Y-%m-%d"), "k": K, "logs": {}}
    for name in a.datasets.split(","):
        result["logs"][name] = got = run(name)
        print(f"{name}: HR@5 / HR@20 / MRR@20 on discovery targets, as is | own items left out")
        for model, m in got.items():
            print(f"  {model:<18} {m['as_is_hr5']:.4f} / {m['as_is_hr20']:.4f} / "
                  f"{m['as_is_mrr20']:.4f} | {m['own_left_out_hr5']:.4f} / "
                  f"{m['own_left_out_hr20']:.4f} / {m['own_left_out_mrr20']:.4f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
