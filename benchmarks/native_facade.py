"""The native engine through the facade, as a user calls it, beside the engine and queuelib.

Every figure is measured side by side in one run: each round runs every case
once, in an order that rotates from round to round, so all of them share the
machine's load; the table gives the median of the rounds and their range.
Payloads are 100 random bytes; logs use ``fsync=interval``, groups are durable
and acks are committed before the clock stops.

* **put+get** (target: at least queuelib's rate): ``bus.publish_many`` of N values in
  batches of 1,000 (each a UUIDv7 id and a timestamp in its envelope), then a
  durable group reads them back, ``sub.fetch(1000)``, every ``d.value`` read,
  ``sub.ack(deliveries)``, and ``sub.commit()`` at the end; timed together
  against queuelib's ``FifoDiskQueue`` push of N then pop of N (one process,
  no fsync), the peer ``native_engine.py`` compares the engine with.
* **consume** (target ≥ 50 % of the engine's rate): one topic of one
  partition, filled through the facade (not timed), read to the end by two
  durable groups: one through ``Consumer.poll(1000)`` + ``ack`` (the engine),
  one through the facade as above.
* **latency** (target p50 ≤ 100 µs, p99 ≤ 300 µs): a child process calls
  ``bus.publish(value)`` 1,000 times a second, each value stamped with
  ``perf_counter_ns()``; this process reads with ``sub.fetch(100, timeout=1)``
  on an ephemeral subscriber. Beside it the engine's own figure
  (``Partition.append`` in the child, ``Consumer.poll`` here), from
  ``native_engine.py``.

    python benchmarks/native_facade.py [--count 200000] [--rounds 3] [--seconds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import native_engine as engine  # the neighbouring benchmark: peers, payloads, latency plumbing
import polybus

TOPIC, GROUP = engine.TOPIC, engine.GROUP
BATCH = 1000


def bus_at(path: Path) -> polybus.Bus:
    return polybus.connect(f"native://{path}?fsync=interval")


def facade_drain(sub: polybus.Subscriber, n: int) -> object:
    """fetch + read every value + ack until ``n`` were read, then commit; the last value."""
    seen, last, idle_since = 0, None, time.monotonic()
    while seen < n:
        deliveries = sub.fetch(BATCH, timeout=0.1)
        if not deliveries:
            if time.monotonic() - idle_since > engine.STALL_SECONDS:
                raise engine.BenchmarkError(f"subscriber stalled after {seen} of {n}")
            continue
        for delivery in deliveries:
            last = delivery.value
        sub.ack(deliveries)
        seen += len(deliveries)
        idle_since = time.monotonic()
    if seen != n:
        raise engine.BenchmarkError(f"subscriber read {seen} messages, expected {n}")
    sub.commit()
    return last


def publish_all(bus: polybus.Bus, values: Sequence[bytes]) -> None:
    for start in range(0, len(values), BATCH):
        bus.publish_many(TOPIC, values[start : start + BATCH])


# ----------------------------------------------------------------------------- cases


def queuelib_put_get(root: Path, values: Sequence[bytes]) -> float:
    return engine.peer_rate(root, "queuelib", engine.peer_queuelib, values)


def facade_put_get(root: Path, values: Sequence[bytes]) -> float:
    with engine.fresh_dir(root, "facade-putget") as path, bus_at(path) as bus:
        bus.declare(TOPIC, partitions=1, groups=[GROUP])
        with bus.subscribe(TOPIC, GROUP) as sub:
            start = time.perf_counter()
            publish_all(bus, values)
            last = facade_drain(sub, len(values))
            elapsed = time.perf_counter() - start
    engine.check_last(values[-1], last, "facade put+get")
    return engine.rate(len(values), elapsed)


def filled_topic(root: Path, values: Sequence[bytes], groups: Sequence[str]) -> Path:
    """A log whose topic holds ``values``, published through the facade, and ``groups``."""
    path = Path(tempfile.mkdtemp(prefix="consume-", dir=root))
    with bus_at(path) as bus:
        bus.declare(TOPIC, partitions=1, groups=groups)
        publish_all(bus, values)
    return path


def engine_consume(path: Path, values: Sequence[bytes], group: str) -> float:
    with engine.open_log(path) as log, log.consumer(TOPIC, group=group) as consumer:
        start = time.perf_counter()
        last = engine.drain(consumer, len(values), max_records=BATCH, timeout=0)
        consumer.commit()
        elapsed = time.perf_counter() - start
    engine.check_last(values[-1], last, "engine consume")
    return engine.rate(len(values), elapsed)


def facade_consume(path: Path, values: Sequence[bytes], group: str) -> float:
    with bus_at(path) as bus, bus.subscribe(TOPIC, group) as sub:
        start = time.perf_counter()
        last = facade_drain(sub, len(values))
        elapsed = time.perf_counter() - start
    engine.check_last(values[-1], last, "facade consume")
    return engine.rate(len(values), elapsed)


def facade_latency(root: Path, seconds: float) -> tuple[float, float]:
    """p50 and p99 cross-process ``bus.publish`` to ``sub.fetch`` latency, in µs."""
    count = int(seconds * engine.LATENCY_RATE)
    with engine.fresh_dir(root, "facade-latency") as path, bus_at(path) as bus:
        bus.declare(TOPIC, partitions=1)
        with bus.subscribe(TOPIC, start="earliest") as sub:
            child = spawn_publisher(path, count)
            latencies: list[int] = []
            deadline = time.monotonic() + engine.CHILD_STARTUP_SECONDS + seconds
            try:
                while len(latencies) < count:
                    deliveries = sub.fetch(100, timeout=1.0)
                    received = time.perf_counter_ns()
                    latencies += [received - engine.sent_ns(d.value) for d in deliveries]
                    if not deliveries and (
                        child.poll() not in (None, 0) or time.monotonic() > deadline
                    ):
                        raise engine.child_failure(child, "facade latency publisher")
            finally:
                child.wait()
    cuts = statistics.quantiles(latencies[engine.WARMUP_RECORDS :], n=100, method="inclusive")
    return cuts[49] / 1000, cuts[98] / 1000


def spawn_publisher(path: Path, count: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(Path(__file__).resolve()), "--publisher", str(path), str(count)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_publisher(path: Path, count: int) -> None:
    """The child: ``bus.publish`` of ``count`` stamped values, LATENCY_RATE a second."""
    padding = bytes(engine.PAYLOAD_BYTES - engine.STAMP.size)
    interval_ns = 1_000_000_000 // engine.LATENCY_RATE
    with bus_at(path) as bus:
        bus.declare(TOPIC, partitions=1)
        publish, pack = bus.publish, engine.STAMP.pack
        start = time.perf_counter_ns()
        for i in range(count):
            delay = start + i * interval_ns - time.perf_counter_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            publish(TOPIC, pack(time.perf_counter_ns()) + padding)


# ----------------------------------------------------------------------------- table


def spread(samples: Sequence[float], unit: str) -> str:
    return f"{statistics.median(samples):>11,.0f} {unit}  ({min(samples):,.0f}-{max(samples):,.0f})"


def ratio_line(name: str, ratios: Sequence[float], target: float) -> str:
    median = statistics.median(ratios)
    mark = "✓" if median >= target else "✗"
    low, high = min(ratios), max(ratios)
    return f"  {name:<38} {median:5.2f}  ({low:.2f}-{high:.2f})  target ≥ {target:.2f} {mark}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="latency run length")
    parser.add_argument("--publisher", nargs=2, metavar=("PATH", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.publisher:
        run_publisher(Path(args.publisher[0]), int(args.publisher[1]))
        return 0
    values = engine.messages(engine.make_payloads(), args.count)
    sizes = engine.QUICK if args.seconds < 2 else engine.FULL
    sizes = type(sizes)(**{**sizes.__dict__, "latency_seconds": args.seconds})
    figures: dict[str, list[float]] = {}

    with tempfile.TemporaryDirectory(prefix="polybus-facade-") as tmp:
        root = Path(tmp)
        rounds = range(args.rounds)  # a group per round and reader: each reads the whole topic
        filled = filled_topic(root, values, [f"{r}-{n}" for r in rounds for n in ("e", "f")])
        cases: list[tuple[str, Callable[[int], float | tuple[float, float]]]] = [
            ("queuelib put+get", lambda r: queuelib_put_get(root, values)),
            ("facade put+get", lambda r: facade_put_get(root, values)),
            ("engine consume", lambda r: engine_consume(filled, values, f"{r}-e")),
            ("facade consume", lambda r: facade_consume(filled, values, f"{r}-f")),
            ("engine latency", lambda r: engine.engine_latency(root, sizes)),
            ("facade latency", lambda r: facade_latency(root, args.seconds)),
        ]
        for r in rounds:
            shift = r % len(cases)
            for name, case in cases[shift:] + cases[:shift]:
                got = case(r)
                if isinstance(got, tuple):
                    figures.setdefault(f"{name} p50", []).append(got[0])
                    figures.setdefault(f"{name} p99", []).append(got[1])
                else:
                    figures.setdefault(name, []).append(got)

    # ratios are taken round by round, then summarised
    put_get = [
        f / q for f, q in zip(figures["facade put+get"], figures["queuelib put+get"], strict=True)
    ]
    consume = [
        f / e for f, e in zip(figures["facade consume"], figures["engine consume"], strict=True)
    ]
    print(
        f"\nnative through the facade: {args.count:,} messages of 100 bytes, "
        f"{args.rounds} alternating rounds; median (range)"
    )
    for name in ("queuelib put+get", "facade put+get", "engine consume", "facade consume"):
        print(f"  {name:<38} {spread(figures[name], 'msg/s')}")
    for name in ("engine latency", "facade latency"):
        p50, p99 = figures[f"{name} p50"], figures[f"{name} p99"]
        print(
            f"  {name + ' p50 / p99':<38} {statistics.median(p50):11.0f} / "
            f"{statistics.median(p99):.0f} µs  ({min(p50):.0f}-{max(p50):.0f} / "
            f"{min(p99):.0f}-{max(p99):.0f})"
        )
    print(ratio_line("put+get: facade / queuelib", put_get, 1.0))
    print(ratio_line("consume: facade / engine", consume, 0.5))
    p50, p99 = (
        statistics.median(figures["facade latency p50"]),
        statistics.median(figures["facade latency p99"]),
    )
    mark = "✓" if p50 <= 100 and p99 <= 300 else "✗"
    name = "latency: facade p50 / p99"
    print(f"  {name:<38} {p50:5.0f} / {p99:.0f} µs  target ≤ 100 / 300 µs {mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
