"""Repurchase cycles on a real log: how well are intervals predicted, and are reminders followed?

    python -m bench.repurchase [--dataset online_retail] [--lead-days 7] [--limit N]

Replays the purchases in time order through models/repurchase.py, as the context stage does:
before each repeat purchase the interval is predicted from what was known, then learned. Each
purchase schedules a reminder `lead` before the predicted run-out; it counts as followed when
the shopper bought the item again within `2 x lead` after it (the week before and the week
after the expected run-out, by default). Baselines in the same run: one shop-wide median
cycle for every item, a fixed 30 days, the item's cycle alone, and a blend of the shopper's
and the item's (models/repurchase.py). Writes bench/results/repurchase.json; the quality
page (bench/quality.py) shows it.
"""

from __future__ import annotations

import argparse
import bisect
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import save
from cartwise import datasets
from models.repurchase import (
    DAY,
    KEEP_PER_ITEM,
    KEEP_PER_SHOPPER,
    MIN_INTERVAL_S,
    blend,
    crowd_cycle,
    median,
    observe,
    predict,
)

RESULTS = Path(__file__).parent / "results" / "repurchase.json"
FIXED_S = 30 * DAY


class Reminders:
    """Outcome of each method's reminders: followed, bought before it, or not followed."""

    def __init__(self, lead_s: float, end: float) -> None:
        self.lead_s, self.end = lead_s, end
        self.pending: dict[tuple[str, str], float] = {}  # (user, item) -> reminder time
        self.counts = {"sent": 0, "followed": 0, "early": 0, "not_followed": 0}

    def schedule(self, key: tuple[str, str], bought: float, cycle_s: float | None) -> None:
        if cycle_s is None:
            return
        self.pending[key] = bought + max(0.0, cycle_s - self.lead_s)

    def bought_again(self, key: tuple[str, str], ts: float) -> None:
        at = self.pending.pop(key, None)
        if at is None:
            return
        self.counts["sent"] += 1
        if ts < at:
            self.counts["early"] += 1
        elif ts <= at + 2 * self.lead_s:
            self.counts["followed"] += 1
        else:
            self.counts["not_followed"] += 1

    def close(self) -> dict[str, Any]:
        """Reminders never followed by a purchase count when their window ended in the log."""
        for at in self.pending.values():
            if at + 2 * self.lead_s <= self.end:
                self.counts["sent"] += 1
                self.counts["not_followed"] += 1
        c = self.counts
        sent = max(1, c["sent"])
        return c | {"followed_share": round(c["followed"] / sent, 4),
                    "early_share": round(c["early"] / sent, 4)}


def errors_summary(errs: list[float], logs: list[float]) -> dict[str, Any]:
    if not errs:
        return {"n": 0}
    return {"n": len(errs), "median_abs_error_days": round(median(errs), 2),
            "mean_abs_error_days": round(sum(errs) / len(errs), 2),
            "within_7_days": round(sum(1 for e in errs if e <= 7) / len(errs), 4),
            "median_abs_log_ratio": round(median(logs), 4)}


def run(name: str, lead_days: float, limit: int | None) -> dict[str, Any]:
    import math

    t0 = time.perf_counter()
    events = [e for e in datasets.load(name) if e.type == "purchase"]
    if limit:
        events = events[:limit]
    lead_s = lead_days * DAY
    end = events[-1].ts if events else 0.0
    last: dict[tuple[str, str], float] = {}
    own: dict[tuple[str, str], list[float]] = defaultdict(list)
    per_item: dict[str, list[float]] = defaultdict(list)
    everything: list[float] = []  # sorted, for the shop-wide median baseline
    methods = ("cartwise", "cartwise_repeat_buyers", "blend", "item_only", "shop_median",
               "fixed_30d")
    errs: dict[str, list[float]] = {m: [] for m in methods}
    logs: dict[str, list[float]] = {m: [] for m in methods}
    reminders = {m: Reminders(lead_s, end) for m in methods}
    sources: dict[str, int] = defaultdict(int)

    def estimates(key: tuple[str, str], item: str) -> dict[str, float | None]:
        crowd = crowd_cycle(per_item.get(item, ()))
        full = predict(own.get(key, ()), crowd)
        mixed = blend(own.get(key, ()), crowd)
        shop = everything[len(everything) // 2] if everything else None  # sorted already
        return {"cartwise": full.cycle_s if full else None,
                "cartwise_repeat_buyers": full.cycle_s if full and own.get(key) else None,
                "blend": mixed.cycle_s if mixed else None,
                "item_only": crowd,
                "shop_median": shop, "fixed_30d": FIXED_S}

    repeats = 0
    for event in events:
        for line in event.lines:
            key = (event.user_id, line.item_id)
            prev = last.get(key)
            if prev is not None and event.ts - prev < MIN_INTERVAL_S:
                continue  # the same need: neither a cycle nor a new reminder
            if prev is not None:
                interval = event.ts - prev
                repeats += 1
                guess = estimates(key, line.item_id)
                full = predict(own.get(key, ()), crowd_cycle(per_item.get(line.item_id, ())))
                if full is not None:
                    sources[full.source] += 1
                # Every method is scored on the repeats the full model can predict, falling
                # back to the shop-wide median where it has nothing, so all compare like with
                # like.
                if guess["cartwise"] is not None:
                    for m, g in guess.items():
                        g = g if g is not None else guess["shop_median"]
                        if g is not None:
                            errs[m].append(abs(g - interval) / DAY)
                            logs[m].append(abs(math.log(g / interval)))
                for r in reminders.values():
                    r.bought_again(key, event.ts)
                observe(own[key], interval, KEEP_PER_SHOPPER)
                observe(per_item[line.item_id], interval, KEEP_PER_ITEM)
                bisect.insort(everything, interval)
            last[key] = event.ts
            after = estimates(key, line.item_id)
            for m, r in reminders.items():
                r.schedule(key, event.ts, after[m])
    return {
        "dataset": name, "purchases": len(events), "repeat_purchases": repeats,
        "lead_days": lead_days, "followed_window_days": 2 * lead_days,
        "prediction": {m: errors_summary(errs[m], logs[m]) for m in methods
                       if m != "cartwise_repeat_buyers"},
        "prediction_sources": dict(sources),
        "reminders": {m: r.close() for m, r in reminders.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="online_retail")
    parser.add_argument("--lead-days", type=float, default=7.0)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    result = run(args.dataset, args.lead_days, args.limit)
    save(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
