"""The broker's own floor for freshness: how old records are when a plain consumer gets them.

`bench.scale` runs it beside the worker during the steady phase (`python -m
bench.plain_consumer ...`): the same topic, the same broker timestamps and fetch wait as the
worker, no Faust, no stages. Set against the worker's `received` figure, it splits an event's
wait into the broker's part and the worker's (docs/operations.md, "Where a steady event waits
before ranking").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import orjson


def ages_summary(ages: list[float]) -> dict:
    """p50 / p99 / max in ms of record ages (seconds)."""
    from streams.stats import percentile

    if not ages:
        return {"n": 0}
    s = sorted(ages)
    p50, p99 = percentile(s, 0.5), percentile(s, 0.99)
    assert p50 is not None and p99 is not None
    return {"n": len(s), "p50_ms": round(1000 * p50, 1), "p99_ms": round(1000 * p99, 1),
            "max_ms": round(1000 * s[-1], 1)}


def late_records(late: list[tuple[int, int]]) -> dict:
    """Where the records that were over a second old came from: how many per partition and
    their offset range (a lump in one partition points at a fetch held back, spread ones at
    records produced with old timestamps)."""
    by: dict[int, list[int]] = {}
    for p, off in late:
        by.setdefault(p, []).append(off)
    return {"over_1s": len(late),
            "over_1s_by_partition": {str(p): {"n": len(o), "offsets": [min(o), max(o)]}
                                     for p, o in sorted(by.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--out", required=True, help="JSON result; OUT.ready once positioned, "
                    "stops when OUT.stop exists or after --seconds")
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--fetch-max-wait-ms", type=int, default=10)  # the worker's default
    args = ap.parse_args()

    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=args.broker.split(","), enable_auto_commit=False,
                             fetch_max_wait_ms=args.fetch_max_wait_ms)
    tps = [TopicPartition(args.topic, p) for p in range(args.partitions)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve the end now, so every later record counts
    out = Path(args.out)
    stop = out.with_name(out.name + ".stop")
    # Tansu 0.6 answers "latest" with the start of a partition's last record batch, a lower
    # bound (cartwise/lag.py): records from before this moment are skipped, not measured.
    ready_at = time.time()
    out.with_name(out.name + ".ready").touch()
    skipped = 0
    ages: list[float] = []
    late: list[tuple[int, int]] = []  # (partition, offset) of records over 1 s old
    deadline = time.time() + args.seconds
    while time.time() < deadline and not stop.exists():
        for records in consumer.poll(timeout_ms=100).values():
            now = time.time()
            for r in records:
                produced = r.timestamp / 1000
                if produced < ready_at:
                    skipped += 1
                    continue
                ages.append(now - produced)
                if now - produced > 1.0 and len(late) < 10_000:
                    late.append((r.partition, r.offset))
    consumer.close()
    out.write_bytes(orjson.dumps(ages_summary(ages) | late_records(late)
                                 | {"skipped_older": skipped}))


if __name__ == "__main__":
    main()
