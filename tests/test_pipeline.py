"""End to end on the real broker and Redis: events in, suggestions out, bad input dead-lettered."""

from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaConsumer

from cartwise.harness import produce, snapshot, wait_complete
from cartwise.redisconn import connect
from cartwise.simulator import Shop
from models import CrossSellRecommender
from models.config import ModelConfig
from streams.topics import ensure_topics

START = 1_750_000_000.0
pytestmark = pytest.mark.both_brokers  # the stream suites run on Tansu and Kafka


def oracle(events: list, catalog: list, config: ModelConfig | None = None,
           partitions: int = 4) -> CrossSellRecommender:
    """The single-process library fed the same events: what the stream must agree with."""
    rec = CrossSellRecommender(config, partitions=partitions)
    for item in catalog:
        rec.learn_catalog(item)
    for e in events:
        if isinstance(e, dict):
            rec.learn_one(e)
    rec.settle()
    return rec


@pytest.fixture(scope="module")
def traffic() -> tuple[list, list]:
    shop = Shop(seed=3)
    events = list(shop.events(250, start_ts=START, bad_rate=0.01, dup_rate=0.02))
    return events, shop.catalog


def test_events_become_suggestions_that_match_the_library(make_settings, workers, traffic):
    events, catalog = traffic
    # Budgets of 4 ms a tick for item lists and 10 ms for refreshes: both are built in slices
    # over many ticks, and must still end up equal to the library's. Trending sets of 12 (of
    # about 200 items), so that cutting them to size is exercised too: they must end up exact.
    settings = make_settings("e2e", lists_budget=0.02, refresh_budget=0.02, trending_size=12)
    ensure_topics(settings)
    ends = produce(settings, events, catalog)
    w = workers(settings)
    wait_complete(settings, ends, procs=[w])
    snap = snapshot(settings)
    ref = oracle(events, catalog)

    # Item lists: the stream's equal the library's, list for list.
    assert snap["items"], "no item lists were written"
    for item in ref.graph.rows:
        expected = ref.graph.lists(item)
        got = snap["items"].get(f"item:{item}")
        assert got is not None, item
        assert got["cross_sell"] == expected["cross_sell"], item
        assert got["alternatives"] == expected["alternatives"], item
    assert any(d["cross_sell"] for d in snap["items"].values())
    assert any(d["alternatives"] for d in snap["items"].values())

    # Shopper lists: same ranking as the library's recommend().
    users = {e["user_id"] for e in events if isinstance(e, dict)}
    assert {k.removeprefix("user:") for k in snap["users"]} == users
    non_empty = 0
    for user in users:
        got = snap["users"][f"user:{user}"]["items"]
        assert got == ref.recommend(user, k=20), user
        non_empty += bool(got)
    assert non_empty > len(users) // 2

    # Trending (the cold-start answer): the same scores as the library's, shop-wide and per
    # category, trimmed to the configured size (which cuts them: more items than that have
    # scores).
    r = connect(settings)
    for category in (None, "phones", "coffee"):
        key = f"{settings.prefix}trending" + (f":{category}" if category else "")
        got = {m.decode(): v for m, v in r.zrange(key, 0, -1, withscores=True)}
        expected = dict(ref.trending(k=settings.trending_size, category=category))
        assert got.keys() == expected.keys(), category
        assert all(abs(got[i] - expected[i]) < 1e-9 for i in got), category
        assert len(got) > 10
    assert len(ref.trending(k=10_000)) > 2 * settings.trending_size

    # Counters: every valid event applied once, duplicates counted, bad ones dead-lettered.
    # Workers publish their counters once a second: wait for a snapshot taken after the last
    # checkpoint (one that counts at least as many records as were sent), then compare exactly.
    deadline = time.monotonic() + 30
    while True:
        counters: dict[str, int] = {}
        for k in r.scan_iter(f"{settings.prefix}stats:*"):
            for name, v in orjson.loads(r.get(k))["counters"].items():
                counters[name] = counters.get(name, 0) + v
        seen = sum(v for name, v in counters.items()
                   if name.startswith(("applied.", "dlq.")) or name == "duplicate")
        if seen >= len(events) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    valid = [e for e in events if isinstance(e, dict)]
    unique = {e["event_id"] for e in valid}
    applied = sum(v for k, v in counters.items() if k.startswith("applied."))
    assert applied == len(unique)
    assert counters.get("duplicate", 0) == len(valid) - len(unique) > 0
    bad = [e for e in events if isinstance(e, bytes)]
    assert sum(v for k, v in counters.items() if k.startswith("dlq.")) == len(bad) > 0
    assert counters.get("cooccurrence.lists_deferred", 0) > 0  # the budgets did cut ticks short
    assert counters.get("context.refresh_deferred", 0) > 0


@pytest.mark.one_broker("kafka")
def test_dead_letters_keep_the_payload_and_a_machine_readable_reason(make_settings, workers):
    settings = make_settings("dlq")
    ensure_topics(settings)
    bad = {
        b"{oops": "bad_json",
        b"[]": "not_an_object",
        b'{"event_id":"1","type":"teleport","user_id":"u","item_id":"i","ts":1.7e9}':
            "unknown_type",
        b'{"event_id":"2","type":"view","item_id":"i","ts":1.7e9}': "missing_field",
        b'{"event_id":"3","type":"view","user_id":"u","item_id":"i","ts":1.7e9,"price":-1}':
            "negative_price",
        b'{"event_id":"4","type":"view","user_id":"u","item_id":7.5,"ts":1.7e9}': "wrong_type",
        b'{"event_id":"5","type":"view","user_id":"u","item_id":"i","ts":1.7e12}':
            "bad_timestamp",
        b'{"pad":"' + b"x" * 70_000 + b'"}': "oversized",
        # 2090: within the contract's range, but decades ahead of the broker's clock.
        b'{"event_id":"6","type":"view","user_id":"u","item_id":"i","ts":3.8e9}':
            "future_timestamp",
    }
    good = {"event_id": "ok-1", "type": "view", "user_id": "u", "item_id": "i", "ts": START}
    ends = produce(settings, [*bad, good])
    w = workers(settings)
    wait_complete(settings, ends, procs=[w])
    consumer = KafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    got = {}
    for m in consumer:
        headers = dict(m.headers)
        value = m.value
        if headers.get("cartwise-truncated") == b"1":
            # Cut to what the dead-letter topic takes, with the original size and source.
            whole = next(b for b in bad if b.startswith(value))
            assert len(value) < len(whole) == int(headers["cartwise-original-bytes"])
            value = whole
        got[value] = headers["cartwise-reason"].decode()
        assert headers["cartwise-source"].startswith(settings.events_topic.encode())
    consumer.close()
    assert got == bad
    ctx = snapshot(settings)["contexts"]
    assert list(ctx) == ["u"] and [i[0] for i in ctx["u"]["i"]] == ["i"]



@pytest.mark.one_broker("kafka")
def test_lists_whose_counts_only_aged_are_rewritten_for_shoppers_ranked_on_them(
        make_settings, workers):
    """Item lists carry a decayed count (`picks`) that the ranking of the item a shopper is on
    reads (models/ranking.py, `repeat_share`). An item only ever re-clicked alone has empty
    lists and a count; a month later the idle stream recomputes its lists at the new time, and
    the aged count must reach Redis too, or its shopper is ranked on the old one."""
    month = 30 * 86400.0
    solo = [{"event_id": f"solo-{n}", "type": "view", "user_id": "solo-shopper",
             "item_id": "solo-item", "ts": START + n, "session_id": "solo-s"} for n in range(3)]
    shop = Shop(seed=5)
    events = solo + list(shop.events(150, start_ts=START + month))
    settings = make_settings("aged")
    ensure_topics(settings)
    w = workers(settings)
    # The solo item's lists are written at its own time first, then the shop moves on.
    wait_complete(settings, produce(settings, solo, shop.catalog), procs=[w])
    wait_complete(settings, produce(settings, events[len(solo):]), procs=[w])
    snap = snapshot(settings)
    ref = oracle(events, shop.catalog)
    want = ref.graph.lists("solo-item")
    assert want["repeat"] == 1.0 and 0 < want["picks"] < 2.0  # two re-clicks, a month old
    assert not any(want[kind] for kind in ("cross_sell", "alternatives", "next"))
    got = snap["items"]["item:solo-item"]
    assert (got["repeat"], got["picks"]) == (want["repeat"], want["picks"])
    ranked = snap["users"]["user:solo-shopper"]["items"]
    assert ranked == ref.recommend("solo-shopper", k=20) and ranked[0]["item_id"] == "solo-item"
