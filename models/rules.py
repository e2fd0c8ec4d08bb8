"""Merchant business rules, applied when an answer is served (docs/rules.md).

Rules change what a storefront sees, never what the workers learned: a block lifted today
brings the item back with all its evidence, and a change takes effect on the next request
instead of after the lists are recomputed. Pure logic, no I/O: api/ stores and reads the
document, this validates it and applies it to an answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cartwise.contract import MAX_ID_LEN
from models.segments import QUADRANTS

# Bounds keep one rules document small enough to read on every change and apply per request.
MAX_BLOCK = 10_000
MAX_CATEGORIES = 1_000
MAX_PIN_ANCHORS = 10_000
MAX_PINS_PER_ANCHOR = 10
MAX_BOOST = 1_000
MAX_BOOST_SLOTS = 5
MAX_FREQUENCY_CAP = 1_000
MAX_LADDER_STEPS = 10
LADDER_ORDERS = ("price_ascending", "score")

PIN_REASON = "recommended by the shop"
BOOST_REASON = "new in the shop, picked for returning customers"

Catalog = Mapping[str, Mapping[str, Any] | None]


class RulesError(ValueError):
    """A rules document that cannot be used; `field` says where, e.g. pins.pho-1[2]."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


@dataclass(frozen=True)
class LadderStep:
    """How a shopper with at least `min_orders` orders is offered related items (SPEC 1).

    `order`: "price_ascending" shows the cheaper of the selected items first (a first-time
    buyer sees the 999 smart lock before the 3999 robot vacuum); "score" keeps the evidence
    order. `max_price` and `max_price_ratio` (of the shopper's average order amount) leave
    out dearer items; null means no cap.
    """

    min_orders: int
    order: str = "score"
    max_price: float | None = None
    max_price_ratio: float | None = None

    def cap(self, average_order: float | None) -> float | None:
        caps = [c for c in (self.max_price,
                            self.max_price_ratio * average_order
                            if self.max_price_ratio is not None and average_order else None)
                if c is not None]
        return min(caps) if caps else None


@dataclass(frozen=True)
class Rules:
    block: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    pins: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    boost: tuple[str, ...] = ()
    boost_slots: int = 1
    frequency_cap: int = 0  # times one item may be shown to one shopper per UTC day; 0: off
    ladder: tuple[LadderStep, ...] = ()  # by min_orders, ascending
    budget_quadrants: frozenset[str] = frozenset()  # these get cross-sell instead of upsell
    updated_at: float | None = None

    @classmethod
    def parse(cls, doc: Any, now: float | None = None) -> Rules:
        """Validate a document as sent to PUT /v1/rules; every field is optional."""
        if not isinstance(doc, dict):
            raise RulesError("body", "the rules document must be a JSON object")
        known = {"block", "exclude_categories", "pins", "boost", "frequency_cap",
                 "price_ladder", "updated_at"}
        for key in doc:
            if key not in known:
                raise RulesError(str(key)[:50], f"unknown rule; known: {', '.join(sorted(known))}")
        block = _ids(doc.get("block", []), "block", MAX_BLOCK)
        categories = _ids(doc.get("exclude_categories", []), "exclude_categories",
                          MAX_CATEGORIES)
        pins_doc = doc.get("pins", {})
        if not isinstance(pins_doc, dict):
            raise RulesError("pins", "must be an object: anchor item id -> list of item ids")
        if len(pins_doc) > MAX_PIN_ANCHORS:
            raise RulesError("pins", f"at most {MAX_PIN_ANCHORS} anchors")
        pins = {}
        for anchor, items in pins_doc.items():
            _id(anchor, f"pins.{str(anchor)[:50]}")
            listed = _ids(items, f"pins.{anchor}", MAX_PINS_PER_ANCHOR)
            if anchor in listed:
                raise RulesError(f"pins.{anchor}", "an item cannot be pinned to itself")
            if listed:
                pins[anchor] = tuple(listed)
        boost_doc = doc.get("boost", {})
        if not isinstance(boost_doc, dict):
            raise RulesError("boost", "must be an object: {\"items\": [...], \"slots\": n}")
        for key in boost_doc:
            if key not in ("items", "slots"):
                raise RulesError(f"boost.{str(key)[:50]}", "unknown; known: items, slots")
        boost = _ids(boost_doc.get("items", []), "boost.items", MAX_BOOST)
        slots = _int(boost_doc.get("slots", 1), "boost.slots", 0, MAX_BOOST_SLOTS)
        cap = _int(doc.get("frequency_cap", 0), "frequency_cap", 0, MAX_FREQUENCY_CAP)
        ladder, budget = _ladder(doc.get("price_ladder", {}))
        return cls(frozenset(block), frozenset(categories), pins, tuple(boost), slots, cap,
                   ladder, budget, time.time() if now is None else now)

    def to_dict(self) -> dict[str, Any]:
        return {"block": sorted(self.block),
                "exclude_categories": sorted(self.exclude_categories),
                "pins": {a: list(items) for a, items in sorted(self.pins.items())},
                "boost": {"items": list(self.boost), "slots": self.boost_slots},
                "frequency_cap": self.frequency_cap,
                "price_ladder": {"steps": [asdict(st) for st in self.ladder],
                                 "budget_quadrants": sorted(self.budget_quadrants)},
                "updated_at": self.updated_at}

    @property
    def empty(self) -> bool:
        return not (self.block or self.exclude_categories or self.pins or self.boost
                    or self.frequency_cap or self.ladder or self.budget_quadrants)

    @property
    def needs_profile(self) -> bool:
        """Does serving a shopper need their order history (price ladder, budget segments)?"""
        return bool(self.ladder or self.budget_quadrants)

    def step(self, orders: int) -> LadderStep | None:
        """The ladder step for a shopper with this many orders: the highest one reached."""
        found = None
        for st in self.ladder:
            if orders >= st.min_orders:
                found = st
        return found

    def permits(self, item_id: str, facts: Mapping[str, Any] | None) -> bool:
        """May this item be shown at all (block list, excluded categories)?"""
        if item_id in self.block:
            return False
        return not (self.exclude_categories and (facts or {}).get("category")
                    in self.exclude_categories)

    def wanted(self, anchors: Iterable[str], existing_customer: bool) -> list[str]:
        """Items whose catalog facts applying the rules needs: pins and boosted items."""
        out = [i for a in anchors for i in self.pins.get(a, ())]
        if existing_customer and self.boost_slots:
            out += self.boost
        return out


NO_RULES = Rules()


def _id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_LEN:
        raise RulesError(where, f"must be an id string of 1..{MAX_ID_LEN} characters")
    return value


def _ids(values: Any, where: str, limit: int) -> list[str]:
    if not isinstance(values, list):
        raise RulesError(where, "must be a list of id strings")
    if len(values) > limit:
        raise RulesError(where, f"at most {limit} entries, got {len(values)}")
    return list(dict.fromkeys(_id(v, f"{where}[{n}]") for n, v in enumerate(values)))


def _ladder(doc: Any) -> tuple[tuple[LadderStep, ...], frozenset[str]]:
    if not isinstance(doc, dict):
        raise RulesError("price_ladder", "must be an object: {\"steps\": [...], "
                         "\"budget_quadrants\": [...]}")
    for key in doc:
        if key not in ("steps", "budget_quadrants"):
            raise RulesError(f"price_ladder.{str(key)[:50]}",
                             "unknown; known: steps, budget_quadrants")
    steps_doc = doc.get("steps", [])
    if not isinstance(steps_doc, list) or len(steps_doc) > MAX_LADDER_STEPS:
        raise RulesError("price_ladder.steps", f"must be a list of at most {MAX_LADDER_STEPS} "
                         "steps")
    steps: list[LadderStep] = []
    for n, st in enumerate(steps_doc):
        where = f"price_ladder.steps[{n}]"
        if not isinstance(st, dict):
            raise RulesError(where, "must be an object with min_orders and order")
        for key in st:
            if key not in ("min_orders", "order", "max_price", "max_price_ratio"):
                raise RulesError(f"{where}.{str(key)[:50]}", "unknown; known: min_orders, "
                                 "order, max_price, max_price_ratio")
        if "min_orders" not in st:
            raise RulesError(f"{where}.min_orders", "is required")
        min_orders = _int(st["min_orders"], f"{where}.min_orders", 0, 1_000_000)
        if steps and min_orders <= steps[-1].min_orders:
            raise RulesError(f"{where}.min_orders", "steps must have increasing min_orders")
        order = st.get("order", "score")
        if order not in LADDER_ORDERS:
            raise RulesError(f"{where}.order", f"must be one of {', '.join(LADDER_ORDERS)}")
        caps = [_positive(st.get(c), f"{where}.{c}") for c in ("max_price", "max_price_ratio")]
        steps.append(LadderStep(min_orders, order, *caps))
    budget = _ids(doc.get("budget_quadrants", []), "price_ladder.budget_quadrants",
                  len(QUADRANTS))
    for n, q in enumerate(budget):
        if q not in QUADRANTS:
            raise RulesError(f"price_ladder.budget_quadrants[{n}]",
                             f"unknown quadrant; known: {', '.join(QUADRANTS)}")
    return tuple(steps), frozenset(budget)


def _positive(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise RulesError(where, "must be a positive number or null")
    return float(value)


def _int(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RulesError(where, f"must be an integer from {low} to {high}")
    return value


def usable(item_id: str, rules: Rules, catalog: Catalog, taken: set[str]) -> bool:
    facts = catalog.get(item_id)
    return (item_id not in taken and (facts or {}).get("in_stock") is not False
            and rules.permits(item_id, facts))


def apply(entries: list[dict[str, Any]], rules: Rules, catalog: Catalog, k: int,
          anchors: Iterable[str] = (), exclude: set[str] | frozenset[str] = frozenset(),
          held: set[str] | frozenset[str] = frozenset(), existing_customer: bool = False,
          shown: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """The served top k: pins of the anchors first, then the list, then boosted new items.

    `entries` are ranked candidates, best first, with headroom past k. `exclude` applies to
    everything; `held` (what the shopper has in the cart or owns) only to what the rules add,
    since the model's own list may revisit on purpose. `shown` counts how often each item
    was shown to this shopper today (frequency cap). Added entries take their neighbours'
    score, so scores stay non-increasing; boosted items take the last `boost_slots` places,
    so strong evidence keeps the top.
    """
    barred = set(exclude) | capped(rules, shown)
    organic: list[dict[str, Any]] = []
    seen: set[str] = set()
    for e in entries:
        if e["item_id"] not in seen and usable(e["item_id"], rules, catalog, barred):
            organic.append(e)
            seen.add(e["item_id"])
    top = organic[0]["score"] if organic else 1.0
    added_barred = barred | set(held)
    pinned: list[dict[str, Any]] = []
    for anchor in anchors:
        for i in rules.pins.get(anchor, ()):
            if usable(i, rules, catalog, added_barred):
                pinned.append({"item_id": i, "score": top, "kind": "pinned",
                               "reason": PIN_REASON})
                added_barred.add(i)
    pinned_ids = {p["item_id"] for p in pinned}
    out = (pinned + [e for e in organic if e["item_id"] not in pinned_ids])[:k]
    if existing_customer and rules.boost and rules.boost_slots and k:
        added_barred |= {e["item_id"] for e in out}
        fresh = [i for i in rules.boost if usable(i, rules, catalog, added_barred)]
        fresh = fresh[: min(rules.boost_slots, k)]
        if fresh:
            keep = out[: k - len(fresh)]
            floor = keep[-1]["score"] if keep else top
            out = keep + [{"item_id": i, "score": floor, "kind": "new", "reason": BOOST_REASON}
                          for i in fresh]
    return out


def ladder(entries: list[dict[str, Any]], step: LadderStep | None, catalog: Catalog,
           average_order: float | None) -> list[dict[str, Any]]:
    """Apply a price-ladder step to ranked candidates (before the top k is cut).

    Items over the step's price cap are left out (items without a known price stay: no
    guess); with "price_ascending", the first `k` chosen by evidence are reordered by
    `order_by_price` once the answer is cut.
    """
    if step is None:
        return entries
    cap = step.cap(average_order)
    if cap is None:
        return entries
    return [e for e in entries
            if (p := (catalog.get(e["item_id"]) or {}).get("price")) is None or p <= cap]


def order_by_price(entries: list[dict[str, Any]], step: LadderStep | None,
                   catalog: Catalog) -> list[dict[str, Any]]:
    """Cheaper first for a "price_ascending" step; pinned items stay first, boosted last.

    The scores are reassigned in the new order (the same multiset, still non-increasing), so
    a storefront sorting by score keeps the ladder's order.
    """
    if step is None or step.order != "price_ascending":
        return entries
    head = [e for e in entries if e["kind"] == "pinned"]
    tail = [e for e in entries if e["kind"] == "new"]
    middle = [e for e in entries if e["kind"] not in ("pinned", "new")]
    inf = float("inf")
    by_price = sorted(middle, key=lambda e: (catalog.get(e["item_id"]) or {}).get("price")
                      if (catalog.get(e["item_id"]) or {}).get("price") is not None else inf)
    scores = [e["score"] for e in middle]
    middle = [dict(e, score=sc) for e, sc in zip(by_price, scores, strict=True)]
    return head + middle + tail


# -- frequency cap: what shoppers saw ---------------------------------------------------------
#
# The cap counts impressions (the storefront's "impression" events: the list a shopper saw),
# not answers: a page that polls every second asks often and shows the same list once.
# Counts are per shopper per UTC day of the event's time, so a replay counts the same day.

def utc_day(ts: float) -> str:
    """The day (YYYYMMDD, UTC) a time falls in: the key of a shopper's shown counts."""
    return time.strftime("%Y%m%d", time.gmtime(ts))


def impression_counts(impressions: Iterable[tuple[str, float, Iterable[str]]]
                      ) -> dict[tuple[str, str], dict[str, int]]:
    """Increments to the shown counts from (user_id, ts, items shown) impressions.

    Each impression adds 1 to each distinct item it lists, under (user_id, UTC day of ts).
    Impressions must be deduplicated by event id before (a retried event is one showing).
    """
    out: dict[tuple[str, str], dict[str, int]] = {}
    for user, ts, items in impressions:
        counts = out.setdefault((user, utc_day(ts)), {})
        for i in dict.fromkeys(items):
            counts[i] = counts.get(i, 0) + 1
    return out


def capped(rules: Rules, shown: Mapping[str, int] | None) -> set[str]:
    """Items this shopper saw `frequency_cap` times today: not shown again today."""
    if not rules.frequency_cap or not shown:
        return set()
    return {i for i, n in shown.items() if n >= rules.frequency_cap}


# -- what happened to a short answer ----------------------------------------------------------

# Why an evidence-based item did not reach the answer, in the order causes are checked.
DROP_CAUSES = ("held", "out_of_stock", "rules", "frequency_cap")


def dropped(entries: Iterable[Mapping[str, Any]], served: Iterable[str], rules: Rules,
            catalog: Catalog, held: set[str] | frozenset[str] = frozenset(),
            shown: Mapping[str, int] | None = None) -> dict[str, int]:
    """Count the evidence-based entries left out of the answer, by cause (`DROP_CAUSES`).

    `entries`: what the evidence offered, before rules; `served`: the item ids answered;
    `held`: items the shopper holds or owns. Entries left out for none of these reasons
    were cut by k and are not counted.
    """
    out: dict[str, int] = {}
    taken = set(served)
    over = capped(rules, shown)
    for e in entries:
        i = e["item_id"]
        if i in taken:
            continue
        facts = catalog.get(i)
        cause = ("held" if i in held
                 else "out_of_stock" if (facts or {}).get("in_stock") is False
                 else "rules" if not rules.permits(i, facts)
                 else "frequency_cap" if i in over else None)
        if cause:
            out[cause] = out.get(cause, 0) + 1
    return out


def shortfall(evidence: int, served_evidence: int,
              dropped_by: Mapping[str, int]) -> str | None:
    """Why an answer has fewer evidence-based items than it could, as a code for
    `models.wording.note`; None when nothing needs saying.

    `evidence`: evidence-based entries there were before rules and filters;
    `served_evidence`: how many of them the answer kept. "no_evidence" only when there was
    none: a list emptied by a rule says which rule, never that nothing was known.
    """
    if evidence == 0:
        return "no_evidence"
    if not any(dropped_by.values()):
        return None if served_evidence else "no_evidence"
    return max(DROP_CAUSES, key=lambda c: (dropped_by.get(c, 0), -DROP_CAUSES.index(c)))
