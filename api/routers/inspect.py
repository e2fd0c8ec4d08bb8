"""What the workers stored, as they stored it, for the inspect page (admin key).

The suggestion routes answer as shoppers are served (stock, rules, fillers); these show the
documents behind them: an item's lists with their counts, a shopper's context and list, and a
catalog search by id or name. An unknown id is an empty document, not a 404: "no lists yet"
is an answer the page shows.

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from api.backend import Backend
from api.errors import json_response, request_id
from cartwise.contract import MAX_ID_LEN

SEARCH_SCAN_MAX = 200_000  # catalog entries one search reads at most
ITEM_LISTS = ("cross_sell", "alternatives", "next")


def match_rank(item: dict, needle: str) -> int | None:
    """0 exact id or name, 1 prefix, 2 substring, None no match (case-insensitive)."""
    ident, name = item.get("item_id", "").lower(), str(item.get("name") or "").lower()
    if needle in (ident, name):
        return 0
    if ident.startswith(needle) or name.startswith(needle):
        return 1
    return 2 if needle in ident or needle in name else None


def router(backend: Backend) -> APIRouter:
    r = APIRouter(tags=["inspect"], dependencies=[Depends(backend.require("admin"))])
    id_path = Path(min_length=1, max_length=MAX_ID_LEN)
    keys = backend.keys

    @r.get("/v1/items/{item_id}/lists",
           summary="An item's stored lists with their counts (support, confidence, lift, "
                   "LLR), freshness and repurchase cycle (admin)")
    async def item_lists(request: Request, item_id: Annotated[str, id_path]) -> Response:
        raw = await backend.redis.get(keys.item(item_id))
        doc = orjson.loads(raw) if raw else {}
        out = {kind: doc.get(kind, []) for kind in ITEM_LISTS}
        return json_response(doc | out | {
            "item_id": item_id, "known": raw is not None,
            "generated_at": doc.get("generated_at"), "as_of": doc.get("as_of"),
            "request_id": request_id(request)})

    @r.get("/v1/users/{user_id}/context",
           summary="A shopper's stored context (recent items, cart, bought) and list, before "
                   "stock filters and rules (admin)")
    async def user_context(request: Request, user_id: Annotated[str, id_path]) -> Response:
        raw = await backend.redis.get(keys.user(user_id))
        doc = orjson.loads(raw) if raw else {}
        return json_response(doc | {
            "user_id": user_id, "known": raw is not None,
            "context": doc.get("context") or {}, "items": doc.get("items", []),
            "generated_at": doc.get("generated_at"), "as_of": doc.get("as_of"),
            "request_id": request_id(request)})

    @r.get("/v1/catalog/search",
           summary="Catalog items whose id or name contains the text: exact, then prefix, "
                   "then substring matches (admin)")
    async def catalog_search(request: Request,
                             q: Annotated[str, Query(min_length=1, max_length=200)],
                             k: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        needle = q.strip().lower()
        found: list[tuple[int, str, dict]] = []
        scanned = 0
        async for _, value in backend.redis.hscan_iter(keys.catalog, count=1000):
            scanned += 1
            item = orjson.loads(value)
            rank = match_rank(item, needle) if needle else None
            if rank is not None:
                found.append((rank, str(item.get("name") or item.get("item_id")), item))
            if scanned >= SEARCH_SCAN_MAX:
                break
        found.sort(key=lambda f: (f[0], f[1]))
        return json_response({"items": [item for _, _, item in found[:k]],
                              "matches": len(found), "scanned": scanned,
                              "complete": scanned < SEARCH_SCAN_MAX,
                              "request_id": request_id(request)})

    return r
