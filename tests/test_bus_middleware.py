"""Middleware on the bus: what the conformance suite does not cover (it runs the hooks on
every backend in polybus.testing.patterns)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import polybus
from polybus import ConfigurationError, Delivery, Middleware, aio
from polybus.middleware import Host, ProcessNext, PublishNext
from polybus.patterns.worker import App
from polybus.types import OutRecord, Receipt

REQUEST = contextvars.ContextVar("request", default="none")


class Stamp(Middleware):
    """Puts the current REQUEST in a header of whatever it publishes, and sets REQUEST
    to a delivery's header around its processing."""

    def publish(
        self, topic: str, records: Sequence[OutRecord], call_next: PublishNext
    ) -> list[Receipt]:
        stamped = [r._replace(headers=(*r.headers, ("x-request", REQUEST.get()))) for r in records]
        return call_next(topic, stamped)

    def process(self, delivery: Delivery, call_next: ProcessNext) -> Any:
        token = REQUEST.set(f"handling {delivery.header('x-request')}")
        try:
            return call_next(delivery)
        finally:
            REQUEST.reset(token)


def test_a_bus_without_publish_hooks_calls_the_backend_directly(tmp_path: Path) -> None:
    class OnlyProcess(Middleware):
        def process(self, delivery: Delivery, call_next: ProcessNext) -> Any:
            return call_next(delivery)

    with polybus.connect(f"native://{tmp_path}", middleware=[OnlyProcess()]) as bus:
        assert bus._publish == bus.backend.publish  # no wrapper on the hot path
        bus.use(Stamp())
        assert bus._publish != bus.backend.publish


def test_use_refuses_what_is_not_a_middleware(tmp_path: Path) -> None:
    refused = pytest.raises(ConfigurationError, match=r"subclass polybus\.middleware\.Middleware")
    with polybus.connect(f"native://{tmp_path}") as bus, refused:
        bus.use(object())  # type: ignore[arg-type]


def test_a_middleware_is_attached_to_each_bus_and_may_refuse_one(tmp_path: Path) -> None:
    class NativeOnly(Middleware):
        def __init__(self) -> None:
            self.buses: list[str] = []

        def attach(self, bus: Host) -> None:
            if bus.wire_protocol != "native":
                raise ConfigurationError("native buses only")
            self.buses.append(bus.wire_protocol)

    class Refusing(Middleware):
        def attach(self, bus: Host) -> None:
            raise ConfigurationError("not this bus")

    first = NativeOnly()
    with polybus.connect(f"native://{tmp_path}", middleware=[first]) as bus:
        assert first.buses == ["native"]
        with pytest.raises(ConfigurationError, match="not this bus"):
            bus.use(Stamp(), Refusing())
        assert bus.middleware == (first,)  # neither was added


def test_a_transactions_staged_publishes_go_through_the_publish_hooks(tmp_path: Path) -> None:
    with polybus.connect(f"native://{tmp_path}", middleware=[Stamp()]) as bus:
        bus.declare("in", partitions=1, groups=["g"])
        bus.declare("out", partitions=1, groups=["g"])
        bus.publish("in", "x")
        with bus.subscribe("in", "g") as sub:
            (d,) = sub.fetch(10, timeout=5)
            token = REQUEST.set("in a transaction")
            with bus.transaction(sub) as tx:
                tx.publish("out", "y")
                tx.ack(d)
            REQUEST.reset(token)
        with bus.subscribe("out", "g") as sub:
            (out,) = sub.fetch(10, timeout=5)
    assert out.header("x-request") == "in a transaction"


def test_async_code_and_coroutine_handlers_see_the_middlewares_context(tmp_path: Path) -> None:
    app = App(middleware=[Stamp()])
    replies: list[str | None] = []

    @app.consumer("in", group="g")
    async def handle(d: Delivery) -> None:
        replies.append(REQUEST.get())  # set by the process hook in the consumer's thread

    async def main() -> None:
        bus = await aio.connect(f"native://{tmp_path}")
        async with bus, aio.AsyncWorker(app, bus):
            REQUEST.set("from a coroutine")
            await bus.publish("in", "job")  # run on a thread, in this context
            for _ in range(500):
                if replies:
                    break
                await asyncio.sleep(0.01)

    asyncio.run(main())
    assert replies == ["handling from a coroutine"]


def test_metrics_share_a_providers_instruments_and_keep_to_one_system() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from polybus.otel.metrics import Metrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    first, second = Metrics(provider), Metrics(provider)  # one app's bus, another's
    a = polybus.connect("memory://", middleware=[first])
    b = polybus.connect("memory://", middleware=[second])
    with a, b:
        a.publish("audit", "x")
        b.publish("audit", "y")
    (sent,) = (
        m
        for scope in reader.get_metrics_data().resource_metrics[0].scope_metrics
        for m in scope.metrics
        if m.name == "messaging.client.sent.messages"
    )
    assert [p.value for p in sent.data.data_points] == [2]  # both, under the same attributes
    provider.shutdown()

    class Kafka:
        wire_protocol = "kafka"

    with pytest.raises(ConfigurationError, match="give the kafka bus a Metrics of its own"):
        first.attach(Kafka())  # type: ignore[arg-type]
    assert first.system == "polybus"
