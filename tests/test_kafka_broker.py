"""The real Apache Kafka broker (cartwise/kafka_broker.py): records go in, come back, and survive
a clean restart and a kill -9 on the same log directory. Skipped where Java 17+ is missing."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from cartwise.kafka_broker import KafkaBroker, fetch_kafka, java_available
from tests.conftest import NOT_PICKED


@pytest.fixture(scope="module")
def kafka_enabled(request: pytest.FixtureRequest) -> None:
    """Skips unless --broker picks Kafka and Java 17+ is here (tests/conftest.py)."""
    if "kafka" not in request.config.cartwise_brokers:
        pytest.skip(NOT_PICKED)
    if request.config.cartwise_kafka_skip:
        pytest.skip(request.config.cartwise_kafka_skip)


N = 1000
PARTITIONS = 3
_topics = itertools.count()


@pytest.fixture(scope="module")
def broker(kafka_enabled: None,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    b = KafkaBroker(workdir=tmp_path_factory.mktemp("kafka")).start()
    print(f"Kafka broker started in {b.started_in:.1f} s")
    yield b
    b.close()


def new_topic(broker: KafkaBroker) -> str:
    name = f"kb-{next(_topics)}"
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        admin.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        admin.close()
    return name


def produce(broker: KafkaBroker, topic: str, n: int = N, start: int = 0) -> dict[tuple, bytes]:
    """n records, acks=all and flushed: returns {(partition, offset): value} as acknowledged."""
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5)
    try:
        futures = [(i, producer.send(topic, key=b"k%d" % i, value=b"v%d" % i))
                   for i in range(start, start + n)]
        producer.flush()
        acked = {}
        for i, f in futures:
            md = f.get(timeout=30)
            acked[(md.partition, md.offset)] = b"v%d" % i
        return acked
    finally:
        producer.close()


def consume_all(broker: KafkaBroker, topic: str) -> tuple[dict[tuple, bytes], dict[int, int]]:
    """Everything in the topic, read from the start up to the end offsets; and those offsets."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=1000)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = {tp.partition: off for tp, off in consumer.end_offsets(tps).items()}
        seen: dict[tuple, bytes] = {}
        for _ in range(60):
            for tp, records in consumer.poll(timeout_ms=1000).items():
                for r in records:
                    seen[(tp.partition, r.offset)] = r.value
            if all(consumer.position(tp) >= ends[tp.partition] for tp in tps):
                break
        return seen, ends
    finally:
        consumer.close()


def test_produce_consume_and_end_offsets(broker: KafkaBroker) -> None:
    topic = new_topic(broker)
    acked = produce(broker, topic)
    seen, ends = consume_all(broker, topic)
    assert seen == acked and len(seen) == N
    for p in range(PARTITIONS):
        offsets = [o for (q, o) in acked if q == p]
        assert offsets, f"partition {p} got no record"
        # ListOffsets (latest) is the last offset + 1, and offsets are dense from 0.
        assert ends[p] == max(offsets) + 1 == len(offsets)


def test_clean_restart_keeps_records(broker: KafkaBroker) -> None:
    topic = new_topic(broker)
    acked = produce(broker, topic)
    broker.restart()
    print(f"restart after SIGTERM took {broker.started_in:.1f} s")
    seen, ends = consume_all(broker, topic)
    assert seen == acked
    assert sum(ends.values()) == N
    # And the broker takes writes again after the restart.
    more = produce(broker, topic, n=10, start=N)
    assert consume_all(broker, topic)[0] == {**acked, **more}


def test_kill9_keeps_acknowledged_records(broker: KafkaBroker) -> None:
    topic = new_topic(broker)
    acked = produce(broker, topic)
    broker.restart(hard=True)  # SIGKILL: no shutdown, the log is recovered on start
    print(f"restart after SIGKILL took {broker.started_in:.1f} s")
    seen, _ = consume_all(broker, topic)
    missing = set(acked) - set(seen)
    assert not missing, f"{len(missing)} acknowledged records lost after kill -9"
    assert {k: seen[k] for k in acked} == acked


def test_failed_start_reports_the_broker_log(kafka_enabled: None, tmp_path: Path) -> None:
    with socket.socket() as taken:  # the broker's port is held: Kafka cannot bind it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        b = KafkaBroker(workdir=tmp_path, port=taken.getsockname()[1], start_timeout=60)
        with pytest.raises(RuntimeError, match="first errors:") as err:
            b.start()
    assert "Address already in use" in str(err.value) or "BindException" in str(err.value)
    assert not b.running


def test_fetch_without_maven_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CARTWISE_KAFKA_LIBS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # neither mvn nor java
    with pytest.raises(RuntimeError, match="no `mvn` on PATH"):
        fetch_kafka(cache_dir=tmp_path / "empty-cache")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert "no `java` on PATH" in (java_available() or "")


def test_compose_and_the_test_broker_run_one_kafka_version() -> None:
    """The version the tests run (deploy/kafka/pom.xml) is the one docker-compose.yml deploys."""
    import yaml

    from cartwise.kafka_broker import REPO, kafka_version

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    image = compose["services"]["kafka"]["image"]
    assert image == f"apache/kafka:{kafka_version()}", image
