"""Consumer lag per topic and partition, also on brokers whose "latest offset" is wrong.

Kafka's ListOffsets(latest) is the usual way to learn where a partition ends. Tansu 0.6, the
embedded broker, answers it with the base offset of the last record batch + 1, which falls
short of the real end whenever the last batch holds several records. The high watermark that
every fetch response carries is right on both, so the end is read from a fetch starting just
below the listed offset (docs/operations.md, "Lag").

Progress is the worker's Redis checkpoint where there is one (events and pairs topics: the
offset after it is the next to apply), else the group's committed offset (catalog topic).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from cartwise.redisconn import connect
from cartwise.settings import Settings
from streams.store import Keys


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    end: int  # next offset to be written (high watermark)
    committed: int | None  # the group's committed offset in Kafka (next to consume)
    checkpoint: int | None  # next offset after the worker's Redis checkpoint
    lag: int

    def as_dict(self) -> dict:
        return asdict(self)


def lag_of(end: int, committed: int | None, checkpoint: int | None) -> int:
    """Records not yet applied: the checkpoint counts when there is one (it is what survives a
    crash), else the committed offset; a partition never read lags by its whole length."""
    done = checkpoint if checkpoint is not None else committed
    return max(0, end - (done or 0))


# An operator asking about lag hears within 5 s that the broker is down (the client's default
# is 30 s).
BOOTSTRAP_TIMEOUT_MS = 5000


def high_watermarks(bootstrap: list[str], tps: list[TopicPartition],
                    timeout: float = 10.0) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             group_id=None, fetch_max_wait_ms=50,
                             max_partition_fetch_bytes=65536,
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        listed = consumer.end_offsets(tps)  # a lower bound on Tansu 0.6, exact on Kafka
        out: dict[TopicPartition, int] = {}
        for tp in tps:
            low = listed.get(tp) or 0
            if low == 0:  # no batch at all: empty on both brokers
                out[tp] = 0
                continue
            consumer.assign([tp])
            consumer.seek(tp, low - 1)
            deadline = time.monotonic() + timeout
            while consumer.highwater(tp) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no fetch answer for {tp.topic}/{tp.partition}")
                consumer.poll(timeout_ms=200, max_records=1)
            out[tp] = max(low, consumer.highwater(tp))
        return out
    finally:
        consumer.close()


def group_offsets(bootstrap: str | list[str], group: str, timeout: float = 15.0) -> dict:
    """The group's committed offsets ({TopicPartition: OffsetAndMetadata}).

    Retries what the broker calls retriable: Apache Kafka answers FindCoordinator with
    COORDINATOR_NOT_AVAILABLE until its __consumer_offsets topic exists (the first group
    request a new cluster sees creates it) and with COORDINATOR_LOAD_IN_PROGRESS while it
    loads that topic after a restart; Tansu answers at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap,
                                 bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
        try:
            return admin.list_group_offsets(group).get(group, {})
        except KafkaError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
        finally:
            admin.close()
        time.sleep(0.2)


def collect(settings: Settings) -> list[PartitionLag]:
    """Lag of every partition the worker group reads."""
    stages = {settings.events_topic: "context", settings.pairs_topic: "cooccurrence",
              settings.catalog_topic: None}
    consumer = KafkaConsumer(bootstrap_servers=settings.bootstrap, group_id=None,
                             bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS)
    try:
        tps = [TopicPartition(t, p) for t in stages
               for p in sorted(consumer.partitions_for_topic(t) or ())]
    finally:
        consumer.close()
    ends = high_watermarks(settings.bootstrap, tps)
    offsets = group_offsets(settings.bootstrap, settings.app_id)
    committed = {tp: om.offset for tp, om in offsets.items() if om.offset >= 0}
    r = connect(settings)
    keys = Keys(settings.prefix)
    rows = []
    for tp in tps:
        stage = stages[tp.topic]
        checkpoint = None
        if stage is not None:
            raw = r.get(keys.offset(stage, tp.partition))
            checkpoint = None if raw is None else int(raw) + 1
        c = committed.get(tp)
        rows.append(PartitionLag(settings.app_id, tp.topic, tp.partition, ends[tp], c,
                                 checkpoint, lag_of(ends[tp], c, checkpoint)))
    return rows


def format_table(rows: list[PartitionLag]) -> str:
    head = ("GROUP", "TOPIC", "PARTITION", "END", "COMMITTED", "CHECKPOINT", "LAG")
    body = [(r.group, r.topic, str(r.partition), str(r.end),
             "-" if r.committed is None else str(r.committed),
             "-" if r.checkpoint is None else str(r.checkpoint), str(r.lag)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
                     for line in (head, *body))


@dataclass
class StallDetector:
    """Flags partitions whose progress has not moved for `after_s` while records wait.

    A worker that is alive but stuck (a poison batch retried forever, a hung connection)
    keeps its partitions, so no rebalance rescues them; only this shows it. Pure: the caller
    feeds it lag rows and the time.
    """

    after_s: float
    seen: dict[tuple[str, int], tuple[int | None, float]] = field(default_factory=dict)

    def update(self, now: float, rows: list[PartitionLag]) -> list[tuple[PartitionLag, float]]:
        """The stalled partitions among `rows`, with how long each has not moved."""
        stalled = []
        for row in rows:
            key = (row.topic, row.partition)
            progress = row.checkpoint if row.checkpoint is not None else row.committed
            last = self.seen.get(key)
            if last is None or last[0] != progress or row.lag == 0:
                self.seen[key] = (progress, now)
                continue
            idle = now - last[1]
            if idle >= self.after_s:
                stalled.append((row, idle))
        return stalled
