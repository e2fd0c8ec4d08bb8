"""RFM segments: recency, frequency and monetary value of a shopper's orders (SPEC 1).

Computed when asked, from the order history the context agent keeps (models/context.py), so
a merchant changing the window or the thresholds sees the new segments at once and recency
is always relative to now. Pure logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

DAY = 86400.0

# The amount x frequency quadrants of SPEC 1, from most to least valuable.
IMPORTANT_VALUE = "important_value"  # frequent and big spenders: keep them
IMPORTANT_TO_DEVELOP = "important_to_develop"  # one big order: bring them back
GENERAL_VALUE = "general_value"  # frequent, mid spend: grow the basket
GENERAL_TO_DEVELOP = "general_to_develop"  # the rest
QUADRANTS = (IMPORTANT_VALUE, IMPORTANT_TO_DEVELOP, GENERAL_VALUE, GENERAL_TO_DEVELOP)


@dataclass(frozen=True)
class SegmentConfig:
    window_days: float = 90.0
    frequent_orders: int = 2  # this many orders in the window or more: "frequent"
    high_spend: float = 600.0  # spent in the window, this or more: "important"
    mid_spend: float = 300.0  # frequent and this or more: "general value"

    def __post_init__(self) -> None:
        if not self.window_days > 0:
            raise ValueError("segment window_days must be positive")
        if self.frequent_orders < 1:
            raise ValueError("segment frequent_orders must be at least 1")
        if not 0 <= self.mid_spend <= self.high_spend:
            raise ValueError("segment thresholds need 0 <= mid_spend <= high_spend")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rfm:
    recency_days: float | None  # since the last order ever kept; None: never ordered
    frequency: int  # orders in the window
    monetary: float  # spent in the window (orders without a price count 0)
    unpriced_orders: int  # orders in the window whose amount is unknown
    quadrant: str | None  # None: no order in the window

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quadrant(frequency: int, monetary: float, cfg: SegmentConfig) -> str | None:
    if frequency <= 0:
        return None
    frequent = frequency >= cfg.frequent_orders
    if monetary >= cfg.high_spend:
        return IMPORTANT_VALUE if frequent else IMPORTANT_TO_DEVELOP
    if frequent and monetary >= cfg.mid_spend:
        return GENERAL_VALUE
    return GENERAL_TO_DEVELOP


def rfm(orders: Sequence[Sequence[Any]], now: float, cfg: SegmentConfig) -> Rfm:
    """RFM over `[ts, amount]` orders, oldest first, as of `now` (epoch s)."""
    since = now - cfg.window_days * DAY
    recent = [(ts, amount) for ts, amount in orders if since <= ts <= now]
    past = [ts for ts, _ in orders if ts <= now]
    monetary = round(sum(a for _, a in recent if a is not None), 2)
    return Rfm(
        recency_days=round((now - past[-1]) / DAY, 2) if past else None,
        frequency=len(recent),
        monetary=monetary,
        unpriced_orders=sum(1 for _, a in recent if a is None),
        quadrant=quadrant(len(recent), monetary, cfg),
    )
