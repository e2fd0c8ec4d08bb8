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
        acks = []
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
                out, headers = dlq_record(value, err.reason, err.field, err.detail,
                                          f"{s.catalog_topic}/{partition}/{offset}")
                acks.append(await self.send(s.dlq_topic, out, None, headers))
                continue
            facts[item.item_id] = orjson.dumps(item.as_dict())
            gone.discard(item.item_id)
        await asyncio.gather(*acks)
        delay = 0.1
        while facts or gone:
            pipe = self.store.redis.pipeline(transaction=True)
            if facts:
                pipe.hset(self.store.keys.catalog, mapping=facts)
            if gone:
                pipe.hdel(self.store.keys.catalog, *gone)
            pipe.incr(self.store.keys.lists_version)
            pipe.incr(self.store.keys.catalog_version)
            try:
                with self.stats.redis_write("catalog"):
                    await pipe.execute()
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
            break
        if self.ack is not None:
            for e in events:
                await self.ack(e)
