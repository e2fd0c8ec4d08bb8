"""Fixtures: one real Tansu broker and one real redis-server for the whole session.

Every test gets its own topics, consumer group and Redis key prefix, so tests never see each
other's data although they share the two servers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cartwise.embedded import EmbeddedStack
from cartwise.harness import start_worker, stop_worker
from cartwise.settings import Settings

_ids = itertools.count()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    s = EmbeddedStack(workdir=tmp_path_factory.mktemp("stack")).start()
    yield s
    s.close()


@pytest.fixture(scope="session")
def make_settings(stack: EmbeddedStack) -> Callable[..., Settings]:
    def make(name: str, topics_from: Settings | None = None, **overrides: object) -> Settings:
        base = f"t{next(_ids)}-{name}"
        src = topics_from
        values: dict[str, object] = dict(
            broker=stack.broker, redis_url=stack.redis_url, prefix=f"{base}:", app_id=base,
            events_topic=src.events_topic if src else f"{base}.events",
            catalog_topic=src.catalog_topic if src else f"{base}.catalog",
            dlq_topic=f"{base}.dlq",
            session_timeout_s=6.0, rebalance_timeout_s=6.0, heartbeat_interval_s=1.0,
            settle_idle_s=0.5, refresh_interval_s=0.5, refresh_window_s=1e9,
            refresh_max_users=1_000_000,
        )
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., object]]:
    procs = []

    def start(settings: Settings, name: str = "w") -> object:
        proc = start_worker(settings, tmp_path / f"{name}.log", name)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        stop_worker(proc, hard=True)
    for log in sorted(tmp_path.glob("*.log")):
        tail = log.read_bytes().decode(errors="replace").splitlines()[-40:]
        print(f"--- {log.name} (last lines) ---", *tail, sep="\n")
