"""The Redis key contract (docs/redis.md): every key name the workers and the API use, with
the hash tags that keep a stage partition's keys in one Redis Cluster slot."""

from __future__ import annotations

import functools

from redis.crc import key_slot

__all__ = ["CLUSTER_SLOTS", "CONTEXT", "GRAPH", "Keys", "slot_tags", "tag"]

CONTEXT = "context"  # the stage names, which tag their partitions' keys
GRAPH = "cooccurrence"


CLUSTER_SLOTS = 16384


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """A hash tag for each Redis Cluster slot, in slot order (`s<n>` for the first n that
    hashes there): a key under each watches its slot's node for data loss."""
    tags: list[str] = [""] * CLUSTER_SLOTS
    left, n = CLUSTER_SLOTS, 0
    while left:
        t = f"s{n}"
        slot = key_slot(t.encode())
        if not tags[slot]:
            tags[slot] = t
            left -= 1
        n += 1
    return tuple(tags)


def tag(stage: str, partition: int) -> str:
    """The hash tag of a stage partition's keys: in a Redis Cluster they share one slot, so
    one checkpoint script can write them all (docs/redis.md, "Cluster")."""
    return f"{{{stage}:{partition}}}"


class Keys:
    """The Redis key contract (docs/redis.md). One place builds every key name.

    Keys a checkpoint writes carry their partition's hash tag; the public lookup keys
    (`item`, `user`, `catalog`, `trending`, `profile`) do not, and are written apart from it.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _state(self, stage: str, partition: int, name: str) -> str:
        return f"{self.prefix}state:{tag(stage, partition)}:{name}"

    def item(self, item_id: str) -> str:
        return f"{self.prefix}item:{item_id}"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}user:{user_id}"

    @property
    def catalog(self) -> str:
        return f"{self.prefix}catalog"

    def trending(self, category: str | None = None) -> str:
        """Sorted set of trending scores (models/trending.py): shop-wide or one category's."""
        return f"{self.prefix}trending" if category is None else f"{self.prefix}trending:{category}"

    def profile(self, user_id: str) -> str:
        """A shopper's order history, for segments (admin reads; not for storefronts)."""
        return f"{self.prefix}profile:{user_id}"

    def audience(self, channel: str, item_id: str) -> str:
        """Sorted set user -> last event time: who viewed ("view") or carted/bought ("buy")."""
        return f"{self.prefix}{'viewers' if channel == 'view' else 'buyers'}:{item_id}"

    @property
    def rules(self) -> str:
        """The merchant's business rules document (models/rules.py), written by the API."""
        return f"{self.prefix}rules"

    def shown(self, partition: int, user_id: str, day: str) -> str:
        """Hash item -> times shown to this shopper on a UTC day (YYYYMMDD): frequency cap.

        Counted from impression events by the workers, in the shopper's events partition
        (`cartwise.contract.expected_partition`); expires `SHOWN_TTL_S` after a write."""
        return f"{self.prefix}shown:{tag(CONTEXT, partition)}:{user_id}:{day}"

    @property
    def catalog_version(self) -> str:
        return f"{self.prefix}state:catalog_version"

    @property
    def lists_version(self) -> str:
        return f"{self.prefix}state:lists_version"

    def offset(self, stage: str, partition: int) -> str:
        return self._state(stage, partition, "offset")

    def contexts(self, partition: int) -> str:
        return self._state(CONTEXT, partition, "ctx")

    def rows(self, partition: int) -> str:
        return self._state(GRAPH, partition, "rows")

    def marginals(self, partition: int) -> str:
        return self._state(GRAPH, partition, "marg")

    def picks(self, partition: int) -> str:
        """JSON [repeat, all]: the "next" evidence partition p's shoppers gave, and how much
        of it was an item picked again right after itself (models/context.py, `picks`)."""
        return self._state(CONTEXT, partition, "picks")

    def forgotten(self, partition: int) -> str:
        """Hash user -> 1: shoppers a checkpoint evicted whose list and profile keys are not
        deleted yet (streams/context_stage.py, `after_checkpoint`)."""
        return self._state(CONTEXT, partition, "forget")

    def touchpoints(self, partition: int) -> str:
        """Sorted set of scheduled touchpoints, [user, item, kind, bought_at] -> send time."""
        return self._state(CONTEXT, partition, "touchpoints")

    def due(self, partition: int) -> str:
        """Sorted set [user_id, item_id] -> when a consumable's replenish reminder is due, for
        the shoppers of one events partition (`dues` lists them all)."""
        return f"{self.prefix}due:{tag(CONTEXT, partition)}"

    def dues(self, partitions: int) -> list[str]:
        return [self.due(p) for p in range(partitions)]

    def clusters(self, partition: int) -> str:
        """The partition's interest-cluster model (river, pickled; models/interests.py)."""
        return self._state(CONTEXT, partition, "clusters")

    def open_evidence(self, partition: int) -> str:
        """Hash "epoch|r|item" or "epoch|m|item" -> evidence of an epoch not closed yet."""
        return self._state(GRAPH, partition, "open")

    def seen_epochs(self, partition: int) -> str:
        """Hash item -> newest closed epoch with evidence of it (what max_items goes by)."""
        return self._state(GRAPH, partition, "seen")

    def cycles(self, partition: int) -> str:
        return self._state(GRAPH, partition, "cycles")

    def served(self, request_id: str) -> str:
        """What the API served under a request id, with each item's re-ranker features; read
        by the workers when the storefront reports the impression (docs/experiments.md)."""
        return f"{self.prefix}served:{request_id}"

    @property
    def experiments(self) -> str:
        """The experiment definitions (models/experiments.py), written by the API."""
        return f"{self.prefix}experiments"

    def experiment(self, experiment_id: str, partition: int) -> str:
        """Hash "variant|counter" -> value: what each variant's shoppers of one events
        partition did (the API sums `experiment_parts`)."""
        return f"{self.prefix}exp:{experiment_id}:{tag(CONTEXT, partition)}"

    def experiment_parts(self, experiment_id: str, partitions: int) -> list[str]:
        return [self.experiment(experiment_id, p) for p in range(partitions)]

    def reranker(self, partition: int) -> str:
        """A context partition's re-ranker summary (weights, progressive AUC) for the API."""
        return f"{self.prefix}reranker:{tag(CONTEXT, partition)}"

    def reranker_state(self, partition: int) -> str:
        """The partition's re-ranker itself (river, pickled): the checkpointed model."""
        return self._state(CONTEXT, partition, "reranker")

    def meta(self, partition: int) -> str:
        return self._state(GRAPH, partition, "meta")

    def settled(self, partition: int) -> str:
        return self._state(GRAPH, partition, "settled")

    def refreshed(self, partition: int) -> str:
        return self._state(CONTEXT, partition, "refreshed")

    @property
    def generation(self) -> str:
        """A token written once when the state is created: gone means Redis lost the state."""
        return f"{self.prefix}state:generation"

    def partition_generation(self, stage: str, partition: int) -> str:
        """The generation's copy beside a partition's state, which its checkpoints check: in
        a cluster each node can lose its data alone."""
        return self._state(stage, partition, "generation")

    def partition_generations(self, partitions: int) -> list[str]:
        return [self.partition_generation(stage, p)
                for stage in (CONTEXT, GRAPH) for p in range(partitions)]

    def sentinels(self) -> list[str]:
        """The generation once in every cluster slot (cluster only): a node that lost its
        data shows as missing sentinels, even one that holds no partition's state."""
        return [f"{self.prefix}state:{{{t}}}:sentinel" for t in slot_tags()]

    def stats(self, worker_id: str) -> str:
        return f"{self.prefix}stats:{worker_id}"

    @property
    def stats_pattern(self) -> str:
        return f"{self.prefix}stats:*"
