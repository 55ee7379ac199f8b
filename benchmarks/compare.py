"""One workload on every backend: throughput and end-to-end latency, as a table and a chart.

For each of native, Kafka, RabbitMQ and Redis, through the same polybus code:

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
from typing import TypeVar

import polybus
from polybus.testing import servers

T = TypeVar("T")
PAYLOAD = os.urandom(100)
WARMUP = 200
DEADLINE = 120.0

BACKENDS: dict[str, tuple[Callable[[], str], Callable[[], str | None]]] = {
    "native": (lambda: f"native://{tempfile.mkdtemp(prefix='polybus-compare-')}", lambda: None),
    "kafka": (lambda: f"kafka://{servers.kafka_bootstrap()}", servers.kafka_unavailable),
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
    samples: list[float] = []
    ready = threading.Event()
    stop = threading.Event()
    with polybus.connect(url) as bus:
        bus.declare(topic, partitions=1, groups=["g"])
        sub = bus.subscribe(topic, "g")

        def consume() -> None:
            while not stop.is_set():
                for d in sub.fetch(100, timeout=0.1):
                    now = time.time()
                    if d.message.value != b"warmup":
                        samples.append(now - d.message.timestamp)
                    d.ack()
                    ready.set()

        reader = threading.Thread(target=consume)
        reader.start()
        end = time.monotonic() + DEADLINE
        while not ready.is_set():  # wait for the group to be joined and flowing
            if time.monotonic() > end:
                raise RuntimeError("the consumer never received the warm-up message")
            bus.publish(topic, b"warmup")
            ready.wait(0.5)
        n = int(seconds * 1000) + WARMUP
        next_at = time.perf_counter()
        for _ in range(n):
            bus.publish(topic, PAYLOAD)
            next_at += 0.001
            pause = next_at - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
        while len(samples) < n and time.monotonic() < end:
            time.sleep(0.01)
        stop.set()
        reader.join()
        sub.close()
    kept = sorted(samples[WARMUP:])
    if len(kept) < n - WARMUP:
        raise RuntimeError(f"received {len(samples)} of {n} latency messages")
    return kept[len(kept) // 2] * 1e6, kept[int(len(kept) * 0.99)] * 1e6


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
    fig.suptitle("polybus: the same workload on every backend")
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
        pub, con = throughput(url, args.count)
        p50, p99 = latency(url, args.seconds)
        label = "kafka (Tansu)" if name == "kafka" and servers.kafka_is_tansu() else name
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
