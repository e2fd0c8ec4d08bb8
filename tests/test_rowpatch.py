"""Rows stored as a whole copy and patches (models/rowpatch.py), by hand."""

from __future__ import annotations

import orjson

from models import rowpatch


def _row(n: int) -> dict[str, list[float]]:
    return {f"i{k}": [float(k), 0.0] for k in range(n)}


def test_a_few_changed_entries_of_a_wide_row_are_a_patch():
    row = _row(40)
    value, n = rowpatch.encode(row, {"i3", "i7"}, 0)
    assert orjson.loads(value) == {"i3": [3.0, 0.0], "i7": [7.0, 0.0]} and n == 2
    value, n = rowpatch.encode(row, {"i3"}, 10)
    assert n == 11


def test_a_row_is_written_whole_when_patches_would_hold_over_half_of_it():
    row = _row(40)
    assert rowpatch.encode(row, {f"i{k}" for k in range(5)}, 16) == (orjson.dumps(row), 0)
    assert rowpatch.encode(row, {f"i{k}" for k in range(5)}, 15)[1] == 20
    # nothing stored to patch, no record of what changed, a small row, an entry gone
    assert rowpatch.encode(row, {"i1"}, None)[1] == 0
    assert rowpatch.encode(row, None, 0)[1] == 0
    assert rowpatch.encode(_row(10), {"i1"}, 0)[1] == 0
    assert rowpatch.encode(row, {"i1", "gone"}, 0) == (orjson.dumps(row), 0)


def test_patches_read_in_order_over_the_whole_row():
    whole = orjson.dumps({"a": [1.0], "b": [2.0]})
    raw = whole + b"\n" + orjson.dumps({"a": [3.0]}) + b"\n" + orjson.dumps({"a": [5.0],
                                                                            "c": [4.0]})
    assert rowpatch.decode(raw) == ({"a": [5.0], "b": [2.0], "c": [4.0]}, 3)
    assert rowpatch.decode(whole) == ({"a": [1.0], "b": [2.0]}, 0)  # as written before patches
    assert rowpatch.decode(whole.decode()) == ({"a": [1.0], "b": [2.0]}, 0)
