"""Apache Kafka brokers for tests and benchmarks, fetched from Maven Central.

:func:`jars` has Maven copy ``org.apache.kafka:kafka_2.13`` and its runtime dependencies
into a cache outside the repository (``$XDG_CACHE_HOME/polybus``, or ``~/.cache/polybus``;
``~/.m2`` keeps Maven's own copy), so only the first run downloads. :class:`KafkaCluster`
runs KRaft nodes (each a combined broker and controller) on free 127.0.0.1 ports, with
data in a temporary directory removed on :meth:`~KafkaCluster.stop`::

    with KafkaCluster() as kafka:            # one node
        polybus.connect(f"kafka://{kafka.bootstrap}")

    with KafkaCluster(3) as kafka:           # replication factor 3, min.insync.replicas=2
        kafka.kill(kafka.leader(topic))      # SIGKILL, as a crashed machine

As a script: ``python -m polybus.testing.apache_kafka fetch`` fills the cache, ``run``
keeps a broker on 127.0.0.1:9092 in the foreground until Ctrl-C (``make kafka``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from ._net import free_port, reachable

__all__ = ["KAFKA_VERSION", "KafkaCluster", "jars", "unavailable"]

KAFKA_VERSION = "4.4.0"

# slf4j-api is pinned: left to Maven, the broker's dependency tree picks 1.7, which finds no
# binding and drops every log line, start-up errors included.
_POM = f"""\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>polybus.testing</groupId>
  <artifactId>apache-kafka</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{KAFKA_VERSION}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>2.26.1</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>2.26.1</version>
    </dependency>
    <dependency>
      <groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.20</version>
    </dependency>
  </dependencies>
</project>
"""

_LOG4J = """\
rootLogger.level=WARN
rootLogger.appenderRef.out.ref=OUT
appender.out.type=Console
appender.out.name=OUT
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
"""

_START_TIMEOUT = 90.0  # a cold JVM on a busy 2-core machine, warm-up included


def _cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "polybus" / f"kafka-{KAFKA_VERSION}"


def unavailable() -> str | None:
    """None when Apache Kafka can run here, else why not and what to install."""
    if shutil.which("java") is None:
        return "no `java` on PATH: Apache Kafka needs Java 17 or newer"
    if not (_cache() / "lib").is_dir() and shutil.which("mvn") is None:
        return "no `mvn` on PATH to fetch Apache Kafka from Maven Central (apt-get install maven)"
    return None


def jars() -> Path:
    """The folder holding Apache Kafka's jars, fetched by Maven on first use.

    Safe across processes: one fetches under a lock while the others wait, and the folder
    appears whole (renamed into place) or not at all. Raises RuntimeError with Maven's
    output when the fetch fails.
    """
    cache = _cache()
    lib = cache / "lib"
    if lib.is_dir():
        return lib
    if reason := unavailable():
        raise RuntimeError(reason)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if lib.is_dir():  # another process fetched while this one waited
            return lib
        (cache / "pom.xml").write_text(_POM)
        partial = cache / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run(
            [
                "mvn",
                "-q",
                "-B",
                "-f",
                str(cache / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={partial}",
                "-DincludeScope=runtime",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"Maven could not fetch Apache Kafka {KAFKA_VERSION}: "
                f"{(done.stdout + done.stderr)[-2000:]}"
            )
        (cache / "log4j2.properties").write_text(_LOG4J)
        partial.rename(lib)
    return lib


@dataclass
class _Node:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None


class KafkaCluster:
    """``size`` KRaft nodes, each broker and controller, on 127.0.0.1.

    Internal topics and new topics are replicated to every node; with three nodes,
    ``min.insync.replicas=2``, so an ``acks=all`` write survives losing any one node.
    ``proxy_port`` (one node only) adds a listener that advertises that port, for a
    :class:`~polybus.testing.proxy.TcpProxy` listening there and forwarding to
    :attr:`proxied_listener`: clients bootstrapped through the proxy keep using it.
    """

    def __init__(self, size: int = 1, *, proxy_port: int | None = None, heap: str = "512m"):
        if proxy_port is not None and size != 1:
            raise ValueError("proxy_port needs a one-node cluster")
        self.size = size
        self.heap = heap
        self.proxy_port = proxy_port
        self.proxied_listener = free_port() if proxy_port else None
        self._root = Path(tempfile.mkdtemp(prefix="polybus-kafka-"))
        self.nodes = [
            _Node(i, free_port(), free_port(), self._root / f"node-{i}") for i in range(1, size + 1)
        ]

    @property
    def bootstrap(self) -> str:
        """``host:port,...`` of every node, for ``bootstrap.servers``."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def __enter__(self) -> KafkaCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Format and start every node, and return once groups and transactions work."""
        lib = jars()
        cluster_id = _cluster_id()
        for node in self.nodes:
            node.directory.mkdir(parents=True)
            (node.directory / "server.properties").write_text(self._properties(node))
        try:
            formats = [
                self._java(
                    lib,
                    node,
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",  # one "=": an id may begin with "-"
                    f"--config={node.directory / 'server.properties'}",
                )
                for node in self.nodes
            ]
            for node, fmt in zip(self.nodes, formats, strict=True):
                if fmt.wait(60) != 0:
                    raise RuntimeError(f"formatting node {node.node_id} failed: {_tail(node)}")
            for node in self.nodes:
                self._launch(node, lib)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def kill(self, node_id: int) -> None:
        """SIGKILL one node, as a machine that lost power: no controlled shutdown."""
        node = self.nodes[node_id - 1]
        assert node.process is not None, f"node {node_id} is not running"
        node.process.kill()
        node.process.wait()
        node.process = None

    def leader(self, topic: str, partition: int = 0) -> int:
        """The id of the node that leads ``partition`` of ``topic``."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        leader: int = (
            admin.list_topics(topic, timeout=10).topics[topic].partitions[partition].leader
        )
        return leader

    def coordinator(self, group: str) -> int:
        """The id of the node that coordinates consumer group ``group``."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        described = admin.describe_consumer_groups([group], request_timeout=10)[group]
        node: int = described.result(10).coordinator.id
        return node

    def stop(self) -> None:
        """Kill every node (their data is thrown away) and remove the data."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
                node.process.wait()
            node.process = None
        shutil.rmtree(self._root, ignore_errors=True)

    def _properties(self, node: _Node) -> str:
        listeners = {"PLAINTEXT": node.port, "CONTROLLER": node.controller_port}
        advertised = {"PLAINTEXT": node.port}
        if self.proxied_listener and self.proxy_port:
            listeners["PROXIED"] = self.proxied_listener
            advertised["PROXIED"] = self.proxy_port
        replicas = self.size
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        settings = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listeners": ",".join(f"{k}://127.0.0.1:{v}" for k, v in listeners.items()),
            "advertised.listeners": ",".join(f"{k}://127.0.0.1:{v}" for k, v in advertised.items()),
            "listener.security.protocol.map": ",".join(f"{k}:PLAINTEXT" for k in listeners),
            "log.dirs": node.directory / "data",
            "default.replication.factor": replicas,
            "min.insync.replicas": min(2, replicas),
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min(2, replicas),
            # Fewer internal partitions than the default 50: the first group and the first
            # transaction wait for them to be created, by the same code paths.
            "offsets.topic.num.partitions": 8,
            "transaction.state.log.num.partitions": 8,
            # Fast groups: no wait for more members, and the tests' short sessions allowed.
            "group.initial.rebalance.delay.ms": 0,
            "group.min.session.timeout.ms": 500,
            # A dead producer's transaction is aborted within a second of its timeout.
            "transaction.abort.timed.out.transaction.cleanup.interval.ms": 1000,
            # A killed node is fenced, and its partitions get new leaders, within 3 s.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 3000,
        }
        return "".join(f"{k}={v}\n" for k, v in settings.items())

    def _java(self, lib: Path, node: _Node, *args: str) -> subprocess.Popen[bytes]:
        log = open(node.directory / "server.log", "ab")  # noqa: SIM115  # the child keeps it
        with log:
            return subprocess.Popen(
                [
                    "java",
                    f"-Xmx{self.heap}",
                    "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={lib.parent / 'log4j2.properties'}",
                    "-cp",
                    f"{lib}/*",
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C in a test run does not reach it half-way
                preexec_fn=_die_with_parent,
            )

    def _launch(self, node: _Node, lib: Path) -> None:
        node.process = self._java(
            lib, node, "kafka.Kafka", str(node.directory / "server.properties")
        )

    def _wait_ready(self) -> None:
        """Wait until every node serves, then make the first group and the first
        transaction once, so the internal topics and coordinators are in place.

        Handing out a broker before its group coordinator loads can crash a client:
        librdkafka 2.x's admin ListConsumerGroupOffsets dereferences a missing coordinator
        and segfaults on NOT_COORDINATOR.
        """
        from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
        from confluent_kafka.admin import AdminClient

        deadline = time.monotonic() + _START_TIMEOUT
        for node in self.nodes:  # before any client, which would log each refused connect
            while not reachable("127.0.0.1", node.port, timeout=0.2):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Apache Kafka did not start: {_tail(node)}")
                time.sleep(0.05)
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        while True:
            self._check_alive()
            try:
                if len(admin.list_topics(timeout=1).brokers) == self.size:
                    break
            except KafkaException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Apache Kafka did not start: {_tail(self.nodes[0])}")
            time.sleep(0.1)
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "polybus-ready"})
        try:
            while True:
                try:
                    consumer.committed([TopicPartition("polybus-ready", 0)], timeout=5)
                    break
                except KafkaException:
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise
        finally:
            consumer.close()
        producer = Producer(  # log_level 3: its "coordinator load in progress" is expected
            {
                "bootstrap.servers": self.bootstrap,
                "transactional.id": "polybus-ready",
                "log_level": 3,
            }
        )
        producer.init_transactions(max(1.0, deadline - time.monotonic()))

    def _check_alive(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                raise RuntimeError(f"Apache Kafka node {node.node_id} exited: {_tail(node)}")


def _die_with_parent() -> None:
    """In the broker's process before Java starts: on Linux, have the kernel SIGKILL it
    when the test process that started it dies, even of SIGKILL, so none is left behind."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def _cluster_id() -> str:
    """A random cluster id in Kafka's form: 16 bytes, URL-safe base64 without padding."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _tail(node: _Node) -> str:
    try:
        return (node.directory / "server.log").read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def _run_in_foreground(port: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop() runs either way
    cluster = KafkaCluster()
    cluster.nodes[0].port = port
    try:
        cluster.start()
        print(f"Apache Kafka {KAFKA_VERSION} on 127.0.0.1:{port}; Ctrl-C stops it.", flush=True)
        print(f"  export POLYBUS_KAFKA_BOOTSTRAP=127.0.0.1:{port}  # tests and benchmarks use it")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "fetch":
        if reason := unavailable():  # not an error: the tests fall back to Tansu
            print(f"Apache Kafka is not available here ({reason}); Kafka tests use Tansu")
            return 0
        print(f"Apache Kafka {KAFKA_VERSION}: {jars()}")
        return 0
    if command == "run":
        _run_in_foreground(int(argv[1]) if len(argv) > 1 else 9092)
        return 0
    print("usage: python -m polybus.testing.apache_kafka fetch | run [port]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
