"""Merchant config of one API process: business rules, experiments and the re-ranker.

Each is a document in Redis that any API process may change; every process re-reads them
every CACHE_REFRESH_S (api/services/catalog.py refreshes them all together). Writes go to
the compacted config topic first, then Redis, so the log is never behind Redis and
`cartwise rebuild` can restore what Redis lost (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from api.errors import ApiError
from cartwise.settings import Settings
from models.experiments import RANKINGS, Experiment, ExperimentError, Strategy, choose
from models.feedback import combine
from models.rules import NO_RULES, Rules, RulesError
from streams.store import Store
from streams.topics import ensure_topics

log = logging.getLogger("cartwise.api")


class ConfigService:
    """Rules, experiments and re-ranker weights, as last read from Redis."""

    def __init__(self, settings: Settings, store: Store,
                 producer: Callable[[], AIOKafkaProducer | None]) -> None:
        self.settings, self.store, self._producer = settings, store, producer
        self.redis, self.keys = store.redis, store.keys
        if settings.ranking not in RANKINGS:
            raise ValueError(f"CARTWISE_RANKING must be one of {list(RANKINGS)}, not "
                             f"{settings.ranking!r}")
        self.rules: Rules = NO_RULES
        self._rules_raw: bytes | None = None
        self.default_strategy = Strategy(ranking=settings.ranking)
        self.experiments: dict[str, Experiment] = {}
        self._experiments_raw: bytes | None = None
        self.reranker: dict[str, Any] = combine([], settings.reranker_min_examples)
        # Writes of this process, one at a time: the config topic and Redis then see them in
        # the same order.
        self._lock = asyncio.Lock()
        self._topic_ready = False  # created (compacted) by this process, or found

    async def load(self) -> None:
        await self.load_rules()
        await self.load_experiments()
        await self.load_reranker()

    async def load_rules(self) -> None:
        """Pick up a rules change made through any API process."""
        raw = await self.redis.get(self.keys.rules)
        if raw == self._rules_raw:
            return
        try:
            doc = orjson.loads(raw) if raw else None
            # The stored time of the change, not this read's (an API restart, a second
            # process or a document restored by `cartwise rebuild` reads it again).
            when = doc.get("updated_at") if isinstance(doc, dict) else None
            when = when if isinstance(when, int | float) and not isinstance(when, bool) else None
            self.rules = Rules.parse(doc, now=when) if raw else NO_RULES
        except (ValueError, RulesError) as exc:
            # Only PUT /v1/rules writes the key, after validating; keep the last good rules.
            log.error("stored rules are not usable, keeping the previous ones: %s", exc)
        self._rules_raw = raw

    async def save_rules(self, rules: Rules) -> None:
        raw = orjson.dumps(rules.to_dict())
        async with self._lock:
            await self.publish(b"rules", raw)  # first: the log is never behind Redis
            await self.redis.set(self.keys.rules, raw)
        self.rules, self._rules_raw = rules, raw

    async def load_experiments(self) -> None:
        """Pick up experiment changes made through any API process."""
        raw = await self.redis.get(self.keys.experiments)
        if raw == self._experiments_raw:
            return
        try:
            docs = orjson.loads(raw) if raw else {}
            self.experiments = {i: Experiment.parse(i, d) for i, d in docs.items()}
        except (ValueError, ExperimentError) as exc:
            log.error("stored experiments are not usable, keeping the previous ones: %s", exc)
        self._experiments_raw = raw

    async def save_experiments(self, experiments: dict[str, Experiment]) -> None:
        raw = orjson.dumps({i: {k: v for k, v in e.to_dict().items() if k != "id"}
                            for i, e in experiments.items()})
        async with self._lock:
            await self.publish(b"experiments", raw)  # first, as in save_rules
            await self.redis.set(self.keys.experiments, raw)
        self.experiments, self._experiments_raw = experiments, raw

    async def load_reranker(self) -> None:
        """The partitions' re-rankers, combined (models/feedback.py, combine); each lies in
        its own partition's slot, hence `Store.mget`."""
        raws = await self.store.mget([self.keys.reranker(p)
                                      for p in range(self.settings.partitions)])
        self.reranker = combine((orjson.loads(r) for r in raws if r),
                                self.settings.reranker_min_examples)

    def strategy(self, user_id: str | None
                 ) -> tuple[dict[str, str] | None, Strategy, Rules, bool]:
        """The shopper's experiment variant (None outside any), its strategy, the rules it
        applies and whether the re-ranker orders the answer."""
        chosen = choose(self.experiments, user_id, time.time())
        if chosen is None:
            experiment, strategy = None, self.default_strategy
        else:
            exp, variant = chosen
            experiment, strategy = {"id": exp.id, "variant": variant.name}, variant.strategy
        rules = self.rules if strategy.rules else NO_RULES
        reranked = strategy.ranking == "auto" and bool(self.reranker["active"])
        return experiment, strategy, rules, reranked

    async def publish(self, key: bytes, raw: bytes) -> None:
        """Put a rules or experiments document on the compacted config topic, keyed `key`,
        and wait for the broker's acknowledgement (acks=all).

        Called before the Redis write, so the log is never behind Redis: a document Redis
        holds was acknowledged by the broker first. When the produce fails, nothing is
        written to Redis and the caller gets 503 `broker_unavailable` naming the broker.
        (A produce that timed out may still land in the log later: the log can be ahead of
        Redis by a document the client was told to retry, never behind.)
        """
        s = self.settings
        what = key.decode()
        brokers = ",".join(s.bootstrap)
        producer = self._producer()
        if producer is None:
            raise ApiError(503, "broker_unavailable", f"{what} not saved: the broker "
                           f"({brokers}) is not reachable yet; the stored {what} are "
                           "unchanged, retry shortly",
                           headers={"Retry-After": "1"})
        try:
            if not self._topic_ready:
                # Created here too, not only by the workers: a topic the broker auto-creates
                # on the first send would not be compacted.
                await asyncio.wait_for(asyncio.to_thread(
                    ensure_topics, s, s.produce_timeout_s, (s.config_topic,)),
                    s.produce_timeout_s)
                self._topic_ready = True
            await asyncio.wait_for(producer.send_and_wait(s.config_topic, raw, key=key),
                                   s.produce_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a timeout or a Kafka error: Redis is left as it was
            log.warning("writing %s to %s failed: %r", what, s.config_topic, exc)
            why = (f"no answer within {s.produce_timeout_s:g}s"
                   if isinstance(exc, asyncio.TimeoutError) else type(exc).__name__)
            raise ApiError(503, "broker_unavailable", f"{what} not saved: the broker "
                           f"({brokers}) did not acknowledge the write to {s.config_topic} "
                           f"({why}); the stored {what} are unchanged, retry",
                           headers={"Retry-After": "1"}) from None
