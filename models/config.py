"""Model settings. Defaults are documented in docs/model.md; every knob is a plain number."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def _default_weights() -> dict[str, float]:
    return {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0}


@dataclass(frozen=True)
class ModelConfig:
    # Evidence strength of one item in a shopper context, by the strongest event seen on it.
    weights: dict[str, float] = field(default_factory=_default_weights)
    # Counts halve every `half_life_s` of event time (forward decay, docs/model.md).
    half_life_s: float = 60 * 86400.0
    # Trending (the cold-start answer) follows the shop faster: popularity halves every 14 days.
    trending_half_life_s: float = 14 * 86400.0
    # A new session starts after this much silence when the app sends no session_id.
    session_gap_s: float = 30 * 60.0
    # Items older than this leave the context; items from earlier sessions count this much.
    history_s: float = 3 * 86400.0
    history_factor: float = 0.5
    # Bounds (docs/model.md, "Memory").
    context_max_items: int = 30
    seen_ids_max: int = 64
    bought_max: int = 200
    # Purchase history per shopper for RFM segments (models/segments.py): a year, 200 orders.
    orders_keep_s: float = 365 * 86400.0
    orders_max: int = 200
    # A consumable is due again this long before its expected run-out (models/repurchase.py);
    # the workers take it from CARTWISE_REPLENISH_LEAD_DAYS.
    replenish_lead_s: float = 7 * 86400.0
    max_users: int = 500_000
    max_neighbours: int = 500
    max_items: int = 200_000
    # Bounds are applied once per this much event time, on closed evidence only (models/graph.py)
    prune_epoch_s: float = 600.0
    # List building.
    list_size: int = 50
    min_support: float = 0.25  # shopper contexts (decayed) in which the pair occurred
    llr_min: float = 0.0  # G² floor; 6.63 is chi-square p < 0.01 (docs/model.md)
    alt_max_buy_share: float = 0.2
    # "Next" evidence: a pick d <= next_steps places after another in one session adds 1/d.
    next_steps: int = 10
    # The same picks seen the other way round (an item picked d places *before* the anchor)
    # count this much in the anchor's next list: a session's neighbourhood both ways, as the
    # session-neighbourhood methods (STAN, VSTAN) weigh it (docs/model.md, fifth round).
    before_weight: float = 0.3
    score_digits: int = 9
    # A changed list is recomputed once its row's evidence new since the last computation is
    # this share of the row's (decayed) evidence, or the list is `list_max_age_s` old in event
    # time: a wide row that gains a little with every event is not rebuilt for each
    # (docs/model.md, "Cost of item lists"). 0 rebuilds every changed list.
    list_min_change: float = 0.05
    list_max_age_s: float = 86400.0
    # Ranking a shopper's list from the context (models/ranking.py).
    max_anchors: int = 30  # newest context items whose lists are blended
    anchor_decay: float = 0.5  # each older anchor counts this much less than the next newer
    # Of those, the newest whose item lists are read and blended; older anchors still come back
    # as revisits. Blending is most of a shopper's cost, and an anchor's weight halves per
    # step: the 12th weighs 0.05% of the newest (docs/model.md, "Cost of a shopper's list").
    list_anchors: int = 12
    viewed_weight: float = 0.6  # an anchor only viewed, against one carted or bought
    alternatives_weight: float = 0.5  # alternatives are offered for viewed anchors only
    next_weight: float = 20.0  # what shoppers picked right after an anchor
    # Only the head of each anchor's lists is blended; reading more costs time. All of the
    # next list (`list_size`): on Online Retail its tail still adds (docs/model.md).
    per_anchor_cross_sell: int = 20
    per_anchor_alternatives: int = 30
    per_anchor_next: int = 50
    # An older anchor weighs less (`anchor_decay`), and so does the tail of its lists: the
    # anchor r steps back reads `anchor_heads` ** r of each head (at least one entry).
    anchor_heads: float = 0.7
    # A context item viewed but not carted may come back as a suggestion ("revisit"), scored
    # this much times its anchor weight; 0 leaves every context item out.
    revisit_weight: float = 20.0
    # The item the shopper is on now (the newest, only viewed) comes back only as far as
    # shoppers pick it again right after itself (a re-click, a cart of the item just viewed):
    # `repeat_weight` x viewed_weight x its repeat share, drawn toward the share of the
    # shopper's partition by `repeat_prior` picks (models/ranking.py, `repeat_share`).
    repeat_weight: float = 300.0
    repeat_prior: float = 5.0
    # A bought item that may be bought again (models/ranking.py, `rebuyable`) comes back as a
    # revisit scored `rebuy_weight` x times bought, halving every `rebuy_half_life_s` since the
    # last purchase; only the newest `rebuy_max` bought items are considered.
    rebuy_weight: float = 0.3
    rebuy_half_life_s: float = 30 * 86400.0
    rebuy_max: int = 30
    # A rebuyable item bought too recently to be due (models/ranking.py, `not_due`) keeps this
    # share of its score; 0 leaves it out until due.
    not_due_weight: float = 1.0
    # Learn each evidence kind's weight online from the shop's next events (models/blend.py):
    # the step size, 0 keeps the weights above fixed. Steps are applied once per
    # `blend_epoch_s` of event time (0: at once), against `blend_negatives` items ranked above
    # the picked one. Not in the stream yet: the library and the replay only.
    blend_rate: float = 0.0
    blend_epoch_s: float = 600.0
    blend_negatives: int = 20

    def to_dict(self) -> dict:
        return asdict(self)

    def per_anchor(self, kind: str) -> int:
        return {"cross_sell": self.per_anchor_cross_sell,
                "alternatives": self.per_anchor_alternatives}.get(kind, self.per_anchor_next)

    def weight(self, event_type: str) -> float:
        return self.weights.get(event_type, 0.0)


def model_config(overrides: Sequence[str], **base: Any) -> ModelConfig:
    """A ModelConfig from NAME=NUMBER strings (`cartwise evaluate --set`, `CARTWISE_MODEL`)."""
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    values: dict[str, Any] = dict(base)
    for o in overrides:
        if not o.strip():
            continue
        name, sep, raw = o.partition("=")
        name = name.strip()
        if not sep or name not in fields or fields[name] not in ("int", "float"):
            numeric = sorted(n for n, t in fields.items() if t in ("int", "float"))
            raise ValueError(f"--set takes NAME=NUMBER with NAME one of {numeric}; got {o!r}")
        try:
            values[name] = int(raw) if fields[name] == "int" else float(raw)
        except ValueError:
            raise ValueError(f"--set {name}: {raw!r} is not a number") from None
    return ModelConfig(**values)
