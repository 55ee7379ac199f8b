"""The conformance test of :mod:`polybus.otel.metrics`: the same counts on every backend,
read with the OpenTelemetry SDK's in-memory reader (skipped without the SDK).

Import it into a test module (``from polybus.testing.otel_metrics import *``) with the
fixtures of :mod:`polybus.testing.plugin` registered.
"""

from __future__ import annotations

from typing import Any

import pytest

from polybus import CapabilityError, Delivery
from polybus.patterns.retry import RetryPolicy
from polybus.patterns.worker import Consumer

from .patterns import Connect, run_until

__all__ = ["test_metrics_count_what_a_consumer_does_with_its_attributes"]

Point = tuple[str, frozenset[tuple[str, Any]]]


def _points(reader: Any) -> dict[Point, Any]:
    """``{(instrument, attributes): value}`` of what ``reader`` collects now; a histogram's
    value is its count."""
    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for p in metric.data.data_points:
                    value = p.count if hasattr(p, "bucket_counts") else p.value
                    points[metric.name, frozenset(p.attributes.items())] = value
    return points


def test_metrics_count_what_a_consumer_does_with_its_attributes(
    connect: Connect, topic: str
) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    export = pytest.importorskip("opentelemetry.sdk.metrics.export")
    from polybus.otel.metrics import Metrics

    reader = export.InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    bus = connect()
    metrics = Metrics(provider)
    bus.use(metrics)
    bus.declare(topic, partitions=1, groups=["g"])

    def handle(d: Delivery) -> None:
        if d.message.value == "poison":
            raise ValueError("cannot")

    policy = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0.0)
    consumer = Consumer(bus, topic, handle, group="g", retry=policy).start()
    bus.publish_many(topic, ["a", "poison", "b", "c"])
    stats = consumer.stats
    run_until([consumer], lambda: stats.processed == 3 and stats.dead_lettered == 1)
    consumer.stop()  # commits: the group's lag is 0
    points = _points(reader)
    provider.shutdown()

    system = metrics.system  # from the bus's wire protocol
    retries, dlq = consumer.retry_topic, consumer.dead_letter_topic

    def at(topic: str, group: str | None = None, **more: str) -> frozenset[tuple[str, Any]]:
        attributes = {"messaging.system": system, "messaging.destination.name": topic}
        if group is not None:
            attributes["messaging.consumer.group.name"] = group
        return frozenset((attributes | more).items())

    send = {"messaging.operation.name": "send"}
    receive = {"messaging.operation.name": "receive"}
    process = {"messaging.operation.name": "process"}
    failed = {"error.type": "ValueError"}
    expected = {
        ("messaging.client.sent.messages", at(topic, **send)): 4,
        ("messaging.client.sent.messages", at(retries, **send)): 1,
        ("messaging.client.sent.messages", at(dlq, **send)): 1,
        ("messaging.client.consumed.messages", at(topic, "g", **receive)): 4,
        ("messaging.client.consumed.messages", at(retries, retries, **receive)): 1,
        ("messaging.process.duration", at(topic, "g", **process)): 3,
        ("messaging.process.duration", at(topic, "g", **process, **failed)): 1,
        ("messaging.process.duration", at(retries, retries, **process, **failed)): 1,
        ("polybus.consumer.retried.messages", at(topic, "g", **failed)): 1,
        (
            "polybus.consumer.dead_lettered.messages",
            at(retries, retries, **failed, **{"polybus.dead_letter.reason": "exhausted"}),
        ): 1,
        ("polybus.consumer.in_flight.messages", at(topic, "g")): 0,
        ("polybus.consumer.in_flight.messages", at(retries, retries)): 0,
    }
    lag = {k: v for k, v in points.items() if k[0] == "polybus.consumer.lag"}
    assert {k: v for k, v in points.items() if k[0] != "polybus.consumer.lag"} == expected
    assert isinstance(system, str)
    assert system
    try:  # the gauge reports what Bus.stats says: 0, all committed at stop
        (stated,) = bus.stats([topic], ["g"]).topics[topic].groups["g"].lag
    except CapabilityError:  # a backend without stats: no lag
        stated = None
    assert stated in (0, None)  # None: the backend cannot say
    partition = at(topic, "g", **{"messaging.destination.partition.id": "0"})
    assert lag.get(("polybus.consumer.lag", partition)) == stated
