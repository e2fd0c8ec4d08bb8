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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cartwise import datasets
from cartwise.contract import Event
from models.baselines import BASELINES
from models.evaluation import K, Replay
from models.recommender import CartwiseModel

OUT = Path(__file__).resolve().parent / "results" / "discovery.json"


def new_rank(recs: Sequence[str], item: str, own: Iterable[str]) -> int:
    """Rank (1..) of `item` in `recs` once the shopper's `own` items are left out; 0: absent."""
    mine = set(own)
    n = 0
    for i in recs:
        if i in mine:
            continue
        n += 1
        if i == item:
            return n
    return 0


class _Listed:
    """A model whose last answer is kept, so both scorings read the same list."""

    def __init__(self, model: Any) -> None:
        self.model, self.name, self.last = model, model.name, []

    def learn(self, event: Event) -> None:
        self.model.learn(event)

    def recommend(self, user: str, k: int) -> list[str]:
        self.last = self.model.recommend(user, k)
        return self.last


class _Replay(Replay):
    """Keeps each event's targets (the replay's own definition of a new item)."""

    def _targets(self, e: Event) -> list[tuple[str, str, bool, bool]]:
        self.last = super()._targets(e)
        return self.last


def run(name: str) -> dict[str, Any]:
    events = datasets.load(name)
    split = events[int(0.3 * len(events))].ts
    models = [_Listed(CartwiseModel()),
              *(_Listed(cls()) for n, cls in BASELINES.items() if n != "most_popular")]
    replay = _Replay(models, datasets.DATASETS[name].targets, split)
    ranks: dict[str, list[tuple[int, int]]] = {m.name: [] for m in models}
    for e in events:
        # What the shopper touched before the event: the replay's own record of it.
        own = set(replay._touched.get(e.user_id, ()))
        for m in models:
            m.last = []
        replay.step(e)
        if e.ts < split:
            continue
        for _, item, new, _ in replay.last:
            if new:
                for m in models:
                    top = m.last[:K]
                    full = top.index(item) + 1 if item in top else 0
                    ranks[m.name].append((full, new_rank(top, item, own)))
    out: dict[str, Any] = {}
    for model, rs in ranks.items():
        n = max(1, len(rs))
        out[model] = {"targets": len(rs)} | {
            f"{label}_{metric}": round(value, 4)
            for label, col in (("as_is", 0), ("own_left_out", 1))
            for metric, value in (
                ("hr5", sum(0 < r[col] <= 5 for r in rs) / n),
                ("hr20", sum(0 < r[col] <= K for r in rs) / n),
                ("mrr20", sum(1 / r[col] for r in rs if r[col]) / n))}
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
