"""The HTTP API over real HTTP, a real worker, the real broker and redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import orjson
import pytest
from kafka import KafkaConsumer

from api.app import create_app
from api.auth import new_key
from cartwise.embedded import free_port
from cartwise.settings import Settings
from models.cart import rank_for_cart
from tests.conftest import Served


def hero_with_lists(s: Served) -> str:
    for item in s.shop.complements:
        doc = s.doc("item", item)
        if doc and len(doc["cross_sell"]) >= 3 and doc["alternatives"]:
            return item
    raise AssertionError("no hero item has lists")


# -- suggestions ------------------------------------------------------------------------------

def test_item_suggestions_are_the_stored_list_filtered_by_stock(served):
    item = hero_with_lists(served)
    stored = served.doc("item", item)
    in_stock = {c["item_id"] for c in served.shop.catalog if c["in_stock"]}
    for kind in ("cross_sell", "alternatives"):
        resp = served.get(f"/v1/items/{item}/suggestions", kind=kind, k=5)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        want = [e for e in stored[kind] if e["item_id"] in in_stock][:5]
        got = [e for e in body["items"] if e["kind"] != "trending"]
        assert [e["item_id"] for e in got] == [e["item_id"] for e in want]
        assert [e["score"] for e in got] == [e["score"] for e in want]
        assert all(e["reason"] and e["name"] and e["price"] is not None for e in got)
        assert body["model"] == stored["model"] and body["item_id"] == item
        assert body["generated_at"] == stored["generated_at"]
        assert resp.headers["x-request-id"] == body["request_id"]


def test_upsell_is_a_dearer_alternative_in_the_same_category(served):
    facts = {c["item_id"]: c for c in served.shop.catalog}
    seen_upsell = 0
    for item in served.shop.complements:
        body = served.get(f"/v1/items/{item}/suggestions", kind="upsell", k=5).json()
        assert body["items"], item  # never empty while the shop has traffic
        for e in body["items"]:
            if e["kind"] == "upsell":
                seen_upsell += 1
                assert facts[e["item_id"]]["price"] > facts[item]["price"]
                assert facts[e["item_id"]]["category"] == facts[item]["category"]
                assert e["price_ratio"] > 1
    assert seen_upsell > 0


def test_unknown_item_gets_trending_from_its_category_when_the_catalog_knows_it(served):
    new = {"item_id": "pho-new-1", "category": "phones", "price": 99.0, "name": "New phone"}
    resp = served.post("/v1/catalog", new, key="admin")
    assert resp.status_code == 202, resp.text
    deadline = time.monotonic() + 30
    while served.r.hget(f"{served.settings.prefix}catalog", "pho-new-1") is None:
        assert time.monotonic() < deadline, "catalog record never reached Redis"
        time.sleep(0.1)
    body = served.get("/v1/items/pho-new-1/suggestions", k=8).json()
    assert body["fallback"] == "trending:phones"
    assert len(body["items"]) == 8
    assert all(e["kind"] == "trending" and e["category"] == "phones" for e in body["items"])
    scores = [e["score"] for e in body["items"]]
    assert scores == sorted(scores, reverse=True) and scores[0] <= 1.0
    # Not in the catalog at all: shop-wide trending.
    body = served.get("/v1/items/never-seen/suggestions", k=3).json()
    assert body["fallback"] == "trending" and len(body["items"]) == 3
    assert "never-seen" not in {e["item_id"] for e in body["items"]}


def test_user_suggestions_follow_placement_and_fall_back_for_strangers(served):
    users = [k.decode().rsplit(":", 1)[1]
             for k in served.r.scan_iter(f"{served.settings.prefix}user:*", count=1000)]
    with_cart = [u for u in users if served.doc("user", u)["context"]["cart"]
                 and served.doc("user", u)["items"]]
    assert with_cart
    user = with_cart[0]
    stored = served.doc("user", user)
    product = served.get(f"/v1/users/{user}/suggestions", k=20).json()
    cart = served.get(f"/v1/users/{user}/suggestions", k=20, placement="cart").json()
    assert [e["item_id"] for e in product["items"] if e["kind"] != "trending"] == [
        e["item_id"] for e in stored["items"]
        if (served.r.hget(f"{served.settings.prefix}catalog", e["item_id"]) or b"")
        .find(b'"in_stock":false') < 0][:20]
    assert all(e["kind"] in ("cross_sell", "next", "trending") for e in cart["items"])
    assert not set(stored["context"]["cart"]) & {e["item_id"] for e in product["items"]}
    recent = set(stored["context"]["recent"])
    assert all(e["kind"] == "revisit" for e in product["items"] if e["item_id"] in recent)
    # "New for you": the same list without the shopper's own items, topped up with trending
    # items they never touched either.
    new = served.get(f"/v1/users/{user}/suggestions", k=20, placement="new").json()
    own = recent | set(stored["context"]["cart"]) | set(stored["context"]["bought"])
    assert new["items"] and not own & {e["item_id"] for e in new["items"]}
    theirs = [e["item_id"] for e in product["items"] if e["kind"] not in ("revisit", "trending")]
    listed = [e["item_id"] for e in new["items"] if e["kind"] != "trending"]
    assert listed[: len(theirs)] == theirs  # the same order; room for more below them
    assert any(e["kind"] == "revisit" for e in product["items"])  # there was something to drop

    stranger = served.get("/v1/users/nobody-yet/suggestions", k=5).json()
    assert stranger["fallback"] == "trending" and len(stranger["items"]) == 5
    assert all(e["kind"] == "trending" for e in stranger["items"])


def test_anonymous_cart_blends_the_lists_of_its_items(served):
    item = hero_with_lists(served)
    other = next(i for i in served.shop.complements if i != item and served.doc("item", i))
    cart = [other, item]
    resp = served.post("/v1/cart/suggestions", {"items": cart, "k": 6}, key="read")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    lists = {i: served.doc("item", i) for i in cart}
    catalog = {c["item_id"]: c for c in served.shop.catalog}
    want = rank_for_cart(cart, lists, catalog, 6, set(cart))
    got = [e for e in body["items"] if e["kind"] != "trending"]
    assert [e["item_id"] for e in got] == [e["item_id"] for e in want]
    assert not set(cart) & {e["item_id"] for e in body["items"]}
    assert len(body["items"]) == 6


def test_trending_and_catalog_pages(served):
    body = served.get("/v1/trending", category="coffee", k=4).json()
    assert len(body["items"]) == 4 and all(e["category"] == "coffee" for e in body["items"])
    seen, cursor = {}, 0
    while True:
        page = served.get("/v1/catalog", cursor=cursor, count=50).json()
        seen.update({i["item_id"]: i for i in page["items"]})
        cursor = page["next_cursor"]
        if cursor == 0:
            break
    assert {c["item_id"] for c in served.shop.catalog} <= set(seen)
    assert seen["pho-000"]["name"]


# -- ingest -----------------------------------------------------------------------------------

def test_events_batch_answers_per_event_and_dead_letters_the_rejected(served):
    now = time.time()
    batch = {"events": [
        {"type": "view", "user_id": "http-u1", "item_id": "pho-000", "event_id": "h1",
         "ts": now},
        {"type": "add_to_cart", "user_id": "http-u1", "item_id": "pho-000", "event_id": "h2",
         "ts": now + 1},
        {"type": "view", "user_id": "http-u1", "event_id": "h3"},
        {"type": "teleport", "user_id": "http-u1", "item_id": "x", "event_id": "h4"},
    ]}
    resp = served.post("/v1/events", batch)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert (body["accepted"], body["rejected"]) == (2, 2)
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted", "rejected",
                                                      "rejected"]
    assert body["results"][2]["reason"] == "missing_field"
    assert body["results"][2]["field"] == "events[2].item_id"
    assert body["results"][3]["reason"] == "unknown_type"

    # The accepted events went through the stream: the shopper has a list now.
    deadline = time.monotonic() + 30
    while (doc := served.doc("user", "http-u1")) is None or "pho-000" not in doc["context"][
            "cart"]:
        assert time.monotonic() < deadline, "events never reached the shopper's list"
        time.sleep(0.2)
    got = served.get("/v1/users/http-u1/suggestions", placement="cart").json()
    assert got["items"] and "pho-000" not in {e["item_id"] for e in got["items"]}

    # The rejected ones are in the dead-letter topic with their reasons.
    consumer = KafkaConsumer(served.settings.dlq_topic,
                             bootstrap_servers=served.settings.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    reasons = {}
    for msg in consumer:
        h = dict(msg.headers)
        if h["cartwise-source"].startswith(f"api/{body['request_id']}/".encode()):
            reasons[orjson.loads(msg.value)["event_id"]] = h["cartwise-reason"].decode()
    consumer.close()
    assert reasons == {"h3": "missing_field", "h4": "unknown_type"}


def test_single_event_and_all_rejected(served):
    ok = served.post("/v1/events", {"type": "view", "user_id": "u-one", "item_id": "toy-001"})
    assert ok.status_code == 202 and ok.json()["results"][0]["id"]  # event_id filled in
    bad = served.post("/v1/events", [{"type": "view", "user_id": "u-one", "item_id": "t",
                                      "ts": 1e13}])
    assert bad.status_code == 422 and bad.json()["error"]["reason"] == "all_rejected"
    assert bad.json()["results"][0] == {"index": 0, "status": "rejected",
                                        "reason": "bad_timestamp", "field": "events[0].ts",
                                        "detail": "'ts' must be epoch seconds (not ms)"}


@pytest.mark.parametrize(("body", "status", "reason"), [
    (b"{nope", 400, "bad_json"),
    (b"42", 422, "not_an_object"),
    (b"[]", 422, "empty_batch"),
    (b'{"events": 3}', 422, "wrong_type"),
])
def test_malformed_bodies_are_4xx_with_a_reason(served, body, status, reason):
    resp = httpx.post(served.base + "/v1/events", content=body,
                      headers={"X-API-Key": served.ingest}, timeout=10)
    assert resp.status_code == status
    assert resp.json()["error"]["reason"] == reason


# -- security and errors ----------------------------------------------------------------------

def test_keys_and_roles(served):
    path = "/v1/items/pho-000/suggestions"
    missing = served.get(path, key=None)
    assert missing.status_code == 401
    assert missing.json()["error"] == {"status": 401, "reason": "missing_api_key",
                                       "field": "header.X-API-Key",
                                       "detail": "send an API key in the X-API-Key header"}
    assert served.get(path, key="cw_read_guess").json()["error"]["reason"] == "unknown_api_key"
    # A read key cannot ingest; ingest cannot write the catalog; admin can do both.
    event = {"type": "view", "user_id": "u-k", "item_id": "pho-001"}
    assert served.post("/v1/events", event, key="read").status_code == 403
    assert served.post("/v1/catalog", {"item_id": "z"}, key="ingest").status_code == 403
    assert served.post("/v1/events", event, key="admin").status_code == 202
    assert served.get(path, key="ingest").status_code == 200


@pytest.mark.parametrize(("params", "field"), [
    ({"k": 0}, "query.k"), ({"k": 51}, "query.k"), ({"k": "many"}, "query.k"),
    ({"kind": "everything"}, "query.kind"),
])
def test_bad_parameters_name_the_field(served, params, field):
    resp = served.get("/v1/items/pho-000/suggestions", **params)
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert (err["reason"], err["field"]) == ("invalid_parameter", field)


def test_size_limits(served):
    big = {"events": [{"type": "view", "user_id": "u", "item_id": "i"}] * 600}
    resp = served.post("/v1/events", big)
    assert resp.status_code == 413 and resp.json()["error"]["reason"] == "batch_too_large"
    huge = b'{"events": [' + b'{"type": "view"},' * 80_000 + b'{}]}'
    resp = httpx.post(served.base + "/v1/events", content=huge,
                      headers={"X-API-Key": served.ingest}, timeout=10)
    assert resp.status_code == 413 and resp.json()["error"]["reason"] == "body_too_large"


def test_cors_allows_only_configured_origins(served):
    def preflight(origin: str) -> httpx.Response:
        return httpx.options(served.base + "/v1/items/pho-000/suggestions", headers={
            "Origin": origin, "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "x-api-key"}, timeout=10)

    ok = preflight("https://shop.example")
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "https://shop.example"
    assert "access-control-allow-origin" not in preflight("https://evil.example").headers


def test_corrupt_document_is_a_500_without_a_stack_trace(served):
    served.r.set(f"{served.settings.prefix}item:broken", b"{not json")
    resp = served.get("/v1/items/broken/suggestions")
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["reason"] == "internal_error" and "Traceback" not in resp.text
    assert resp.json()["request_id"] in err["detail"]


def test_operations_routes(served):
    assert httpx.get(served.base + "/health").json() == {"status": "ok"}
    ready = httpx.get(served.base + "/ready").json()
    assert (ready["ready"], ready["checks"]) == (True, {"redis": "ok", "broker": "ok"})
    assert ready["stream"]["status"] in ("ok", "unknown")  # the first check may still run
    spec = httpx.get(served.base + "/openapi.json").json()
    assert "/v1/users/{user_id}/suggestions" in spec["paths"]
    metrics = httpx.get(served.base + "/metrics").text
    assert 'cartwise_api_requests_total{method="GET",route="/v1/items/{item_id}/suggestions"' \
        in metrics
    assert "cartwise_api_request_seconds_bucket" in metrics


# -- in-process: limits and dependency failures -------------------------------------------------

@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


def test_rate_limit_answers_429_with_retry_after(make_settings):
    key, entry = new_key("read")
    settings = make_settings("ratelimit", api_keys=entry, rate_read=1.0)

    async def run() -> list[httpx.Response]:
        async with in_process(settings) as c:
            return [await c.get("/v1/trending", headers={"X-API-Key": key}) for _ in range(4)]

    statuses = [r.status_code for r in asyncio.run(run())]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:]
    limited = next(r for r in asyncio.run(run()) if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["reason"] == "rate_limited"


def test_redis_down_is_503_and_not_ready(make_settings):
    key, entry = new_key("read")
    settings = make_settings("noredis", api_keys=entry,
                             redis_url=f"redis://127.0.0.1:{free_port()}/0")

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with in_process(settings) as c:
            return (await c.get("/v1/users/u/suggestions", headers={"X-API-Key": key}),
                    await c.get("/ready"))

    lookup, ready = asyncio.run(run())
    assert lookup.status_code == 503
    assert lookup.json()["error"]["reason"] == "store_unavailable"
    assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")


def test_api_refuses_to_start_without_keys(make_settings):
    with pytest.raises(ValueError, match="no API keys configured"):
        create_app(make_settings("nokeys"))


def test_fast_path_answers_like_the_full_app(served):
    """Valid lookups skip FastAPI's routing; an extra parameter sends the same lookup through
    it (FastAPI ignores unknown parameters). Both must answer alike."""
    item = hero_with_lists(served)
    for path in (f"/v1/items/{item}/suggestions", "/v1/users/u-00001/suggestions"):
        # The worker may rewrite the stored list between the two lookups (a refresh pass):
        # compare two answers built from the same stored list (`generated_at`).
        for _ in range(20):
            fast = served.get(path, k=7).json()
            full = served.get(path, k=7, utm_source="x").json()
            for body in (fast, full):
                body.pop("served_at"), body.pop("request_id")
            if fast.get("generated_at") == full.get("generated_at"):
                break
            time.sleep(0.25)
        assert fast == full


def test_fast_path_cors_and_request_ids(served):
    path = served.base + "/v1/items/pho-000/suggestions"
    ok = httpx.get(path, headers={"X-API-Key": served.read, "Origin": "https://shop.example",
                                  "X-Request-ID": "trace-42"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["request_id"] == "trace-42"
    assert ok.headers["access-control-allow-origin"] == "https://shop.example"
    assert ok.headers["x-request-id"] == "trace-42"
    other = httpx.get(path, headers={"X-API-Key": served.read, "Origin": "https://evil.example"},
                      timeout=10)
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_catalog_changes_apply_to_answers_within_seconds(served):
    item = hero_with_lists(served)
    first = served.get(f"/v1/items/{item}/suggestions", k=3).json()["items"][0]["item_id"]
    facts = next(c for c in served.shop.catalog if c["item_id"] == first)
    assert served.post("/v1/catalog", facts | {"in_stock": False}, key="admin").status_code == 202
    try:
        deadline = time.monotonic() + 20
        while first in {e["item_id"] for e in
                        served.get(f"/v1/items/{item}/suggestions", k=3).json()["items"]}:
            assert time.monotonic() < deadline, "out-of-stock item still suggested"
            time.sleep(0.2)
    finally:
        served.post("/v1/catalog", facts, key="admin")


# -- pages, docs, metrics port, settings --------------------------------------------------------

def test_index_links_the_pages_and_docs_work_offline(served):
    index = httpx.get(served.base + "/", timeout=10)
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    for link in ('href="/demo/"', 'href="/docs"', 'href="/experiments/"', 'href="/inspect/"'):
        assert link in index.text
    docs = httpx.get(served.base + "/docs", timeout=10).text
    # Every asset of the page comes from this server: nothing from a CDN.
    assets = [a for a in docs.split('"') if a.endswith((".js", ".css"))]
    assert assets and all(a.startswith("/docs-assets/") for a in assets), assets
    for asset in assets:
        got = httpx.get(served.base + asset, timeout=10)
        assert got.status_code == 200 and len(got.content) > 10_000, asset
    for page in ("/inspect/", "/widget/cartwise.js"):
        assert httpx.get(served.base + page, timeout=10).status_code == 200, page


def test_openapi_states_the_role_each_route_needs(served):
    spec = httpx.get(served.base + "/openapi.json", timeout=10).json()
    assert set(spec["components"]["securitySchemes"]) == {"ReadKey", "IngestKey", "AdminKey"}

    def role(path: str, method: str) -> list:
        return spec["paths"][path][method]["security"]

    assert role("/v1/items/{item_id}/suggestions", "get") == [{"ReadKey": []}]
    assert role("/v1/events", "post") == [{"IngestKey": []}]
    for path, method in (("/v1/catalog", "post"), ("/v1/rules", "put"),
                         ("/v1/users/{user_id}/profile", "get"), ("/v1/reranker", "get")):
        assert role(path, method) == [{"AdminKey": []}], path
    assert "security" not in spec["paths"]["/health"]["get"]


def test_metrics_move_to_their_own_port_when_one_is_set(make_settings):
    key, entry = new_key("read")
    settings = make_settings("metricsport", api_keys=entry, metrics_port=free_port())

    async def run() -> tuple[int, str]:
        async with in_process(settings) as c:
            public = (await c.get("/metrics")).status_code
            async with httpx.AsyncClient() as direct:
                own = await direct.get(f"http://127.0.0.1:{settings.metrics_port}/metrics")
            return public, own.text

    public, text = asyncio.run(run())
    assert public == 404
    assert "cartwise_api_requests_total" in text


def test_placeholder_passwords_are_refused():
    with pytest.raises(ValueError, match="placeholder password 'change-me'"):
        Settings(redis_url="redis://:change-me@redis:6379/0")
    Settings(redis_url="redis://:s3cret@redis:6379/0")  # a real one is fine


def test_inspect_routes_show_the_stored_documents(served):
    item = hero_with_lists(served)
    stored = served.doc("item", item)
    lists = served.get(f"/v1/items/{item}/lists", key="admin").json()
    assert lists["known"] and lists["cross_sell"] == stored["cross_sell"]
    assert {"support", "confidence", "lift", "llr"} <= set(lists["cross_sell"][0])
    assert lists["generated_at"] == stored["generated_at"]
    unknown = served.get("/v1/items/never-seen/lists", key="admin").json()
    assert (unknown["known"], unknown["cross_sell"], unknown["generated_at"]) == (
        False, [], None)
    assert served.get(f"/v1/items/{item}/lists").status_code == 403  # read key: not admin

    user = next(k.decode().rsplit(":", 1)[1]
                for k in served.r.scan_iter(f"{served.settings.prefix}user:*"))
    ctx = served.get(f"/v1/users/{user}/context", key="admin").json()
    assert ctx["known"] and ctx["context"] == served.doc("user", user)["context"]

    name = next(c["name"] for c in served.shop.catalog if c["item_id"] == "pho-000")
    found = served.get("/v1/catalog/search", key="admin", q=name.upper()).json()
    assert found["items"][0]["item_id"] == "pho-000" and found["complete"]
    by_prefix = served.get("/v1/catalog/search", key="admin", q="pho-", k=5).json()
    assert len(by_prefix["items"]) == 5 and by_prefix["matches"] > 5
    assert all(i["item_id"].startswith("pho-") for i in by_prefix["items"])
