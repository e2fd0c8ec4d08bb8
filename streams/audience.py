"""The audience index (docs/audiences.md): who viewed or bought each item lately."""

from __future__ import annotations

import zlib
from typing import Any

from streams.stats import Stats
from streams.store import Store

TRIM_EVERY = 8  # each item's sets are trimmed one batch in this many


class AudienceIndex:
    def __init__(self, store: Store, stats: Stats, settings: Any) -> None:
        self.store, self.keys, self.stats, self.settings = store, store.keys, stats, settings
        self._trim_turn = 0

    async def write(self, index: dict[tuple[str, str], dict[str, float]]) -> None:
        """Who touched each item lately, newest kept: what audiences are ranked from.

        Derived output like the lists: a replay writes the same scores again (GT keeps the
        newest time), so it needs no checkpoint.
        """
        rows = []
        for (channel, item), users in index.items():
            key = self.keys.audience(channel, item)
            # Trimming every time would cost a command per key; a set may run past the bound
            # by what one item gets in a few batches before its next trim.
            rows.append((key, zlib.crc32(key.encode()) % TRIM_EVERY == self._trim_turn, users))
        self._trim_turn = (self._trim_turn + 1) % TRIM_EVERY
        with self.stats.redis_write("audience_index"):
            await self.store.audience_index(self.settings.audience_index_size, rows)
