"""The event collector and catalog writes: batches validated by the contract, produced to
Kafka with acks=all before the answer; rejected records also go to the dead-letter topic.

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from api.backend import Backend
from api.errors import ApiError, json_response, request_id
from api.schemas import CATALOG_SCHEMA, EVENT_SCHEMA, IngestResponse, batch_body
from cartwise.contract import ContractError, dlq_headers, prepare_catalog, prepare_event

log = logging.getLogger("cartwise.api")


def records_of(data: Any, plural: str) -> list:
    """One record, a list, or {plural: [...]}: the records, or a 4xx ApiError."""
    if isinstance(data, dict) and plural in data:
        records = data[plural]
        if not isinstance(records, list):
            raise ApiError(422, "wrong_type", f"'{plural}' must be a list", f"body.{plural}")
    elif isinstance(data, list):
        records = data
    elif isinstance(data, dict):
        records = [data]
    else:
        raise ApiError(422, "not_an_object", "send an object, a list of objects or "
                       f"{{\"{plural}\": [...]}}", "body")
    if not records:
        raise ApiError(422, "empty_batch", "no records in the request", "body")
    return records


def router(backend: Backend) -> APIRouter:
    s = backend.settings
    m = backend.metrics
    r = APIRouter()

    async def ingest_batch(request: Request, plural: str, topic: str,
                           prepare: Callable[[Any, float], tuple[Any, bytes]],
                           key_of: Callable[[Any], str], id_of: Callable[[Any], str]
                           ) -> Response:
        rid = request_id(request)
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, "bad_json", f"body is not JSON: {str(exc)[:200]}") from None
        records = records_of(data, plural)
        if len(records) > s.max_batch:
            raise ApiError(413, "batch_too_large", f"{len(records)} records > {s.max_batch}; "
                           "split the batch", "body")
        if plural == "events":
            backend.charge_events(request.scope.get("cartwise.key"), len(records))
        producer = backend.producer
        if producer is None:
            raise ApiError(503, "broker_unavailable", "the event broker is not reachable "
                           "yet; retry shortly", headers={"Retry-After": "1"})
        results: list[dict[str, Any]] = []
        sends: list[Awaitable[Any]] = []
        rejected: list[tuple[int, Any, ContractError]] = []
        now = time.time()
        for n, d in enumerate(records):
            try:
                valid, value = prepare(d, now)
            except ContractError as err:
                rejected.append((n, d, err))
                results.append({"index": n, "status": "rejected", **err.as_dict()})
                if err.field:
                    results[-1]["field"] = f"{plural}[{n}].{err.field}"
                continue
            sends.append(producer.send(topic, value, key=key_of(valid).encode()))
            results.append({"index": n, "status": "accepted", "id": id_of(valid)})
        try:
            futures = await asyncio.wait_for(asyncio.gather(*sends), s.produce_timeout_s)
            await asyncio.wait_for(asyncio.gather(*futures), s.produce_timeout_s)
        except Exception as exc:  # a timeout or a Kafka error: nothing may be half-claimed
            log.warning("request %s: produce failed: %r", rid, exc)
            raise ApiError(503, "broker_unavailable", "events were not stored (broker did "
                           "not acknowledge); retry with the same event_ids",
                           headers={"Retry-After": "1"}) from None
        await dead_letter(producer, rid, plural, rejected)
        for _n, _d, err in rejected:
            m.ingest.labels(plural, "rejected", err.reason).inc()
        m.ingest.labels(plural, "accepted", "").inc(len(sends))
        body: dict[str, Any] = {"accepted": len(sends), "rejected": len(rejected),
                                "results": results, "request_id": rid}
        if not sends:
            body["error"] = {"status": 422, "reason": "all_rejected",
                             "detail": f"none of the {plural} was accepted; see results"}
            return json_response(body, 422)
        return json_response(body, 202)

    async def dead_letter(producer: AIOKafkaProducer, rid: str, plural: str,
                          rejected: list[tuple[int, Any, ContractError]]) -> None:
        """Rejected records go to the dead-letter topic too: the sender may not log them."""
        if not rejected:
            return
        try:
            futures = [await producer.send(
                s.dlq_topic, orjson.dumps(d), headers=list(
                    dlq_headers(err, f"api/{rid}/{plural}[{n}]").items()))
                for n, d, err in rejected]
            await asyncio.wait_for(asyncio.gather(*futures), s.produce_timeout_s)
        except Exception as exc:  # the client has its answer; losing the copy is logged
            log.warning("request %s: dead-lettering %d records failed: %r", rid,
                        len(rejected), exc)

    @r.post("/v1/events", status_code=202, response_model=IngestResponse, tags=["ingest"],
            summary="Collect events (one, a list, or {\"events\": [...]})",
            openapi_extra=batch_body(EVENT_SCHEMA, "events"),
            dependencies=[Depends(backend.require("ingest"))])
    async def collect_events(request: Request) -> Response:
        # Keyed by shopper: one shopper's events stay in order on one partition.
        return await ingest_batch(request, "events", s.events_topic, prepare_event,
                                  lambda e: e.user_id, lambda e: e.event_id)

    @r.post("/v1/catalog", status_code=202, response_model=IngestResponse, tags=["catalog"],
            summary="Add or update catalog records (admin)",
            openapi_extra=batch_body(CATALOG_SCHEMA, "items"),
            dependencies=[Depends(backend.require("admin"))])
    async def put_catalog(request: Request) -> Response:
        return await ingest_batch(request, "items", s.catalog_topic,
                                  lambda d, _now: prepare_catalog(d), lambda c: c.item_id,
                                  lambda c: c.item_id)

    return r
