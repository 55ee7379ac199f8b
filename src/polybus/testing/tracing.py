"""The conformance suite of :mod:`polybus.otel.tracing`: one trace from producer to
consumer to what it publishes, through retries, dead letters and request-reply, on
every backend. Needs ``opentelemetry-sdk`` (its in-memory exporter).

Import these tests into a test module (``from polybus.testing.tracing import *``)
with the fixtures of :mod:`polybus.testing.plugin` registered.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from polybus import Delivery
from polybus.otel.tracing import SYSTEMS, Tracing
from polybus.patterns.request_reply import Requester
from polybus.patterns.retry import RetryPolicy
from polybus.patterns.worker import App, Consumer, Output, Worker

from .patterns import DEADLINE, Connect, run_until

__all__ = [
    "test_a_trace_follows_a_message_through_retries_dead_letters_and_outputs",
    "test_a_trace_follows_a_request_to_its_reply",
]


def _tracing() -> tuple[Tracing, InMemorySpanExporter, trace.Tracer]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(tracer_provider=provider), exporter, provider.get_tracer("test")


def _parent(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    (parent,) = [s for s in spans if s.context.span_id == span.parent.span_id]
    return parent


def test_a_trace_follows_a_message_through_retries_dead_letters_and_outputs(
    connect: Connect, topic: str
) -> None:
    tracing, exporter, tracer = _tracing()
    bus = connect()
    bus.use(tracing)
    bus.declare(topic, partitions=1, groups=["g"])
    tries: dict[str, int] = {}

    def handle(d: Delivery) -> Output | None:
        tries[d.message.value] = tries.get(d.message.value, 0) + 1
        if d.message.value == "poison" or tries[d.message.value] == 1:
            raise ValueError(f"{d.message.value} failed")
        return Output(f"{topic}-out", "result")

    policy = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0.0)
    consumer = Consumer(bus, topic, handle, group="g", retry=policy).start()
    with tracer.start_as_current_span("checkout") as checkout:
        bus.publish(topic, "job")
    bus.publish(topic, "poison")
    run_until([consumer], lambda: consumer.stats.processed + consumer.stats.dead_lettered == 2)
    consumer.stop()
    spans = list(exporter.get_finished_spans())

    # job: checkout -> send -> process (failed) -> send retry -> process -> send output
    job = [s for s in spans if s.context.trace_id == checkout.get_span_context().trace_id]
    output = next(s for s in job if s.name == f"send {topic}-out")
    done = _parent(output, spans)
    retry = _parent(done, spans)
    failed = _parent(retry, spans)
    sent = _parent(failed, spans)
    assert [s.name for s in (sent, failed, retry, done)] == [
        f"send {topic}",
        f"process {topic}",
        f"send {topic}.g.retry",
        f"process {topic}.g.retry",
    ]
    assert _parent(sent, spans).name == "checkout"
    assert (sent.kind, failed.kind, output.kind) == (
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.PRODUCER,
    )
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "ValueError"
    assert done.status.status_code is StatusCode.UNSET
    assert [link.context.span_id for link in failed.links] == [sent.context.span_id]
    attributes = dict(failed.attributes)
    assert attributes["messaging.destination.name"] == topic
    assert attributes["messaging.system"] == SYSTEMS[bus.wire_protocol]
    assert attributes["messaging.consumer.group.name"] == "g"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.message.id"] == dict(sent.attributes or {})["messaging.message.id"]
    received = [s for s in spans if s.name == f"receive {topic}"]
    assert received
    assert all(s.kind is SpanKind.CLIENT for s in received)
    assert sent.context.span_id in {link.context.span_id for s in received for link in s.links}

    # poison: its dead letter is sent from within the try that gave up
    dead = next(s for s in spans if s.name == f"send {topic}.g.dlq")
    gave_up = _parent(dead, spans)
    assert gave_up.name == f"process {topic}.g.retry"
    assert gave_up.status.status_code is StatusCode.ERROR


def test_a_trace_follows_a_request_to_its_reply(connect: Connect, topic: str) -> None:
    tracing, exporter, tracer = _tracing()
    app = App(middleware=[tracing])

    @app.responder(topic)
    def double(d: Delivery) -> Any:
        return d.message.value * 2

    worker = Worker(app, connect()).start()
    try:
        requesting = connect()
        requesting.use(tracing)
        with (
            Requester(requesting, topic, timeout=DEADLINE) as requester,
            tracer.start_as_current_span("ask") as ask,
        ):
            assert requester.request(21).value == 42
    finally:
        worker.stop()
    spans = exporter.get_finished_spans()
    trace_id = ask.get_span_context().trace_id
    names = {s.name for s in spans if s.context.trace_id == trace_id}
    assert {f"send {topic}", f"process {topic}"} <= names
    (answered,) = [s for s in spans if s.name == f"process {topic}"]
    reply = next(s for s in spans if s.parent and s.parent.span_id == answered.context.span_id)
    assert reply.kind is SpanKind.PRODUCER  # the reply, sent from the responder's process
