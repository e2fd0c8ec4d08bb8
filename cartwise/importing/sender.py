"""Record batches to the broker, and the ledger of imported event ids in Redis.

`BatchSender` fills one record batch per partition (aiokafka's batch API) and sends it whole:
kafka-python's per-record `send` tops out near 15,000 records/s on 2 cores before any
parsing, and an import has to go faster than that. Records are keyed and partitioned by
shopper exactly as the producer library does (Kafka's default murmur2 partitioner), so a
shopper's history lands in the partition that keeps their context.

The ledger is what makes a re-run safe: the stream drops a repeated event id only within the
last 64 of a shopper (`seen_ids_max`), which a whole history overruns. So the importer
remembers every (shopper, event id) the broker acknowledged, as an 8-byte digest in one
Redis set, and sends only the ones it has not seen.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import redis
from aiokafka import AIOKafkaProducer

from cartwise.contract import expected_partition

# Well under the broker's 1 MiB message limit (Kafka's message.max.bytes).
BATCH_BYTES = 512 * 1024


def event_digest(user_id: str, event_id: str) -> bytes:
    """The ledger's member for one event: ids are per shopper, as the stream treats them."""
    return hashlib.blake2b(f"{user_id}\x00{event_id}".encode(), digest_size=8).digest()


class Ledger:
    """The set of events already imported (`{prefix}import:events`, docs/import.md)."""

    CHUNK = 10_000

    def __init__(self, r: redis.Redis, key: str) -> None:
        self.r = r
        self.key = key

    def known(self, digests: list[bytes]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(digests), self.CHUNK):
            chunk = digests[i:i + self.CHUNK]
            out.extend(bool(x) for x in self.r.smismember(self.key, chunk))
        return out

    def add(self, digests: list[bytes]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for i in range(0, len(digests), self.CHUNK):
            pipe.sadd(self.key, *digests[i:i + self.CHUNK])
        pipe.execute()


class BatchSender:
    """Whole record batches per partition; `flush` waits for the broker's acknowledgements."""

    def __init__(self, bootstrap: list[str], topic: str) -> None:
        self.topic = topic
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                         max_batch_size=BATCH_BYTES, request_timeout_ms=30_000)
        self.partitions = 0
        self._partition_of: dict[str, int] = {}
        self._open: dict[int, Any] = {}
        self._pending: list[tuple[int, int, asyncio.Future]] = []
        self.ends: dict[int, int] = {}

    async def start(self) -> None:
        await self.producer.start()
        parts = await self.producer.partitions_for(self.topic)
        if not parts:
            raise RuntimeError(f"topic {self.topic} has no partitions")
        self.partitions = len(parts)

    async def stop(self) -> None:
        await self.producer.stop()

    def partition(self, key: str) -> int:
        p = self._partition_of.get(key)
        if p is None:
            if len(self._partition_of) > 1_000_000:
                self._partition_of.clear()
            p = self._partition_of[key] = expected_partition(key, self.partitions)
        return p

    async def send(self, key: str, value: bytes) -> None:
        p = self.partition(key)
        batch = self._open.get(p)
        if batch is None:
            batch = self._open[p] = [self.producer.create_batch(), 0]
        if batch[0].append(key=key.encode(), value=value, timestamp=None) is None:
            await self._ship(p)
            batch = self._open[p] = [self.producer.create_batch(), 0]
            if batch[0].append(key=key.encode(), value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value)} bytes does not fit a batch")
        batch[1] += 1

    async def _ship(self, p: int) -> None:
        builder, count = self._open.pop(p)
        builder.close()
        future = await self.producer.send_batch(builder, self.topic, partition=p)
        self._pending.append((p, count, future))

    async def flush(self) -> None:
        """Send what is open and wait until the broker has every record; raises if it failed."""
        for p in list(self._open):
            await self._ship(p)
        pending, self._pending = self._pending, []
        results = await asyncio.gather(*(f for _, _, f in pending))
        for (p, count, _), md in zip(pending, results, strict=True):
            self.ends[p] = max(self.ends.get(p, -1), md.offset + count - 1)
