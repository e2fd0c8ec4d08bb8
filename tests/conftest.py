"""Fixtures: one real broker and one real redis-server for the whole session.

Every test gets its own topics, consumer group and Redis key prefix, so tests never see each
other's data although they share the two servers.

Two brokers: Tansu (embedded, Python only) and Apache Kafka (cartwise/kafka_broker.py: Java 17+,
jars fetched once by Maven). `--broker tansu|kafka|both` (default both; or CARTWISE_TEST_BROKER)
picks them. Tests that use the stack run once per broker, with ids [tansu] and [kafka], in the
modules marked `both_brokers` (the stream suites); elsewhere on one broker per module: the first
one picked (Tansu when it is), or the last for the modules in `ON_LAST_BROKER`. Without Java the
[kafka] runs are skipped, with one line saying why and how to enable them, and those modules go
to the first broker. Tests that use no stack fixture do not depend on any broker.

In a `both_brokers` module, a test marked `one_broker("tansu")` or `one_broker("kafka")` runs on
that broker only, unless `--every-broker` (or CARTWISE_TEST_EVERY_BROKER=1) runs it on both: a
scenario that costs a minute or more and says nothing broker-specific runs once, so that `make
test` stays near its 15 minutes on two cores (docs/architecture.md, "Which stream tests run on
both brokers"). Which broker each runs on is chosen to even out the two halves; a marked test
whose broker is not picked, or is skipped for want of Java, runs on the other, unless marked
`fallback=False` (a copy that only repeats another, as the chaos test's second seed).

`make test` runs two pytest-xdist workers (`-n 2 --dist loadgroup`). Every test with a broker is
in the xdist group named after it, so one worker takes the Tansu half and the other the Kafka
half, each building its broker's session stack once; the broker-free tests fill in whichever
worker is free. The stream suites mostly wait on timers, so the halves share two cores well.
xdist 3.8 marks a group in the test's id, which pytest 9.2 no longer lets it change: the
scheduler below also reads the group from the broker id itself (`broker_group`).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from api.auth import new_key
from cartwise.embedded import BROKER_KINDS, EmbeddedStack, free_port
from cartwise.harness import (
    produce,
    run_settings,
    start_api,
    start_worker,
    stop_worker,
    wait_complete,
    wait_http,
)
from cartwise.redisconn import Client, connect
from cartwise.settings import Settings, _flag
from cartwise.simulator import Shop
from streams.topics import ensure_topics

_ids = itertools.count()

# Unmarked stack modules that run on the last broker picked (Kafka under `--broker both`), not the
# first: Tansu's half also has every other unmarked module, so this evens out the two xdist
# workers. Only modules with a stack of their own (not `served`, which one worker builds once).
ON_LAST_BROKER = frozenset({"test_experiments_stream.py", "test_redis_cluster.py",
                            "test_config_log.py", "test_graph_checkpoint.py", "test_import.py",
                            "test_budgets.py"})

ENABLE_KAFKA = ("install Java 17+ and Maven (the jars are fetched once into .cartwise/), or set "
                "CARTWISE_KAFKA_LIBS to a folder of Kafka 4.x jars")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker", choices=(*BROKER_KINDS, "both"),
        default=os.environ.get("CARTWISE_TEST_BROKER", "both"),
        help="broker(s) the stream suites run on: tansu (embedded), kafka (Apache Kafka, needs "
             "Java 17+) or both (default; env CARTWISE_TEST_BROKER)")
    try:
        every = _flag("test_every_broker", os.environ.get("CARTWISE_TEST_EVERY_BROKER", "0"))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    parser.addoption(
        "--every-broker", action="store_true", default=every,
        help="run the tests marked one_broker on every broker picked too (env "
             "CARTWISE_TEST_EVERY_BROKER=1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "both_brokers: tests that use the stack run on every broker --broker picks "
                   "(unmarked ones: on one broker per module)")
    config.addinivalue_line(
        "markers", "one_broker(name): in a both_brokers module, run on this broker only "
                   "(--every-broker: on every one)")
    # pytest-xdist registers it too; this keeps runs without the plugin free of warnings.
    config.addinivalue_line("markers", "xdist_group(name): tests one xdist worker runs")
    choice = config.getoption("--broker")
    config.cartwise_brokers = list(BROKER_KINDS) if choice == "both" else [choice]
    config.cartwise_kafka_skip = None
    if "kafka" in config.cartwise_brokers:
        from cartwise.kafka_broker import java_available

        reason = java_available()
        if reason:
            config.cartwise_kafka_skip = f"Apache Kafka tests skipped: {reason}; to run them, " \
                                         f"{ENABLE_KAFKA}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"cartwise brokers: {', '.join(config.cartwise_brokers)}"]
    if config.cartwise_kafka_skip:
        lines.append(config.cartwise_kafka_skip)
    return lines


NOT_PICKED = "Apache Kafka not picked (--broker tansu)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """Report every skip for want of Kafka at this file, so `-ra` folds them into one line."""
    rep = yield
    reasons = (item.config.cartwise_kafka_skip, NOT_PICKED)
    if rep.skipped and isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3:
        reason = str(rep.longrepr[2])
        if any(r and reason.endswith(r) for r in reasons):
            rep.longrepr = (__file__, None, reason)
    return rep


def module_broker(config: pytest.Config, module: str) -> str:
    """The one broker an unmarked module's stack tests run on (`ON_LAST_BROKER`)."""
    picked = config.cartwise_brokers
    last = picked[-1]
    if module in ON_LAST_BROKER and not (last == "kafka" and config.cartwise_kafka_skip):
        return last
    return picked[0]


def one_broker(config: pytest.Config, wanted: str, fallback: bool = True) -> str | None:
    """The broker a `one_broker(wanted)` test runs on: `wanted` if picked and usable, else the
    first usable one picked (the test must run somewhere), or none with `fallback=False` (a
    copy that only repeats another, as a second chaos seed does)."""
    if wanted not in BROKER_KINDS:
        raise pytest.UsageError(f"one_broker({wanted!r}): not a broker; use one of "
                                f"{', '.join(BROKER_KINDS)}")
    usable = [b for b in config.cartwise_brokers
              if not (b == "kafka" and config.cartwise_kafka_skip)]
    if wanted in usable:
        return wanted
    return (usable or config.cartwise_brokers)[0] if fallback else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the other brokers' copies of tests marked `one_broker` (on the test, its
    class or module, or one of its parameters) in `both_brokers` modules, unless
    `--every-broker`. A copy named on the command line by its id is kept: a failure seen in
    an `--every-broker` run can be run again alone."""
    if config.getoption("--every-broker"):
        return
    named = {a.replace("\\", "/") for a in config.args if "::" in a}
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("one_broker")
        params = getattr(item, "callspec", None)
        broker = params.params.get("broker_name") if params is not None else None
        if mark is None or broker is None or item.get_closest_marker("both_brokers") is None \
                or item.nodeid in named or broker == one_broker(
                    config, mark.args[0], mark.kwargs.get("fallback", True)):
            keep.append(item)
        else:
            drop.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that uses the stack (directly or through a fixture) gets a broker, and the
    xdist group of that broker."""
    if "broker_name" not in metafunc.fixturenames:
        return
    names = metafunc.config.cartwise_brokers
    if metafunc.definition.get_closest_marker("both_brokers") is None:
        names = [module_broker(metafunc.config, Path(metafunc.definition.path).name)]
    params = [pytest.param(n, id=n, marks=pytest.mark.xdist_group(n)) for n in names]
    metafunc.parametrize("broker_name", params, indirect=True, scope="session")


@pytest.fixture(scope="session")
def broker_name(request: pytest.FixtureRequest) -> str:
    """"tansu" or "kafka": the broker of this test's stack (parametrized above)."""
    name = getattr(request, "param", request.config.cartwise_brokers[0])
    if name == "kafka" and request.config.cartwise_kafka_skip:
        # Raised once per session; every [kafka] skip is folded into one line (above).
        pytest.skip(request.config.cartwise_kafka_skip)
    return name


def broker_group(nodeid: str) -> str | None:
    """The broker in a test id's parameters ("test[tansu]", "test[kafka-2]"), or None: the
    controller of an xdist run sees ids only, not marks."""
    _, bracket, params = nodeid.partition("::")[2].partition("[")
    if not bracket:
        return None
    found = set(params.removesuffix("]").split("-")) & set(BROKER_KINDS)
    return found.pop() if len(found) == 1 else None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`, grouping by broker even where xdist cannot mark the test ids."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class BrokerGroups(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)  # xdist's own "@group" suffix, where it works
            return scope if scope != nodeid else broker_group(nodeid) or nodeid

    return BrokerGroups(config, log)


START_TRIES = 3


def start_stack(workdir: Callable[[], Path], **options: Any) -> EmbeddedStack:
    """A started stack, on fresh ports up to `START_TRIES` times: a port `free_port` found free
    can be taken (the other xdist worker's servers, any client socket) before a server binds
    it, and the server then exits at once (wait_port's RuntimeError; a timeout is no clash)."""
    for attempt in range(1, START_TRIES + 1):
        stack = EmbeddedStack(workdir=workdir(), **options)
        try:
            return stack.start()
        except RuntimeError:
            stack.close()
            if attempt == START_TRIES:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def stack(broker_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    s = start_stack(lambda: tmp_path_factory.mktemp(f"stack-{broker_name}"),
                    broker_kind=broker_name)
    yield s
    s.close()


@pytest.fixture(scope="session")
def make_settings(stack: EmbeddedStack) -> Callable[..., Settings]:
    def make(name: str, topics_from: Settings | None = None, **overrides: object) -> Settings:
        return run_settings(f"t{next(_ids)}-{name}", topics_from,
                            **({"broker": stack.broker, "redis_url": stack.redis_url} | overrides))

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
        # Faust's partition tables fill a tail without saying anything: leave them out.
        lines = log.read_bytes().decode(errors="replace").splitlines()
        tail = [line for line in lines if not line.startswith(("+", "|"))][-40:]
        print(f"--- {log.name} (last lines) ---", *tail, sep="\n")


# Simulated traffic a day before the test: events the browser sends "now" then extend it.
API_START = time.time() - 86_400


@dataclass
class Served:
    settings: Settings
    base: str
    read: str
    ingest: str
    admin: str
    shop: Shop
    r: Client

    def get(self, path: str, key: str | None = "read", **params: object) -> httpx.Response:
        return httpx.get(self.base + path, params=params, headers=self._h(key), timeout=10)

    def post(self, path: str, body: object, key: str | None = "ingest") -> httpx.Response:
        return httpx.post(self.base + path, content=orjson.dumps(body), timeout=10,
                          headers=self._h(key) | {"Content-Type": "application/json"})

    def put(self, path: str, body: object, key: str | None = "admin") -> httpx.Response:
        return httpx.put(self.base + path, content=orjson.dumps(body), timeout=10,
                         headers=self._h(key) | {"Content-Type": "application/json"})

    def delete(self, path: str, key: str | None = "admin") -> httpx.Response:
        return httpx.delete(self.base + path, headers=self._h(key), timeout=10)

    def clear_experiments(self) -> None:
        """Delete every experiment: an answer follows the first one (by id) that takes the
        shopper, so a test that watches its own must be alone."""
        for e in self.get("/v1/experiments", "admin").json()["experiments"]:
            assert self.delete(f"/v1/experiments/{e['id']}").status_code == 200

    def _h(self, key: str | None) -> dict[str, str]:
        return {} if key is None else {"X-API-Key": getattr(self, key, key)}

    def doc(self, kind: str, id_: str) -> dict | None:
        raw = self.r.get(f"{self.settings.prefix}{kind}:{id_}")
        return None if raw is None else orjson.loads(raw)


@pytest.fixture(scope="session")
def served(make_settings: Callable[..., Settings],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One worker and one API process over simulated traffic, shared by the API tests."""
    keys = {role: new_key(role) for role in ("read", "ingest", "admin")}
    settings = make_settings(
        "api", api_port=free_port(), api_keys=",".join(e for _, e in keys.values()),
        cors_origins="https://shop.example", rate_admin=10_000.0, touchpoint_check_s=0.5,
        demo_read_key=keys["read"][0], demo_ingest_key=keys["ingest"][0])
    ensure_topics(settings)
    shop = Shop(seed=5)
    events = list(shop.events(300, start_ts=API_START))
    ends = produce(settings, events, shop.catalog)
    logs = tmp_path_factory.mktemp("api-logs")
    worker = start_worker(settings, logs / "worker.log", "api")
    api = start_api(settings, logs / "api.log")
    try:
        wait_complete(settings, ends, procs=[worker])
        base = f"http://127.0.0.1:{settings.api_port}"
        wait_http(base + "/ready", api)
        yield Served(settings, base, keys["read"][0], keys["ingest"][0], keys["admin"][0],
                     shop, connect(settings))
    finally:
        stop_worker(api)
        stop_worker(worker, hard=True)
        for log in sorted(logs.glob("*.log")):
            tail = log.read_bytes().decode(errors="replace").splitlines()[-30:]
            print(f"--- {log.name} ---", *tail, sep="\n")


_TIME_BY_BROKER: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Adds each test's setup, call and teardown time to its broker's total (in the
    controller too under xdist, where reports arrive from the workers)."""
    key = broker_group(report.nodeid) or "no broker"
    _TIME_BY_BROKER[key] = _TIME_BY_BROKER.get(key, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _TIME_BY_BROKER:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(_TIME_BY_BROKER.items()))
        terminalreporter.write_line(f"test time per broker (setup + call + teardown): {parts}")
