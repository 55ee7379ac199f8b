"""What tracing and metrics cost a consumer: the same work with and without them, in one run.

A worker's :class:`~polybus.patterns.worker.Consumer` on the native engine handles
``--count`` messages (100 bytes each, published beforehand, not timed) with a
handler that does nothing, so the figure is the most the middleware can cost;
a handler that does real work pays the same microseconds a message on top of
its own. Cases, in an order that rotates from round to round:

* ``plain``: no middleware;
* ``hooks``: a middleware that overrides no hook (installed, disabled);
* ``tracing``: :class:`~polybus.otel.tracing.Tracing` with the OpenTelemetry SDK
  and a batch span processor whose exporter drops everything;
* ``tracing+metrics``: that and :class:`~polybus.otel.metrics.Metrics` with the
  SDK's meter provider and an in-memory reader (never read).

Each case's rate is compared with ``plain`` of the same round; the table gives
medians and ranges. Targets: with tracing and metrics, at least 0.8x;
disabled, no measurable cost.

    python benchmarks/observability.py [--count 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import polybus
from polybus import Delivery, Middleware
from polybus.otel.tracing import Tracing
from polybus.patterns.worker import Consumer

PAYLOAD = b"x" * 100
BATCH = 1000


class DropSpans(SpanExporter):
    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoHooks(Middleware):
    """Installed, overriding nothing."""


def tracing() -> list[Middleware]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DropSpans()))
    return [Tracing(tracer_provider=provider)]


def tracing_and_metrics() -> list[Middleware]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from polybus.otel.metrics import Metrics

    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return [*tracing(), Metrics(meter_provider=meters)]


def consume_rate(middleware: list[Middleware], count: int) -> float:
    """Messages a second a Consumer handles, from its start to the last one handled."""
    path = tempfile.mkdtemp(prefix="polybus-observability-")
    try:
        with polybus.connect(f"native://{path}", middleware=middleware) as bus:
            bus.declare("jobs", partitions=1, groups=["workers"])
            for start in range(0, count, BATCH):
                bus.publish_many("jobs", [PAYLOAD] * min(BATCH, count - start))
            handled = 0

            def handle(delivery: Delivery) -> None:
                nonlocal handled
                handled += 1

            consumer = Consumer(bus, "jobs", handle, group="workers", batch=BATCH).start()
            begin, deadline = time.perf_counter(), time.monotonic() + 300
            while handled < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"handled only {handled} of {count} in 300 s")
                consumer.poll(0.1)
            elapsed = time.perf_counter() - begin
            consumer.stop()
            return count / elapsed
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cases: list[tuple[str, Callable[[], list[Middleware]]]] = [
        ("plain", list),
        ("hooks", lambda: [NoHooks()]),
        ("tracing", tracing),
        ("tracing+metrics", tracing_and_metrics),
    ]
    rates: dict[str, list[float]] = {name: [] for name, _ in cases}
    for r in range(args.rounds):
        shift = r % len(cases)
        for name, middleware in cases[shift:] + cases[:shift]:
            rates[name].append(consume_rate(middleware(), args.count))
    print(
        f"\na Consumer on native://, {args.count:,} messages, a handler doing nothing, "
        f"{args.rounds} alternating rounds; msg/s and ratio to plain, median (range)"
    )
    for name, _ in cases:
        ratios = [rate / plain for rate, plain in zip(rates[name], rates["plain"], strict=True)]
        target = {"hooks": 0.95, "tracing+metrics": 0.8}.get(name)
        mark = "" if target is None else (" ✓" if statistics.median(ratios) >= target else " ✗")
        print(
            f"  {name:<16} {statistics.median(rates[name]):>9,.0f} "
            f"({min(rates[name]):,.0f}-{max(rates[name]):,.0f})   "
            f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            f"{'' if target is None else f'  target ≥ {target}'}{mark}"
        )
    per_message = 1e6 / statistics.median(rates["tracing"]) - 1e6 / statistics.median(
        rates["plain"]
    )
    print(f"  tracing adds about {per_message:.0f} µs a message (the SDK's span is most of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
