"""How an item graph is stored: its rows, totals, cycles, open evidence and clocks as the
checkpoint writes them, and loaded back (streams/graph_stage.py; rows as patches,
models/rowpatch.py). A mixin of `ItemGraph`, kept apart so models/graph.py holds the counting
and the rules."""

from __future__ import annotations

from typing import Any

import orjson

from models import rowpatch

__all__ = ["ROW_FIELDS", "GraphState"]

# A row entry: [all, buy, shopper contexts (all), shopper contexts (buy), next, before].
ROW_FIELDS = 6


def _widen(row: dict[str, list[float]]) -> dict[str, list[float]]:
    """A row from a checkpoint written before "next" (4 fields) or "before" (5) existed."""
    for v in row.values():
        if len(v) < ROW_FIELDS:
            v.extend([0.0] * (ROW_FIELDS - len(v)))
    return row



class GraphState:
    """Persistence of `ItemGraph` (models/graph.py), whose state it reads and writes."""

    rows: dict[str, dict[str, list[float]]]
    marg: dict[str, list[float]]
    cycles: dict[str, list[float]]
    open_rows: dict[int, dict[str, dict[str, list[float]]]]
    open_marg: dict[int, dict[str, list[float]]]
    seen_epoch: dict[str, int]
    clocks: dict[int, float]
    whole: set[str]
    total: list[float]
    landmark: float | None
    now: float
    closed: int | None

    def _reshape(self, item: str) -> None:
        raise NotImplementedError

    def row_json(self, item: str) -> bytes | None:
        row = self.rows.get(item)
        return None if row is None else orjson.dumps(row)

    def load_row(self, item: str, raw: bytes | str) -> int:
        """Load a stored row (whole, or whole and patches); returns the entries patched."""
        row, patched = rowpatch.decode(raw)
        self.rows[item] = _widen(row)
        self._reshape(item)
        self.whole.discard(item)  # as stored
        return patched

    def marg_json(self, item: str) -> bytes | None:
        m = self.marg.get(item)
        return None if m is None else orjson.dumps(m)

    def load_marg(self, item: str, raw: bytes | str) -> None:
        m = orjson.loads(raw)
        if len(m) < 4:  # checkpoint written before trending had its own half-life
            m.append(m[0])
        self.marg[item] = m

    def cycle_json(self, item: str) -> bytes | None:
        history = self.cycles.get(item)
        return None if history is None else orjson.dumps(history)

    def load_cycle(self, item: str, raw: bytes | str) -> None:
        self.cycles[item] = orjson.loads(raw)

    def meta(self) -> dict[str, Any]:
        return {"total": self.total, "landmark": self.landmark, "now": self.now,
                "clocks": {str(k): v for k, v in self.clocks.items()}, "closed": self.closed}

    def load_meta(self, d: dict[str, Any]) -> None:
        self.total, self.landmark, self.now = list(d["total"]), d["landmark"], d["now"]
        self.clocks = {int(k): v for k, v in (d.get("clocks") or {}).items()}
        self.closed = d.get("closed")

    def open_json(self, epoch: int, kind: str, item: str) -> bytes | None:
        """One item's evidence of an open epoch (rows: kind "r", totals: "m"), or None."""
        src = self.open_rows if kind == "r" else self.open_marg
        v = src.get(epoch, {}).get(item)
        return None if v is None else orjson.dumps(v)

    def load_open(self, epoch: int, kind: str, item: str, raw: bytes | str) -> int:
        """Load stored open evidence (a row's may have patches); returns the entries patched."""
        if kind == "r":
            row, patched = rowpatch.decode(raw)
            self.open_rows.setdefault(epoch, {})[item] = _widen(row)
            return patched
        self.open_marg.setdefault(epoch, {})[item] = orjson.loads(raw)
        return 0

    def load_seen(self, item: str, raw: bytes | str) -> None:
        self.seen_epoch[item] = int(raw)
