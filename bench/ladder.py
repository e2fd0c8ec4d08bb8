"""What the price ladder does to hit rate and suggested prices, by RFM segment, on a real log.

    python -m bench.ladder [--dataset online_retail] [--limit N]

Replays the log in time order through the default model, as the quality replay does (SPEC 4).
Before each purchase, the shopper's top 20 is taken twice from the same model state: plain,
and through the price ladder of docs/rules.md as the API applies it (the shopper's orders and
RFM quadrant as known then; budget quadrants lose their alternatives; cheapest first from one
order on, evidence order from three). Reported per quadrant on the later 70% of the log:
HR@10, HR@20, MRR@20 and the average price of the first 10 suggestions. Writes
bench/results/ladder.json; the quality page (bench/quality.py) shows it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import save
from cartwise import datasets
from models.evaluation import metrics
from models.recommender import CrossSellRecommender
from models.rules import Rules, ladder, order_by_price
from models.segments import SegmentConfig, rfm

RESULTS = Path(__file__).parent / "results" / "ladder.json"
POLICY = {"steps": [{"min_orders": 1, "order": "price_ascending"},
                    {"min_orders": 3, "order": "score"}],
          "budget_quadrants": ["general_to_develop"]}
K = 20
READ = 40  # candidates read past K, as serving reads past k


def avg_price(items: list[str], prices: dict[str, float]) -> float | None:
    known = [prices[i] for i in items[:10] if i in prices]
    return sum(known) / len(known) if known else None


def run(name: str, limit: int | None, report_from: float = 0.3) -> dict[str, Any]:
    t0 = time.perf_counter()
    events = datasets.load(name)
    if limit:
        events = events[:limit]
    split_ts = events[int(report_from * len(events))].ts
    rules = Rules.parse({"price_ladder": POLICY})
    segments = SegmentConfig()
    rec = CrossSellRecommender(list_interval_s=1.0)
    prices: dict[str, float] = {}  # last price seen per item: the catalog as it was
    catalog: dict[str, dict[str, float]] = {}  # the same, in the shape serving reads
    orders: dict[str, dict[str, list[float]]] = defaultdict(dict)  # user -> order -> [ts, amount]
    ranks: dict[str, dict[str, list[int]]] = defaultdict(lambda: {"plain": [], "ladder": []})
    shown_price: dict[str, dict[str, list[float]]] = defaultdict(
        lambda: {"plain": [], "ladder": []})
    for e in events:
        if e.type == "purchase" and e.ts >= split_ts:
            history = sorted(orders[e.user_id].values())
            quadrant = rfm(history, e.ts, segments).quadrant or "no_order_in_window"
            entries = rec.recommend(e.user_id, READ)
            plain = [x["item_id"] for x in entries[:K]]
            amounts = [a for _, a in history if a]
            average = sum(amounts) / len(amounts) if amounts else None
            listed = entries
            if quadrant in rules.budget_quadrants:
                listed = [x for x in listed if x["kind"] != "alternatives"]
            step = rules.step(len(history))
            laddered = ladder(listed, step, catalog, average)[:K]
            laddered = [x["item_id"] for x in order_by_price(laddered, step, catalog)]
            for label in (quadrant, "all"):
                for variant, shown in (("plain", plain), ("ladder", laddered)):
                    pos = {item: r for r, item in enumerate(shown, 1)}
                    ranks[label][variant].extend(pos.get(line.item_id, 0) for line in e.lines)
                    p = avg_price(shown, prices)
                    if p is not None:
                        shown_price[label][variant].append(p)
        rec.learn_one(e)
        if e.type == "purchase":
            order = orders[e.user_id].setdefault(e.session_id or e.event_id, [e.ts, 0.0])
            for line in e.lines:
                if line.price is not None:
                    prices[line.item_id] = line.price
                    catalog[line.item_id] = {"price": line.price}
                    order[1] += line.price * line.quantity
    out: dict[str, Any] = {}
    for label, by_variant in ranks.items():
        row: dict[str, Any] = {}
        for variant, rs in by_variant.items():
            m = metrics(rs, [0] * len(rs))
            m.pop("new_hit_share")
            ps = shown_price[label][variant]
            m["avg_price_top10"] = round(sum(ps) / len(ps), 2) if ps else None
            row[variant] = m
        out[label] = row
    return {"dataset": name, "events": len(events), "policy": POLICY,
            "segment_config": segments.to_dict(), "segments": out,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="online_retail")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    result = run(args.dataset, args.limit)
    save(RESULTS, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
