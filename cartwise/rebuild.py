"""`cartwise rebuild`: the exact rebuild of the workers' state from the retained events topic.

After Redis lost its data the workers stop (a missing state generation, docs/operations.md).
The rebuild clears what is left of the derived state under the prefix, starts a new state
generation, and lets the workers replay the events topic from offset 0: each stage finds no
checkpoint and fetches from the start; co-occurrence evidence of the old generation still in the
pairs topic is skipped, so the item graph is computed again from rebuilt contexts only.
The catalog comes back from the catalog topic, and the merchant's rules and experiment
definitions from the compacted config topic (the API writes them there before Redis).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from cartwise.contract import ContractError, parse_catalog
from cartwise.redisconn import Client, connect, is_cluster
from cartwise.settings import Settings
from streams.store import Keys

if TYPE_CHECKING:
    from kafka import KafkaConsumer

# Written by the API, not derived from events: kept. Short-lived request records and worker
# stats are kept too (they expire on their own).
KEEP = ("rules", "experiments", "served:", "stats:")
# Record keys on the config topic (api/app.py, Backend.publish_config), by Redis key name.
CONFIG_KEYS = (b"rules", b"experiments")
# A worker publishes its stats every second: one whose stats are this recent is running.
# `rebuild(alive_s=...)` (`cartwise rebuild --alive-s`) changes it.
ALIVE_S = 5.0
# What the exact rebuild needs of the broker, for `cartwise rebuild --help` and its refusals.
RETENTION_NEEDED = ("the events topic kept whole (retention.ms=-1) and the catalog and config "
                    "topics compacted (cleanup.policy=compact)")


class RebuildRefused(RuntimeError):
    """The rebuild would not be exact, or would race a running worker; nothing was changed."""


@dataclass
class RebuildReport:
    deleted: int
    generation: str
    partitions: int  # of the events topic, each replayed from offset 0
    items: int  # catalog facts read back from the catalog topic
    # Read back from the config topic: whether the rules were, and how many experiments
    # (None: the experiment definitions were not); what Redis still held is kept.
    rules_restored: bool = False
    experiments_restored: int | None = None

    def config_summary(self) -> str:
        parts = (["rules"] if self.rules_restored else []) + (
            [] if self.experiments_restored is None else
            [f"{self.experiments_restored} experiment"
             f"{'' if self.experiments_restored == 1 else 's'}"])
        if not parts:
            return "no rules or experiments restored (kept, or none on the config topic)"
        return f"{' and '.join(parts)} restored from the config topic"

    def summary(self) -> str:
        return (f"deleted {self.deleted} keys of derived state; new state generation "
                f"{self.generation}; {self.items} catalog items read back from the catalog "
                f"topic; {self.config_summary()}; start the workers: they replay the events "
                f"topic from offset 0 of its {self.partitions} partitions")


def _consumer(settings: Settings, *topics: str, **options: object) -> KafkaConsumer:
    """A consumer of the rebuild's own (no group). kafka is imported here, not at the top:
    `cartwise --help` imports this module for its constants and should not pay for it."""
    from kafka import KafkaConsumer

    return KafkaConsumer(*topics, bootstrap_servers=settings.bootstrap,
                         client_id=f"{settings.app_id}-rebuild", **options)


def running_workers(r: Client, keys: Keys, now: float,
                    alive_s: float = ALIVE_S) -> list[str]:
    """The workers of this prefix whose stats were published within `alive_s` of `now`; a
    worker that stopped itself (`"stopped"`: state lost, checkpoint stuck) is not running,
    however recent its last stats."""
    out = []
    for key in r.scan_iter(keys.stats_pattern, count=1000):
        raw = r.get(key)
        if raw is None:
            continue
        snap = orjson.loads(raw)
        if not snap.get("stopped") and now - float(snap.get("updated") or 0) < alive_s:
            out.append(str(snap.get("worker_id", key.decode())))
    return out


def retained_events(settings: Settings) -> int:
    """The events topic's partition count, refusing when a log no longer starts at offset 0.

    Only the log start is asked (ListOffsets "earliest"): the embedded broker's answer for
    the log end is not reliable (docs/architecture.md).
    """
    from kafka import TopicPartition

    consumer = _consumer(settings)
    try:
        parts = consumer.partitions_for_topic(settings.events_topic)
        if not parts:
            raise RebuildRefused(f"the events topic {settings.events_topic!r} does not exist")
        tps = [TopicPartition(settings.events_topic, p) for p in sorted(parts)]
        first = consumer.beginning_offsets(tps)
    finally:
        consumer.close()
    cut = {tp.partition: o for tp, o in first.items() if o > 0}
    if cut:
        where = ", ".join(f"partition {p} starts at {o}" for p, o in sorted(cut.items()))
        raise RebuildRefused(
            f"the events topic no longer holds every event ({where}): an exact rebuild needs "
            f"{RETENTION_NEEDED} (docs/operations.md); or start a new app id and prefix to "
            "rebuild from what is left")
    return len(tps)


def rebuild(settings: Settings, force: bool = False, alive_s: float = ALIVE_S) -> RebuildReport:
    """Clear the derived state for an exact replay; refuses (changing nothing) while a worker
    published stats within `alive_s` seconds (unless `force`) or the events log lost its start.
    """
    r = connect(settings)
    keys = Keys(settings.prefix)
    alive = running_workers(r, keys, time.time(), alive_s)
    if alive and not force:
        raise RebuildRefused(f"{len(alive)} worker(s) published stats in the last {alive_s:g} s "
                             f"({', '.join(sorted(alive))}): stop every worker first, or "
                             "--force if they are stopped")
    partitions = retained_events(settings)
    keep = tuple(settings.prefix + k for k in KEEP)
    deleted = 0
    batch: list[bytes] = []
    for key in r.scan_iter(f"{settings.prefix}*", count=1000):
        if key.decode(errors="replace").startswith(keep):
            continue
        batch.append(key)
        if len(batch) >= 1000:
            deleted += r.unlink(*batch)
            batch.clear()
    if batch:
        deleted += r.unlink(*batch)
    items = restore_catalog(settings, r, keys)
    held = {key: bool(r.exists(key)) for key in (keys.rules, keys.experiments)}
    restore_config(settings, r, keys)
    rules_restored = not held[keys.rules] and bool(r.exists(keys.rules))
    experiments_restored = None
    if not held[keys.experiments] and (raw := r.get(keys.experiments)) is not None:
        experiments_restored = len(orjson.loads(raw))
    generation = secrets.token_hex(8)
    # The copies beside each partition's state (what its checkpoints check) first, the global
    # token last: a worker that finds the token then finds every copy too.
    copies = dict.fromkeys(keys.partition_generations(max(settings.partitions, partitions)),
                           generation)
    if is_cluster(r):
        # And one in every slot: the workers watch them for a node that lost its data.
        pipe = r.pipeline(transaction=False)
        for key in (*copies, *keys.sentinels()):
            pipe.set(key, generation)
        pipe.execute()
    else:
        r.mset(copies)
    r.set(keys.generation, generation)
    return RebuildReport(deleted, generation, partitions, items, rules_restored,
                         experiments_restored)


def restore_catalog(settings: Settings, r: Client, keys: Keys) -> int:
    """Read the catalog topic from its start into the catalog hash, as the catalog stage does.

    The workers' catalog consumer resumes at its committed offset, past what Redis lost.
    Records are keyed by item, so the last one read for an item is its newest.
    """
    consumer = _consumer(settings, settings.catalog_topic, group_id=None,
                         auto_offset_reset="earliest", consumer_timeout_ms=3000)
    facts: dict[str, bytes] = {}
    try:
        for m in consumer:
            if m.value is None and m.key:  # a tombstone: the shop removed the item
                facts.pop(m.key.decode(errors="replace"), None)
                continue
            try:
                item = parse_catalog(m.value)
            except ContractError:
                continue  # the catalog stage dead-lettered it when it first came
            facts[item.item_id] = orjson.dumps(item.as_dict())
    finally:
        consumer.close()
    for start in range(0, len(facts), 1000):
        chunk = dict(list(facts.items())[start:start + 1000])
        r.hset(keys.catalog, mapping=chunk)
    return len(facts)


def restore_config(settings: Settings, r: Client, keys: Keys) -> int:
    """Read the config topic from its start and write the newest rules and experiments
    documents back to Redis, each only where Redis no longer holds it; returns how many.

    The API writes each document to the topic (keyed `rules` or `experiments`, the value the
    exact bytes it then writes to Redis) before Redis, so the topic is never behind Redis.
    Rules that survived in Redis are kept as they are. The topic is compacted: the last
    record read for a key is its newest document.
    """
    consumer = _consumer(settings, group_id=None, auto_offset_reset="earliest",
                         consumer_timeout_ms=3000,
                         allow_auto_create_topics=False)  # never an uncompacted one
    newest: dict[bytes, bytes | None] = {}
    try:
        if settings.config_topic not in consumer.topics():
            return 0  # never written (no API wrote rules or experiments yet)
        consumer.subscribe([settings.config_topic])
        for m in consumer:
            if m.key in CONFIG_KEYS:
                newest[m.key] = m.value
    finally:
        consumer.close()
    targets = {b"rules": keys.rules, b"experiments": keys.experiments}
    restored = 0
    for key, value in newest.items():
        if value is None:  # a tombstone: no document to restore
            continue
        if r.set(targets[key], value, nx=True):  # only where Redis lost it
            restored += 1
    return restored
