"""Ranked shoppers for an item (docs/audiences.md): three pipelined reads, no scoring state."""

from __future__ import annotations

import time
from typing import Any

import orjson

from cartwise.redisconn import AsyncClient
from models.audience import RELATED_PER_KIND, rank_audience, related_items
from streams.store import Store

MAX_AUDIENCE = 1000  # shoppers per audience request
AUDIENCE_READ = 200  # newest shoppers read per related item and channel


async def audience(redis: AsyncClient, store: Store, item_id: str, k: int) -> dict[str, Any]:
    """Shoppers most likely to buy `item_id` who have not, with the related items used."""
    keys = store.keys
    raw = await redis.get(keys.item(item_id))
    doc = orjson.loads(raw) if raw else None
    heads = list(dict.fromkeys(
        e["item_id"] for kind, n in RELATED_PER_KIND.items()
        for e in (doc or {}).get(kind, ())[:n] if e["item_id"] != item_id))
    docs = await store.item_lists(heads)
    related = related_items(item_id, doc, docs)
    pipe = redis.pipeline(transaction=False)
    for r in related:
        pipe.zrevrange(keys.audience("buy", r.item_id), 0, AUDIENCE_READ - 1, withscores=True)
        pipe.zrevrange(keys.audience("view", r.item_id), 0, AUDIENCE_READ - 1, withscores=True)
    got = await pipe.execute()
    touches = {r.item_id: ([(u.decode(), ts) for u, ts in got[2 * n]],
                           [(u.decode(), ts) for u, ts in got[2 * n + 1]])
               for n, r in enumerate(related)}
    now = time.time()
    # Rank more than asked, then drop those whose profile says they bought it already.
    ranked = rank_audience(related, touches, now, 2 * k + 20)
    owners: set[str] = set()
    if ranked:
        profiles = await store.mget([keys.profile(e["user_id"]) for e in ranked])
        owners = {e["user_id"] for e, p in zip(ranked, profiles, strict=True)
                  if p and item_id in orjson.loads(p).get("bought", ())}
    shoppers = [e for e in ranked if e["user_id"] not in owners][:k]
    return {"item_id": item_id, "shoppers": shoppers,
            "related": [{"item_id": r.item_id, "strength": round(r.strength, 6),
                         "kind": r.kind} for r in related[:10]],
            "known_item": doc is not None, "served_at": now}
