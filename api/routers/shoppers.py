"""Shoppers and audiences for marketing: profiles, audiences, due reminders (admin key).

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

import re
import time
from collections import deque
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from api.backend import Backend
from api.errors import ApiError, json_response, request_id
from api.schemas import ErrorBody
from api.services.audience import MAX_AUDIENCE, audience
from cartwise.contract import MAX_ID_LEN
from cartwise.redisconn import AsyncClient
from models.segments import rfm


def parse_span(text: str) -> float | None:
    """'7d' or '36h' in seconds; None if malformed or over 90 days."""
    m = re.fullmatch(r"(\d{1,4}(?:\.\d{1,3})?)([dh])", text.strip())
    if not m:
        return None
    seconds = float(m[1]) * (86400.0 if m[2] == "d" else 3600.0)
    return seconds if 0 < seconds <= 90 * 86400.0 else None


async def merged_range(redis: AsyncClient, keys: list[str], low: float, high: float,
                       start: int, num: int) -> list[tuple[bytes, float]]:
    """ZRANGEBYSCORE `low` `high` LIMIT `start` `num` WITHSCORES over the union of the sorted
    sets `keys` (one per events partition; their members differ), in Redis's order: score,
    then member. Each set is read in growing slices, as far as the merge needs: a deep cursor
    costs about what Redis's own LIMIT offset does, not that times the partitions."""
    heads: list[deque[tuple[bytes, float]]] = [deque() for _ in keys]
    read = [0] * len(keys)  # rows taken from each set so far
    size = [max(16, num)] * len(keys)  # the next slice's length, doubled after each
    left = set(range(len(keys)))  # sets that may hold more rows in the range
    out: list[tuple[bytes, float]] = []
    skip = start
    while len(out) < num:
        empty = [i for i in left if not heads[i]]
        if empty:
            pipe = redis.pipeline(transaction=False)  # one round trip (a node each)
            for i in empty:
                pipe.zrangebyscore(keys[i], low, high, start=read[i], num=size[i],
                                   withscores=True)
            for i, rows in zip(empty, await pipe.execute(), strict=True):
                heads[i].extend(rows)
                read[i] += len(rows)
                if len(rows) < size[i]:
                    left.discard(i)
                size[i] = min(2 * size[i], 1 << 16)
        ready = [i for i in range(len(keys)) if heads[i]]
        if not ready:
            break
        first = min(ready, key=lambda i: (heads[i][0][1], heads[i][0][0]))
        row = heads[first].popleft()
        if skip:
            skip -= 1
        else:
            out.append(row)
    return out


def router(backend: Backend) -> APIRouter:
    s = backend.settings
    segments = s.segments
    r = APIRouter(tags=["shoppers"], dependencies=[Depends(backend.require("admin"))])
    id_path = Path(min_length=1, max_length=MAX_ID_LEN)

    @r.get("/v1/users/{user_id}/profile",
           summary="A shopper's RFM segment, interest cluster and orders (admin)",
           responses={404: {"model": ErrorBody, "description": "Nothing known of this "
                                                              "shopper yet"}})
    async def user_profile(request: Request, user_id: Annotated[str, id_path]) -> Response:
        raw = await backend.redis.get(backend.keys.profile(user_id))
        if raw is None:
            raise ApiError(404, "not_found", f"nothing is known of shopper '{user_id}' yet (a "
                           "profile starts with their first purchase, or first view of an "
                           "item the catalog has a category for)", "path.user_id")
        doc = orjson.loads(raw)
        now = time.time()
        return json_response({
            "user_id": user_id,
            "rfm": rfm(doc["orders"], now, segments).to_dict(),
            "segment_config": segments.to_dict(),
            "orders_kept": len(doc["orders"]),
            "first_order_ts": doc["orders"][0][0] if doc["orders"] else None,
            "last_order_ts": doc["orders"][-1][0] if doc["orders"] else None,
            "bought": doc.get("bought", []),
            "interest": doc.get("interest"),
            "as_of": doc.get("as_of"), "generated_at": doc.get("generated_at"),
            "served_at": now, "request_id": request_id(request)})

    @r.get("/v1/audiences/{item_id}",
           summary="Shoppers most likely to buy this item who have not (admin)")
    async def audience_route(request: Request, item_id: Annotated[str, id_path],
                             k: Annotated[int, Query(ge=1, le=MAX_AUDIENCE)] = 50) -> Response:
        body = await audience(backend.redis, backend.store, item_id, k)
        return json_response(body | {"request_id": request_id(request)})

    @r.get("/v1/replenishment/due", summary="Shoppers due to rebuy a consumable (admin)")
    async def replenishment_due(
        request: Request,
        within: Annotated[str, Query(description="How far ahead: e.g. 7d, 36h (at most 90d)",
                                     max_length=10)] = "7d",
        cursor: Annotated[int, Query(ge=0, le=10**9)] = 0,
        count: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        ahead = parse_span(within)
        if ahead is None:
            raise ApiError(422, "invalid_parameter", "within: a number of days or hours, e.g. "
                           "7d or 36h, at most 90d", "query.within")
        now = time.time()
        lead = s.replenish_lead_days * 86400.0
        # Due = reminded up to `lead` ago (the run-out is still ahead) or within `ahead`.
        rows = await merged_range(backend.redis, backend.keys.dues(s.partitions), now - lead,
                                  now + ahead, cursor, count + 1)
        more = len(rows) > count
        rows = rows[:count]
        catalog = await backend.catalog.facts(list({orjson.loads(m)[1] for m, _ in rows}))
        out = []
        for member, at in rows:
            user, item = orjson.loads(member)
            facts = catalog.get(item) or {}
            out.append({"user_id": user, "item_id": item, "due_at": at,
                        "expected_run_out": at + lead, "name": facts.get("name"),
                        "price": facts.get("price"), "in_stock": facts.get("in_stock")})
        return json_response({"due": out, "within_s": ahead, "lead_days": s.replenish_lead_days,
                              "next_cursor": cursor + count if more else None,
                              "served_at": now, "request_id": request_id(request)})

    return r
