"""Storefront lookups: item, shopper and cart suggestions, trending, catalog pages (read key).

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

import time
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response

from api.backend import Backend
from api.errors import ApiError, json_response, request_id
from api.schemas import CartRequest, CatalogPage, Suggestions, Trending
from cartwise.contract import MAX_ID_LEN
from models import serving
from models.wording import render_all


def router(backend: Backend) -> APIRouter:
    s = backend.settings
    answers = backend.answers
    r = APIRouter(dependencies=[Depends(backend.require("read"))])
    k_param = Query(ge=1, le=s.max_k, description="How many suggestions")
    id_path = Path(min_length=1, max_length=MAX_ID_LEN)

    @r.get("/v1/items/{item_id}/suggestions", response_model=Suggestions,
           summary="Suggestions for an item page", tags=["suggestions"])
    async def item_suggestions(
        request: Request,
        item_id: Annotated[str, id_path],
        kind: Annotated[Literal["cross_sell", "alternatives", "next", "upsell"],
                        Query(description="cross_sell: goes with it; alternatives: instead "
                                          "of it; next: what shoppers picked right after "
                                          "it, or right before it; upsell: a dearer "
                                          "alternative")] = "cross_sell",
        k: Annotated[int, k_param] = 10,
        user_id: Annotated[str | None, Query(
            min_length=1, max_length=MAX_ID_LEN,
            description="The shopper looking, for the merchant's price ladder "
                        "(docs/rules.md)")] = None,
    ) -> Response:
        rid = request_id(request)
        body = await answers.item(item_id, kind, k, user_id, rid)
        return json_response(body | {"request_id": rid})

    @r.get("/v1/users/{user_id}/suggestions", response_model=Suggestions,
           summary="A shopper's \"you may also need\" list", tags=["suggestions"])
    async def user_suggestions(
        request: Request,
        user_id: Annotated[str, id_path],
        k: Annotated[int, k_param] = 10,
        placement: Annotated[Literal["product", "cart", "home", "new"],
                             Query(description="Where the list is shown: a cart shows only "
                                               "complements; new only what the shopper "
                                               "never touched")] = "product",
    ) -> Response:
        rid = request_id(request)
        body = await answers.user(user_id, placement, k, rid)
        return json_response(body | {"request_id": rid})

    @r.post("/v1/cart/suggestions", response_model=Suggestions,
            summary="Suggestions for an anonymous cart", tags=["suggestions"])
    async def cart_suggestions(request: Request, body: CartRequest) -> Response:
        for n, i in enumerate(body.items):
            if not 0 < len(i) <= MAX_ID_LEN:
                raise ApiError(422, "invalid_body", f"item ids are 1..{MAX_ID_LEN} characters",
                               f"body.items[{n}]")
        rid = request_id(request)
        out = await answers.cart(body.items, body.k, body.exclude, body.user_id, rid)
        return json_response(out | {"request_id": rid})

    @r.get("/v1/trending", response_model=Trending,
           summary="Most popular items now, shop-wide or in one category",
           tags=["suggestions"])
    async def trending(request: Request,
                       category: Annotated[str | None, Query(max_length=200)] = None,
                       k: Annotated[int, k_param] = 10) -> Response:
        catalog: dict[str, dict | None] = {}
        entries, _used = await answers.fill([], catalog, k, set(), [category] if category
                                            else [])
        return json_response({"items": render_all(serving.enrich(entries, catalog), catalog),
                              "category": category,
                              "served_at": time.time(), "request_id": request_id(request)})

    @r.get("/v1/catalog", response_model=CatalogPage, tags=["catalog"],
           summary="Page through the catalog the workers know")
    async def catalog_page(cursor: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
                           count: Annotated[int, Query(ge=1, le=500)] = 100,
                           category: Annotated[str | None, Query(max_length=200)] = None
                           ) -> Response:
        nxt, found = await backend.redis.hscan(backend.keys.catalog, cursor, count=count)
        items = [orjson.loads(v) for v in found.values()]
        if category is not None:
            items = [i for i in items if i.get("category") == category]
        items.sort(key=lambda i: i["item_id"])
        return json_response({"items": items, "next_cursor": int(nxt)})

    return r
