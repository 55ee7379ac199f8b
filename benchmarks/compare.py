"""One workload on every backend: throughput and end-to-end latency, as a table and a chart.

For each of native, Kafka, RabbitMQ and Redis, through the same polybus code, and for
Kafka also through confluent-kafka alone (``kafka-raw``: an idempotent ``acks=all``
producer, as the adapter's, and a consumer that commits what it read):

* throughput: publish ``--count`` 100-byte messages with ``publish_many`` in
  batches of 1000 (each batch confirmed by the broker), then consume and ack
  them all with one group member; messages per second, each way;
* latency: a member of a fresh group waits in ``fetch`` in its own thread
  while the main thread publishes one message every millisecond (1,000 msg/s,
  each ``publish`` confirmed before the next) for ``--seconds``; latency is
  receive time minus the message's creation time (both ``time.time()`` on
  this host); the first ``WARMUP`` messages are dropped; p50 and p99.

Prints a table and writes a bar chart to ``--png`` (default
``benchmarks/results/compare.png``). Servers come from
``polybus.testing.servers``, as for the test suite.

    python benchmarks/compare.py [--count 20000] [--seconds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import polybus
from polybus.testing import servers

T = TypeVar("T")
PAYLOAD = os.urandom(100)
WARMUP = 200
DEADLINE = 120.0

BACKENDS: dict[str, tuple[Callable[[], str], Callable[[], str | None]]] = {
    "native": (lambda: f"native://{tempfile.mkdtemp(prefix='polybus-compare-')}", lambda: None),
    "kafka": (lambda: f"kafka://{servers.kafka_bootstrap()}", servers.kafka_unavailable),
    # the Kafka workload through confluent-kafka alone, on the same broker
    "kafka-raw": (servers.kafka_bootstrap, servers.kafka_unavailable),
    "rabbitmq": (servers.rabbitmq_url, servers.rabbitmq_unavailable),
    "redis": (servers.redis_url, servers.redis_unavailable),
}


def each_backend(names: str, measure: Callable[[str, str], T]) -> tuple[list[T], bool]:
    """``measure(name, url)`` on each backend in the comma-separated ``names`` that is
    reachable; a failure is reported and the others go on. Returns (rows, failed)."""
    rows, failed = [], False
    for name in names.split(","):
        make_url, unavailable = BACKENDS[name]
        reason = unavailable()
        if reason:
            print(f"{name}: skipped ({reason})", file=sys.stderr)
            continue
        try:
            rows.append(measure(name, make_url()))
        except Exception as exc:  # report the backend and go on with the others
            failed = True
            print(f"{name}: FAILED {exc!r}", file=sys.stderr)
    return rows, failed


def throughput(url: str, count: int) -> tuple[float, float]:
    topic = f"cmp-{uuid.uuid4().hex[:8]}"
    with polybus.connect(url) as bus:
        bus.declare(topic, partitions=1, groups=["g"])
        started = time.perf_counter()
        for start in range(0, count, 1000):
            bus.publish_many(topic, [PAYLOAD] * min(1000, count - start))
        publish = count / (time.perf_counter() - started)
        with bus.subscribe(topic, "g") as sub:
            got, first = 0, 0.0
            end = time.monotonic() + DEADLINE
            while got < count:
                if time.monotonic() > end:
                    raise RuntimeError(f"consumed only {got} of {count}")
                batch = sub.fetch(1000, timeout=1.0)
                if batch and not first:
                    first = time.perf_counter()
                for d in batch:
                    d.ack()
                got += len(batch)
            consume = count / (time.perf_counter() - first)
    return publish, consume


def latency(url: str, seconds: float) -> tuple[float, float]:
    topic = f"cmp-{uuid.uuid4().hex[:8]}"
    with polybus.connect(url) as bus:
        bus.declare(topic, partitions=1, groups=["g"])
        with bus.subscribe(topic, "g") as sub:

            def receive() -> list[tuple[bytes, float]]:
                batch = sub.fetch(100, timeout=0.1)
                for d in batch:
                    d.ack()
                return [(d.message.value, d.message.timestamp) for d in batch]

            return measure_latency(lambda value: bus.publish(topic, value), receive, seconds)


def measure_latency(
    publish: Callable[[bytes], object],
    receive: Callable[[], list[tuple[bytes, float]]],
    seconds: float,
) -> tuple[float, float]:
    """p50 and p99 in µs of receive time minus creation time, with ``receive`` (value and
    creation time of what arrived) called in its own thread, while this one calls
    ``publish`` (confirmed on return) once a millisecond."""
    samples: list[float] = []
    ready = threading.Event()
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            for value, created in receive():
                if value != b"warmup":
                    samples.append(time.time() - created)
                ready.set()

    reader = threading.Thread(target=consume)
    reader.start()
    try:
        end = time.monotonic() + DEADLINE
        while not ready.is_set():  # wait for the group to be joined and flowing
            if time.monotonic() > end:
                raise RuntimeError("the consumer never received the warm-up message")
            publish(b"warmup")
            ready.wait(0.5)
        n = int(seconds * 1000) + WARMUP
        next_at = time.perf_counter()
        for _ in range(n):
            publish(PAYLOAD)
            next_at += 0.001
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        while len(samples) < n and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        stop.set()
        reader.join()
    kept = sorted(samples[WARMUP:])
    if len(kept) < n - WARMUP:
        raise RuntimeError(f"received {len(samples)} of {n} latency messages")
    return kept[len(kept) // 2] * 1e6, kept[int(len(kept) * 0.99)] * 1e6


# -- the same workload with confluent-kafka alone, configured as the adapter is -----------


def raw_kafka(bootstrap: str) -> tuple[Any, Any, str]:
    """An idempotent ``acks=all`` producer, a consumer of a fresh group that commits
    itself, and the one-partition topic they share."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"cmp-raw-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 1)])[topic].result()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"})
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{topic}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    return producer, consumer, topic


def raw_kafka_throughput(bootstrap: str, count: int) -> tuple[float, float]:
    producer, consumer, topic = raw_kafka(bootstrap)
    started = time.perf_counter()
    for start in range(0, count, 1000):
        for _ in range(min(1000, count - start)):
            producer.produce(topic, PAYLOAD)
        producer.flush()  # the batch confirmed, as publish_many's
    publish = count / (time.perf_counter() - started)
    got, first = 0, 0.0
    end = time.monotonic() + DEADLINE
    while got < count:
        if time.monotonic() > end:
            raise RuntimeError(f"consumed only {got} of {count}")
        batch = [m for m in consumer.consume(1000, timeout=1.0) if m.error() is None]
        if batch and not first:
            first = time.perf_counter()
        if batch:
            consumer.commit(asynchronous=True)
        got += len(batch)
    consume = count / (time.perf_counter() - first)
    consumer.close()
    return publish, consume


def raw_kafka_latency(bootstrap: str, seconds: float) -> tuple[float, float]:
    producer, consumer, topic = raw_kafka(bootstrap)

    def publish(value: bytes) -> None:
        producer.produce(topic, value)
        producer.flush()

    def receive() -> list[tuple[bytes, float]]:
        # poll: a record as soon as one is there (consume(100, t) would wait for 100 of them)
        message = consumer.poll(0.1)
        if message is None or message.error() is not None:
            return []
        consumer.commit(asynchronous=True)
        return [(message.value(), message.timestamp()[1] / 1000)]

    try:
        return measure_latency(publish, receive, seconds)
    finally:
        consumer.close()


def chart(rows: list[tuple[str, float, float, float, float]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r[1] for r in rows], 0.4, label="publish")
    left.bar([i + 0.2 for i in x], [r[2] for r in rows], 0.4, label="consume + ack")
    left.set_yscale("log")
    left.set_ylabel("messages / s (log scale)")
    left.set_title("Throughput, 100-byte messages")
    right.bar([i - 0.2 for i in x], [r[3] for r in rows], 0.4, label="p50")
    right.bar([i + 0.2 for i in x], [r[4] for r in rows], 0.4, label="p99")
    right.set_yscale("log")
    right.set_ylabel("µs (log scale)")
    right.set_title("End-to-end latency at 1,000 msg/s")
    for ax in (left, right):
        ax.set_xticks(list(x), names)
        ax.legend()
    fig.suptitle("polybus: the same workload on every backend; kafka-raw is confluent-kafka alone")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--png", type=Path, default=Path(__file__).parent / "results/compare.png")
    args = parser.parse_args()

    def measure(name: str, url: str) -> tuple[str, float, float, float, float]:
        if name == "kafka-raw":
            pub, con = raw_kafka_throughput(url, args.count)
            p50, p99 = raw_kafka_latency(url, args.seconds)
        else:
            pub, con = throughput(url, args.count)
            p50, p99 = latency(url, args.seconds)
        tansu = name.startswith("kafka") and servers.kafka_is_tansu()
        label = f"{name} (Tansu)" if tansu else name
        return label, pub, con, p50, p99

    rows, failed = each_backend(args.backends, measure)
    print(f"\n{args.count} messages of {len(PAYLOAD)} bytes; latency at 1,000 msg/s")
    print(f"{'backend':13} {'publish/s':>11} {'consume/s':>11} {'p50 µs':>9} {'p99 µs':>9}")
    for name, pub, con, p50, p99 in rows:
        print(f"{name:13} {pub:11,.0f} {con:11,.0f} {p50:9,.0f} {p99:9,.0f}")
    if rows:
        chart(rows, args.png)
        print(f"chart: {args.png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
