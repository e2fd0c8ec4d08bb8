"""Real interaction logs turned into contract events, for the prequential replay (docs/quality.md).

Every loader yields event dicts of the event contract (docs/events.md), so a shop's own export
in that form (`--events FILE`, JSON lines) goes through exactly the same replay. Where a log
has no event type of the contract, the mapping is stated next to its loader.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from cartwise.contract import ContractError, Event, validate_event


@dataclass(frozen=True)
class Dataset:
    name: str
    # Which events are prediction targets (docs/quality.md, "Targets").
    targets: tuple[str, ...]
    description: str


DATASETS = {
    "taobao": Dataset("taobao", ("cart", "purchase"),
                      "Taobao UserBehavior, complete 9-day histories of 815 shoppers"),
    "online_retail": Dataset("online_retail", ("purchase",),
                             "UCI Online Retail, invoices 2010-12 to 2011-10"),
    "diginetica": Dataset("diginetica", ("view",), "DIGINETICA (CIKM Cup 2016) view sample"),
    "yoochoose": Dataset("yoochoose", ("view",), "YOOCHOOSE (RecSys Challenge 2015) 100k clicks"),
}


def data_dir() -> Path:
    """`CARTWISE_DATA_DIR`, else the shared data folder beside the project checkout."""
    env = os.environ.get("CARTWISE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - the caller closes it


def taobao(root: Path) -> Iterator[dict[str, Any]]:
    """pv -> view, cart -> add_to_cart, buy -> purchase; fav (a wish list) -> view, since the
    contract has no wish-list event and a favourite says interest, not intent to buy."""
    types = {"pv": "view", "fav": "view", "cart": "add_to_cart", "buy": "purchase"}
    path = root / "taobao_userbehavior" / "taobao_userbehavior_head_815users.csv.gz"
    with _open_text(path) as f:
        for n, row in enumerate(csv.DictReader(f)):
            yield {"event_id": f"t{n}", "type": types[row["behavior_type"]],
                   "user_id": row["user_id"], "item_id": row["item_id"],
                   "category": row["category_id"], "ts": int(row["timestamp"])}


def online_retail(root: Path) -> Iterator[dict[str, Any]]:
    """Each invoice line is a one-line purchase in the invoice's session, a millisecond after
    the line before it, so later lines are predicted from the earlier ones (cart building).

    Cancellations (invoice "C...", negative quantity) are skipped; an item repeated within an
    invoice counts once; an invoice without a customer is its own anonymous shopper.
    """
    path = root / "online_retail" / "online_retail_2010-12-01_to_2011-10-31.csv.gz"
    with _open_text(path) as f:
        seen: set[tuple[str, str]] = set()
        line_no: dict[str, int] = {}
        for n, row in enumerate(csv.DictReader(f)):
            invoice, item = row["InvoiceNo"], row["StockCode"].strip().upper()
            qty = int(row["Quantity"])
            if invoice.startswith("C") or qty <= 0 or (invoice, item) in seen:
                continue
            seen.add((invoice, item))
            i = line_no[invoice] = line_no.get(invoice, -1) + 1
            ts = datetime.strptime(row["InvoiceDate"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            customer = row["CustomerID"]
            user = f"c{customer.split('.')[0]}" if customer else f"guest-{invoice}"
            price = float(row["UnitPrice"])
            yield {"event_id": f"r{n}", "type": "purchase", "user_id": user,
                   "session_id": invoice, "order_id": invoice, "ts": ts.timestamp() + i / 1000,
                   "items": [{"item_id": item, "quantity": min(qty, 10_000),
                              **({"price": price} if price >= 0 else {})}]}


def diginetica(root: Path) -> Iterator[dict[str, Any]]:
    """Views. The log gives a session's day and each view's milliseconds since the session
    started; a session is the shopper (most have no user id)."""
    path = root / "diginetica_sample" / "sample_train-item-views.csv"
    rows = []
    with _open_text(path) as f:
        for row in csv.DictReader(f, delimiter=";"):
            day = datetime.strptime(row["eventdate"], "%Y-%m-%d").replace(tzinfo=UTC)
            rows.append((day.timestamp(), int(row["session_id"]), int(row["timeframe"]),
                         row["item_id"]))
    rows.sort()
    for n, (day, session, ms, item) in enumerate(rows):
        yield {"event_id": f"d{n}", "type": "view", "user_id": f"s{session}",
               "session_id": f"s{session}", "item_id": item, "ts": day + ms / 1000}


def yoochoose(root: Path) -> Iterator[dict[str, Any]]:
    """Clicks as views; the prepared sample's training and test parts in time order."""
    folder = root / "yoochoose_clicks_100k"
    n = 0
    for part in ("yoochoose-clicks-100k_train_full.txt", "yoochoose-clicks-100k_test.txt"):
        with _open_text(folder / part) as f:
            for row in csv.DictReader(f, delimiter="\t"):
                yield {"event_id": f"y{n}", "type": "view", "user_id": f"s{row['SessionId']}",
                       "session_id": f"s{row['SessionId']}", "item_id": row["ItemId"],
                       "ts": float(row["Time"])}
                n += 1


LOADERS = {"taobao": taobao, "online_retail": online_retail, "diginetica": diginetica,
           "yoochoose": yoochoose}


def jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The canonical export: one contract event per line (docs/events.md), any order."""
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = orjson.loads(line)
            except orjson.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not JSON: {err}") from None
            yield d


def load_events(raw: Iterator[dict[str, Any]], source: str = "events") -> list[Event]:
    """Validated events in time order (ties keep file order). A bad event stops the load with
    its line and reason: a replay over silently dropped events would measure something else."""
    out = []
    for n, d in enumerate(raw, 1):
        try:
            out.append(validate_event(d))
        except ContractError as err:
            raise ValueError(f"{source}: event {n}: {err.reason} ({err.field}): {err.detail}") \
                from None
    out.sort(key=lambda e: e.ts)
    return out


def load(name: str, root: Path | None = None) -> list[Event]:
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(LOADERS))}")
    root = root or data_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} not found; set CARTWISE_DATA_DIR")
    return load_events(LOADERS[name](root), name)
