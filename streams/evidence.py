"""The pairs-topic messages the context stage sends the item stage (docs/architecture.md).

One batch of a source partition becomes, per pairs partition, one message or, when its
evidence is large, several: each holds whole events in offset order and says the last offset
it covers (`last`), so the item stage's high-water mark per source stays exact. Only the last
message of a batch moves "now" and the source clock (`n`, `c`). Events are never split: a
single event's evidence is bounded by the contract (200 lines, a 30-item context).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

# Well below the producer's and Apache Kafka's 1 MB default message limit.
MESSAGE_BYTES = 512 * 1024
_MARGINAL_BYTES = 40  # estimates of one entry's JSON size, to cut before encoding
_PAIR_BYTES = 80


@dataclass(frozen=True)
class Marginals:
    """A batch's marginals [(offset, ts, entries, clock)]: the same for every pairs partition,
    so sized and encoded once per batch, not once per partition (`marginals_of`)."""

    entries: list[tuple]
    sizes: dict[int, int]  # offset -> estimated JSON bytes
    encoded: bytes


def marginals_of(entries: list[tuple]) -> Marginals:
    sizes: dict[int, int] = {}
    for offset, _, items, *_ in entries:
        sizes[offset] = sizes.get(offset, 0) + _MARGINAL_BYTES * len(items)
    return Marginals(entries, sizes, orjson.dumps(entries))


def pairs_messages(src: int, generation: str, last: int, first_ts: float,
                   newest: float | None, clock: float | None,
                   marginals: list[tuple] | Marginals, pairs: list[tuple],
                   repeats: list[tuple], limit: int = MESSAGE_BYTES) -> list[bytes]:
    """Messages for one pairs partition: `marginals` [(offset, ts, entries, clock)] of every
    event (or `marginals_of` them), `pairs` and `repeats` of those this partition owns, all in
    offset order."""
    m = marginals if isinstance(marginals, Marginals) else marginals_of(marginals)
    events = sorted(m.sizes.keys() | {e[0] for e in pairs} | {r[0] for r in repeats})
    if not events:
        return [_encode(src, generation, last, first_ts, newest, clock, [], [], [])]
    size: dict[int, int] = dict.fromkeys(events, 0)
    size.update(m.sizes)
    for offset, _, entries, *_ in pairs:
        size[offset] += _PAIR_BYTES * len(entries)
    cuts: list[int] = []  # last offset of each message but the final one
    used = 0
    prev = events[0]
    for offset in events:
        if used and used + size[offset] > limit:
            cuts.append(prev)
            used = 0
        used += size[offset]
        prev = offset
    if not cuts:  # the usual case: one message, with the marginals as encoded once
        return [_encode(src, generation, last, first_ts, newest, clock, m.encoded, pairs,
                        repeats)]
    out = []
    lo = -1
    for hi in (*cuts, None):
        def part(entries: list[tuple], lo: int = lo, hi: int | None = hi) -> list[tuple]:
            return [e for e in entries if e[0] > lo and (hi is None or e[0] <= hi)]
        final = hi is None
        out.append(_encode(src, generation, last if final else hi, first_ts,
                           newest if final else None, clock if final else None,
                           part(m.entries), part(pairs), part(repeats)))
        lo = hi if hi is not None else lo
    return out


def _encode(src: int, generation: str, last: int, first_ts: float, newest: float | None,
            clock: float | None, marginals: list | bytes, pairs: list, repeats: list) -> bytes:
    msg: dict[str, Any] = {"src": src, "g": generation, "last": last, "t": first_ts,
                           "n": newest, "c": clock, "p": pairs, "r": repeats}
    if isinstance(marginals, bytes):  # already encoded: spliced in as the last field
        return orjson.dumps(msg)[:-1] + b',"m":' + marginals + b"}"
    msg["m"] = marginals
    return orjson.dumps(msg)
