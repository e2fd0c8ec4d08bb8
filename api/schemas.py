"""Request and response shapes, for validation and for the OpenAPI document (docs/api.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cartwise.contract import MAX_ID_LEN

ItemId = str


class Suggestion(BaseModel):
    item_id: str
    score: float = Field(description="Higher is better; comparable within one answer only")
    kind: Literal["cross_sell", "alternatives", "next", "upsell", "trending", "revisit",
                  "pinned", "new"]
    reason: str = Field(description="Why it is suggested, fit to show to shoppers, worded "
                                    "from kind, anchor and evidence (docs/model.md)")
    anchor: str | None = Field(None, description="The item whose evidence put this one here")
    anchor_name: str | None = Field(
        None, description="The anchor's catalog name; null when the catalog has none")
    evidence: dict[str, Any] | None = Field(
        None, description="The numbers behind the reason, to word your own: share, shoppers, "
                          "out_of; bought (a rebuy); category (trending)")
    name: str | None = None
    price: float | None = None
    category: str | None = None
    price_ratio: float | None = Field(None, description="upsell only: its price / the item's")


class Suggestions(BaseModel):
    items: list[Suggestion]
    fallback: str | None = Field(
        description="null when every item came from evidence; 'trending:<category>' or "
                    "'trending' when trending items filled a short answer")
    model: str | None = Field(description="Model version that computed the lists")
    as_of: float | None = Field(description="Event time (epoch s) the lists reflect")
    generated_at: float | None = Field(description="When a worker wrote the lists (epoch s)")
    served_at: float
    request_id: str
    item_id: str | None = None
    user_id: str | None = None
    kind: str | None = None
    placement: str | None = None
    shopper: dict[str, Any] | None = Field(
        None, description="Only with a price ladder or budget segments in the rules: the "
                          "shopper's orders, quadrant, ladder step and budget flag used")
    experiment: dict[str, str] | None = Field(
        None, description="The experiment and variant this shopper's answers follow, e.g. "
                          "{\"id\": \"rerank-test\", \"variant\": \"plain\"}; null when none. "
                          "Send it back, with request_id, in the impression (docs/experiments.md)")
    ranking: str | None = Field(
        None, description="'reranker' when the learned re-ranker ordered the list, else 'plain'")
    note: dict[str, str] | None = Field(
        None, description="Why trending items filled the answer, when they did: {\"code\": "
                          "\"no_evidence\"|\"held\"|\"out_of_stock\"|\"rules\"|"
                          "\"frequency_cap\", \"text\": a sentence fit to show}")


class CartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[str] = Field(min_length=1, max_length=100,
                             description="Item ids in the cart, oldest first")
    k: int = Field(10, ge=1, le=50)
    exclude: list[str] = Field(default_factory=list, max_length=500,
                               description="Items never to suggest (e.g. already on the page)")
    user_id: str | None = Field(None, min_length=1, max_length=128,
                                description="The shopper, when known: puts the answer in "
                                            "their experiment variant")


class Problem(BaseModel):
    status: int
    reason: str = Field(description="Stable code, e.g. missing_api_key, invalid_parameter")
    field: str | None = Field(None, description="Where the problem is, e.g. query.k, "
                                                "events[3].user_id")
    detail: str


class ErrorBody(BaseModel):
    error: Problem
    request_id: str | None = None


class IngestResult(BaseModel):
    index: int
    status: Literal["accepted", "rejected"]
    id: str | None = Field(None, description="event_id or item_id of an accepted record")
    reason: str | None = None
    field: str | None = None
    detail: str | None = None


class IngestResponse(BaseModel):
    accepted: int
    rejected: int
    results: list[IngestResult]
    request_id: str


class CatalogPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: int = Field(description="Pass back as `cursor`; 0 when the scan is complete")


class Trending(BaseModel):
    items: list[Suggestion]
    category: str | None
    served_at: float
    request_id: str


EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "An event as in docs/events.md (contract v1)",
    "properties": {
        "v": {"type": "integer", "enum": [1]},
        "event_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN},
        "type": {"type": "string", "enum": ["view", "add_to_cart", "remove_from_cart",
                                            "purchase"]},
        "user_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN},
        "item_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN},
        "ts": {"type": "number", "description": "epoch seconds; default: now"},
        "quantity": {"type": "integer", "minimum": 1},
        "price": {"type": "number", "minimum": 0},
        "session_id": {"type": "string"},
        "order_id": {"type": "string"},
        "category": {"type": "string"},
        "items": {"type": "array", "items": {"type": "object"},
                  "description": "purchase lines: {item_id, quantity, price}"},
    },
    "required": ["type", "user_id"],
}

CATALOG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A catalog record as in docs/events.md",
    "properties": {
        "item_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN},
        "price": {"type": "number", "minimum": 0},
        "category": {"type": "string"},
        "name": {"type": "string"},
        "brand": {"type": "string"},
        "tier": {"type": "string"},
        "in_stock": {"type": "boolean"},
        "consumable": {"type": ["boolean", "null"]},
    },
    "required": ["item_id"],
}


_IDS = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LEN}}

RULES_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {
        "type": "object",
        "description": "Business rules as in docs/rules.md; the whole document is replaced",
        "additionalProperties": False,
        "properties": {
            "block": _IDS | {"description": "items never suggested", "maxItems": 10_000},
            "exclude_categories": _IDS | {"description": "categories never suggested"},
            "pins": {"type": "object", "additionalProperties": _IDS | {"maxItems": 10},
                     "description": "anchor item -> items shown first next to it"},
            "boost": {"type": "object", "properties": {
                "items": _IDS | {"description": "new products to show returning customers"},
                "slots": {"type": "integer", "minimum": 0, "maximum": 5}}},
            "frequency_cap": {"type": "integer", "minimum": 0, "maximum": 1000,
                              "description": "times one item may be shown to one shopper "
                                            "per UTC day; 0 = no cap"},
        },
    }}}}}


def batch_body(schema: dict[str, Any], plural: str) -> dict[str, Any]:
    """OpenAPI request body: one record, a JSON array of them, or {plural: [...]}."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"anyOf": [
                schema,
                {"type": "array", "items": schema, "minItems": 1},
                {"type": "object", "properties": {plural: {"type": "array", "items": schema,
                                                           "minItems": 1}},
                 "required": [plural]},
            ]}}},
        }
    }


EXPERIMENT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "object",
        "description": "An experiment as in docs/experiments.md; the first variant is the "
                       "control",
        "additionalProperties": False,
        "required": ["variants"],
        "properties": {
            "variants": {"type": "array", "minItems": 2, "maxItems": 8, "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                    "weight": {"type": "number", "exclusiveMinimum": 0},
                    "settings": {"type": "object", "additionalProperties": False,
                                 "properties": {
                                     "ranking": {"type": "string", "enum": ["plain", "auto"]},
                                     "rules": {"type": "boolean"},
                                     "fill": {"type": "boolean"}}}}}},
            "traffic": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "start": {"type": ["number", "null"], "description": "epoch seconds"},
            "end": {"type": ["number", "null"], "description": "epoch seconds"},
            "metric": {"type": "string", "enum": ["conversion_rate", "ctr", "cross_sell_rate",
                                                  "revenue_per_shopper"]},
            "min_shoppers": {"type": "integer", "minimum": 1},
            "description": {"type": "string", "maxLength": 500}}}}}}}
