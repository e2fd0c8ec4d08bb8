"""Redis side of the workers: the checkpoint transaction and state loading (key names:
streams/keys.py).

Every batch ends in one atomic step (a Lua script): compare the partition's stored input offset
with the one this worker loaded, and only if they match write the new offset and the changed
state together. A worker that lost the partition (or replays after a crash) can therefore never
overwrite newer state. The suggestion lists derived from it are written apart, per slot in a
Redis Cluster. See docs/architecture.md and docs/redis.md.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import Any

import orjson

from cartwise.redisconn import AsyncClient, is_cluster
from streams.cache import parse_json
from streams.keys import CONTEXT, GRAPH, Keys, slot_tags, tag

__all__ = ["CONTEXT", "GRAPH", "SHOWN_TTL_S", "Keys", "Ops", "StateLost", "Store", "slot_tags",
           "tag"]

SHOWN_TTL_S = 2 * 86400  # a day's frequency-cap counts outlive the day by one day

_CHECKPOINT_LUA = """
-- KEYS[1]: the stage's offset for this partition; KEYS[2]: the state generation.
-- ARGV[1]: the offset this worker loaded ('' for none); ARGV[2]: the new offset;
-- ARGV[3]: the generation this worker started on; then the ops.
local MSLICE = 1000
local cur = redis.call('GET', KEYS[1]) or ''
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return {-1, cur} end
if cur ~= ARGV[1] then return {0, cur} end
-- Redis does not roll back a script that fails halfway: check what could fail first.
local i, n = 4, #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'H' or op == 'Z' then i = i + 4
  elseif op == 'M' then i = i + 3 + 2 * tonumber(ARGV[i+2])
  elseif op == 'P' then
    -- a patch extends a stored value: one that is not there would stand for the whole row
    local last = i + 2 + 2 * tonumber(ARGV[i+2])
    for j = i + 3, last, 2 do
      if redis.call('HEXISTS', ARGV[i+1], ARGV[j]) == 0 then
        return redis.error_reply('cartwise checkpoint: no stored ' .. ARGV[i+1] .. ' ' ..
                                 ARGV[j] .. ' to patch')
      end
    end
    i = last + 1
  elseif op == 'D' or op == 'S' or op == 'R' then i = i + 3
  elseif op == 'X' or op == 'I' then i = i + 2
  elseif op == 'E' then i = i + 3
  elseif op == 'F' then
    local before = tonumber(redis.call('HGET', ARGV[i+1], ARGV[i+2]) or '0')
    local sum = (before or 0/0) + (tonumber(ARGV[i+3]) or 0/0)
    if sum ~= sum or sum == math.huge or sum == -math.huge then
      return redis.error_reply('cartwise checkpoint: ' .. ARGV[i+1] .. ' ' .. ARGV[i+2] ..
                               ' would not stay a finite number')
    end
    i = i + 4
  else return redis.error_reply('cartwise checkpoint: unknown op ' .. op) end
end
i = 4
while i <= n do
  local op = ARGV[i]
  if op == 'H' then redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'M' then
    -- 'M' key n f1 v1 ... fn vn: n fields of one hash (unpack in slices: Lua's stack is finite)
    local first, last = i + 3, i + 2 + 2 * tonumber(ARGV[i+2])
    while first <= last do
      local upto = math.min(last, first + 2 * MSLICE - 1)
      redis.call('HSET', ARGV[i+1], unpack(ARGV, first, upto))
      first = upto + 1
    end
    i = last + 1
  elseif op == 'P' then
    -- 'P' key n f1 v1 ...: append each value to its field, after a newline (models/rowpatch.py)
    local last = i + 2 + 2 * tonumber(ARGV[i+2])
    for j = i + 3, last, 2 do
      redis.call('HSET', ARGV[i+1], ARGV[j], redis.call('HGET', ARGV[i+1], ARGV[j]) .. '\\n' ..
                 ARGV[j+1])
    end
    i = last + 1
  elseif op == 'D' then redis.call('HDEL', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'S' then redis.call('SET', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'X' then redis.call('DEL', ARGV[i+1]); i = i + 2
  elseif op == 'I' then redis.call('INCR', ARGV[i+1]); i = i + 2
  elseif op == 'Z' then redis.call('ZADD', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'R' then redis.call('ZREM', ARGV[i+1], ARGV[i+2]); i = i + 3
  elseif op == 'F' then redis.call('HINCRBYFLOAT', ARGV[i+1], ARGV[i+2], ARGV[i+3]); i = i + 4
  elseif op == 'E' then redis.call('EXPIRE', ARGV[i+1], ARGV[i+2]); i = i + 3
  end
end
-- The offset last: whatever failed above left it where it was.
redis.call('SET', KEYS[1], ARGV[2])
return {1, ARGV[2]}
"""


# The audience index in one command: per-command overhead in the client, not Redis, is what
# a pipeline of thousands of small ZADDs costs. ARGV: keep, then per key: key, trim (0/1),
# n, and n (score, member) pairs.
_AUDIENCE_LUA = """
local keep, i, n = tonumber(ARGV[1]), 2, #ARGV
while i <= n do
  local key, trim, count = ARGV[i], ARGV[i+1], tonumber(ARGV[i+2])
  redis.call('ZADD', key, 'GT', unpack(ARGV, i + 3, i + 2 + 2 * count))
  if trim == '1' then redis.call('ZREMRANGEBYRANK', key, 0, -keep - 1) end
  i = i + 3 + 2 * count
end
return 1
"""


def _finite(value: float, key: str) -> str:
    """A number for the checkpoint script; refused here, before anything is written."""
    f = float(value)
    if not math.isfinite(f):
        raise ValueError(f"checkpoint value for {key} is not finite: {f!r}")
    return repr(f)


class StateLost(RuntimeError):
    """Redis no longer holds the state generation this worker started on (data loss)."""


class Ops:
    """Writes collected during a batch, applied by the checkpoint script in one step.

    Consecutive fields of one hash travel as one op ('M' key n f1 v1 ..., and 'P' for patches
    appended to stored fields): a checkpoint is
    mostly a partition's rows, marginals and open evidence, and every argument costs the
    client its encoding and Redis its parsing (the script's arguments were 7% of a worker's
    time at 20,000 items).
    """

    __slots__ = ("args", "_count_at", "_group_key", "_group_end")

    def __init__(self) -> None:
        self.args: list[str | bytes | int] = []
        self._count_at = -1  # index in `args` of the last 'M' op's field count
        self._group_key = ""
        self._group_end = -1  # len(args) after it: nothing else came since

    def hset(self, key: str, field: str, value: bytes | str) -> None:
        self._grouped("M", key, field, value)

    def happend(self, key: str, field: str, value: bytes | str) -> None:
        """Append `value` to a stored field after a newline (a row's patch, models/rowpatch.py);
        the checkpoint fails, writing nothing, where the field is not there."""
        self._grouped("P", key, field, value)

    def _grouped(self, op: str, key: str, field: str, value: bytes | str) -> None:
        args = self.args
        if self._group_end == len(args) and self._group_key == key and args[
                self._count_at - 2] == op:
            args[self._count_at] += 1  # type: ignore[operator]
        else:
            args += (op, key, 0)
            self._count_at, self._group_key = len(args) - 1, key
            args[-1] = 1
        args += (field, value)
        self._group_end = len(args)

    def hdel(self, key: str, field: str) -> None:
        self.args += ("D", key, field)

    def set(self, key: str, value: bytes | str) -> None:
        self.args += ("S", key, value)

    def delete(self, key: str) -> None:
        self.args += ("X", key)

    def incr(self, key: str) -> None:
        self.args += ("I", key)

    def zadd(self, key: str, score: float, member: bytes) -> None:
        self.args += ("Z", key, _finite(score, key), member)

    def zrem(self, key: str, member: bytes) -> None:
        self.args += ("R", key, member)

    def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        self.args += ("F", key, field, _finite(amount, key))

    def expire(self, key: str, seconds: int) -> None:
        self.args += ("E", key, str(int(seconds)))


class Store:
    def __init__(self, redis: AsyncClient, prefix: str) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.cluster = is_cluster(redis)
        self._checkpoint = redis.register_script(_CHECKPOINT_LUA)
        self._audience = redis.register_script(_AUDIENCE_LUA)
        self.generation = ""  # set by `claim_generation` before the first checkpoint

    async def claim_generation(self, state_exists: bool, partitions: int) -> str:
        """Read the state generation, creating it when this is a new deployment.

        `state_exists` says whether the broker remembers progress of this app (committed
        offsets): then a missing generation means Redis lost its data, and carrying on over
        an empty Redis would silently skip everything before the committed offsets. Each
        partition's state has its own copy (what its checkpoints check): a cluster node that
        lost its data shows as copies missing.
        """
        raw = await self.redis.get(self.keys.generation)
        if raw is None:
            if state_exists:
                raise StateLost(
                    f"Redis has no cartwise state under prefix {self.keys.prefix!r} but the "
                    "consumer group has committed offsets: Redis lost its data. Stop all "
                    "workers and run `cartwise rebuild` (docs/operations.md).")
            await self.redis.set(self.keys.generation, secrets.token_hex(8), nx=True)
            raw = await self.redis.get(self.keys.generation)
        copies = self.keys.partition_generations(partitions)
        found = await self.mget(copies)
        if state_exists and None in found:
            missing = sum(v is None for v in found)
            raise StateLost(
                f"Redis has no state generation for {missing} of {len(copies)} partition "
                f"states under prefix {self.keys.prefix!r} but the consumer group has "
                "committed offsets: Redis (or one of its cluster nodes) lost its data, or the "
                "state predates partition-tagged keys. Stop all workers and run "
                "`cartwise rebuild` (docs/operations.md).")
        for key, value in zip(copies, found, strict=True):
            if value is None:  # a new deployment: nothing can have been checkpointed yet
                await self.redis.set(key, raw, nx=True)
        found = await self.mget(copies)
        if any(v != raw for v in found):
            raise StateLost(
                f"partition states under prefix {self.keys.prefix!r} belong to another state "
                "generation than the deployment's: Redis lost part of its data. Stop all "
                "workers and run `cartwise rebuild` (docs/operations.md).")
        if self.cluster:
            sentinels = self.keys.sentinels()
            found = await self.mget(sentinels)
            if state_exists and None in found:
                raise StateLost(self._sentinels_lost(
                    [slot for slot, v in enumerate(found) if v is None]))
            missing = [k for k, v in zip(sentinels, found, strict=True) if v is None]
            if missing:  # a new deployment
                pipe = self.redis.pipeline(transaction=False)
                for key in missing:
                    pipe.set(key, raw, nx=True)
                await pipe.execute()
        self.generation = raw.decode()
        if self.cluster:
            await self.check_generation()
        return self.generation

    async def check_generation(self) -> None:
        """Raise StateLost unless every slot of the cluster still holds this generation: a
        node restarted empty or flushed lost lists and shared keys (catalog, versions) even
        where no partition's state lives. A worker calls it every `GENERATION_CHECK_S`."""
        if not self.cluster or not self.generation:
            return
        want = self.generation.encode()
        if await self.redis.get(self.keys.generation) != want:
            raise StateLost(f"the state generation under prefix {self.keys.prefix!r} is gone "
                            "or changed: Redis lost its data. Stop all workers and run "
                            "`cartwise rebuild` (docs/operations.md).")
        if bad := await self.lost_slots(want):
            raise StateLost(self._sentinels_lost(bad))

    async def lost_slots(self, want: bytes) -> list[int]:
        """Cluster slots whose sentinel is not `want`, of the first and last slot of each range
        a node serves: a node loses all its keys or none (reading all 16,384 took 0.4 s of the
        event loop's CPU; this, 2 ms)."""
        ranges = await self.redis.cluster_slots()
        slots = sorted({slot for first, last in ranges for slot in (first, last)})
        sentinels = self.keys.sentinels()
        found = await self.mget([sentinels[s] for s in slots])
        return [s for s, v in zip(slots, found, strict=True) if v != want]

    def _sentinels_lost(self, bad: list[int]) -> str:
        return (f"{len(bad)} cluster slots (first: {bad[:3]}) lost the state generation under "
                f"prefix {self.keys.prefix!r}: a Redis Cluster node lost its data (restarted "
                "empty, flushed, or failed over without a replica). Stop all workers and run "
                "`cartwise rebuild` (docs/operations.md).")

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        """Values of `keys` in order; in a cluster, one MGET per slot, sent as one pipeline
        (a round trip per node)."""
        if not keys:
            return []
        if self.cluster:
            return await self.redis.mget_nonatomic(keys)
        return await self.redis.mget(keys)

    async def write_docs(self, docs: dict[str, bytes], deleted: Sequence[str] = ()) -> None:
        """SET every doc and delete `deleted`: one MSET, or one per slot in a cluster."""
        if self.cluster:
            if docs:
                await self.redis.mset_nonatomic(docs)
            if deleted:
                await self.redis.delete(*deleted)  # the cluster client splits it per slot
            return
        if docs and not deleted:
            await self.redis.mset(docs)
        elif docs or deleted:
            pipe = self.redis.pipeline(transaction=False)
            if docs:
                pipe.mset(docs)
            pipe.delete(*deleted)
            await pipe.execute()

    def pipeline(self) -> Any:
        """A transaction on one Redis; in a cluster (where one cannot span slots) a pipeline
        whose commands each go to their own node."""
        return self.redis.pipeline(transaction=not self.cluster)

    async def offset(self, stage: str, partition: int) -> int:
        raw = await self.redis.get(self.keys.offset(stage, partition))
        return -1 if raw is None else int(raw)

    async def checkpoint(
        self, stage: str, partition: int, expected: int, new: int, ops: Ops
    ) -> tuple[bool, int]:
        """Atomically move the offset from `expected` to `new` and apply `ops`.

        Returns (True, new) or (False, offset found) when someone else moved it; raises
        StateLost when the state generation is gone (Redis lost its data).
        """
        exp = "" if expected < 0 else str(expected)
        ok, found = await self._checkpoint(
            keys=[self.keys.offset(stage, partition),
                  self.keys.partition_generation(stage, partition)],
            args=[exp, str(new), self.generation, *ops.args],
        )
        if ok == -1:
            raise StateLost(
                f"{stage} partition {partition}: the state generation under prefix "
                f"{self.keys.prefix!r} is gone: Redis lost its data. Stop all workers and run "
                "`cartwise rebuild` (docs/operations.md).")
        return bool(ok), (-1 if found in (b"", "") else int(found))

    async def audience_index(self, keep: int,
                             rows: list[tuple[str, bool, dict[str, float]]]) -> None:
        """ZADD GT each key's {user: ts}, trimming those marked to the newest `keep`.

        One script call; in a cluster (where the keys lie in many slots) a pipeline that sends
        each node its own commands."""
        if self.cluster:
            pipe = self.redis.pipeline(transaction=False)
            for key, trim, users in rows:
                pipe.zadd(key, {u: float(ts) for u, ts in users.items()}, gt=True)
                if trim:
                    pipe.zremrangebyrank(key, 0, -keep - 1)
            await pipe.execute()
            return
        args: list[str | float | int] = [keep]
        for key, trim, users in rows:
            args += (key, "1" if trim else "0", len(users))
            for user, ts in users.items():
                args += (repr(float(ts)), user)
        await self._audience(args=args)

    async def hgetall(self, key: str) -> dict[str, bytes]:
        raw = await self.redis.hgetall(key)
        return {k.decode(): v for k, v in raw.items()}

    async def get_json(self, key: str) -> Any:
        raw = await self.redis.get(key)
        return None if raw is None else orjson.loads(raw)

    async def item_lists(self, items: list[str]) -> dict[str, dict | None]:
        return {i: parse_json(r) for i, r in (await self.item_lists_raw(items)).items()}

    async def item_lists_raw(self, items: list[str]) -> dict[str, bytes | None]:
        """The stored `cw:item` documents, unparsed (streams/cache.py parses what changed)."""
        if not items:
            return {}
        raws = await self.mget([self.keys.item(i) for i in items])
        return {i: (r or None) for i, r in zip(items, raws, strict=True)}

    async def catalog_facts(self, items: list[str]) -> dict[str, dict | None]:
        if not items:
            return {}
        raws = await self.redis.hmget(self.keys.catalog, items)
        return {i: (orjson.loads(r) if r else None) for i, r in zip(items, raws, strict=True)}
