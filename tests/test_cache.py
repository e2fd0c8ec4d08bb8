"""The worker's read cache (streams/cache.py): pure logic, driven with a counting fetch."""

from __future__ import annotations

import asyncio

import orjson

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
    cache = ReadCache(max_age=0.0, parse=parse_json)  # every read goes to the source

    async def run() -> None:
        first = await cache.get_many(["a", "b", "gone"], src.fetch)
        assert first == {"a": {"v": 1}, "b": {"v": 2}, "gone": None}
        src.docs["b"] = orjson.dumps({"v": 3})
        second = await cache.get_many(["a", "b", "gone"], src.fetch)
        assert second == {"a": {"v": 1}, "b": {"v": 3}, "gone": None}
        assert second["a"] is first["a"]  # the same bytes: not parsed again
        assert second["b"] is not first["b"]
        src.docs["a"] = None  # deleted: no stale copy survives
        assert (await cache.get_many(["a"], src.fetch)) == {"a": None}
        src.docs["a"] = orjson.dumps({"v": 1})
        assert (await cache.get_many(["a"], src.fetch)) == {"a": {"v": 1}}

    asyncio.run(run())
    assert src.asked == [["a", "b", "gone"], ["a", "b", "gone"], ["a"], ["a"]]


def test_copies_are_served_until_max_age_and_fresh_reads_skip_them():
    src = Source({"a": b"1"})
    cache = ReadCache(max_age=3600.0)  # no parse: values are kept as fetched

    async def run() -> None:
        assert await cache.get_many(["a"], src.fetch) == {"a": b"1"}
        src.docs["a"] = b"2"
        assert await cache.get_many(["a"], src.fetch) == {"a": b"1"}  # within max_age
        assert await cache.get_many(["a"], src.fetch, fresh=True) == {"a": b"2"}
        cache.forget(["a"])
        src.docs["a"] = b"3"
        assert await cache.get_many(["a"], src.fetch) == {"a": b"3"}

    asyncio.run(run())
    assert src.asked == [["a"], ["a"], ["a"]]
