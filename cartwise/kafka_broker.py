"""A real Apache Kafka broker (single node, KRaft) from Maven Central jars, run with `java` alone.

The embedded default (cartwise/embedded.py) is Tansu; this is the broker production runs, for
tests and local runs that need Kafka's own behaviour (log recovery after kill -9, transactions,
the group coordinator). It needs Java 17+ and, the first time, Maven: `fetch_kafka()` copies the
jars named by deploy/kafka/pom.xml into .cartwise/kafka-VERSION/libs and reuses them after.

    with KafkaBroker() as broker:      # free loopback ports, a temporary log directory
        ...broker.bootstrap...         # "127.0.0.1:PORT"
        broker.kill(); broker.start()  # the same log directory: acknowledged records survive

Environment: CARTWISE_KAFKA_LIBS, a folder of jars to use as is (a Kafka distribution's libs/,
say; no Maven then); CARTWISE_KAFKA_CACHE, where fetched jars go (default .cartwise/ in the repo).
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from cartwise.embedded import free_port, wait_or_kill

REPO = Path(__file__).resolve().parents[1]
KAFKA_POM = REPO / "deploy" / "kafka" / "pom.xml"
MIN_JAVA = 17  # Kafka 4.x brokers need Java 17 or newer.
LOG_TAIL = 40
_COMPLETE = ".complete"  # written last into a fetched libs folder

LOG4J2 = """\
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
logger.state.name = state.change.logger
logger.state.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""


def kafka_version(pom: Path = KAFKA_POM) -> str:
    """The Kafka version deploy/kafka/pom.xml pins (its kafka.version property)."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = ET.parse(pom).getroot().find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise RuntimeError(f"{pom} has no <kafka.version> property")
    return node.text.strip()


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


def _tail(text: str, n: int = LOG_TAIL) -> str:
    return "\n".join(text.splitlines()[-n:])


def _libs_ready(libs: Path) -> bool:
    return (libs / _COMPLETE).exists()


def _cache_root(cache_dir: Path | str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("CARTWISE_KAFKA_CACHE") or REPO / ".cartwise")


def java_available(cache_dir: Path | str | None = None) -> str | None:
    """None when a Kafka broker can be started here, else one line saying why not."""
    java = _java()
    if java is None:
        return "no `java` on PATH (Kafka 4.x needs Java 17+)"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{java} -version` failed: {e}"
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not m:
        return f"cannot read the Java version from `{java} -version`"
    major = int(m.group(2)) if m.group(1) == "1" else int(m.group(1))
    if major < MIN_JAVA:
        return f"Java {major} at {java}; Kafka 4.x needs Java {MIN_JAVA}+"
    env_libs = os.environ.get("CARTWISE_KAFKA_LIBS")
    if env_libs:
        if not any(Path(env_libs).glob("kafka_2.13-*.jar")):
            return f"CARTWISE_KAFKA_LIBS={env_libs} holds no kafka_2.13-*.jar"
        return None
    if not KAFKA_POM.is_file():
        return f"{KAFKA_POM} is missing (not a source checkout?); set CARTWISE_KAFKA_LIBS"
    libs = _cache_root(cache_dir) / f"kafka-{kafka_version()}" / "libs"
    if not _libs_ready(libs) and shutil.which("mvn") is None:
        return f"no `mvn` on PATH to fetch the Kafka jars into {libs}"
    return None


def fetch_kafka(cache_dir: Path | str | None = None, pom: Path = KAFKA_POM) -> Path:
    """The folder of Kafka broker jars: fetched by Maven the first time, reused after.

    Safe to call from several processes at once (a file lock; the folder appears whole).
    """
    env_libs = os.environ.get("CARTWISE_KAFKA_LIBS")
    if env_libs:
        return Path(env_libs)
    if not pom.is_file():
        raise RuntimeError(f"{pom} is missing (not a source checkout?); set CARTWISE_KAFKA_LIBS")
    home = _cache_root(cache_dir) / f"kafka-{kafka_version(pom)}"
    libs = home / "libs"
    if _libs_ready(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise RuntimeError(f"no `mvn` on PATH: cannot fetch the Kafka jars into {libs} "
                           "(install Maven, or set CARTWISE_KAFKA_LIBS to a folder of Kafka jars)")
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _libs_ready(libs):  # another process fetched them while we waited
            return libs
        tmp = Path(tempfile.mkdtemp(prefix="libs.", dir=home))
        argv = [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
                f"-DoutputDirectory={tmp}"]
        try:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=600)
        except subprocess.TimeoutExpired as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"`{' '.join(argv)}` took over 600 s") from e
        if done.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"fetching the Kafka jars failed (exit {done.returncode}): "
                               f"`{' '.join(argv)}`; its last lines:\n{_tail(done.stdout)}")
        (tmp / _COMPLETE).write_text(kafka_version(pom) + "\n")
        shutil.rmtree(libs, ignore_errors=True)  # a partial folder from an older layout
        tmp.rename(libs)
    return libs


def _cluster_id() -> str:
    # Kafka's own form (Uuid.toString): 22 characters of URL-safe base64, never led by "-".
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _two_free_ports() -> tuple[int, int]:
    a = free_port()
    b = free_port()
    while b == a:
        b = free_port()
    return a, b


@dataclass
class KafkaBroker:
    """One Kafka node (broker and controller) on free loopback ports, its log under `workdir`.

    `start()`, then `stop()` (SIGTERM), `kill()` (SIGKILL) or `restart()`; each start reuses
    the log directory, formatted once. `close()` stops it and removes `workdir`.
    """

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cartwise-kafka-")))
    port: int = 0  # 0: a free one, chosen once and kept across restarts
    controller_port: int = 0
    num_partitions: int = 1
    heap: str = "512m"
    # Start fast and light: C1 only, serial GC (a test broker on a small machine, not a benchmark).
    jvm_opts: list[str] = field(default_factory=lambda: [
        "-Xms64m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true"])
    # Further server.properties entries, or overrides of those below.
    config: dict[str, str] = field(default_factory=dict)
    cache_dir: Path | None = None
    start_timeout: float = 90.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started_in: float | None = None  # seconds the last start() took (JVM up, metadata answered)
    _log_mark: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        if not self.port or not self.controller_port:
            a, b = _two_free_ports()
            self.port = self.port or a
            self.controller_port = self.controller_port or (b if b != self.port else a)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        return self.workdir / "kafka.log"

    def properties(self) -> dict[str, str]:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": str(self.num_partitions),
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "true",
            # After a kill -9 the restarted node cannot register again until the controller has
            # fenced its previous incarnation: one session timeout (default 9 s) added to every
            # crash restart. 4 s keeps that short and still far above any pause seen here.
            "broker.heartbeat.interval.ms": "1000",
            "broker.session.timeout.ms": "4000",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
        }
        props.update({k: str(v) for k, v in self.config.items()})
        return props

    def _java_argv(self, libs: Path, main: str, *args: str) -> list[str]:
        java = _java()
        if java is None:
            raise RuntimeError("no `java` on PATH (Kafka 4.x needs Java 17+)")
        return [java, f"-Xmx{self.heap}", *self.jvm_opts,
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={self.workdir}",
                "-cp", f"{libs}/*", main, *args]

    def _write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "log4j2.properties").write_text(LOG4J2)
        path = self.workdir / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in self.properties().items()))
        return path

    def log_tail(self, n: int = LOG_TAIL) -> str:
        try:
            return _tail(self.log_file.read_bytes().decode(errors="replace"), n)
        except FileNotFoundError:
            return "(no broker log)"

    def _why(self) -> str:
        """The first ERROR lines this start logged, then the last lines of the log."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_mark)
                new = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            new = []
        errors = [line for line in new if line.startswith("[") and "] ERROR " in line][:3]
        first = "".join(f"\n  {line}" for line in errors)
        return (f"{' first errors:' if first else ''}{first}\n"
                f"last {LOG_TAIL} lines of {self.log_file}:\n{self.log_tail()}")

    def _format(self, libs: Path, server_properties: Path) -> None:
        if (self.log_dir / "meta.properties").exists():
            return  # formatted before: keep the cluster id and the data
        argv = self._java_argv(libs, "kafka.tools.StorageTool", "format",
                               f"--cluster-id={_cluster_id()}", "--config", str(server_properties),
                               "--ignore-formatted")
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120)
        with open(self.log_file, "a") as log:
            log.write(done.stdout)
        if done.returncode != 0:
            raise RuntimeError(f"formatting {self.log_dir} failed (exit {done.returncode}):\n"
                               f"{_tail(done.stdout)}")

    def start(self) -> KafkaBroker:
        if self.proc is not None and self.proc.poll() is None:
            return self
        reason = java_available(self.cache_dir)
        if reason:
            raise RuntimeError(reason)
        libs = fetch_kafka(self.cache_dir)
        began = time.monotonic()
        self._log_mark = self.log_file.stat().st_size if self.log_file.exists() else 0
        props = self._write_config()
        self._format(libs, props)
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self._java_argv(libs, "kafka.Kafka", str(props)),
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True)
        try:
            self._wait_ready(began + self.start_timeout)
        except BaseException:
            self.kill()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Until the listener accepts and answers a metadata request that lists this broker."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        assert self.proc is not None
        last: object = "the port never opened"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Kafka broker exited with {self.proc.returncode} while "
                                   f"starting;{self._why()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.1)
                continue
            try:
                # Bounded: something else on the port that never answers must not hold us 30 s.
                quick = {"bootstrap_timeout_ms": 3000}  # kafka-python 3.x; 2.x lacks it
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap, request_timeout_ms=5000,
                    client_id="cartwise-kafka-ready",
                    **{k: v for k, v in quick.items() if k in KafkaAdminClient.DEFAULT_CONFIG})
                try:
                    if admin.describe_cluster().get("brokers"):
                        admin.list_topics()  # a MetadataRequest
                        return
                    last = "no broker registered yet"
                finally:
                    admin.close()
            except (KafkaError, OSError) as e:
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"the Kafka broker on {self.bootstrap} was not ready after "
                           f"{self.start_timeout:.0f} s ({last!r});{self._why()}")

    def _signal(self, sig: int, timeout: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            wait_or_kill(proc, timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (SIGTERM: Kafka flushes and closes its logs); SIGKILL after timeout."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown hook; the next start recovers the log."""
        self._signal(signal.SIGKILL, 30.0)

    def restart(self, hard: bool = False) -> KafkaBroker:
        """Stop (or kill, when hard) and start again on the same ports and log directory."""
        self.kill() if hard else self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.stop()
        if not os.environ.get("CARTWISE_KEEP_WORKDIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m cartwise.kafka_broker [--port N] [--dir D]`: a broker in the foreground;
    `--fetch`: only fetch the jars (what `make test` does first), or say why they cannot be."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--port", type=int, default=9092)
    ap.add_argument("--controller-port", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=REPO / ".cartwise" / "kafka-data")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--fetch", action="store_true",
                    help="fetch the Kafka jars into the cache and exit (0 also when Java or "
                         "Maven is missing: the tests then skip Kafka, and this says why)")
    args = ap.parse_args(argv)
    if args.fetch:
        reason = java_available()
        if reason:
            print(f"Apache Kafka {kafka_version()}: not fetched: {reason}; the Kafka half of "
                  "the tests will be skipped", file=sys.stderr)
            return
        began = time.monotonic()
        try:
            libs = fetch_kafka()
        except RuntimeError as exc:
            sys.exit(f"Apache Kafka {kafka_version()}: {exc}")
        print(f"Apache Kafka {kafka_version()} jars in {libs} ({time.monotonic() - began:.1f} s)")
        return
    broker = KafkaBroker(workdir=args.dir, port=args.port, controller_port=args.controller_port,
                         num_partitions=args.partitions).start()
    print(f"Kafka {kafka_version()} on {broker.bootstrap} (started in {broker.started_in:.1f} s); "
          f"data and log in {broker.workdir}; Ctrl-C stops it", flush=True)
    try:
        assert broker.proc is not None
        broker.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
