"""What the reliability patterns cost, per backend, measured side by side in one run.

* Request-reply round trip: one :class:`Requester` against a responder worker
  on the same bus, sequential (each request answered before the next) and
  with 100 in flight (each latency is submit to reply); p50 and p99. Beside
  it, the backend's one-way latency measured the way ``compare.py`` does
  (publish one message every millisecond, each confirmed, receive time minus
  creation time). Target: round-trip p50 <= 2.5x one-way p50.
* The machinery: the same :class:`Consumer` processes ``--count`` messages
  with no failures, bare (no retries, no dead-letter topic, no inbox) and with
  a retry policy, a dead-letter topic and a memory inbox, in five alternating
  rounds; the medians. Target: with them >= 0.85x the speed without, taken
  as the ratio of process CPU per message (bare / with all): the machinery
  runs in this process, while wall-clock speed on a broker like Tansu swings
  more between rounds than the machinery costs. Both are printed.

    python benchmarks/patterns.py [--count 20000] [--seconds 2] [--backends native,redis]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import polybus
from compare import BACKENDS, each_backend, latency, round_trips  # measured alike
from polybus.patterns.inbox import MemoryInbox
from polybus.patterns.retry import NO_RETRY, RetryPolicy
from polybus.patterns.worker import Consumer

RR_TARGET = 2.5
MACHINERY_TARGET = 0.85


def _consume(url: str, count: int, full: bool) -> tuple[float, float]:
    """(messages per second, process CPU µs per message) through one Consumer, bare or
    with everything on."""
    topic = f"mach-{uuid.uuid4().hex[:8]}"
    with polybus.connect(url) as bus:
        bus.declare(topic, partitions=1, groups=["g"])
        for start in range(0, count, 1000):
            bus.publish_many(topic, [b"x" * 100] * min(1000, count - start))
        consumer = Consumer(
            bus,
            topic,
            lambda d: d.message.value,
            group="g",
            retry=RetryPolicy() if full else NO_RETRY,
            dead_letters=full,
            inbox=MemoryInbox() if full else None,
            batch=1000,
        ).start()
        while not consumer.poll(1.0):  # the group join is not part of the work
            pass
        started, cpu = time.perf_counter(), time.process_time()
        end = time.monotonic() + 300
        while consumer.stats.processed < count:
            if time.monotonic() > end or consumer.stats.failed:
                raise RuntimeError(f"processed {consumer.stats} of {count}")
            consumer.poll(1.0)
        n = count - 1000
        speed = n / (time.perf_counter() - started)
        cpu_us = (time.process_time() - cpu) / n * 1e6
        consumer.stop()
    return speed, cpu_us


def machinery(url: str, count: int, rounds: int = 5) -> tuple[float, float, float, float]:
    """Medians of (bare msg/s, full msg/s, bare CPU µs/msg, full CPU µs/msg) over
    alternating rounds, so a change in the machine's load lands on both."""
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(rounds):
        for full in (False, True):
            runs[full].append(_consume(url, count, full))

    def median(full: bool, i: int) -> float:
        return sorted(r[i] for r in runs[full])[rounds // 2]

    return median(False, 0), median(True, 0), median(False, 1), median(True, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()

    def measure(name: str, url: str) -> tuple[Any, ...]:
        return (
            name,
            latency(url, args.seconds),
            round_trips(url, args.seconds),
            machinery(url, args.count),
        )

    rows, failed = each_backend(args.backends, measure)
    print("\nlatency in µs (p50 / p99); round trip ratio = sequential p50 / one-way p50")
    print(
        f"{'backend':9} {'one-way':>15} {'round trip':>15} {'ratio':>6}  {'100 in flight':>17}"
        f"   {'bare msg/s':>10} {'with all':>10}  {'CPU µs/msg':>13} {'ratio':>6}"
    )
    for name, (o50, o99, _rate), (s50, s99, p50, p99), (bare, full, bare_cpu, full_cpu) in rows:
        rr_ratio, m_ratio = s50 / o50, bare_cpu / full_cpu
        rr_flag = "" if rr_ratio <= RR_TARGET else " ✗"
        m_flag = "" if m_ratio >= MACHINERY_TARGET else " ✗"
        print(
            f"{name:9} {o50:7,.0f} / {o99:5,.0f} {s50:7,.0f} / {s99:5,.0f} "
            f"{rr_ratio:6.2f}{rr_flag:2} {p50:8,.0f} / {p99:6,.0f}   "
            f"{bare:10,.0f} {full:10,.0f}  {bare_cpu:5.1f} / {full_cpu:5.1f} {m_ratio:6.2f}{m_flag}"
        )
    print(
        f"targets: round trip p50 <= {RR_TARGET}x one-way p50; "
        f"with retries, DLQ and inbox >= {MACHINERY_TARGET}x bare (✗ marks a miss)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
