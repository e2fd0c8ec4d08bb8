"""An A/B test end to end: API, collector, broker, worker, Redis, report.

Simulated price-sensitive shoppers (cartwise.simulator.Responder) look at item pages, and
their impressions, clicks, carts and orders go through POST /v1/events. The worker learns the
re-ranker from that feedback; an experiment then pits the plain order against it, and the
report must call the re-ranker the winner. Restarting the worker in between must not make it
forget what it learned.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from api.auth import new_key
from cartwise.embedded import free_port
from cartwise.harness import (
    produce,
    start_api,
    start_worker,
    stop_worker,
    wait_complete,
    wait_http,
)
from cartwise.redisconn import Client, connect
from cartwise.settings import Settings
from cartwise.simulator import Responder, Shop
from models.experiments import Experiment
from streams.store import Keys
from streams.topics import ensure_topics

AB = {"variants": [{"name": "plain", "settings": {"ranking": "plain"}},
                   {"name": "reranked", "settings": {"ranking": "auto"}}],
      "min_shoppers": 100, "description": "learned order against the model's order"}


@dataclass
class Stack:
    settings: Settings
    base: str
    keys: dict[str, str]
    shop: Shop
    r: Client
    logs: Path
    worker: Any
    # One keep-alive connection for the test's ~3,000 requests: a new one each costs more than
    # the request, and a storefront keeps its connections open too.
    http: httpx.Client

    def call(self, method: str, path: str, role: str = "read", body: Any = None,
             **params: Any) -> httpx.Response:
        headers = {"X-API-Key": self.keys[role], "Content-Type": "application/json"}
        return self.http.request(method, self.base + path, params=params, headers=headers,
                                 content=None if body is None else orjson.dumps(body))


@pytest.fixture(scope="module")
def ab_stack(make_settings: Callable[..., Settings],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    keys = {role: new_key(role) for role in ("read", "ingest", "admin")}
    settings = make_settings(
        "ab", api_port=free_port(), api_keys=",".join(e for _, e in keys.values()),
        rate_admin=10_000.0, reranker_min_examples=500, feedback_label_s=2.0, partitions=1)
    ensure_topics(settings)
    shop = Shop(seed=9)
    ends = produce(settings, list(shop.events(300, start_ts=time.time() - 86_400)),
                   shop.catalog)
    logs = tmp_path_factory.mktemp("ab-logs")
    worker = start_worker(settings, logs / "worker.log", "ab")
    api = start_api(settings, logs / "api.log")
    st = Stack(settings, f"http://127.0.0.1:{settings.api_port}",
               {k: v[0] for k, v in keys.items()}, shop,
               connect(settings), logs, worker, httpx.Client(timeout=10))
    try:
        wait_complete(settings, ends, procs=[worker])
        wait_http(st.base + "/ready", api)
        yield st
    finally:
        st.http.close()
        stop_worker(api)
        stop_worker(st.worker, hard=True)
        for log in sorted(logs.glob("*.log")):
            tail = log.read_bytes().decode(errors="replace").splitlines()[-30:]
            print(f"--- {log.name} ---", *tail, sep="\n")


def heroes(st: Stack) -> list[str]:
    """Item pages where the order matters to these shoppers: the model's list offers both
    items cheaper than the page's item and dearer ones, and its first five hold dearer ones.
    Where every suggestion is cheaper (or none is), any order converts alike."""
    out = []
    prices = st.shop.prices
    for item in st.shop.complements:
        raw = st.r.get(f"{st.settings.prefix}item:{item}")
        listed = [e["item_id"] for e in orjson.loads(raw)["cross_sell"]] if raw else []
        cheaper = [i for i in listed[:15] if prices[i] < prices[item]]
        if len(listed) >= 8 and len(cheaper) >= 3 and \
                sum(prices[i] >= prices[item] for i in listed[:5]) >= 2:
            out.append(item)
    assert len(out) >= 5, f"too few item pages with a mixed list: {out}"
    return out


def visit(st: Stack, responder: Responder, user: str, hero: str, n: int,
          tally: dict[str, Any]) -> dict[str, Any]:
    """One shopper on one item page: fetch, show five, react, report what happened."""
    resp = st.call("GET", f"/v1/items/{hero}/suggestions", user_id=user, k=5)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    shown = body["items"]
    rid = body["request_id"]
    now = time.time()
    exp = body["experiment"]
    tag = {"experiment_id": exp["id"], "variant": exp["variant"]} if exp else {}
    events = [{"event_id": f"{user}-i", "type": "impression", "user_id": user, "ts": now,
               "request_id": rid, "placement": "product",
               "items": [{"item_id": e["item_id"]} for e in shown], **tag}]
    clicked, carted = responder.respond([(e["item_id"], e["price"]) for e in shown],
                                        st.shop.prices[hero])
    if clicked:
        events.append({"event_id": f"{user}-c", "type": "click", "user_id": user,
                       "ts": now + 0.01, "item_id": clicked, "request_id": rid, **tag})
        tally["clicks"] += 1
    if carted:
        events.append({"event_id": f"{user}-a", "type": "add_to_cart", "user_id": user,
                       "ts": now + 0.02, "item_id": clicked})
        if n % 2 == 0:
            price = st.shop.prices[clicked]
            events.append({"event_id": f"{user}-p", "type": "purchase", "user_id": user,
                           "ts": now + 0.03, "order_id": f"o-{user}",
                           "items": [{"item_id": clicked, "price": price}]})
            if exp:
                tally["revenue"][exp["variant"]] += price
    resp = st.call("POST", "/v1/events", "ingest", {"events": events})
    assert resp.status_code == 202, resp.text
    return body


def wait_for(check: Callable[[], tuple[bool, Any]], what: str, timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        ok, got = check()
        if ok:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {got}")
        time.sleep(0.5)


def reranker(st: Stack) -> dict[str, Any]:
    return st.call("GET", "/v1/reranker", "admin").json()


def test_ab_test_through_the_stream_picks_the_reranker(ab_stack: Stack, tmp_path: Path):
    st = ab_stack
    items = heroes(st)
    responder = Responder(seed=4, base=0.3, decay=1.0, dear_appeal=0.0)
    tally: dict[str, Any] = {"clicks": 0, "revenue": {"plain": 0.0, "reranked": 0.0}}

    # Warm-up, no experiment: the default ("auto") serves the plain order until the
    # re-ranker beats it on held-out feedback, then the re-ranker's.
    rankings = []
    for n in range(800):
        body = visit(st, responder, f"w{n}", items[n % len(items)], n, tally)
        assert body["experiment"] is None
        rankings.append(body["ranking"])
    assert rankings[0] == "plain" and set(rankings) <= {"plain", "reranker"}
    status = wait_for(lambda: ((s := reranker(st))["active"], s),
                      "the re-ranker to win on held-out feedback")
    assert status["auc"] > status["auc_plain"]
    assert status["weights"]["cheaper"] > 0  # it learned the shoppers' known preference
    learned = status["examples"]

    # A restart must not forget it: the new worker carries on from the checkpointed model.
    stop_worker(st.worker, hard=True)
    st.worker = start_worker(st.settings, st.logs / "worker2.log", "ab2")

    resp = st.call("PUT", "/v1/experiments/ab", "admin", AB)
    assert resp.status_code == 200, resp.text
    exp = Experiment.parse("ab", AB)
    time.sleep(1.0)  # every API process picks definitions up within CACHE_REFRESH_S
    tally["clicks"] = 0
    seen = {"plain": 0, "reranked": 0}
    for n in range(700):
        user = f"s{n}"
        body = visit(st, responder, user, items[n % len(items)], n, tally)
        variant = exp.assign(user).name
        assert body["experiment"] == {"id": "ab", "variant": variant}  # deterministic split
        assert body["ranking"] == ("reranker" if variant == "reranked" else "plain")
        seen[variant] += 1

    def done() -> tuple[bool, dict]:
        rep = st.call("GET", "/v1/experiments/ab/report", "admin").json()
        rows = {r["variant"]: r for r in rep["variants"]}
        return all(rows[v]["impressions"] == seen[v] for v in seen), rep

    rep = wait_for(done, "every impression to be counted")
    rows = {r["variant"]: r for r in rep["variants"]}
    for v in seen:
        assert rows[v]["shoppers"] == seen[v]
        assert rows[v]["revenue"] == pytest.approx(tally["revenue"][v])
    rates = {v: (rows[v]["shoppers"], rows[v]["conversion_rate"]["value"]) for v in rows}
    print("shoppers and conversion rate per variant:", rates,
          "p =", rows["reranked"]["vs_control"]["conversion_rate"]["p_value"])
    assert rates["reranked"][1] > rates["plain"][1], rates
    assert rep["winner"] == "reranked", (rep["verdict"], rates, reranker(st))

    after = wait_for(lambda: ((s := reranker(st))["examples"] >= learned + tally["clicks"], s),
                     "phase-two clicks to be learned")
    assert after["examples"] >= learned + tally["clicks"]


def test_experiment_routes_refuse_bad_requests(ab_stack: Stack):
    st = ab_stack
    bad = st.call("PUT", "/v1/experiments/x", "admin", {"variants": [{"name": "only"}]})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "body.variants"
    assert st.call("PUT", "/v1/experiments/x", "read", AB).status_code == 403
    assert st.call("GET", "/v1/experiments/nope/report", "admin").status_code == 404
    assert st.call("PUT", "/v1/experiments/bad%20id", "admin", AB).status_code == 422
    # feedback that breaks the contract is refused at the door with the field named
    resp = st.call("POST", "/v1/events", "ingest", {"events": [
        {"event_id": "z1", "type": "impression", "user_id": "u", "ts": time.time(),
         "items": [{"item_id": "a"}]}]})
    assert resp.status_code in (207, 422), resp.text
    assert "request_id" in resp.text


def test_report_page_draws_each_variant_with_its_interval(ab_stack: Stack):
    from playwright.sync_api import sync_playwright

    from tests.test_storefront import CHROMIUM, FLAGS

    st = ab_stack
    assert st.call("PUT", "/v1/experiments/page", "admin", AB).status_code == 200
    # The counters the workers would have written (the stream's part is tested above).
    st.r.hset(Keys(st.settings.prefix).experiment("page", 0), mapping={  # its one partition
        "plain|shoppers": 150, "plain|converters": 15, "plain|impressions": 300,
        "reranked|shoppers": 150, "reranked|converters": 45, "reranked|impressions": 300})
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(st.base + "/experiments/")
            page.fill("#key", st.keys["admin"])
            page.click("#load")
            page.select_option("#experiment", "page")
            # Load shows the first experiment ("ab") until the chosen one's report arrives.
            page.wait_for_function(
                "document.querySelectorAll('#chart[data-experiment=\"page\"] rect').length === 2")
            verdict = page.text_content("#verdict")
            assert "reranked beats plain on conversion_rate" in verdict
            labels = page.eval_on_selector_all("#chart text", "ts => ts.map(t => t.textContent)")
            assert "10.0%" in labels and "30.0%" in labels
            assert page.eval_on_selector_all("#chart line", "ls => ls.length") == 2
        finally:
            browser.close()


def test_a_report_sums_the_counters_of_every_events_partition(stack):
    """The workers of each events partition add to that partition's hash: the report reads
    their sum, field by field, whichever partitions a variant's shoppers are in."""
    import asyncio
    from types import SimpleNamespace

    import redis.asyncio as aioredis

    from api.routers.rules import experiment_totals

    settings = Settings(redis_url=stack.redis_url, prefix=f"exp-sum-{time.monotonic_ns()}:",
                        partitions=3)
    keys = Keys(settings.prefix)
    parts = keys.experiment_parts("ab", settings.partitions)

    async def run() -> dict[str, str]:
        r = aioredis.Redis.from_url(stack.redis_url)
        await r.hset(parts[0], mapping={"A|shoppers": 2, "A|revenue": 1.5})
        await r.hset(parts[2], mapping={"A|shoppers": 3, "B|shoppers": 4, "A|revenue": 0.25})
        await r.hset(keys.experiment("other", 1), "A|shoppers", 100)  # not this experiment
        try:
            return await experiment_totals(SimpleNamespace(redis=r, keys=keys,
                                                           settings=settings), "ab")
        finally:
            await r.aclose()

    totals = asyncio.run(run())
    assert {k: float(v) for k, v in totals.items()} == {
        "A|shoppers": 5.0, "B|shoppers": 4.0, "A|revenue": 1.75}
