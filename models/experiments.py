"""A/B tests of suggestion strategies: definitions, assignment and the per-variant report.

An experiment splits shoppers deterministically (a hash of experiment id and shopper id) into
variants, each a set of strategy settings the API applies to that shopper's answers. The
workers count what the variants' shoppers did (models/feedback.py); this module turns those
counters into rates with confidence intervals and a verdict. Pure logic, no I/O.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
RANKINGS = ("plain", "auto")
METRICS = ("conversion_rate", "ctr", "cross_sell_rate", "revenue_per_shopper")
MAX_VARIANTS = 8
MAX_EXPERIMENTS = 50
# Counted per variant by the workers (docs/experiments.md has what each one means).
COUNTERS = ("shoppers", "existing", "impressions", "clicked", "clicks", "converters",
            "conversions", "cross_sold", "orders", "revenue", "revenue_sq", "shopper_revenue_sq",
            "attributed_revenue")
Z95 = 1.959963984540054


class ExperimentError(ValueError):
    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field, self.detail = field, detail


@dataclass(frozen=True)
class Strategy:
    """What a variant changes in the answers its shoppers get (docs/experiments.md)."""

    ranking: str = "auto"  # "plain": the model's order; "auto": the re-ranker once it wins
    rules: bool = True  # the merchant's business rules
    fill: bool = True  # top short answers up with trending items

    def to_dict(self) -> dict[str, Any]:
        return {"ranking": self.ranking, "rules": self.rules, "fill": self.fill}


DEFAULT_STRATEGY = Strategy()


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    strategy: Strategy


@dataclass(frozen=True)
class Experiment:
    id: str
    variants: tuple[Variant, ...]
    traffic: float = 1.0  # share of shoppers in the experiment; the rest get the default
    start: float | None = None
    end: float | None = None
    metric: str = "conversion_rate"  # what the verdict is about
    min_shoppers: int = 100  # per variant before any verdict
    description: str = ""
    _cum: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        total = sum(v.weight for v in self.variants)
        acc, cum = 0.0, []
        for v in self.variants:
            acc += v.weight / total
            cum.append(acc)
        object.__setattr__(self, "_cum", tuple(cum))

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def active(self, now: float) -> bool:
        return (self.start is None or now >= self.start) and (self.end is None or now < self.end)

    def assign(self, user_id: str) -> Variant | None:
        """The shopper's variant, the same on every API process and every call; None: not in."""
        h = hashlib.blake2b(f"{self.id}\x00{user_id}".encode(), digest_size=8).digest()
        u = int.from_bytes(h, "big") / 2**64
        if u >= self.traffic:
            return None
        u /= self.traffic
        for v, c in zip(self.variants, self._cum, strict=True):
            if u < c:
                return v
        return self.variants[-1]

    @classmethod
    def parse(cls, exp_id: str, d: Any) -> Experiment:
        """Validate a definition from the API; errors name the field."""
        if not ID_RE.match(exp_id):
            raise ExperimentError("id", "1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(d, dict):
            raise ExperimentError("body", "an experiment is a JSON object")
        known = {"variants", "traffic", "start", "end", "metric", "min_shoppers", "description"}
        for k in d:
            if k not in known:
                raise ExperimentError(k, f"unknown field; known: {sorted(known)}")
        raw = d.get("variants")
        if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_VARIANTS:
            raise ExperimentError("variants", f"a list of 2 to {MAX_VARIANTS} variants; the "
                                  "first is the control")
        variants, names = [], set()
        for n, v in enumerate(raw):
            where = f"variants[{n}]"
            if not isinstance(v, dict):
                raise ExperimentError(where, "a variant is an object")
            for k in v:
                if k not in ("name", "weight", "settings"):
                    raise ExperimentError(f"{where}.{k}", "unknown field; known: name, "
                                          "weight, settings")
            name = v.get("name")
            if not isinstance(name, str) or not ID_RE.match(name):
                raise ExperimentError(f"{where}.name", "1-64 letters, digits, '_', '-' or '.'")
            if name in names:
                raise ExperimentError(f"{where}.name", f"{name!r} used twice")
            names.add(name)
            weight = _number(v.get("weight", 1), f"{where}.weight")
            if weight <= 0:
                raise ExperimentError(f"{where}.weight", "must be > 0")
            variants.append(Variant(name, weight, _strategy(v.get("settings", {}),
                                                             f"{where}.settings")))
        traffic = _number(d.get("traffic", 1.0), "traffic")
        if not 0 < traffic <= 1:
            raise ExperimentError("traffic", "a share in (0, 1]")
        start = _time(d.get("start"), "start")
        end = _time(d.get("end"), "end")
        if start is not None and end is not None and end <= start:
            raise ExperimentError("end", "must be after start")
        metric = d.get("metric", "conversion_rate")
        if metric not in METRICS:
            raise ExperimentError("metric", f"one of {list(METRICS)}")
        min_shoppers = d.get("min_shoppers", 100)
        if isinstance(min_shoppers, bool) or not isinstance(min_shoppers, int) \
                or not 1 <= min_shoppers <= 10_000_000:
            raise ExperimentError("min_shoppers", "an integer >= 1")
        description = d.get("description", "")
        if not isinstance(description, str) or len(description) > 500:
            raise ExperimentError("description", "a string of at most 500 characters")
        return cls(exp_id, tuple(variants), traffic, start, end, metric, min_shoppers,
                   description)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "traffic": self.traffic, "start": self.start, "end": self.end,
                "metric": self.metric, "min_shoppers": self.min_shoppers,
                "description": self.description,
                "variants": [{"name": v.name, "weight": v.weight,
                              "settings": v.strategy.to_dict()} for v in self.variants]}


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ExperimentError(where, "must be a number")
    return float(v)


def _time(v: Any, where: str) -> float | None:
    if v is None:
        return None
    t = _number(v, where)
    if not 946_684_800 <= t <= 4_102_444_800:
        raise ExperimentError(where, "epoch seconds between 2000 and 2100")
    return t


def _strategy(d: Any, where: str) -> Strategy:
    if not isinstance(d, dict):
        raise ExperimentError(where, "settings are an object")
    for k in d:
        if k not in ("ranking", "rules", "fill"):
            raise ExperimentError(f"{where}.{k}", "unknown setting; known: ranking, rules, fill")
    ranking = d.get("ranking", "auto")
    if ranking not in RANKINGS:
        raise ExperimentError(f"{where}.ranking", f"one of {list(RANKINGS)}")
    for k in ("rules", "fill"):
        if not isinstance(d.get(k, True), bool):
            raise ExperimentError(f"{where}.{k}", "true or false")
    return Strategy(ranking, d.get("rules", True), d.get("fill", True))


def choose(experiments: Mapping[str, Experiment], user_id: str | None, now: float
           ) -> tuple[Experiment, Variant] | None:
    """The experiment and variant of this shopper's answers: the first active experiment (by
    id) that takes them. One experiment per answer keeps every report's arms clean."""
    if user_id is None:
        return None
    for exp_id in sorted(experiments):
        exp = experiments[exp_id]
        if exp.active(now) and (v := exp.assign(user_id)) is not None:
            return exp, v
    return None


# -- the report ---------------------------------------------------------------------------------

def wilson(k: float, n: float) -> tuple[float, float]:
    """95% Wilson interval of a proportion: sane at 0, 1 and small n."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, k / n)
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _normal_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def mean_ci(total: float, sq: float, n: float) -> tuple[float | None, float | None,
                                                         float | None, float | None]:
    """Mean, its 95% normal interval and the variance of the mean, from sum and sum of squares."""
    if n <= 0:
        return None, None, None, None
    mean = total / n
    var = max(0.0, (sq - n * mean * mean) / (n - 1)) if n > 1 else 0.0
    se2 = var / n
    half = Z95 * math.sqrt(se2)
    return mean, mean - half, mean + half, se2


def _rate(c: Mapping[str, float], k: str, n: str) -> dict[str, Any]:
    lo, hi = wilson(c.get(k, 0.0), c.get(n, 0.0))
    value = c.get(k, 0.0) / c[n] if c.get(n) else None
    return {"value": value, "ci95": [lo, hi], "count": c.get(k, 0.0), "of": c.get(n, 0.0)}


def _mean(c: Mapping[str, float], total: str, sq: str, n: str) -> dict[str, Any]:
    mean, lo, hi, _ = mean_ci(c.get(total, 0.0), c.get(sq, 0.0), c.get(n, 0.0))
    return {"value": mean, "ci95": [lo, hi], "of": c.get(n, 0.0)}


def compare(metric: str, a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, Any]:
    """Variant b against control a: difference, its 95% interval and a two-sided p-value."""
    if metric == "revenue_per_shopper":
        ma, _, _, va = mean_ci(a.get("revenue", 0.0), a.get("shopper_revenue_sq", 0.0),
                               a.get("shoppers", 0.0))
        mb, _, _, vb = mean_ci(b.get("revenue", 0.0), b.get("shopper_revenue_sq", 0.0),
                               b.get("shoppers", 0.0))
        if ma is None or mb is None or va is None or vb is None:
            return {"difference": None, "ci95": [None, None], "p_value": None}
        diff, se = mb - ma, math.sqrt(va + vb)
    else:
        k, n = {"conversion_rate": ("converters", "shoppers"), "ctr": ("clicked", "impressions"),
                "cross_sell_rate": ("cross_sold", "existing")}[metric]
        na, nb = a.get(n, 0.0), b.get(n, 0.0)
        if na <= 0 or nb <= 0:
            return {"difference": None, "ci95": [None, None], "p_value": None}
        pa, pb = min(1.0, a.get(k, 0.0) / na), min(1.0, b.get(k, 0.0) / nb)
        diff = pb - pa
        se = math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
        pooled = (a.get(k, 0.0) + b.get(k, 0.0)) / (na + nb)
        se0 = math.sqrt(max(pooled * (1 - pooled), 0.0) * (1 / na + 1 / nb))
        p = _normal_p(diff / se0) if se0 > 0 else (1.0 if diff == 0 else 0.0)
        return {"difference": diff, "ci95": [diff - Z95 * se, diff + Z95 * se], "p_value": p}
    p = _normal_p(diff / se) if se > 0 else (1.0 if diff == 0 else 0.0)
    return {"difference": diff, "ci95": [diff - Z95 * se, diff + Z95 * se], "p_value": p}


def report(exp: Experiment, counters: Mapping[str, Mapping[str, float]], now: float
           ) -> dict[str, Any]:
    """Per-variant rates with 95% intervals, each variant against the control, and a verdict.

    `counters` is variant -> counter -> value as the workers keep them. A difference is called
    only when every variant has `min_shoppers` and the p-value clears 0.05 split over the
    comparisons (Bonferroni); until then the verdict says "not significant yet".
    """
    rows = []
    for v in exp.variants:
        c = counters.get(v.name, {})
        rows.append({
            "variant": v.name, "settings": v.strategy.to_dict(),
            "shoppers": c.get("shoppers", 0.0), "impressions": c.get("impressions", 0.0),
            "clicks": c.get("clicks", 0.0), "conversions": c.get("conversions", 0.0),
            "orders": c.get("orders", 0.0), "revenue": c.get("revenue", 0.0),
            "ctr": _rate(c, "clicked", "impressions"),
            "conversion_rate": _rate(c, "converters", "shoppers"),
            "cross_sell_rate": _rate(c, "cross_sold", "existing"),
            "average_order_value": _mean(c, "revenue", "revenue_sq", "orders"),
            "revenue_per_shopper": _mean(c, "revenue", "shopper_revenue_sq", "shoppers"),
        })
    control = counters.get(exp.control.name, {})
    alpha = 0.05 / max(1, len(exp.variants) - 1)
    enough = all(r["shoppers"] >= exp.min_shoppers for r in rows)
    better, worse = [], []
    for row, v in zip(rows[1:], exp.variants[1:], strict=True):
        row["vs_control"] = {m: compare(m, control, counters.get(v.name, {})) for m in METRICS}
        head = row["vs_control"][exp.metric]
        significant = enough and head["p_value"] is not None and head["p_value"] < alpha
        row["vs_control"]["significant"] = significant
        if significant:
            (better if head["difference"] > 0 else worse).append((head["difference"], v.name))
    if not enough:
        verdict = (f"not significant yet: fewer than {exp.min_shoppers} shoppers in a variant")
        winner = None
    elif better:
        winner = max(better)[1]
        verdict = f"{winner} beats {exp.control.name} on {exp.metric}"
    elif len(worse) == len(rows) - 1:
        winner = exp.control.name
        verdict = f"{winner} (the control) beats every variant on {exp.metric}"
    else:
        winner = None
        verdict = f"not significant yet on {exp.metric} (p >= {alpha:.3g})"
    status = ("scheduled" if exp.start is not None and now < exp.start
              else "ended" if exp.end is not None and now >= exp.end else "running")
    return {"experiment": exp.to_dict(), "status": status, "metric": exp.metric,
            "alpha": alpha, "winner": winner, "verdict": verdict, "variants": rows,
            "generated_at": now}


def parse_counters(raw: Mapping[bytes | str, bytes | str]) -> dict[str, dict[str, float]]:
    """The workers' hash (field "variant|counter") -> variant -> counter -> value."""
    out: dict[str, dict[str, float]] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        variant, _, counter = key.rpartition("|")
        out.setdefault(variant, {})[counter] = float(v)
    return out
