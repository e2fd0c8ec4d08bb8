"""A stored row: its last whole copy, then patches of the entries changed since.

A hot row holds hundreds of entries and changes in every batch, yet only a few of its entries
do. Written whole at every checkpoint, rows made checkpoints grow with the state a worker
holds (encoding them was a tenth of a worker's time at 20,000 items, docs/operations.md). A
patch carries only the entries changed since the last checkpoint; the row is written whole
again once its patches hold more than `PATCH_SHARE` of its entries, so a stored value stays
within 1.5 rows.

The stored value is JSON objects separated by newlines (orjson never writes a raw newline):
the whole row first, then each patch in order; a later entry replaces an earlier one. A value
written before patches existed is one object, and reads the same.
"""

from __future__ import annotations

from collections.abc import Collection

import orjson

__all__ = ["PATCH_SHARE", "SEPARATOR", "decode", "encode"]

SEPARATOR = b"\n"
PATCH_SHARE = 0.5
MIN_ENTRIES = 16  # a smaller row is as cheap to write whole as a patch


def encode(row: dict[str, list[float]], changed: Collection[str] | None,
           patched: int | None) -> tuple[bytes, int]:
    """What to write for `row`: (value, entries in its patches afterwards), 0 for the whole row.

    `changed`: the entries changed since the last write (None: write it whole); `patched`:
    the entries in its stored patches (None: nothing stored to patch).
    """
    if (changed is None or patched is None or len(row) < MIN_ENTRIES
            or patched + len(changed) > PATCH_SHARE * len(row)):
        return orjson.dumps(row), 0
    try:
        patch = {k: row[k] for k in changed}
    except KeyError:  # an entry went: only a whole row says so
        return orjson.dumps(row), 0
    return orjson.dumps(patch), patched + len(patch)


def decode(raw: bytes | str) -> tuple[dict[str, list[float]], int]:
    """(row, entries in its patches) of a stored value."""
    if isinstance(raw, str):
        raw = raw.encode()
    first, *patches = raw.split(SEPARATOR)
    row = orjson.loads(first)
    n = 0
    for part in patches:
        patch = orjson.loads(part)
        row.update(patch)
        n += len(patch)
    return row, n
