"""Redis clients for every process: one Redis or a Redis Cluster, as the settings say.

A cluster client routes each command by its key's slot and finds the other nodes from the one
in `redis_url`; commands over keys of several slots must be split (`Store.write_docs`,
`Store.mget`). docs/redis.md, "Cluster".
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from cartwise.settings import Settings

AsyncClient = aioredis.Redis | AsyncRedisCluster
Client = redis.Redis | RedisCluster


def connect_async(settings: Settings, **options: Any) -> AsyncClient:
    """The asyncio client of a worker or an API process."""
    if settings.redis_cluster:
        return AsyncRedisCluster.from_url(settings.redis_url, **options)
    return aioredis.Redis.from_url(settings.redis_url, **options)


def connect(settings: Settings, **options: Any) -> Client:
    """The blocking client of the command line, the rebuild and the test harness."""
    if settings.redis_cluster:
        return RedisCluster.from_url(settings.redis_url, **options)
    return redis.Redis.from_url(settings.redis_url, **options)


def is_cluster(client: Any) -> bool:
    return isinstance(client, AsyncRedisCluster | RedisCluster)
