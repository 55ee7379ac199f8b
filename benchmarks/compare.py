"""The same workloads on every reachable backend: the Kafka vs RabbitMQ vs Redis table,
measured on your own brokers, with a chart (PNG) and the numbers (JSON).

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
  this host); the first ``WARMUP`` messages are dropped; p50 and p99. The rate
  really reached is printed beside it, and a backend that fell behind is named;
* request-reply: one ``Requester`` and a responder worker on the same bus, each
  request answered before the next; round-trip p50 and p99;
* what each backend offers (``bus.capabilities``) and the settings that decide
  its durability and latency (fsync, confirms, acks, linger, fetch wait), read
  from the adapter's defaults and, for Redis, from the server itself;
* every example (``examples/*``) run with ``--quick`` on the backend: its wall
  time and whether its invariant held.

Prints the tables and writes ``--png`` (default ``benchmarks/results/compare.png``)
and the same numbers as JSON beside it. Servers come from
``polybus.testing.servers``, as for the test suite (``make compare`` starts them).

    python benchmarks/compare.py [--count 20000] [--seconds 3] [--no-examples]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import polybus
from polybus.patterns.request_reply import Requester
from polybus.patterns.worker import App, Worker
from polybus.testing import servers

T = TypeVar("T")
PAYLOAD = os.urandom(100)
WARMUP = 200
DEADLINE = 120.0
RATE = 1000  # messages per second of the latency run
CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.parent.name for p in (CHECKOUT / "examples").glob("*/__main__.py"))

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


def latency(url: str, seconds: float) -> tuple[float, float, float]:
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
) -> tuple[float, float, float]:
    """p50 and p99 in µs of receive time minus creation time, with ``receive`` (value and
    creation time of what arrived) called in its own thread, while this one calls
    ``publish`` (confirmed on return) once a millisecond; and the rate really reached."""
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
        n = int(seconds * RATE) + WARMUP
        started = next_at = time.perf_counter()
        for _ in range(n):
            publish(PAYLOAD)
            next_at += 1 / RATE
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        rate = n / (time.perf_counter() - started)
        while len(samples) < n and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        stop.set()
        reader.join()
    kept = sorted(samples[WARMUP:])
    if len(kept) < n - WARMUP:
        raise RuntimeError(f"received {len(samples)} of {n} latency messages")
    return (*percentiles(kept), rate)


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 of ``samples`` (seconds), in µs."""
    kept = sorted(samples)
    return kept[len(kept) // 2] * 1e6, kept[int(len(kept) * 0.99)] * 1e6


def round_trips(url: str, seconds: float) -> tuple[float, float, float, float]:
    """Request-reply (sequential p50, p99, 100-in-flight p50, p99) in µs: one Requester
    against a responder worker on the same bus."""
    topic = f"rr-{uuid.uuid4().hex[:8]}"
    app = App()
    app.responder(topic)(lambda d: d.message.value)
    with polybus.connect(url) as bus:
        worker = Worker(app, bus).start()
        try:
            with Requester(bus, topic, timeout=60) as requester:
                for _ in range(50):  # the responder's group join, the reader's start
                    requester.request(b"warm-up")
                sequential: list[float] = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    started = time.perf_counter()
                    requester.request(b"x")
                    sequential.append(time.perf_counter() - started)
                parallel: list[float] = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    started = time.perf_counter()
                    futures = [requester.submit(b"x") for _ in range(100)]
                    for f in futures:
                        f.result()
                        parallel.append(time.perf_counter() - started)
        finally:
            worker.stop()
    return (*percentiles(sequential), *percentiles(parallel))


def capabilities(url: str) -> list[str]:
    with polybus.connect(url) as bus:
        return sorted(c.name or "" for c in polybus.Capability if c in bus.capabilities)


def settings(name: str, url: str) -> str:
    """What decides the backend's durability and latency in this run."""
    if name == "native":
        return "fsync=interval (1 s); a group commits acks in batches"
    if name == "kafka":
        return "acks=all, idempotent, linger.ms=5 (librdkafka), fetch.wait.max.ms=500"
    if name == "kafka-raw":
        return "acks=all, idempotent, linger.ms=5, flush per batch, fetch.wait.max.ms=500"
    if name == "rabbitmq":
        return "quorum queues, publisher confirms (window 1000), prefetch 1000, history stream"
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        config = client.config_get("appendonly") | client.config_get("appendfsync")
    finally:
        client.close()
    if config.get("appendonly") == "yes":
        durability = f"AOF, appendfsync={config.get('appendfsync')}"
    else:
        durability = "appendonly=no on this server: nothing survives its restart"
    return f"{durability}; XADD pipelined, XREADGROUP blocking"


def examples(url: str) -> dict[str, tuple[float, bool]]:
    """Each example's wall time with ``--quick`` on ``url`` and whether its invariant held."""
    results = {}
    for example in EXAMPLES:
        started = time.perf_counter()
        try:
            run = subprocess.run(
                [sys.executable, "-m", f"examples.{example}", "--url", url, "--quick"],
                cwd=CHECKOUT,
                capture_output=True,
                text=True,
                timeout=180,
            )
            ok = run.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        results[example] = (time.perf_counter() - started, ok)
    return results


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


def chart(rows: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["backend"] for r in rows]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    x = range(len(rows))

    def bars(ax: Any, first: str, second: str, labels: tuple[str, str]) -> None:
        ax.bar([i - 0.2 for i in x], [r[first] or 0 for r in rows], 0.4, label=labels[0])
        ax.bar([i + 0.2 for i in x], [r[second] or 0 for r in rows], 0.4, label=labels[1])
        ax.set_yscale("log")
        ax.set_xticks(list(x), names)
        ax.legend()

    bars(left, "publish", "consume", ("publish", "consume + ack"))
    left.set_ylabel("messages / s (log scale)")
    left.set_title("Throughput, 100-byte messages")
    bars(middle, "p50", "p99", ("p50", "p99"))
    middle.set_ylabel("µs (log scale)")
    middle.set_title(f"End-to-end latency at {RATE:,} msg/s")
    bars(right, "rtt_p50", "rtt_p99", ("p50", "p99"))
    right.set_ylabel("µs (log scale)")
    right.set_title("Request-reply round trip")
    fig.suptitle("polybus: the same workload on every backend; kafka-raw is confluent-kafka alone")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--no-examples", action="store_true", help="skip running the examples")
    parser.add_argument("--png", type=Path, default=Path(__file__).parent / "results/compare.png")
    args = parser.parse_args()

    def measure(name: str, url: str) -> dict[str, Any]:
        row: dict[str, Any] = {"backend": name, "settings": settings(name, url)}
        if name == "kafka-raw":
            row["publish"], row["consume"] = raw_kafka_throughput(url, args.count)
            row["p50"], row["p99"], row["rate"] = raw_kafka_latency(url, args.seconds)
            row["rtt_p50"] = row["rtt_p99"] = None
            row["capabilities"], row["examples"] = None, {}
            return row
        row["publish"], row["consume"] = throughput(url, args.count)
        row["p50"], row["p99"], row["rate"] = latency(url, args.seconds)
        row["rtt_p50"], row["rtt_p99"], _, _ = round_trips(url, args.seconds)
        row["capabilities"] = capabilities(url)
        row["examples"] = {} if args.no_examples else examples(url)
        if name.startswith("kafka") and servers.kafka_is_tansu():
            row["backend"] = f"{name} (Tansu)"
        return row

    rows, failed = each_backend(args.backends, measure)
    print(f"\n{args.count} messages of {len(PAYLOAD)} bytes; latency at {RATE:,} msg/s")
    print(
        f"{'backend':13} {'publish/s':>11} {'consume/s':>11} {'p50 µs':>9} {'p99 µs':>9}"
        f" {'rate/s':>7} {'rr p50 µs':>10} {'rr p99 µs':>10}"
    )
    for r in rows:
        behind = "" if r["rate"] >= 0.95 * RATE else "  fell behind the rate"
        rtt = "" if r["rtt_p50"] is None else f" {r['rtt_p50']:10,.0f} {r['rtt_p99']:10,.0f}"
        print(
            f"{r['backend']:13} {r['publish']:11,.0f} {r['consume']:11,.0f} {r['p50']:9,.0f}"
            f" {r['p99']:9,.0f} {r['rate']:7,.0f}{rtt}{behind}"
        )
    print("\nsettings")
    for r in rows:
        print(f"  {r['backend']:13} {r['settings']}")
    offered = [r for r in rows if r["capabilities"] is not None]
    if offered:
        every = sorted({c.name or "" for c in polybus.Capability})
        header = "".join(f" {r['backend']:>10}" for r in offered)
        print(f"\n{'capabilities':18}{header}")
        for capability in every:
            marks = ["yes" if capability in r["capabilities"] else "-" for r in offered]
            print(f"  {capability:16}" + "".join(f" {m:>10}" for m in marks))
    if any(r["examples"] for r in rows):
        header = "".join(f" {r['backend']:>14}" for r in offered)
        print(f"\n{'examples (--quick)':18}{header}   (wall time, invariant)")
        for example in EXAMPLES:
            cells = []
            for r in offered:
                seconds, ok = r["examples"].get(example, (0.0, False))
                cells.append(f" {seconds:6.1f} s {'OK' if ok else 'FAILED':>5}")
                failed |= not ok
            print(f"  {example:16}" + "".join(cells))
    if rows:
        chart(rows, args.png)
        args.png.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nchart: {args.png}; numbers: {args.png.with_suffix('.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
