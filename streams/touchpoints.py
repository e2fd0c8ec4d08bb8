"""Touchpoints as they leave the system (docs/replenishment.md): ids and messages."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import orjson

from models.config import ModelConfig
from models.repurchase import DAY, LIFECYCLE_DAYS, predict, touchpoints
from streams.stats import Stats
from streams.store import Store

TOUCHPOINTS_PER_TICK = 500  # per partition: bounds one tick's work after downtime


def touchpoint_member(user: str, item: str, kind: str, bought_at: float) -> bytes:
    return orjson.dumps([user, item, kind, bought_at])


def touchpoint_message(member: bytes, at: float, lead_s: float) -> dict[str, Any]:
    """A touchpoint as sent to the touchpoints topic (docs/events.md, contract v1)."""
    user, item, kind, bought_at = orjson.loads(member)
    msg: dict[str, Any] = {
        "v": 1,
        "touchpoint_id": hashlib.sha1(member + repr(at).encode()).hexdigest()[:20],
        "kind": kind,
        "user_id": user,
        "item_id": item,
        "at": at,
        "bought_at": bought_at,
    }
    if kind == "replenish":
        msg["expected_run_out"] = at + lead_s
        msg["reason"] = f"about to run out of {item}"
    else:
        msg["reason"] = f"{kind.replace('_', ' ')} after buying {item}"
    return msg


class Touchpoints:
    """Plans each consumable purchase's touchpoints and due reminder (written with the
    checkpoint) and sends those whose time has come (docs/replenishment.md)."""

    def __init__(self, store: Store, stats: Stats, send: Any, settings: Any,
                 config: ModelConfig, catalog_cache: Any, list_cache: Any) -> None:
        self.store, self.keys, self.stats, self.send = store, store.keys, stats, send
        self.settings, self.config = settings, config
        self.catalog_cache, self.list_cache = catalog_cache, list_cache

    async def schedule(self, st: Any,
                       cycles: list[tuple[str, str, float, float | None]]) -> None:
        """Plan the touchpoints and the due reminder of each consumable just bought."""
        items = sorted({i for _, i, _, _ in cycles})
        catalog = await self.catalog_cache.get_many(items)
        docs = await self.list_cache.get_many(items)
        lead = self.config.replenish_lead_s
        for user, item, ts, prev in cycles:
            if not (catalog.get(item) or {}).get("consumable"):
                continue
            if prev is not None:  # a repeat: what the last purchase planned is void
                for kind in (*(f"day_{d}" for d in LIFECYCLE_DAYS), "replenish"):
                    st.schedule[touchpoint_member(user, item, kind, prev)] = None
            ctx = st.book.users.get(user)
            learned = (docs.get(item) or {}).get("repurchase")
            estimate = predict(ctx.repeats.get(item, ()) if ctx else (),
                               learned["cycle_days"] * DAY if learned else None)
            planned = touchpoints(ts, prev is not None, estimate, lead)
            for tp in planned:
                st.schedule[touchpoint_member(user, item, tp.kind, ts)] = tp.at
            due = [tp.at for tp in planned if tp.kind == "replenish"]
            st.due[orjson.dumps([user, item])] = due[0] if due else None
            st.counts["context.touchpoints_planned"] += len(planned)

    async def send_due(self, stage: Any) -> None:
        """Send the touchpoints whose time has come to the touchpoints topic, then forget them.

        At least once: a crash between the send and the removal sends again; consumers dedupe
        by `touchpoint_id`. The partition lock keeps a checkpoint from re-planning a member
        between reading and removing it.
        """
        s = self.settings
        redis = self.store.redis
        for p in sorted(stage.assigned):
            async with stage.locks[p]:
                now = time.time()
                key = self.keys.touchpoints(p)
                rows = await redis.zrangebyscore(key, "-inf", now, start=0,
                                                 num=TOUCHPOINTS_PER_TICK, withscores=True)
                if not rows:
                    continue
                # Re-planned or voided since the last checkpoint: the checkpoint decides.
                pending = st.schedule if (st := stage.parts.get(p)) is not None else {}
                rows = [(m, at) for m, at in rows if m not in pending]
                acks, stale = [], 0
                for member, at in rows:
                    if at < now - s.touchpoint_max_late_s:
                        stale += 1
                        continue
                    msg = touchpoint_message(member, at, self.config.replenish_lead_s)
                    acks.append(await self.send(s.touchpoints_topic, orjson.dumps(msg), None,
                                                None, msg["user_id"].encode()))
                await asyncio.gather(*acks)
                if rows:
                    await redis.zrem(key, *[m for m, _ in rows])
                self.stats.inc("context.touchpoints_sent", len(acks))
                self.stats.inc("context.touchpoints_stale", stale)
        # Reminders whose run-out has passed unanswered are no longer due.
        for p in sorted(stage.assigned):
            await redis.zremrangebyscore(self.keys.due(p), "-inf",
                                         time.time() - self.config.replenish_lead_s)
