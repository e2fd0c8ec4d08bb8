"""What shoppers did with suggestions: attribution, experiment counters and the re-ranker.

The context stage keeps, per shopper, the impressions of the attribution window (what was
shown, under which request and variant, with the features each suggestion had when it was
served). A click, add-to-cart or purchase of a shown item is attributed to the newest such
impression; experiment counters change by the deltas returned here. Every shown suggestion
becomes one training example for the re-ranker when its label window closes: positive if it
was clicked, carted or bought within it, else negative. All of an impression's examples are
learned together, in impression order: learning positives at once and negatives a window
later would feed the online model long runs of one class. Pure logic, no I/O.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from river import linear_model, metrics, optim, utils

from cartwise.contract import Event

# The re-ranker's inputs, in this order everywhere (served documents, training, serving).
KIND_FEATURES = ("cross_sell", "alternatives", "next", "upsell", "revisit", "trending",
                 "pinned")
PLACEMENT_FEATURES = ("product", "cart", "home")
FEATURES = ("score", "plain_rank", "lift", "llr", "price_ratio", "cheaper", "same_category",
            "existing_customer", *(f"kind_{k}" for k in KIND_FEATURES),
            *(f"placement_{p}" for p in PLACEMENT_FEATURES))

# Per shown item: [features or None, label state, converted]. PENDING: nothing yet; HIT: a
# response within the label window, not learned yet; POSITIVE / NEGATIVE: learned.
PENDING, POSITIVE, NEGATIVE, UNLEARNABLE, HIT = 0, 1, -1, 2, 3

Delta = tuple[str, str, str, float]  # experiment, variant, counter, amount
Example = tuple[list[float], bool, float]  # features, label, plain ordering's score


@dataclass(frozen=True)
class FeedbackConfig:
    attribution_s: float = 7 * 86400.0  # a conversion counts this long after the impression
    label_s: float = 1800.0  # an example is negative when nothing happened within this
    max_shown: int = 20  # impressions kept per shopper (oldest dropped)


def features(entry: Mapping[str, Any], plain_pos: int, top_score: float,
             facts: Mapping[str, Any] | None, anchor: Mapping[str, Any] | None,
             placement: str, existing: bool, evidence: Mapping[str, Any] | None = None
             ) -> list[float]:
    """One suggestion's features as served; `evidence` is its entry in the item list (lift,
    LLR) when the answer came from one. Scaled to about [0, 1] so weights can be averaged."""
    facts = facts or {}
    anchor = anchor or {}
    ev = evidence or {}
    score = entry.get("score") or 0.0
    price, base = facts.get("price"), anchor.get("price")
    ratio = math.log(price / base) if price and base and price > 0 and base > 0 else 0.0
    kind = entry.get("kind")
    cat = facts.get("category")
    return [
        min(1.0, score / top_score) if top_score > 0 else 0.0,
        1.0 / (1.0 + plain_pos),
        min(1.0, math.log1p(max(0.0, ev.get("lift") or 0.0)) / 5.0),
        min(1.0, math.log1p(max(0.0, ev.get("llr") or 0.0)) / 10.0),
        max(-1.0, min(1.0, ratio / 3.0)),
        1.0 if ratio < 0 else 0.0,
        1.0 if cat is not None and cat == anchor.get("category") else 0.0,
        1.0 if existing else 0.0,
        *(1.0 if kind == k else 0.0 for k in KIND_FEATURES),
        *(1.0 if placement == p else 0.0 for p in PLACEMENT_FEATURES),
    ]


def plain_score(x: Sequence[float]) -> float:
    """The plain ordering as a score: earlier in the model's list is better."""
    return x[1]


def predict(weights: Sequence[float], intercept: float, x: Sequence[float]) -> float:
    z = intercept + sum(w * v for w, v in zip(weights, x, strict=False))
    return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))


def rerank(entries: list[dict[str, Any]], xs: Sequence[Sequence[float]],
           weights: Sequence[float], intercept: float) -> list[dict[str, Any]]:
    """Entries by predicted conversion, best first; pinned entries keep their places."""
    free = [(predict(weights, intercept, x), -n, e) for n, (e, x) in enumerate(zip(entries, xs,
                                                                                   strict=True))
            if e.get("kind") != "pinned"]
    free.sort(key=lambda t: (t[0], t[1]), reverse=True)
    it = iter(e for _, _, e in free)
    return [e if e.get("kind") == "pinned" else next(it) for e in entries]


class Attribution:
    """Applies feedback and shop events to one shopper's feedback state (a plain dict that
    is checkpointed with the shopper's context): {"shown": [...], "exp": {...}}.

    shown: [request_id, ts, experiment, variant, placement, {item: [x, state, converted]},
            clicked]
    exp:   {experiment: [variant, first_ts, last_ts, revenue, converted, cross_sold,
                         existing customer when first shown]}
    """

    def __init__(self, config: FeedbackConfig | None = None) -> None:
        self.config = config or FeedbackConfig()

    def impression(self, fb: dict[str, Any], event: Event, served: Mapping[str, Any] | None,
                   existing: bool) -> list[Delta]:
        """`served` is the API's record of the answer (features per item), if still there."""
        exp, variant = event.experiment_id, event.variant
        if served is not None and exp is None and served.get("e"):
            exp, variant = served["e"], served["v"]
        xs = (served or {}).get("x") or {}
        placement = event.placement or (served or {}).get("p")
        items: dict[str, list[Any]] = {}
        for line in event.lines:
            x = xs.get(line.item_id)
            items[line.item_id] = [x, PENDING if x is not None else UNLEARNABLE, 0]
        shown = fb.setdefault("shown", [])
        shown.append([event.request_id, event.ts, exp, variant, placement, items, 0])
        deltas: list[Delta] = []
        if exp is not None and variant is not None:
            exps = fb.setdefault("exp", {})
            mine = exps.get(exp)
            if mine is None or mine[0] != variant:
                # A shopper switching variant (a redefined experiment) counts anew there.
                exps[exp] = [variant, event.ts, event.ts, 0.0, 0, 0, 1 if existing else 0]
                deltas.append((exp, variant, "shoppers", 1.0))
                if existing:
                    deltas.append((exp, variant, "existing", 1.0))
            else:
                mine[2] = max(mine[2], event.ts)
            deltas.append((exp, variant, "impressions", 1.0))
        return deltas

    def click(self, fb: dict[str, Any], event: Event) -> list[Delta]:
        item = event.lines[0].item_id
        for imp in reversed(fb.get("shown", ())):
            if imp[0] == event.request_id and item in imp[5]:
                deltas: list[Delta] = []
                if imp[2] is not None:
                    deltas.append((imp[2], imp[3], "clicks", 1.0))
                    if not imp[6]:
                        deltas.append((imp[2], imp[3], "clicked", 1.0))
                imp[6] = 1
                self._hit(imp[5][item], event.ts - imp[1])
                return deltas
        return []

    def shop_event(self, fb: dict[str, Any], event: Event, bought_before: Mapping[str, Any]
                   ) -> list[Delta]:
        """An add-to-cart or purchase: conversions of shown items, and orders and revenue of
        shoppers in an experiment. Call before the context learns the event (`bought_before`
        is what the shopper owned until now)."""
        deltas: list[Delta] = []
        now = event.ts
        horizon = now - self.config.attribution_s
        exps = fb.get("exp") or {}
        purchase = event.type == "purchase"
        attributed = 0.0
        for line in event.lines:
            for imp in reversed(fb.get("shown", ())):
                if imp[1] < horizon or imp[1] > now or line.item_id not in imp[5]:
                    continue
                rec = imp[5][line.item_id]
                self._hit(rec, now - imp[1])
                exp, variant = imp[2], imp[3]
                if exp is not None and not rec[2]:
                    deltas.append((exp, variant, "conversions", 1.0))
                    mine = exps.get(exp)
                    if mine is not None and mine[0] == variant and not mine[4]:
                        mine[4] = 1
                        deltas.append((exp, variant, "converters", 1.0))
                rec[2] = 1
                if purchase and exp is not None:
                    value = (line.price or 0.0) * line.quantity
                    attributed += value
                    deltas.append((exp, variant, "attributed_revenue", value))
                    mine = exps.get(exp)
                    if (mine is not None and mine[0] == variant and mine[6] and not mine[5]
                            and line.item_id not in bought_before):
                        mine[5] = 1
                        deltas.append((exp, variant, "cross_sold", 1.0))
                break  # the newest impression that showed it takes the credit
        if purchase:
            amount = sum((ln.price or 0.0) * ln.quantity for ln in event.lines)
            for exp, mine in exps.items():
                if mine[1] <= now and now - mine[2] <= self.config.attribution_s:
                    variant, before = mine[0], mine[3]
                    mine[3] = before + amount
                    deltas += [(exp, variant, "orders", 1.0), (exp, variant, "revenue", amount),
                               (exp, variant, "revenue_sq", amount * amount),
                               (exp, variant, "shopper_revenue_sq",
                                mine[3] * mine[3] - before * before)]
        return deltas

    def settle(self, fb: dict[str, Any], now: float) -> list[Example]:
        """The examples of impressions whose label window has closed, oldest first; forget
        what is past attribution. `now` is event time (the partition's newest), so a replay
        agrees."""
        examples: list[Example] = []
        label_by = now - self.config.label_s
        keep = []
        for imp in fb.get("shown", ()):
            if imp[1] <= label_by:
                for rec in imp[5].values():
                    if rec[1] in (PENDING, HIT):
                        positive = rec[1] == HIT
                        rec[1] = POSITIVE if positive else NEGATIVE
                        examples.append((rec[0], positive, plain_score(rec[0])))
            if imp[1] >= now - self.config.attribution_s:
                keep.append(imp)
        del keep[: max(0, len(keep) - self.config.max_shown)]
        if "shown" in fb:
            fb["shown"] = keep
        exps = fb.get("exp") or {}
        for exp in [e for e, m in exps.items() if now - m[2] > self.config.attribution_s]:
            del exps[exp]
        return examples

    def next_settle(self, fb: Mapping[str, Any]) -> float | None:
        """Event time at which `settle` has something to do for this shopper."""
        pending = [imp[1] for imp in fb.get("shown", ())
                   if any(r[1] in (PENDING, HIT) for r in imp[5].values())]
        return min(pending) + self.config.label_s if pending else None

    def _hit(self, rec: list[Any], age: float) -> None:
        if rec[1] == PENDING and age <= self.config.label_s:
            rec[1] = HIT


class Reranker:
    """Online logistic regression (river) over FEATURES, with progressive validation.

    Each example is scored before it is learned, so the ROC AUC is measured on feedback the
    model had not seen (river's prequential evaluation); the plain ordering is scored on the
    same examples. Both over the newest `window` examples: the comparison is about the model
    as it is now, not as it was while it knew nothing. Used only while it beats the plain
    order.
    """

    def __init__(self, min_examples: int = 500, window: int = 2000) -> None:
        self.min_examples = min_examples
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(0.05), l2=1e-5)
        self.auc = utils.Rolling(metrics.ROCAUC, window_size=window)
        self.auc_plain = utils.Rolling(metrics.ROCAUC, window_size=window)
        self.loss = metrics.LogLoss()
        self.examples = 0
        self.positives = 0

    def learn(self, examples: Iterable[Example]) -> None:
        for x, label, plain in examples:
            if x is None or len(x) != len(FEATURES):
                continue  # served by an API with another feature set: not comparable
            xd = dict(zip(FEATURES, x, strict=True))
            p = self.model.predict_proba_one(xd).get(True, 0.5)
            self.auc.update(label, {True: p, False: 1.0 - p})
            self.auc_plain.update(label, {True: plain, False: 1.0 - plain})
            self.loss.update(label, {True: p, False: 1.0 - p})
            self.model.learn_one(xd, label)
            self.examples += 1
            self.positives += int(label)

    def summary(self) -> dict[str, Any]:
        """What the API combines across partitions (docs/redis.md, cw:reranker)."""
        w = self.model.weights
        return {"features": list(FEATURES), "weights": [float(w.get(f, 0.0)) for f in FEATURES],
                "intercept": float(self.model.intercept), "examples": self.examples,
                "positives": self.positives,
                "auc": float(self.auc.get()) if self.examples else None,
                "auc_plain": float(self.auc_plain.get()) if self.examples else None,
                "log_loss": float(self.loss.get()) if self.examples else None}

    def to_bytes(self) -> bytes:
        return pickle.dumps(self)

    @staticmethod
    def from_bytes(raw: bytes) -> Reranker:
        # Written by the workers into the project's own Redis keyspace, never by clients.
        r = pickle.loads(raw)  # noqa: S301
        if not isinstance(r, Reranker):
            raise TypeError("not a re-ranker")
        return r


def combine(docs: Iterable[Mapping[str, Any] | None], min_examples: int) -> dict[str, Any]:
    """One model from the partitions' summaries: weights averaged by examples learned.

    Active when, over all partitions, there are `min_examples` examples and the re-ranker's
    progressive AUC (examples-weighted) is above the plain ordering's.
    """
    docs = [d for d in docs if d and d.get("examples") and list(d.get("features", ()))
            == list(FEATURES)]
    n = sum(d["examples"] for d in docs)
    if not n:
        return {"active": False, "examples": 0, "positives": 0, "auc": None, "auc_plain": None,
                "weights": None, "intercept": 0.0, "partitions": 0}
    weights = [sum(d["weights"][i] * d["examples"] for d in docs) / n
               for i in range(len(FEATURES))]
    intercept = sum(d["intercept"] * d["examples"] for d in docs) / n
    auc = sum((d["auc"] or 0.5) * d["examples"] for d in docs) / n
    auc_plain = sum((d["auc_plain"] or 0.5) * d["examples"] for d in docs) / n
    return {"active": n >= min_examples and auc > auc_plain, "examples": n,
            "positives": sum(d["positives"] for d in docs), "auc": auc, "auc_plain": auc_plain,
            "weights": weights, "intercept": intercept, "partitions": len(docs)}
