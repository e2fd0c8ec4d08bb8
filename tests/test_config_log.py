"""Rules and experiment definitions on the compacted config topic, and back after Redis data loss.

The API writes each rules or experiments document to the config topic (acknowledged by the
broker) before Redis; `cartwise rebuild` writes the newest ones back where Redis lost them.
Real broker, real Redis, the real API process and the real `cartwise rebuild` command.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import ConfigResource, ConfigResourceType

from api.auth import new_key
from cartwise.embedded import EmbeddedStack, free_port
from cartwise.harness import start_api, stop_worker, wait_http, worker_env
from cartwise.redisconn import Client, connect
from cartwise.settings import Settings
from streams.store import Keys
from streams.topics import ensure_topics, topic_configs, topic_plan

RULES = {"block": ["sku-9"], "exclude_categories": ["adult"], "pins": {"printer": ["ink"]},
         "boost": {"items": ["new1"], "slots": 1}, "frequency_cap": 3}
AB = {"variants": [{"name": "plain", "settings": {"ranking": "plain"}},
                   {"name": "reranked", "settings": {"ranking": "auto"}}],
      "traffic": 0.5}
CD = {"variants": [{"name": "a"}, {"name": "b", "settings": {"rules": False}}]}


@dataclass
class Api:
    settings: Settings
    base: str
    admin: str
    proc: subprocess.Popen
    r: Client

    def call(self, method: str, path: str, body: object = None) -> httpx.Response:
        content = None if body is None else orjson.dumps(body)
        return httpx.request(method, self.base + path, content=content, timeout=30,
                             headers={"X-API-Key": self.admin,
                                      "Content-Type": "application/json"})

    def read(self, path: str) -> dict:
        resp = self.call("GET", path)
        assert resp.status_code == 200, resp.text
        return {k: v for k, v in resp.json().items() if k != "request_id"}


def run_api(settings: Settings, logs: Path) -> Api:
    admin, entry = new_key("admin")
    settings = dataclasses.replace(settings, api_keys=entry, api_port=free_port())
    proc = start_api(settings, logs / "api.log")
    base = f"http://127.0.0.1:{settings.api_port}"
    try:
        wait_http(base + "/ready", proc)
    except BaseException:
        stop_worker(proc, hard=True)
        raise
    return Api(settings, base, admin, proc, connect(settings))


@pytest.fixture
def api_on(tmp_path: Path) -> Iterator[Callable[[Settings], Api]]:
    started: list[Api] = []

    def start(settings: Settings) -> Api:
        api = run_api(settings, tmp_path)
        started.append(api)
        return api

    yield start
    for api in started:
        stop_worker(api.proc)
    for log in sorted(tmp_path.glob("*.log")):
        tail = log.read_bytes().decode(errors="replace").splitlines()[-30:]
        print(f"--- {log.name} (last lines) ---", *tail, sep="\n")


def config_records(settings: Settings) -> list[tuple[bytes, bytes]]:
    consumer = KafkaConsumer(settings.config_topic, bootstrap_servers=settings.bootstrap,
                             group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    try:
        return [(m.key, m.value) for m in consumer]
    finally:
        consumer.close()


def topic_layout(settings: Settings, topic: str) -> tuple[set[int], dict[str, str]]:
    """The topic's partitions, and its configs as far as the broker reports them."""
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
    finally:
        consumer.close()
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap)
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    configs: dict[str, str] = {}
    if isinstance(described, dict):  # kafka-python 3: {"topic": {name: {config: value}}}
        for name, value in (described.get("topic", {}).get(topic) or {}).items():
            configs[name] = value.get("value") if isinstance(value, dict) else value
    else:  # kafka-python 2: DescribeConfigsResponse objects
        for response in described:
            for resource in response.resources:
                for entry in resource[4]:
                    configs[entry[0]] = entry[1]
    return partitions, configs


def rebuild(settings: Settings) -> str:
    out = subprocess.run([sys.executable, "-m", "cartwise", "rebuild", "--force"],
                         env=worker_env(settings), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.both_brokers
def test_config_topic_is_created_compacted_with_one_partition(make_settings, broker_name):
    settings = make_settings("cfg-topic")
    settings = dataclasses.replace(settings, config_topic=f"{settings.app_id}.config")
    assert topic_plan(settings)[settings.config_topic] == 1
    ensure_topics(settings)
    partitions, configs = topic_layout(settings, settings.config_topic)
    assert partitions == {0}
    if broker_name == "kafka" or configs:
        assert configs.get("cleanup.policy") == "compact", configs
    # Tansu accepts the config at creation but describes none; its log is not compacted, and
    # the rebuild does not need it to be: it keeps the last record read per key.
    others, _ = topic_layout(settings, settings.events_topic)
    assert len(others) == settings.partitions
    if broker_name == "kafka":
        # Kafka's defaults would keep events 7 days and never compact the catalog, and
        # `cartwise rebuild` needs the events log whole (docs/architecture.md).
        for topic, wanted in topic_configs(settings).items():
            _, got = topic_layout(settings, topic)
            assert {k: got.get(k) for k in wanted} == wanted, topic
        assert topic_configs(settings)[settings.events_topic] == {"retention.ms": "-1"}


def test_rules_and_experiments_come_back_after_redis_data_loss(make_settings, api_on):
    base = make_settings("cfg-loss")
    settings = dataclasses.replace(base, config_topic=f"{base.app_id}.config")
    # The events topic only (the rebuild checks it): the API creates the config topic itself.
    ensure_topics(settings, only=(settings.events_topic,))
    api = api_on(settings)
    keys = Keys(settings.prefix)

    assert api.call("PUT", "/v1/rules", {"block": ["first"]}).status_code == 200
    resp = api.call("PUT", "/v1/rules", RULES)  # the newest document wins
    assert resp.status_code == 200, resp.text
    for exp_id, doc in (("ab", AB), ("cd", CD), ("gone", CD)):
        resp = api.call("PUT", f"/v1/experiments/{exp_id}", doc)
        assert resp.status_code == 200, resp.text
    assert api.call("DELETE", "/v1/experiments/gone").status_code == 200
    rules, experiments = api.read("/v1/rules"), api.read("/v1/experiments")
    assert rules["block"] == ["sku-9"] and rules["frequency_cap"] == 3
    assert [e["id"] for e in experiments["experiments"]] == ["ab", "cd"]

    # Every write is on the topic, byte for byte what Redis holds; the newest last.
    records = config_records(settings)
    assert [k for k, _ in records] == [b"rules"] * 2 + [b"experiments"] * 4
    newest = dict(records)
    assert newest[b"rules"] == api.r.get(keys.rules)
    assert newest[b"experiments"] == api.r.get(keys.experiments)
    partitions, configs = topic_layout(settings, settings.config_topic)
    assert partitions == {0}  # created by the API, one partition (compacted on Kafka)
    if configs:
        assert configs.get("cleanup.policy") == "compact", configs

    # Redis loses both documents: the API now serves no rules and no experiments.
    api.r.delete(keys.rules, keys.experiments)
    assert api.read("/v1/rules")["block"] == []
    assert api.read("/v1/experiments")["experiments"] == []

    out = rebuild(settings)
    assert "rules and 2 experiments restored from the config topic" in out, out
    assert api.read("/v1/rules") == rules
    assert api.read("/v1/experiments") == experiments
    assert api.r.get(keys.rules) == newest[b"rules"]
    assert api.r.get(keys.experiments) == newest[b"experiments"]

    # What Redis still holds is kept: here rules that survived, only experiments lost.
    survived = orjson.dumps({"block": ["survivor"]})
    api.r.set(keys.rules, survived)
    api.r.delete(keys.experiments)
    out = rebuild(settings)
    assert "2 experiments restored from the config topic" in out and "rules and" not in out
    assert api.r.get(keys.rules) == survived
    assert api.read("/v1/experiments") == experiments
    out = rebuild(settings)
    assert "no rules or experiments restored" in out, out


@pytest.fixture
def lone_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    """A broker of its own: this test stops it under the API."""
    stack = EmbeddedStack(workdir=tmp_path / "stack").start()
    yield stack
    stack.close()


def test_rules_update_with_the_broker_away_answers_503_and_leaves_redis(
        make_settings, api_on, lone_stack):
    settings = make_settings("cfg-down", broker=lone_stack.broker,
                             redis_url=lone_stack.redis_url, produce_timeout_s=2.0)
    ensure_topics(settings)
    api = api_on(settings)
    keys = Keys(settings.prefix)
    assert api.call("PUT", "/v1/rules", RULES).status_code == 200
    stored = api.r.get(keys.rules)
    assert stored is not None and api.r.get(keys.experiments) is None

    lone_stack.stop("broker")
    resp = api.call("PUT", "/v1/rules", {"block": ["never-stored"]})
    assert resp.status_code == 503, resp.text
    assert "\n" not in resp.text and resp.headers["retry-after"] == "1"
    err = resp.json()["error"]
    assert err["reason"] == "broker_unavailable"
    assert lone_stack.broker in err["detail"] and settings.config_topic in err["detail"]
    assert api.r.get(keys.rules) == stored  # produced first: Redis never got it
    assert api.read("/v1/rules")["block"] == RULES["block"]

    resp = api.call("PUT", "/v1/experiments/ab", AB)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["reason"] == "broker_unavailable"
    assert api.r.get(keys.experiments) is None
    assert api.read("/v1/experiments")["experiments"] == []
