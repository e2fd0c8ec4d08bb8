"""Writes docs/quality.md and its plots from a fresh prequential replay of every shared log.

    python -m bench.quality [--datasets taobao,diginetica] [--limit N] [--jobs 2]
                            [--no-ablations]

Each dataset is replayed once through every model side by side: the default model, its
ablations (each switches one component off) and the baselines. Results go to
bench/results/quality/<dataset>.json, plots to docs/img/, the page to docs/quality.md.
Every process replays the same events and targets, so results of separate processes pair up
target by target (the significance tests compare their per-window values).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from cartwise import datasets
from cartwise.evaluate import NAMES, against_best, evaluate, head_group, verdict
from models.baselines import BASELINES
from models.config import ModelConfig
from models.recommender import CartwiseModel

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "quality"
IMG = ROOT / "docs" / "img"

# One component off at a time, against the default (docs/quality.md, "Ablation").
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_next": {"next_weight": 0.0},
    "no_revisit": {"revisit_weight": 0.0},
    "no_rebuy": {"rebuy_weight": 0.0},
    "strict_support": {"min_support": 2.0, "llr_min": 6.63},
    "last_anchor_only": {"max_anchors": 1},
}


def variant(name: str, config: ModelConfig) -> CartwiseModel:
    m = CartwiseModel(config)
    m.name = name
    return m


# Logs whose every event is a target for every model and whose sessions are long cost hours
# to replay in full: there suggestions are asked for at 1 in N targets (chosen by event id,
# the same for every model) while every event is learned (docs/quality-protocol.md).
TARGET_SAMPLE = {"online_retail": 5}

def groups(keep_baselines: bool, ablations: bool = True) -> list[list[str]]:
    """The models of each process replaying one log, results merged afterwards: the default
    with the cheap baselines, the neighbourhood baselines, and the ablations; with
    `keep_baselines` the default and its ablations, halved."""
    ablated = [f"cartwise-{a}" for a in ABLATIONS] if ablations else []
    if not keep_baselines:
        knn = ["sknn", "v_sknn", "stan", "vstan"]
        plan = [["cartwise", *(b for b in BASELINES if b not in knn)], knn]
        return plan + ([ablated] if ablated else [])
    models = ["cartwise", *ablated]
    if not ablated:
        return [models]
    models = ["cartwise", *ablations]
    half = (len(models) + 1) // 2
    return [models[:half], models[half:]]


def make(model: str, base: ModelConfig) -> Any:
    if model == "cartwise":
        return variant(model, base)
    if model.startswith("cartwise-"):
        return variant(model, replace(base, **ABLATIONS[model.removeprefix("cartwise-")]))
    return BASELINES[model]()


def run(name: str, limit: int | None, group: list[str]) -> dict[str, Any]:
    events = datasets.load(name)
    if limit:
        events = events[:limit]
    base = ModelConfig()
    models = [make(m, base) for m in group]
    kinds = list(datasets.DATASETS[name].targets)
    total = len(events)
    print(f"{name}: {total} events, models {', '.join(group)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()

    def progress(n: int) -> None:
        if n and n % 50_000 == 0:
            spent = time.perf_counter() - t0
            print(f"{name}/{group[0]}..: {n:,}/{total:,} events, {spent:.0f} s, about "
                  f"{spent / n * (total - n):.0f} s left", file=sys.stderr, flush=True)

    result = evaluate(events, kinds, models, progress=progress,
                      sample=TARGET_SAMPLE.get(name, 1))
    result["source"] = name
    result["limit"] = limit
    result["description"] = datasets.DATASETS[name].description
    result["config"] = base.to_dict()
    return result


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from the processes' results: the default, its ablations in the order the page
    shows them, then the baselines."""
    found = {n: r for part in parts for n, r in part["models"].items()}
    order = ["cartwise", *(f"cartwise-{a}" for a in ABLATIONS), *BASELINES]
    out = dict(parts[0])
    out["models"] = {n: found[n] for n in order if n in found}
    out["seconds"] = max(part["seconds"] for part in parts)
    against_best(out)
    return out


def kept_baselines(new: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """The saved run's baselines beside a new run of the default model, refused unless both
    replayed the same targets: same events, items, sampling, target counts and time windows.

    The baselines' code and the logs did not change, so replaying them again would give the
    same numbers at the cost of hours (Online Retail); the check makes sure of the second.
    """
    defaults = {"target_sample": 1}  # runs saved before sampling existed asked at every target
    for key in ("events", "items", "kinds", "target_sample", "window_ts"):
        if new.get(key, defaults.get(key)) != saved.get(key, defaults.get(key)):
            raise SystemExit(f"--keep-baselines: the saved run differs in {key!r}; replay "
                             "the baselines too")
    h = head(new)
    cur, old = new["models"]["cartwise"], saved["models"]["cartwise"]
    for kind in [h, *new["kinds"]]:
        if cur[kind]["targets"] != old[kind]["targets"]:
            raise SystemExit(f"--keep-baselines: {kind} targets differ "
                             f"({cur[kind]['targets']} vs {old[kind]['targets']})")
    for n, r in saved["models"].items():
        missing = [g for g in cur.get("windows", {}) if n in BASELINES and g not in r]
        if missing:
            raise SystemExit(f"--keep-baselines: the saved {n} has no {missing[0]!r} group; "
                             "replay the baselines too")
    models = dict(new["models"])
    models.update((n, r) for n, r in saved["models"].items() if n in BASELINES)
    out = dict(new)
    out["models"] = models
    out["baselines_from"] = saved.get("generated", "an earlier run")
    against_best(out)
    return out


def head(result: dict[str, Any]) -> str:
    return head_group(result)


def plot(results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        fig, ax = plt.subplots(figsize=(7, 3.5))
        days = [(t - r["window_ts"][0]) / 86400 for t in r["window_ts"]]
        for model, res in r["models"].items():
            if model.startswith("cartwise-"):
                continue
            ax.plot(days, res["hr20_by_window"], marker=".", label=model,
                    linewidth=2.5 if model == "cartwise" else 1)
        ax.set_xlabel("days into the reported part (window centres)")
        ax.set_ylabel("HR@20")
        ax.set_title(f"{name}: HR@20 over time ({', '.join(r['kinds'])} targets)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(IMG / f"quality-{name}-over-time.png", dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items(), strict=True):
        for model, res in r["models"].items():
            if model.startswith("cartwise-"):
                continue
            ax.scatter(res["cost_us_per_event"], res[head(r)]["hr20"],
                       s=60 if model == "cartwise" else 25)
            ax.annotate(model, (res["cost_us_per_event"], res[head(r)]["hr20"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("learn + recommend, us per event")
        ax.set_ylabel("HR@20")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(IMG / "quality-vs-cost.png", dpi=110)
    plt.close(fig)


def page(results: dict[str, dict[str, Any]], command: str) -> str:
    out = [
        "# Recommendation quality",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
        "The protocol, the targets and what each method is: [quality-protocol.md]"
        "(quality-protocol.md).",
        "",
    ]
    out += summary_section(results)
    out += [
        "## Results (reported part: the last 70% of each log)",
        "",
    ]
    for name, r in results.items():
        h = head(r)
        against_best(r)
        sampled = r.get("target_sample", 1)
        note = (f" Suggestions asked for at 1 in {sampled} targets, every event learned "
                "(quality-protocol.md, \"Sampled targets\"); us/event is not comparable with "
                "the other logs." if sampled > 1 else "")
        if r.get("limit") and r["events"] >= r["limit"]:  # a shorter log was replayed whole
            note += f" The first {r['limit']:,} events of the log (`--limit`)."
        if r.get("command", command) != command:
            note += f" Replayed by `{r['command']}` on {r['generated']}."
        if r.get("baselines_from"):
            src = r["baselines_from"]
            src = f"the run of {src}" if src[:1].isdigit() else src
            note += (f" The baselines' rows come from {src} (`--keep-baselines`: same events, "
                     "targets and time windows, checked; their code is unchanged since).")
        out += [f"### {name}", "", f"{r['description']}: {r['events']:,} events, "
                f"{r['items']:,} items; targets: {', '.join(r['kinds'])}.{note}", ""]
        labels = ([h] if h == "all" else []) + r["kinds"]
        cols = " | ".join(f"HR@20 {k}" for k in labels)
        out += [f"| model | targets | HR@5 | HR@10 | HR@20 | MRR@20 | new-item share of hits | "
                f"coverage@20 | us/event | {cols} |",
                "|---|---|---|---|---|---|---|---|---|" + "---|" * len(labels)]
        for model, res in r["models"].items():
            m = res[h]
            per = " | ".join(f"{res[k]['hr20']:.4f} ({res[k]['targets']})" for k in labels)
            bold = "**" if model == "cartwise" else ""
            out.append(f"| {bold}{model}{bold} | {m['targets']} | {m.get('hr5', 0):.4f} | "
                       f"{m['hr10']:.4f} | {m['hr20']:.4f} | {m['mrr20']:.4f} | "
                       f"{m['new_hit_share']:.2f} | {res['coverage20']:.3f} | "
                       f"{res['cost_us_per_event']:.0f} | {per} |")
        out += subset_tables(r)
        out += significance_table(r)
        out += ["", f"![HR@20 over time on {name}](img/quality-{name}-over-time.png)", ""]
    out += ["## Quality against cost", "", "![HR@20 against learn + recommend time per event]"
            "(img/quality-vs-cost.png)", ""]
    if all(f"cartwise-{a}" in r["models"] for r in results.values() for a in ABLATIONS):
        out += ablation_section(results)
    else:
        out += ["## Ablation", "", "Not replayed in this run (`--no-ablations`)."]
    out += shoppers_section()
    return "\n".join(out) + "\n"


SHORT = {"better, beyond noise": "better", "worse, beyond noise": "**worse**",
         "not significantly different": "no sig. difference"}


def summary_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per log and target group: cartwise against the baseline best at each metric."""
    out = ["## Summary", "", "cartwise minus the best baseline at each metric (which one, in "
           "brackets), and whether the difference is beyond noise (sign test and bootstrap "
           "over 20 time windows, below).", "",
           "| log | targets | HR@5 | HR@20 | MRR@20 |", "|---|---|---|---|---|"]
    for name, r in results.items():
        against_best(r)
        for label, per_metric in r.get("significance", {}).items():
            cells = [f"{v['diff']:+.4f} ({v['baseline']}) {SHORT[verdict(v)]}"
                     for v in (per_metric[m] for m in ("hr5", "hr20", "mrr20"))]
            out.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return out + [""]


SUBSET_TITLE = {"discovery": "Discovery targets (items the shopper never touched before)",
                "new for you": "The same discovery targets, with the shopper's own items left "
                               "out of every model's top 20 (what the `placement=new` answer, "
                               "\"new for you\", shows: docs/api.md)",
                "basket": "Basket completion (items added to a basket that already holds "
                          "others: the cart so far, or the earlier lines of the same order)"}


def subset_tables(r: dict[str, Any]) -> list[str]:
    """HR@5/10/20 and MRR@20 of every model on the discovery and basket-completion targets."""
    out: list[str] = []
    for label, title in SUBSET_TITLE.items():
        if label not in r["models"]["cartwise"]:
            continue
        out += ["", f"{title}:", "", "| model | targets | HR@5 | HR@10 | HR@20 | MRR@20 |",
                "|---|---|---|---|---|---|"]
        for model, res in r["models"].items():
            if model.startswith("cartwise-"):
                continue
            m = res[label]
            bold = "**" if model == "cartwise" else ""
            out.append(f"| {bold}{model}{bold} | {m['targets']} | {m['hr5']:.4f} | "
                       f"{m['hr10']:.4f} | {m['hr20']:.4f} | {m['mrr20']:.4f} |")
    return out


def significance_table(r: dict[str, Any]) -> list[str]:
    """cartwise against the baseline best at each metric, per target group."""
    sig = r.get("significance")
    if not sig:  # results saved before per-metric windows: the headline HR@20 only
        if "vs_best" not in r:
            return []
        sig = {head(r): {"hr20": {"baseline": r["best_baseline"], **r["vs_best"]}}}
    out = ["", "cartwise against the best baseline at each metric (paired over "
           f"{next(iter(next(iter(sig.values())).values()))['blocks']} time windows: mean "
           "difference with its 95% bootstrap interval, windows better / worse, sign test):",
           "", "| targets | metric | best baseline | difference | 95% interval | better / worse "
           "| p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for label, per_metric in sig.items():
        for metric, v in per_metric.items():
            out.append(f"| {label} | {NAMES[metric]} | {v['baseline']} | {v['diff']:+.4f} | "
                       f"{v['ci95'][0]:+.4f} .. {v['ci95'][1]:+.4f} | {v['wins']} / "
                       f"{v['losses']} | {v['sign_p']:.2g} | **{verdict(v)}** |")
    return out


def ablation_section(results: dict[str, dict[str, Any]]) -> list[str]:
    out = ["## Ablation", "",
           "Each row switches one component of the default model off; HR@20 on the headline "
           "targets (change against the default).", "",
           "| variant | what is off | " + " | ".join(results) + " |",
           "|---|---|" + "---|" * len(results)]
    for a, over in ABLATIONS.items():
        cells = []
        for r in results.values():
            h = head(r)
            full = r["models"]["cartwise"][h]["hr20"]
            v = r["models"][f"cartwise-{a}"][h]["hr20"]
            cells.append(f"{v:.4f} ({v - full:+.4f})")
        what = ", ".join(f"{k}={v}" for k, v in over.items())
        out.append(f"| {a} | {what} | " + " | ".join(cells) + " |")
    return out


def shoppers_section() -> list[str]:
    """Repurchase cycles and the price ladder (bench/repurchase.py, bench/ladder.py), when run."""
    out: list[str] = []
    rep_path, lad_path = RESULTS.parent / "repurchase.json", RESULTS.parent / "ladder.json"
    if rep_path.exists():
        r = orjson.loads(rep_path.read_bytes())
        out += ["", "## Repurchase cycles", "",
                f"`python -m bench.repurchase` on {r['dataset']}: {r['purchases']:,} purchase "
                f"lines, {r['repeat_purchases']:,} repeat purchases (a day or more after the "
                "shopper's previous purchase of the item). Each interval is predicted before it "
                "is learned; each method is scored on the same repeats (docs/replenishment.md).",
                "", "| method | repeats | median abs error (days) | mean abs error (days) | "
                "within 7 days | median abs log ratio |", "|---|---|---|---|---|---|"]
        for m, v in r["prediction"].items():
            bold = "**" if m == "cartwise" else ""
            out.append(f"| {bold}{m}{bold} | {v['n']:,} | {v['median_abs_error_days']} | "
                       f"{v['mean_abs_error_days']} | {v['within_7_days']:.1%} | "
                       f"{v['median_abs_log_ratio']} |")
        out += ["", f"Reminders {r['lead_days']:g} days before the predicted run-out; followed = "
                f"the shopper bought the item again within {r['followed_window_days']:g} days "
                "after the reminder; early = bought again before it.", "",
                "| method | reminders | followed | followed share | early share |",
                "|---|---|---|---|---|"]
        for m, v in r["reminders"].items():
            bold = "**" if m == "cartwise" else ""
            out.append(f"| {bold}{m}{bold} | {v['sent']:,} | {v['followed']:,} | "
                       f"{v['followed_share']:.1%} | {v['early_share']:.1%} |")
    if lad_path.exists():
        r = orjson.loads(lad_path.read_bytes())
        out += ["", "## Price ladder by segment", "",
                f"`python -m bench.ladder` on {r['dataset']} ({r['events']:,} events): before each "
                "purchase in the reported part, the shopper's top 20 plain and through the "
                "ladder of docs/rules.md (cheapest first from one order, evidence order from "
                "three, budget quadrants lose alternatives), by the shopper's RFM quadrant then.",
                "", "| segment | targets | HR@10 plain / ladder | HR@20 plain / ladder | "
                "MRR@20 plain / ladder | avg price of top 10 plain / ladder |",
                "|---|---|---|---|---|---|"]
        for seg, v in sorted(r["segments"].items(), key=lambda kv: kv[0] != "all"):
            p, q = v["plain"], v["ladder"]
            out.append(f"| {seg} | {p['targets']:,} | {p['hr10']:.4f} / {q['hr10']:.4f} | "
                       f"{p['hr20']:.4f} / {q['hr20']:.4f} | {p['mrr20']:.4f} / "
                       f"{q['mrr20']:.4f} | {p['avg_price_top10']} / {q['avg_price_top10']} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS))
    parser.add_argument("--limit", type=int, default=None, help="first N events of each")
    parser.add_argument("--reuse", action="store_true",
                        help="rebuild the page from saved results instead of replaying")
    parser.add_argument("--jobs", type=int, default=2,
                        help="replays at once, two per dataset (default+baselines, ablations)")
    parser.add_argument("--no-ablations", action="store_true",
                        help="skip the default model's ablations (half the time; the page "
                        "leaves the ablation table out)")
    parser.add_argument("--keep-baselines", action="store_true",
                        help="replay the default model and its ablations only; take the "
                        "baselines from the saved results after checking the targets match")
    args = parser.parse_args(argv)
    invocation = " ".join(["python -m bench.quality", *(sys.argv[1:] if argv is None else argv)])
    RESULTS.mkdir(parents=True, exist_ok=True)
    names = args.datasets.split(",")
    todo = [n for n in names if not (args.reuse and (RESULTS / f"{n}.json").exists())]
    saved = {n: orjson.loads((RESULTS / f"{n}.json").read_bytes()) for n in todo
             if args.keep_baselines}
    plan = groups(args.keep_baselines, ablations=not args.no_ablations)
    # Each log's result is saved the moment it is done, so a long run that is cut off keeps
    # what it finished and `--reuse` picks up from there.
    parts: dict[str, list[dict[str, Any]]] = {n: [] for n in todo}
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(run, n, args.limit, g): n for n in todo for g in plan}
        for future in as_completed(futures):
            n = futures[future]
            parts[n].append(future.result())
            if len(parts[n]) == len(plan):
                result = merge(parts[n])
                result["generated"] = time.strftime("%Y-%m-%d")
                result["command"] = invocation
                if args.keep_baselines:
                    result = kept_baselines(result, saved[n])
                (RESULTS / f"{n}.json").write_bytes(orjson.dumps(
                    result, option=orjson.OPT_INDENT_2))
    results = {n: orjson.loads((RESULTS / f"{n}.json").read_bytes()) for n in names}
    plot(results)
    (ROOT / "docs" / "quality.md").write_text(page(results, invocation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
