"""Repurchase cycles: the estimates and schedules on hand-checked cases, then reminders and
touchpoints through the real worker, broker, Redis and API."""

from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaConsumer

from cartwise.contract import prepare_event
from models.config import ModelConfig
from models.context import ContextBook
from models.graph import ItemGraph
from models.ranking import REBUY_REASON, not_due, rank_for_user, rebuyable
from models.repurchase import DAY, Estimate, blend, observe, predict, touchpoints
from streams.store import Keys
from tests.conftest import Served

NOW = 1_700_000_000.0
LEAD = 7 * DAY


def test_predict_takes_the_shoppers_own_rhythm_first_then_the_items():
    assert predict([], None) is None
    assert predict([], 30 * DAY) == Estimate(30 * DAY, "item")
    assert predict([10 * DAY], None) == Estimate(10 * DAY, "shopper")
    assert predict([10 * DAY], 40 * DAY) == Estimate(10 * DAY, "shopper")
    # A median: the one long gap does not move it.
    assert predict([10 * DAY, 12 * DAY, 300 * DAY], 40 * DAY) == Estimate(12 * DAY, "shopper")
    mixed = blend([10 * DAY, 10 * DAY, 300 * DAY], 40 * DAY)
    assert mixed.source == "shopper+item" and mixed.cycle_s == pytest.approx(20 * DAY)
    assert blend([10 * DAY], 40 * DAY) == Estimate(40 * DAY, "item")


def test_observe_ignores_same_day_repeats_and_keeps_the_newest():
    history: list[float] = []
    assert not observe(history, 3600.0, 3)
    for d in (5, 6, 7, 8):
        assert observe(history, d * DAY, 3)
    assert history == [6 * DAY, 7 * DAY, 8 * DAY]


def test_touchpoints_follow_a_first_purchase_and_only_the_reminder_a_repeat():
    est = Estimate(30 * DAY, "item")
    first = touchpoints(NOW, False, est, LEAD)
    assert [(t.kind, (t.at - NOW) / DAY) for t in first] == [
        ("day_1", 1), ("day_3", 3), ("day_7", 7), ("replenish", 23)]
    assert [t.kind for t in touchpoints(NOW, True, est, LEAD)] == ["replenish"]
    # A 10-day cycle is due on day 3: lifecycle messages from then on give way to it.
    short = touchpoints(NOW, False, Estimate(10 * DAY, "item"), LEAD)
    assert [(t.kind, (t.at - NOW) / DAY) for t in short] == [("day_1", 1), ("replenish", 3)]
    assert [t.kind for t in touchpoints(NOW, False, None, LEAD)] == ["day_1", "day_3", "day_7"]
    assert touchpoints(NOW, True, None, LEAD) == []


def buy(book: ContextBook, user: str, item: str, ts: float, n: int) -> None:
    book.learn(prepare_event({"type": "purchase", "user_id": user, "item_id": item, "ts": ts,
                              "event_id": f"{user}-{n}"}, ts)[0])


def test_context_reports_repeats_and_cycle_starts_and_the_graph_learns_the_cycle():
    book = ContextBook()
    buy(book, "u", "ink", NOW, 1)
    assert book.last_purchases == [("ink", NOW, None)] and book.last_repeats == []
    buy(book, "u", "ink", NOW + 3600, 2)  # same need: no new cycle
    assert book.last_purchases == [] and book.get("u").bought["ink"] == NOW
    buy(book, "u", "ink", NOW + 20 * DAY, 3)
    assert book.last_repeats == [("ink", 20 * DAY)]
    assert book.last_purchases == [("ink", NOW + 20 * DAY, NOW)]
    assert book.get("u").repeats == {"ink": [20 * DAY]}
    g = ItemGraph()
    for d in (20, 30):
        g.repeat("ink", d * DAY)
    assert g.repurchase("ink") is None  # two intervals are not a cycle yet
    g.repeat("ink", 400 * DAY)
    g.repeat("ink", 0.5 * DAY)  # ignored: same day
    assert g.repurchase("ink") == {"cycle_days": 30.0, "intervals": 3}
    again = ItemGraph()
    again.load_cycle("ink", g.cycle_json("ink"))
    assert again.repurchase("ink") == g.repurchase("ink")


def test_the_shop_flag_decides_rebuying_and_the_shoppers_decide_when_it_is_unset():
    cycle = {"x": {"repurchase": {"cycle_days": 30.0, "intervals": 3}}}
    assert rebuyable("x", {}, {"consumable": True})
    assert not rebuyable("x", cycle, {"consumable": False})  # the shop knows best
    assert rebuyable("x", cycle, {"consumable": None})
    assert rebuyable("x", cycle, {})  # no catalog record at all
    assert not rebuyable("x", {}, {})  # nobody was seen buying it again
    assert not rebuyable("x", {"x": {"repurchase": None}}, {})


def test_bought_items_come_back_as_revisits_when_shoppers_rebuy_them_and_they_are_due():
    book = ContextBook()
    buy(book, "u", "coffee", NOW, 1)
    buy(book, "u", "coffee", NOW + 20 * DAY, 2)  # bought twice: one own interval of 20 days
    buy(book, "u", "tea", NOW + 20 * DAY, 3)
    buy(book, "u", "kettle", NOW + 20 * DAY, 4)
    buy(book, "u", "mug", NOW + 20 * DAY, 5)
    ctx = book.get("u")
    cycles = {j: {"repurchase": {"cycle_days": 25.0, "intervals": 9}}
              for j in ("coffee", "tea", "mug")}
    catalog = {"mug": {"consumable": False}}
    cfg = ModelConfig(not_due_weight=0)  # held back until due
    # While they are in the context (the last 3 days) they are not offered again.
    assert rank_for_user(ctx, cycles, catalog, 10, cfg) == []

    def cart(n: int, at: float) -> None:  # a later event: the purchases leave the context
        book.learn(prepare_event({"type": "add_to_cart", "user_id": "u", "item_id": f"cup{n}",
                                  "ts": at, "event_id": f"u-cart-{n}"}, at)[0])

    # 15 days after: coffee is due (own rhythm 20 days, minus the 7-day lead), tea is not
    # (the shoppers' 25 days); the kettle (nobody rebuys it) and the mug (the shop says it
    # is durable) never come back.
    cart(1, NOW + 35 * DAY)
    assert [e["item_id"] for e in rank_for_user(ctx, cycles, catalog, 10, cfg)] == ["coffee"]
    # With a `not_due_weight` the tea stays, at that share of its score: 0.3 x 0.5 ** (15 / 30).
    soft = rank_for_user(ctx, cycles, catalog, 10, ModelConfig(not_due_weight=0.5))
    assert [e["item_id"] for e in soft] == ["coffee", "tea"]
    assert soft[1]["score"] == pytest.approx(0.5 * 0.3 * 0.5 ** (15 / 30))
    assert soft[0]["score"] == pytest.approx(0.3 * 2 * 0.5 ** (15 / 30))  # due: not damped
    cart(2, NOW + 40 * DAY)
    got = rank_for_user(ctx, cycles, catalog, 10, cfg)
    assert [e["item_id"] for e in got] == ["coffee", "tea"]
    assert {e["kind"] for e in got} == {"revisit"}
    assert {e["reason"] for e in got} == {REBUY_REASON}
    # Bought twice, bought once, both 20 days ago: 0.3 x times x 0.5 ** (20 / 30).
    assert got[0]["score"] == pytest.approx(0.3 * 2 * 0.5 ** (20 / 30))
    assert got[1]["score"] == pytest.approx(0.3 * 1 * 0.5 ** (20 / 30))
    # Off, or limited to the newest bought items.
    assert rank_for_user(ctx, cycles, catalog, 10, ModelConfig(rebuy_weight=0)) == []
    newest = rank_for_user(ctx, cycles, catalog, 10, ModelConfig(rebuy_max=3))
    assert [e["item_id"] for e in newest] == ["tea"]  # coffee is the oldest of the four


def test_bought_consumables_come_back_only_when_due():
    book = ContextBook()
    buy(book, "u", "ink", NOW, 1)
    buy(book, "u", "mug", NOW, 2)
    ctx = book.get("u")
    catalog = {"ink": {"consumable": True}, "mug": {"consumable": False}}
    lists = {"ink": {"repurchase": {"cycle_days": 30.0, "intervals": 9}}}
    cfg = ModelConfig()
    assert not_due(ctx, lists, catalog, cfg) == {"ink"}
    ctx.last_ts = NOW + 22 * DAY  # 8 days before the run-out: not yet
    assert not_due(ctx, lists, catalog, cfg) == {"ink"}
    ctx.last_ts = NOW + 23 * DAY
    assert not_due(ctx, lists, catalog, cfg) == set()
    # Without a learned cycle nothing can be judged: the shop flagged it consumable.
    assert not_due(ctx, {}, catalog, cfg) == set()


def test_reminders_and_touchpoints_flow_to_redis_the_topic_and_the_api(served: Served):
    s = served
    prefix = s.settings.prefix
    item = {"item_id": "rep-ink", "category": "office", "price": 12.0, "consumable": True,
            "name": "Ink cartridge"}
    assert s.post("/v1/catalog", item, key="admin").status_code == 202
    deadline = time.monotonic() + 30
    while s.r.hget(f"{prefix}catalog", "rep-ink") is None:
        assert time.monotonic() < deadline, "catalog record never reached Redis"
        time.sleep(0.1)
    consumer = KafkaConsumer(s.settings.touchpoints_topic, bootstrap_servers=s.settings.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=500)
    now = time.time()

    def purchase(user: str, ts: float, n: int) -> dict:
        return {"type": "purchase", "user_id": user, "event_id": f"{user}-{n}", "ts": ts,
                "items": [{"item_id": "rep-ink", "quantity": 1, "price": 12.0}]}

    events = [
        # Every 20 days: the reminder falls due half a day ago, a week before the run-out.
        purchase("rep-a", now - 33.5 * DAY, 1), purchase("rep-a", now - 13.5 * DAY, 2),
        # First purchase a day ago: the day-1 message is due now, no cycle is known yet.
        purchase("rep-b", now - DAY - 60, 1),
        # Five days ago: days 1 and 3 are too late to send, day 7 is still ahead.
        purchase("rep-c", now - 5 * DAY, 1),
    ]
    assert s.post("/v1/events", events).status_code == 202
    got: dict[tuple[str, str], dict] = {}
    deadline = time.monotonic() + 40
    while not {("rep-a", "replenish"), ("rep-b", "day_1")} <= set(got):
        assert time.monotonic() < deadline, f"touchpoints never arrived: {sorted(got)}"
        for record in consumer:
            msg = orjson.loads(record.value)
            got[(msg["user_id"], msg["kind"])] = msg
            assert record.key == msg["user_id"].encode()
    consumer.close()
    reminder = got[("rep-a", "replenish")]
    assert reminder["item_id"] == "rep-ink" and reminder["bought_at"] == now - 13.5 * DAY
    assert reminder["at"] == pytest.approx(now - 0.5 * DAY, abs=1)
    assert reminder["expected_run_out"] == pytest.approx(now + 6.5 * DAY, abs=1)
    assert not any(u == "rep-c" for u, _ in got) and ("rep-a", "day_1") not in got
    day7 = orjson.dumps(["rep-c", "rep-ink", "day_7", now - 5 * DAY])
    assert any(s.r.zscore(Keys(prefix).touchpoints(p), day7) is not None
               for p in range(s.settings.partitions))
    due = s.get("/v1/replenishment/due", key="admin", within="7d").json()
    rows = {(d["user_id"], d["item_id"]): d for d in due["due"]}
    assert ("rep-a", "rep-ink") in rows and rows[("rep-a", "rep-ink")]["name"] == "Ink cartridge"
    assert ("rep-b", "rep-ink") not in rows  # no cycle known: nothing to be due
    bad = s.get("/v1/replenishment/due", key="admin", within="1y")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "query.within"
    assert s.get("/v1/replenishment/due", key="read").status_code == 403


def test_due_pages_merge_the_partitions_as_one_sorted_set_would(stack):
    """Each events partition has its own due set: a page over them all (ties on the score
    included, ordered by member) is the page one ZRANGEBYSCORE over their union gives."""
    import asyncio
    import random

    import redis.asyncio as aioredis

    from api.routers.shoppers import merged_range

    keys = Keys(f"due-merge-{time.monotonic_ns()}:")
    sets = keys.dues(4)
    union = f"{keys.prefix}union"
    rng = random.Random(3)

    async def run() -> None:
        r = aioredis.Redis.from_url(stack.redis_url)
        for n in range(300):
            member = orjson.dumps([f"u{n}", f"i{n % 7}"])
            score = float(rng.randint(0, 90))  # many ties
            await r.zadd(sets[rng.randrange(4)], {member: score})
            await r.zadd(union, {member: score})
        for low, high in ((0, 90), (20, 40), (91, 99)):
            for start, num in ((0, 1), (0, 101), (7, 10), (150, 101), (290, 20), (999, 5)):
                want = await r.zrangebyscore(union, low, high, start=start, num=num,
                                             withscores=True)
                got = await merged_range(r, sets, low, high, start, num)
                assert got == want, (low, high, start, num)
        await r.aclose()

    asyncio.run(run())


def test_the_worker_offers_again_what_shoppers_rebuy_when_the_catalog_does_not_say(
        served: Served):
    s = served
    prefix = s.settings.prefix
    now = time.time()

    def purchase(user: str, item: str, ts: float) -> dict:
        return {"type": "purchase", "user_id": user, "event_id": f"{user}-{item}-{ts:.0f}",
                "ts": ts, "items": [{"item_id": item, "quantity": 1, "price": 3.0}]}

    # Three shoppers buy the tea again after 20 days; nobody buys a second kettle. Neither
    # has a catalog record, so the shop says nothing about either.
    crowd = [purchase(f"rb-{n}", item, now - days * DAY) for n in range(3)
             for item in ("rb-tea", "rb-kettle") for days in ((60, 40) if item == "rb-tea"
                                                              else (60,))]
    assert s.post("/v1/events", crowd).status_code == 202
    deadline = time.monotonic() + 40
    while not (orjson.loads(s.r.get(f"{prefix}item:rb-tea") or b"{}").get("repurchase")):
        assert time.monotonic() < deadline, "the tea's repurchase cycle was never published"
        time.sleep(0.2)
    # A shopper bought both 30 days ago (the tea is due: 20-day cycle, 7-day lead) and is
    # back today, putting something else in the cart.
    mine = [purchase("rb-me", "rb-tea", now - 30 * DAY),
            purchase("rb-me", "rb-kettle", now - 30 * DAY + 1),
            {"type": "add_to_cart", "user_id": "rb-me", "item_id": "rb-mug", "ts": now,
             "event_id": "rb-me-cart"}]
    assert s.post("/v1/events", mine).status_code == 202
    # The first list may rank against item lists cached up to 0.2 s before the tea's cycle
    # was published; the periodic refresh brings it in. The kettle must never be offered.
    deadline = time.monotonic() + 40
    while True:
        doc = orjson.loads(s.r.get(f"{prefix}user:rb-me") or b"{}")
        listed = {e["item_id"]: e for e in doc.get("items", [])}
        assert "rb-kettle" not in listed
        if "rb-mug" in (doc.get("context") or {}).get("cart", {}) and "rb-tea" in listed:
            break
        assert time.monotonic() < deadline, "the due tea never reached the shopper's list"
        time.sleep(0.2)
    assert listed["rb-tea"]["kind"] == "revisit"
    assert listed["rb-tea"]["reason"] == "you bought it before"
    answer = s.get("/v1/users/rb-me/suggestions", k=10).json()
    assert "rb-tea" in [e["item_id"] for e in answer["items"]]
    assert "rb-kettle" not in [e["item_id"] for e in answer["items"]]
    # The shop's word wins: flagged durable, the tea is not offered again.
    durable = {"item_id": "rb-tea", "consumable": False}
    assert s.post("/v1/catalog", durable, key="admin").status_code == 202
    deadline = time.monotonic() + 40
    while orjson.loads(s.r.hget(f"{prefix}catalog", "rb-tea") or b"{}").get(
            "consumable") is not False:
        assert time.monotonic() < deadline, "catalog record never reached Redis"
        time.sleep(0.1)
    later = {"type": "view", "user_id": "rb-me", "item_id": "rb-spoon", "ts": now + 1,
             "event_id": "rb-me-view"}
    assert s.post("/v1/events", [later]).status_code == 202
    deadline = time.monotonic() + 40
    while True:
        doc = orjson.loads(s.r.get(f"{prefix}user:rb-me") or b"{}")
        if "rb-spoon" in (doc.get("context") or {}).get("recent", []):
            break
        assert time.monotonic() < deadline, "the shopper's list was never rewritten"
        time.sleep(0.2)
    assert "rb-tea" not in [e["item_id"] for e in doc["items"]]
