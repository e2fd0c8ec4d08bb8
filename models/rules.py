"""Merchant business rules, applied when an answer is served (docs/rules.md).

Rules change what a storefront sees, never what the workers learned: a block lifted today
brings the item back with all its evidence, and a change takes effect on the next request
instead of after the lists are recomputed. Pure logic, no I/O: api/ stores and reads the
document, this validates it and applies it to an answer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cartwise.contract import MAX_ID_LEN

# Bounds keep one rules document small enough to read on every change and apply per request.
MAX_BLOCK = 10_000
MAX_CATEGORIES = 1_000
MAX_PIN_ANCHORS = 10_000
MAX_PINS_PER_ANCHOR = 10
MAX_BOOST = 1_000
MAX_BOOST_SLOTS = 5
MAX_FREQUENCY_CAP = 1_000

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
class Rules:
    block: frozenset[str] = frozenset()
    exclude_categories: frozenset[str] = frozenset()
    pins: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    boost: tuple[str, ...] = ()
    boost_slots: int = 1
    frequency_cap: int = 0  # times one item may be shown to one shopper per UTC day; 0: off
    updated_at: float | None = None

    @classmethod
    def parse(cls, doc: Any, now: float | None = None) -> Rules:
        """Validate a document as sent to PUT /v1/rules; every field is optional."""
        if not isinstance(doc, dict):
            raise RulesError("body", "the rules document must be a JSON object")
        known = {"block", "exclude_categories", "pins", "boost", "frequency_cap", "updated_at"}
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
        return cls(frozenset(block), frozenset(categories), pins, tuple(boost), slots, cap,
                   time.time() if now is None else now)

    def to_dict(self) -> dict[str, Any]:
        return {"block": sorted(self.block),
                "exclude_categories": sorted(self.exclude_categories),
                "pins": {a: list(items) for a, items in sorted(self.pins.items())},
                "boost": {"items": list(self.boost), "slots": self.boost_slots},
                "frequency_cap": self.frequency_cap,
                "updated_at": self.updated_at}

    @property
    def empty(self) -> bool:
        return not (self.block or self.exclude_categories or self.pins or self.boost
                    or self.frequency_cap)

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
    barred = set(exclude)
    if rules.frequency_cap and shown:
        barred |= {i for i, n in shown.items() if n >= rules.frequency_cap}
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
