"""Which pairs-topic partition owns an item: stable across processes and versions."""

from __future__ import annotations

import zlib


def item_partition(item_id: str, partitions: int) -> int:
    """Pairs-topic partition that owns an item's row (stable across processes and versions)."""
    return zlib.crc32(item_id.encode()) % partitions


class PartitionOf(dict):
    """item -> pairs partition, memoised: hot items are routed thousands of times a second."""

    def __init__(self, partitions: int, max_size: int = 500_000) -> None:
        super().__init__()
        self.partitions = partitions
        self.max_size = max_size

    def __missing__(self, item: str) -> int:
        if len(self) >= self.max_size:
            self.clear()
        q = self[item] = item_partition(item, self.partitions)
        return q
