"""The frequency cap counts what shoppers saw: impression events, once each, not API answers."""

from __future__ import annotations

import time

from cartwise.contract import expected_partition
from models.rules import utc_day
from streams.store import SHOWN_TTL_S, Keys
from tests.conftest import Served


def shown_key(s: Served, user: str, day: str) -> str:
    """Counted beside the state of the shopper's events partition."""
    return Keys(s.settings.prefix).shown(expected_partition(user, s.settings.partitions),
                                         user, day)


def shown(s: Served, user: str, day: str) -> dict[str, float]:
    raw = s.r.hgetall(shown_key(s, user, day))
    return {k.decode(): float(v) for k, v in raw.items()}


def test_impressions_count_once_each_and_answers_do_not(served: Served):
    s = served
    a, b = (c["item_id"] for c in s.shop.catalog[:2])
    now = time.time()
    day = utc_day(now)

    def impression(eid: str, items: list[str], ts: float) -> dict:
        return {"event_id": eid, "type": "impression", "user_id": "fc-1", "ts": ts,
                "placement": "product", "request_id": f"rq-{eid}",
                "items": [{"item_id": i} for i in items]}

    # Listed twice in one impression is one showing; the same event sent twice is one event.
    first = impression("fc-imp-1", [a, b, b], now)
    resp = s.post("/v1/events", [first, first])
    assert resp.status_code == 202, resp.text
    assert s.post("/v1/events", [impression("fc-imp-2", [a], now + 1)]).status_code == 202
    deadline = time.monotonic() + 40
    while shown(s, "fc-1", day) != {a: 2.0, b: 1.0}:
        assert time.monotonic() < deadline, f"shown counts: {shown(s, 'fc-1', day)}"
        time.sleep(0.2)
    ttl = s.r.ttl(shown_key(s, "fc-1", day))
    assert 0 < ttl <= SHOWN_TTL_S
    # Answers are not showings: a storefront polling the API does not use up the cap.
    assert s.put("/v1/rules", {"frequency_cap": 100}).status_code == 200
    try:
        time.sleep(1.0)  # every API process picks the rules up within its refresh
        for _ in range(3):
            assert s.get("/v1/users/fc-1/suggestions", k=10).status_code == 200
            assert s.get(f"/v1/items/{a}/suggestions", user_id="fc-1", k=10).status_code == 200
        time.sleep(1.5)  # past a checkpoint interval: nothing else may have counted
        assert shown(s, "fc-1", day) == {a: 2.0, b: 1.0}
    finally:
        assert s.put("/v1/rules", {}).status_code == 200
