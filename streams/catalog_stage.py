"""The catalog stage: item facts into one Redis hash, read by the ranking's filters."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson

from cartwise.contract import ContractError, dlq_record, parse_catalog
from streams.stage import Record, Sender
from streams.stats import Stats
from streams.store import Store

log = logging.getLogger("cartwise.catalog")


class CatalogStage:
    """Item facts into one Redis hash; the ranking reads them when it filters.

    Same acknowledgement rule as the other stages: a record is acknowledged only once Redis
    has its fact (or the dead-letter topic has it); an outage is retried until it ends.
    """

    def __init__(self, store: Store, stats: Stats, send: Sender, settings: Any) -> None:
        self.store, self.stats, self.send, self.settings = store, stats, send, settings
        self.ack: Callable[[Any], Awaitable[Any]] | None = None
        self.assigned: set[int] = set()
        # Told which items changed once Redis has them: the worker's read caches drop them,
        # so the next ranking here reads the new facts (other workers' caches age out).
        self.on_change: Callable[[set[str]], None] | None = None

    def revoke(self, partitions: set[int]) -> None:
        self.assigned -= partitions

    def assign(self, partitions: set[int]) -> None:
        self.assigned |= partitions

    async def handle(self, records: Sequence[Record], events: Sequence[Any] = ()) -> None:
        s = self.settings
        facts: dict[str, bytes] = {}
        letters: list[tuple[bytes, dict[str, bytes]]] = []
        # Fetched before a rebalance: the new owner applies them, in order after older ones.
        mine = [r for r in records if r[1] in self.assigned]
        gone: set[str] = set()
        for value, partition, offset, _, key in mine:
            if value is None and key:
                # A tombstone on the compacted catalog topic: the shop removed the item.
                item_id = key.decode(errors="replace")
                facts.pop(item_id, None)
                gone.add(item_id)
                continue
            try:
                item = parse_catalog(value)
            except ContractError as err:
                self.stats.inc(f"dlq.{err.reason}")
                letters.append(dlq_record(value, err.reason, err.field, err.detail,
                                          f"{s.catalog_topic}/{partition}/{offset}"))
                continue
            facts[item.item_id] = orjson.dumps(item.as_dict())
            gone.discard(item.item_id)
        await self._dead_letters(letters)
        await self._write(facts, gone)
        if self.ack is not None:
            # Only what this worker owns: an unowned record's new owner applies and acks it.
            for e in events:
                if e.message.partition in self.assigned:
                    await self.ack(e)

    async def _dead_letters(self, letters: list[tuple[bytes, dict[str, bytes]]]) -> None:
        """Send the bad records to the dead-letter topic until the broker has them all."""
        delay = 0.1
        while letters:
            results = await asyncio.gather(*(self._send(v, h) for v, h in letters),
                                           return_exceptions=True)
            failed = [(ltr, res) for ltr, res in zip(letters, results, strict=True)
                      if isinstance(res, BaseException)]
            if not failed:
                return
            if any(isinstance(res, asyncio.CancelledError) for _, res in failed):
                raise asyncio.CancelledError
            self.stats.inc("catalog.errors")
            log.warning("catalog: %d dead-letter sends failed (%s); retrying in %.1fs",
                        len(failed), failed[0][1], delay)
            letters = [ltr for ltr, _ in failed]
            await asyncio.sleep(delay)
            delay = min(5.0, delay * 2)

    async def _send(self, value: bytes, headers: dict[str, bytes]) -> None:
        await (await self.send(self.settings.dlq_topic, value, None, headers))

    async def _write(self, facts: dict[str, bytes], gone: set[str]) -> None:
        """Write the facts and removals, then move the versions, retried until Redis has them.

        The versions follow the facts (in a cluster they are in other slots): a reader that
        sees a new version reads facts at least that new."""
        delay = 0.1
        while facts or gone:
            pipe = self.store.pipeline()
            if facts:
                pipe.hset(self.store.keys.catalog, mapping=facts)
            if gone:
                pipe.hdel(self.store.keys.catalog, *gone)
            versions = self.store.pipeline()
            versions.incr(self.store.keys.lists_version)
            versions.incr(self.store.keys.catalog_version)
            try:
                with self.stats.redis_write("catalog"):
                    await pipe.execute()
                    await versions.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.inc("catalog.errors")
                log.warning("catalog: write failed (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            self.stats.inc("catalog.applied", len(facts))
            self.stats.inc("catalog.removed", len(gone))
            if self.on_change is not None:
                self.on_change(set(facts) | gone)
            return
