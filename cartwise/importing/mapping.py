"""From a file's rows to contract records: column mappings and the presets (docs/import.md).

A mapping says where each contract field comes from: a column (`user_id=CustomerID`), a
template over columns (`event_id={InvoiceNo}-{StockCode}`) or a constant (`--const
type=purchase`). A column already named like a field needs no mapping. Values from CSV are
text, so numbers, times and flags are converted here; the contract (cartwise/contract.py)
then judges the result, the same rules as for live events.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from cartwise.contract import ContractError

EVENT_FIELDS = ("event_id", "type", "user_id", "item_id", "ts", "quantity", "price",
                "session_id", "order_id", "category", "items", "request_id", "placement",
                "experiment_id", "variant", "v")
CATALOG_FIELDS = ("item_id", "name", "category", "price", "in_stock", "consumable", "tier",
                  "brand", "v")
_TEMPLATE = re.compile(r"\{([^{}]+)\}")
_TRUE = {"true", "yes", "y", "1", "t"}
_FALSE = {"false", "no", "n", "0", "f"}


class MappingError(ValueError):
    """A mapping or option that cannot work for any line: the import does not start."""


class Skip(Exception):  # noqa: N818 - a signal, not an error
    """A line a preset leaves out on purpose (a cancelled invoice line), with why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Getter = Callable[[dict[str, Any]], Any]


def _getter(spec: str) -> Getter:
    names = _TEMPLATE.findall(spec)
    if not names:
        return lambda row: row.get(spec)

    def template(row: dict[str, Any]) -> str | None:
        values = [row.get(n) for n in names]
        if any(v is None or v == "" for v in values):
            return None  # a template over a missing column makes no id
        it = iter(str(v).strip() for v in values)
        return _TEMPLATE.sub(lambda _: next(it), spec)

    return template


def parse_pairs(specs: list[str], option: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """`FIELD=VALUE` options into a dict, refusing fields the contract does not have."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name = name.strip()
        if not sep or not name or not value:
            raise MappingError(f"{option} {spec!r}: write FIELD=VALUE, e.g. {option} "
                               f"user_id=CustomerID")
        if name not in allowed:
            raise MappingError(f"{option} {spec!r}: unknown field {name!r}; fields: "
                               f"{', '.join(allowed)}")
        out[name] = value
    return out


def parse_types(spec: str | None) -> dict[str, str]:
    """`--types pv=view,buy=purchase`: the file's event type names to the contract's."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        src, sep, dst = part.partition("=")
        if not sep or not src.strip() or not dst.strip():
            raise MappingError(f"--types {spec!r}: write FILE_TYPE=TYPE,..., e.g. "
                               "pv=view,buy=purchase")
        out[src.strip()] = dst.strip()
    return out


def _zone(tz: str | None) -> ZoneInfo | None:
    if tz is None:
        return None
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise MappingError(f"--tz {tz!r} is not a time zone name (e.g. UTC, Europe/London)") \
            from None


@dataclass
class Converter:
    """Text to the types the contract wants; times without a zone get `tz`."""

    tz: str | None = None
    ts_format: str | None = None
    _zone: ZoneInfo | None = field(init=False, default=None)
    _times: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._zone = _zone(self.tz)

    def ts(self, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        cached = self._times.get(v)
        if cached is not None:
            return cached
        s = v.strip()
        try:
            out: Any = float(s)
        except ValueError:
            try:
                t = (datetime.strptime(s, self.ts_format) if self.ts_format
                     else datetime.fromisoformat(s.replace("Z", "+00:00")))
            except ValueError:
                hint = f"format {self.ts_format!r}" if self.ts_format else "ISO-8601 or epoch " \
                       "seconds (or give --ts-format)"
                raise ContractError("bad_timestamp", "ts", f"{v!r} is not {hint}") from None
            if t.tzinfo is None:
                if self._zone is None:
                    raise ContractError("bad_timestamp", "ts", f"{v!r} has no UTC offset; give "
                                        "--tz (e.g. --tz UTC)") from None
                t = t.replace(tzinfo=self._zone)
            out = t.timestamp()
        if len(self._times) > 100_000:
            self._times.clear()
        self._times[v] = out
        return out

    @staticmethod
    def number(v: Any, name: str, integer: bool) -> Any:
        if not isinstance(v, str):
            return v
        try:
            return int(v) if integer else float(v)
        except ValueError:
            try:
                f = float(v)
            except ValueError:
                raise ContractError("wrong_type", name, f"{v!r} is not a number") from None
            if integer and f.is_integer():
                return int(f)
            raise ContractError("wrong_type", name, f"{v!r} is not a whole number") from None

    @staticmethod
    def flag(v: Any, name: str) -> Any:
        if not isinstance(v, str):
            return v
        s = v.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        try:  # a stock count: in stock when above zero
            return float(s) > 0
        except ValueError:
            raise ContractError("wrong_type", name, f"{v!r} is not true/false/yes/no/1/0 or "
                                "a stock count") from None


def derived_event_id(event: dict[str, Any]) -> str:
    """The same line gives the same id on every run, so a re-run is recognised."""
    digest = hashlib.blake2b(orjson.dumps(event, option=orjson.OPT_SORT_KEYS),
                             digest_size=12).hexdigest()
    return f"imp-{digest}"


class RowMapper:
    """Builds one record (event or catalog item) from one row, with the mapping applied."""

    def __init__(self, fields: tuple[str, ...], maps: dict[str, str], consts: dict[str, str],
                 types: dict[str, str], conv: Converter) -> None:
        self.getters = {name: _getter(spec) for name, spec in maps.items()}
        self.consts = consts
        self.types = types
        self.conv = conv
        self.fields = fields

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.fields:  # a column named like the field maps itself
            if name not in self.getters and name in row:
                out[name] = row[name]
        for name, get in self.getters.items():
            out[name] = get(row)
        out.update(self.consts)
        out = {k: v.strip() if isinstance(v, str) else v for k, v in out.items()
               if v is not None and v != ""}
        return self.convert(out)

    def convert(self, out: dict[str, Any]) -> dict[str, Any]:
        conv = self.conv
        if "ts" in out:
            out["ts"] = conv.ts(out["ts"])
        if "quantity" in out:
            out["quantity"] = conv.number(out["quantity"], "quantity", integer=True)
        if "price" in out:
            out["price"] = conv.number(out["price"], "price", integer=False)
        if "v" in out:
            out["v"] = conv.number(out["v"], "v", integer=True)
        for name in ("in_stock", "consumable"):
            if name in out:
                out[name] = conv.flag(out[name], name)
        if self.types and "type" in out:
            out["type"] = self.types.get(out["type"], out["type"])
        return out


class Preset:
    """A file's lines as records: the mapped columns as they are (catalog records)."""

    name = "catalog"
    columns: dict[str, str] = {}
    tz: str | None = None
    ts_format: str | None = None

    def __init__(self, mapper: RowMapper) -> None:
        self.mapper = mapper

    def sequence(self, row: dict[str, Any]) -> int:
        """What a line's record needs from the lines before it (cheap: it runs in order)."""
        return 0

    def event(self, row: dict[str, Any], seq: int = 0) -> dict[str, Any]:
        return self.mapper.record(row)


class CatalogPreset(Preset):
    """Catalog records (docs/events.md, "Catalog"): item id, name, category, price, stock."""


class EventsPreset(Preset):
    """The event contract itself (docs/events.md), any column named like its field."""

    name = "events"

    def event(self, row: dict[str, Any], seq: int = 0) -> dict[str, Any]:
        ev = self.mapper.record(row)
        if "event_id" not in ev:
            ev["event_id"] = derived_event_id(ev)
        return ev


class InvoiceLinesPreset(EventsPreset):
    """An invoice-lines export like UCI Online Retail, mapped as cartwise.datasets does.

    Each line is a one-line purchase in its invoice's session, a millisecond after the line
    before, so the model sees the cart being built. Cancellations (invoice "C...", quantity
    <= 0) are skipped; an item repeated in an invoice has the same event id (invoice:item),
    so it counts once; a line without a customer is the invoice's own anonymous shopper.
    """

    name = "invoice-lines"
    columns = {"order_id": "InvoiceNo", "item_id": "StockCode", "quantity": "Quantity",
               "ts": "InvoiceDate", "price": "UnitPrice", "user_id": "CustomerID"}
    tz = "UTC"

    def __init__(self, mapper: RowMapper) -> None:
        super().__init__(mapper)
        self._invoice: Any = None
        self._lines = 0
        self._order = mapper.getters["order_id"] if "order_id" in mapper.getters \
            else lambda row: mapper.consts.get("order_id")

    def sequence(self, row: dict[str, Any]) -> int:
        """The line's place in its invoice: its purchase is that many milliseconds later."""
        invoice = self._order(row)
        if invoice != self._invoice:
            self._invoice, self._lines = invoice, 0
        else:
            self._lines += 1
        return self._lines

    def event(self, row: dict[str, Any], seq: int = 0) -> dict[str, Any]:
        m = self.mapper
        raw = {name: get(row) for name, get in m.getters.items()} | m.consts
        invoice = str(raw.get("order_id") or "").strip()
        if not invoice:
            raise ContractError("missing_field", "order_id", "the invoice number is empty")
        qty = m.conv.number(raw.get("quantity") or "1", "quantity", integer=True)
        if invoice.upper().startswith("C") or qty <= 0:
            raise Skip("cancellation")
        item = str(raw.get("item_id") or "").strip().upper()
        customer = str(raw.get("user_id") or "").strip()
        if customer.endswith(".0"):  # pandas-written ids: 17850.0
            customer = customer[:-2]
        ts = m.conv.ts(raw.get("ts"))
        price = m.conv.number(raw.get("price"), "price", integer=False) \
            if raw.get("price") not in (None, "") else None
        line: dict[str, Any] = {"item_id": item or None, "quantity": min(qty, 10_000)}
        if isinstance(price, float | int) and price >= 0:
            line["price"] = price
        if raw.get("category"):
            line["category"] = str(raw["category"]).strip()
        return {"event_id": f"{invoice}:{item}", "type": "purchase",
                "user_id": f"c{customer}" if customer else f"guest-{invoice}",
                "session_id": invoice, "order_id": invoice,
                "ts": ts + seq / 1000 if isinstance(ts, float | int) else ts, **line}


EVENT_PRESETS: dict[str, type[EventsPreset]] = {"events": EventsPreset,
                                                "invoice-lines": InvoiceLinesPreset}


@dataclass(frozen=True)
class PresetSpec:
    """The options a preset is built from: picklable, so each import process builds its own."""

    kind: str
    preset: str = "events"
    maps: tuple[str, ...] = ()
    consts: tuple[str, ...] = ()
    types: str | None = None
    tz: str | None = None
    ts_format: str | None = None

    def build(self) -> Preset:
        return make_preset(self.kind, self.preset, list(self.maps), list(self.consts),
                           self.types, self.tz, self.ts_format)


def make_preset(kind: str, preset: str, maps: list[str], consts: list[str],
                types: str | None, tz: str | None, ts_format: str | None
                ) -> Preset:
    """The row-to-record step for `cartwise import KIND`, from the command line's options."""
    if kind == "catalog":
        cls: Any = CatalogPreset
        fields = CATALOG_FIELDS
    else:
        if preset not in EVENT_PRESETS:
            raise MappingError(f"unknown preset {preset!r}; presets: "
                               f"{', '.join(EVENT_PRESETS)}")
        cls = EVENT_PRESETS[preset]
        fields = EVENT_FIELDS
    mapped = dict(cls.columns) | parse_pairs(maps, "--map", fields)
    conv = Converter(tz=tz or cls.tz, ts_format=ts_format or cls.ts_format)
    mapper = RowMapper(fields, mapped, parse_pairs(consts, "--const", fields),
                       parse_types(types), conv)
    return cls(mapper)
