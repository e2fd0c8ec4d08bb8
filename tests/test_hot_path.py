"""The worker's hot-path helpers, pure logic: its read cache (streams/cache.py), driven with a
counting fetch, the item lists' share of a tick (streams/graph_stage.py) and how long a
partition's state waits for its checkpoint (streams/stage.py)."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from streams.cache import ReadCache, parse_json


class Source:
    """What Redis holds, and every key each fetch asked for."""

    def __init__(self, docs: dict[str, bytes | None]) -> None:
        self.docs = docs
        self.asked: list[list[str]] = []

    async def fetch(self, keys: list[str]) -> dict[str, bytes | None]:
        self.asked.append(sorted(keys))
        return {k: self.docs.get(k) for k in keys}


def test_a_document_read_again_unchanged_keeps_its_parsed_copy():
    src = Source({"a": orjson.dumps({"v": 1}), "b": orjson.dumps({"v": 2})})
    cache = ReadCache(0.0, src.fetch, parse=parse_json)  # every read goes to the source

    async def run() -> None:
        first = await cache.get_many(["a", "b", "gone"])
        assert first == {"a": {"v": 1}, "b": {"v": 2}, "gone": None}
        src.docs["b"] = orjson.dumps({"v": 3})
        second = await cache.get_many(["a", "b", "gone"])
        assert second == {"a": {"v": 1}, "b": {"v": 3}, "gone": None}
        assert second["a"] is first["a"]  # the same bytes: not parsed again
        assert second["b"] is not first["b"]
        src.docs["a"] = None  # deleted: no stale copy survives
        assert (await cache.get_many(["a"])) == {"a": None}
        src.docs["a"] = orjson.dumps({"v": 1})
        assert (await cache.get_many(["a"])) == {"a": {"v": 1}}

    asyncio.run(run())
    assert src.asked == [["a", "b", "gone"], ["a", "b", "gone"], ["a"], ["a"]]


def test_copies_are_served_until_max_age_and_fresh_reads_skip_them():
    src = Source({"a": b"1"})
    cache = ReadCache(3600.0, src.fetch)  # no parse: values are kept as fetched

    async def run() -> None:
        assert await cache.get_many(["a"]) == {"a": b"1"}
        src.docs["a"] = b"2"
        assert await cache.get_many(["a"]) == {"a": b"1"}  # within max_age
        assert await cache.get_many(["a"], fresh=True) == {"a": b"2"}
        cache.forget(["a"])
        src.docs["a"] = b"3"
        assert await cache.get_many(["a"]) == {"a": b"3"}

    asyncio.run(run())
    assert src.asked == [["a"], ["a"], ["a"]]


def test_item_lists_yield_only_while_shoppers_lists_are_behind():
    from cartwise.settings import Settings
    from streams.graph_stage import BEHIND_FOR_S, lists_budget

    s = Settings(lists_budget=0.3, lists_budget_behind=0.05, behind_after_s=0.25)  # set here
    now = 100.0
    assert lists_budget(s, None, now) == 0.3  # no batch yet
    assert lists_budget(s, (now - 0.1, 0.2), now) == 0.3  # fresh enough
    assert lists_budget(s, (now - 0.1, 0.3), now) == 0.05  # behind
    assert lists_budget(s, (now - BEHIND_FOR_S, 5.0), now) == 0.3  # quiet since: not behind
    # A smaller budget than the "behind" one is never raised by it.
    assert lists_budget(Settings(lists_budget=0.02, lists_budget_behind=0.05), (now, 9.0),
                        now) == 0.02


def test_the_lag_item_lists_go_by_is_the_most_behind_of_the_last_second():
    from streams.stage import BEHIND_FOR_S, most_behind

    assert most_behind(None, 10.0, 0.05) == (10.0, 0.05)  # the first batch
    # A partition 2 s behind, then another that keeps up: the lagging one stands...
    lag = most_behind((10.0, 0.05), 10.2, 2.0)
    assert lag == (10.2, 2.0)
    assert most_behind(lag, 10.5, 0.01) == (10.2, 2.0)
    # ...until it ages out: a second later, the newest batch's lag again.
    assert most_behind(lag, 10.2 + BEHIND_FOR_S, 0.01) == (10.2 + BEHIND_FOR_S, 0.01)
    # A batch further behind than the standing one replaces it.
    assert most_behind(lag, 10.5, 3.0) == (10.5, 3.0)


def test_a_checkpoint_that_costs_more_than_its_share_waits_longer_within_a_bound():
    from cartwise.settings import Settings
    from streams.stage import CHECKPOINT_MAX_INTERVALS, checkpoint_every

    s = Settings(checkpoint_interval_s=1.0, checkpoint_budget=0.05)
    assert checkpoint_every(s, 0.0, 8) == 1.0  # nothing measured yet
    assert checkpoint_every(s, 0.002, 8) == 1.0  # 16 ms of 8 partitions: within 5%
    # 10 ms each over 8 partitions is 80 ms a round: every 1.6 s keeps it at 5%.
    assert checkpoint_every(s, 0.01, 8) == pytest.approx(1.6)
    assert checkpoint_every(s, 0.02, 1) == 1.0
    assert checkpoint_every(s, 5.0, 8) == CHECKPOINT_MAX_INTERVALS * 1.0  # bounded
    assert checkpoint_every(Settings(checkpoint_budget=0.0), 5.0, 8) == 1.0  # off
