"""Event and catalog contract, version 1 (docs/events.md).

Shared by the producer library, the stream workers and the HTTP collector so an event is
judged by one set of rules wherever it enters. Pure: no I/O.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

CONTRACT_VERSION = 1
SHOP_TYPES = ("view", "add_to_cart", "remove_from_cart", "purchase")
# Suggestion feedback (docs/experiments.md): what was shown, under which request, and what was
# clicked. They feed experiments and the re-ranker, never the co-occurrence counts.
FEEDBACK_TYPES = ("impression", "click")
EVENT_TYPES = SHOP_TYPES + FEEDBACK_TYPES
RESERVED_TYPES: tuple[str, ...] = ()
MAX_SHOWN = 50  # suggestions one impression may list
MAX_EVENT_BYTES = 64 * 1024
MAX_ID_LEN = 128
MAX_TEXT_LEN = 200  # catalog category, tier, brand and name
MAX_ORDER_LINES = 200
MAX_QUANTITY = 10_000
# Event times before 2000-01-01 or after 2100-01-01 are almost surely a unit mistake (ms vs s).
MIN_TS, MAX_TS = 946_684_800.0, 4_102_444_800.0
# How far an event may be ahead of the clock that receives it (device clocks drift). Counts
# decay relative to the newest event time seen, so one event from the far future would age
# all evidence at once: such events are rejected, not applied.
MAX_FUTURE_S = 3600.0


class ContractError(ValueError):
    """Why a record broke the contract: `reason` is a stable code, `field` the culprit."""

    def __init__(self, reason: str, field: str | None = None, detail: str = "") -> None:
        self.reason = reason
        self.field = field
        self.detail = detail
        where = f" ({field})" if field else ""
        super().__init__(f"{reason}{where}: {detail}" if detail else f"{reason}{where}")

    def as_dict(self) -> dict[str, str]:
        out = {"reason": self.reason, "detail": self.detail}
        if self.field:
            out["field"] = self.field
        return out


@dataclass(frozen=True, slots=True)
class Line:
    item_id: str
    quantity: int
    price: float | None


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. A single-item event has exactly one line."""

    event_id: str
    type: str
    user_id: str
    ts: float
    lines: tuple[Line, ...]
    session_id: str | None = None
    order_id: str | None = None
    category: str | None = None
    # Feedback only: the suggestion answer's request_id, where it was shown, and the
    # experiment and variant that answer carried.
    request_id: str | None = None
    placement: str | None = None
    experiment_id: str | None = None
    variant: str | None = None


@dataclass(frozen=True, slots=True)
class CatalogItem:
    item_id: str
    price: float | None = None
    category: str | None = None
    in_stock: bool = True
    # None: the shop does not say; the model then learns it from repeat purchases
    consumable: bool | None = None
    tier: str | None = None
    brand: str | None = None
    name: str | None = None  # display name, for storefronts that render suggestions as-is

    def as_dict(self) -> dict[str, Any]:
        return {
            "item_id": self.item_id,
            "price": self.price,
            "category": self.category,
            "in_stock": self.in_stock,
            "consumable": self.consumable,
            "tier": self.tier,
            "brand": self.brand,
            "name": self.name,
        }


def _id(d: dict[str, Any], field: str, required: bool = True) -> str | None:
    v = d.get(field)
    if v is None:
        if required:
            raise ContractError("missing_field", field, f"'{field}' is required")
        return None
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise ContractError("wrong_type", field, f"'{field}' must be a string")
    s = str(v)
    if not s or len(s) > MAX_ID_LEN:
        raise ContractError("bad_value", field, f"'{field}' must be 1..{MAX_ID_LEN} characters")
    return s


def _price(v: Any, field: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ContractError("wrong_type", field, f"'{field}' must be a finite number")
    if v < 0:
        raise ContractError("negative_price", field, f"'{field}' must be >= 0, got {v}")
    return float(v)


def _quantity(v: Any, field: str) -> int:
    if v is None:
        return 1
    if isinstance(v, bool) or not isinstance(v, int):
        raise ContractError("wrong_type", field, f"'{field}' must be an integer")
    if not 1 <= v <= MAX_QUANTITY:
        raise ContractError("bad_quantity", field, f"'{field}' must be 1..{MAX_QUANTITY}")
    return v


def _ts(v: Any) -> float:
    if v is None:
        raise ContractError("missing_field", "ts", "'ts' (event time) is required")
    if isinstance(v, str):
        try:
            v = datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            raise ContractError("bad_timestamp", "ts", "'ts' is not ISO-8601") from None
    elif isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ContractError("wrong_type", "ts", "'ts' must be epoch seconds or ISO-8601")
    if not MIN_TS <= v <= MAX_TS:
        raise ContractError("bad_timestamp", "ts", "'ts' must be epoch seconds (not ms)")
    return float(v)


def _version(d: dict[str, Any]) -> None:
    v = d.get("v", CONTRACT_VERSION)
    if v != CONTRACT_VERSION:
        raise ContractError("unsupported_version", "v", f"version {v!r} is not supported")


def decode(raw: bytes | str) -> dict[str, Any]:
    """Parse one wire record into a JSON object, enforcing the size limit first."""
    if len(raw) > MAX_EVENT_BYTES:
        raise ContractError("oversized", None, f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        d = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ContractError("bad_json", None, str(exc)[:200]) from None
    if not isinstance(d, dict):
        raise ContractError("not_an_object", None, "a record must be a JSON object")
    return d


def validate_event(d: dict[str, Any]) -> Event:
    _version(d)
    etype = d.get("type")
    if etype is None:
        raise ContractError("missing_field", "type", "'type' is required")
    if etype not in EVENT_TYPES:
        reason = "unsupported_type" if etype in RESERVED_TYPES else "unknown_type"
        raise ContractError(reason, "type", f"type {etype!r} not in {list(EVENT_TYPES)}")
    event_id = _id(d, "event_id")
    user_id = _id(d, "user_id")
    ts = _ts(d.get("ts"))
    raw_lines = d.get("items")
    if etype == "impression" and raw_lines is None:
        raise ContractError("missing_field", "items",
                            "an impression lists the suggestions shown in 'items'")
    if raw_lines is not None:
        if etype not in ("purchase", "impression"):
            raise ContractError("bad_value", "items",
                                "'items' lines are only for purchases and impressions")
        if not isinstance(raw_lines, list) or not raw_lines:
            raise ContractError("wrong_type", "items", "'items' must be a non-empty list")
        most = MAX_SHOWN if etype == "impression" else MAX_ORDER_LINES
        if len(raw_lines) > most:
            raise ContractError("too_many_lines", "items", f"more than {most} lines")
        lines = []
        for n, raw in enumerate(raw_lines):
            if not isinstance(raw, dict):
                raise ContractError("wrong_type", f"items[{n}]", "a line must be an object")
            lines.append(
                Line(
                    _id(raw, "item_id") if "item_id" in raw else _missing(f"items[{n}].item_id"),
                    _quantity(raw.get("quantity"), f"items[{n}].quantity"),
                    _price(raw.get("price"), f"items[{n}].price"),
                )
            )
        if "item_id" in d:
            raise ContractError("bad_value", "item_id", "give either 'item_id' or 'items'")
    else:
        lines = [Line(_id(d, "item_id"), _quantity(d.get("quantity"), "quantity"),
                      _price(d.get("price"), "price"))]
    category = d.get("category")
    if category is not None and not isinstance(category, str):
        raise ContractError("wrong_type", "category", "'category' must be a string")
    feedback = etype in FEEDBACK_TYPES
    extra = {f: _id(d, f, required=f == "request_id" and feedback)
             for f in ("request_id", "placement", "experiment_id", "variant")}
    if not feedback:
        given = [f for f, v in extra.items() if v is not None]
        if given:
            raise ContractError("bad_value", given[0],
                                f"'{given[0]}' is only for impression and click events")
    elif (extra["experiment_id"] is None) != (extra["variant"] is None):
        raise ContractError("missing_field", "variant" if extra["variant"] is None
                            else "experiment_id", "give both 'experiment_id' and 'variant'")
    return Event(
        event_id=event_id,
        type=etype,
        user_id=user_id,
        ts=ts,
        lines=tuple(lines),
        session_id=_id(d, "session_id", required=False),
        order_id=_id(d, "order_id", required=False),
        category=category,
        **extra,
    )


def _missing(field: str) -> str:
    raise ContractError("missing_field", field, f"'{field}' is required")


def validate_catalog(d: dict[str, Any]) -> CatalogItem:
    _version(d)
    flags = {}
    for field, default in (("in_stock", True), ("consumable", None)):
        v = d.get(field, default)
        if not isinstance(v, bool) and not (v is None and default is None):
            allowed = "true, false or null" if default is None else "true or false"
            raise ContractError("wrong_type", field, f"'{field}' must be {allowed}")
        flags[field] = v
    for field in ("category", "tier", "brand", "name"):
        v = d.get(field)
        if v is not None and not isinstance(v, str):
            raise ContractError("wrong_type", field, f"'{field}' must be a string")
        if v is not None and len(v) > MAX_TEXT_LEN:
            raise ContractError("bad_value", field, f"'{field}' is over {MAX_TEXT_LEN} characters")
    return CatalogItem(
        item_id=_id(d, "item_id"),
        price=_price(d.get("price"), "price"),
        category=d.get("category"),
        tier=d.get("tier"),
        brand=d.get("brand"),
        name=d.get("name"),
        **flags,
    )


def parse_event(raw: bytes | str) -> Event:
    return validate_event(decode(raw))


def parse_catalog(raw: bytes | str) -> CatalogItem:
    return validate_catalog(decode(raw))


def check_not_future(event: Event, now: float) -> Event:
    """Reject an event dated more than MAX_FUTURE_S after `now` (the receiver's clock)."""
    if event.ts > now + MAX_FUTURE_S:
        raise ContractError("future_timestamp", "ts", f"'ts' is {event.ts - now:.0f}s ahead "
                            f"of the receiver's clock (at most {MAX_FUTURE_S:.0f}s allowed)")
    return event


def prepare_event(d: dict[str, Any], now: float) -> tuple[Event, bytes]:
    """Fill in what a sender may omit, validate, and encode the canonical wire form.

    Used by every entry point that produces events (producer library, HTTP collector): a
    missing `event_id` becomes a uuid4 and a missing `ts` becomes `now`. Senders that may
    retry should set their own event_id, so a retried event is applied once.
    """
    if not isinstance(d, dict):
        raise ContractError("not_an_object", None, "an event must be a JSON object")
    d = dict(d)
    d.setdefault("event_id", uuid.uuid4().hex)
    d.setdefault("ts", now)
    valid = check_not_future(validate_event(d), now)
    value = orjson.dumps(event_to_dict(valid))
    if len(value) > MAX_EVENT_BYTES:
        raise ContractError("oversized", None, f"{len(value)} bytes > {MAX_EVENT_BYTES}")
    return valid, value


def prepare_catalog(d: dict[str, Any]) -> tuple[CatalogItem, bytes]:
    if not isinstance(d, dict):
        raise ContractError("not_an_object", None, "a catalog record must be a JSON object")
    valid = validate_catalog(d)
    return valid, orjson.dumps(valid.as_dict() | {"v": CONTRACT_VERSION})


def dlq_headers(err: ContractError, source: str) -> dict[str, bytes]:
    """Headers of a dead-lettered record: why it was rejected and where it came from."""
    return {
        "cartwise-reason": err.reason.encode(),
        "cartwise-field": (err.field or "").encode(),
        "cartwise-detail": err.detail.encode()[:500],
        "cartwise-source": source.encode()[:500],
    }


def event_to_dict(e: Event) -> dict[str, Any]:
    """The canonical wire form of a validated event (used by the producer and replays)."""
    d: dict[str, Any] = {"v": CONTRACT_VERSION, "event_id": e.event_id, "type": e.type,
                         "user_id": e.user_id, "ts": e.ts}
    if len(e.lines) == 1 and e.type != "impression":
        ln = e.lines[0]
        d["item_id"] = ln.item_id
        if ln.quantity != 1:
            d["quantity"] = ln.quantity
        if ln.price is not None:
            d["price"] = ln.price
    else:
        d["items"] = [{"item_id": ln.item_id, "quantity": ln.quantity, "price": ln.price}
                      for ln in e.lines]
    for field in ("session_id", "order_id", "category", "request_id", "placement",
                  "experiment_id", "variant"):
        v = getattr(e, field)
        if v is not None:
            d[field] = v
    return d
