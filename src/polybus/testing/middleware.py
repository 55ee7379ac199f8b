"""The conformance suite of middleware (:mod:`polybus.middleware`): the same tests on
every backend, through a worker's consumer.

Import these tests into a test module (``from polybus.testing.middleware import *``)
with the fixtures of :mod:`polybus.testing.plugin` registered.
"""

from __future__ import annotations

from typing import Any

from polybus import Delivery, Middleware
from polybus.patterns.dlq import DeadLetters
from polybus.patterns.retry import RetryPolicy
from polybus.patterns.worker import Consumer, Output
from polybus.types import Receipt

from .patterns import Connect, run_until

__all__ = [
    "test_middleware_that_raises_loses_no_message",
    "test_middleware_wraps_publishing_and_processing_in_order",
]


class _Recorder(Middleware):
    """Writes down every hook it sees; stamps a header of its name on what it publishes."""

    def __init__(self, name: str, events: list[tuple[str, ...]]) -> None:
        self.name = name
        self.events = events

    def publish(self, topic: str, records: Any, call_next: Any) -> list[Receipt]:
        self.events.append((self.name, "publish", topic))
        stamped = [r._replace(headers=(*r.headers, (f"x-{self.name}", "1"))) for r in records]
        receipts: list[Receipt] = call_next(topic, stamped)
        self.events.append((self.name, "published", topic))
        return receipts

    def received(self, deliveries: list[Delivery]) -> None:
        self.events.append((self.name, "received", deliveries[0].topic))

    def process(self, delivery: Delivery, call_next: Any) -> Any:
        self.events.append((self.name, "process", delivery.message.value))
        try:
            return call_next(delivery)
        finally:
            self.events.append((self.name, "processed", delivery.message.value))

    def failed(self, delivery: Delivery, error: BaseException) -> None:
        self.events.append((self.name, "failed", delivery.message.value))

    def retrying(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        self.events.append((self.name, "retrying", delivery.message.value, str(error)))

    def dead_lettered(self, delivery: Delivery, error: BaseException, reason: str) -> None:
        self.events.append((self.name, "dead_lettered", delivery.message.value, reason))


def test_middleware_wraps_publishing_and_processing_in_order(connect: Connect, topic: str) -> None:
    events: list[tuple[str, ...]] = []
    bus = connect()
    bus.use(_Recorder("a", events), _Recorder("b", events))
    bus.declare(topic, partitions=1, groups=["g"])
    bus.declare(f"{topic}-out", partitions=1, groups=["g"])
    seen: list[dict[str, str]] = []

    def handle(d: Delivery) -> Output:
        seen.append(d.message.headers)
        events.append(("handler", d.message.value))
        return Output(f"{topic}-out", "answer")

    consumer = Consumer(bus, topic, handle, group="g").start()
    bus.publish(topic, "job")
    run_until([consumer], lambda: consumer.stats.processed == 1)
    consumer.stop()
    assert seen == [{"x-a": "1", "x-b": "1"}]  # both stamped what the handler got
    processing = [e for e in events if e[1] not in ("received",)]
    assert processing == [
        ("a", "publish", topic), ("b", "publish", topic),
        ("b", "published", topic), ("a", "published", topic),
        ("a", "process", "job"), ("b", "process", "job"), ("handler", "job"),
        ("a", "publish", f"{topic}-out"), ("b", "publish", f"{topic}-out"),  # the output
        ("b", "published", f"{topic}-out"), ("a", "published", f"{topic}-out"),
        ("b", "processed", "job"), ("a", "processed", "job"),
    ]  # fmt: skip
    assert [e for e in events if e[1] == "received"][:2] == [
        ("a", "received", topic),
        ("b", "received", topic),
    ]


class _Faulty(Middleware):
    """Raises in its process hook on a message's first try, and in every notification."""

    def __init__(self) -> None:
        self.tried: set[str] = set()

    def process(self, delivery: Delivery, call_next: Any) -> Any:
        if delivery.message.id not in self.tried:
            self.tried.add(delivery.message.id)
            raise RuntimeError("the middleware failed")
        return call_next(delivery)

    def received(self, deliveries: list[Delivery]) -> None:
        raise RuntimeError("a notification failed")

    def retrying(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        raise RuntimeError("a notification failed")


def test_middleware_that_raises_loses_no_message(connect: Connect, topic: str) -> None:
    events: list[tuple[str, ...]] = []
    bus = connect()
    bus.use(_Faulty(), _Recorder("r", events))
    bus.declare(topic, partitions=1, groups=["g"])
    handled: list[Any] = []

    def handle(d: Delivery) -> None:
        handled.append(d.message.value)
        if d.message.value == "poison":
            raise ValueError("cannot")

    policy = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0.0)
    consumer = Consumer(bus, topic, handle, group="g", retry=policy).start()
    bus.publish_many(topic, ["fine", "poison"])
    run_until([consumer], lambda: consumer.stats.processed + consumer.stats.dead_lettered == 2)
    consumer.stop()
    assert sorted(handled) == ["fine", "poison"]  # each first try was the middleware's failure
    assert ("r", "retrying", "fine", "the middleware failed") in events
    assert ("r", "dead_lettered", "poison", "exhausted") in events
    # a handler's failure is routed inside the process hooks: its dead letter is theirs
    gave_up = events.index(("r", "dead_lettered", "poison", "exhausted"))
    assert events[gave_up - 2 : gave_up + 4] == [
        ("r", "process", "poison"),
        ("r", "failed", "poison"),
        ("r", "dead_lettered", "poison", "exhausted"),
        ("r", "publish", f"{topic}.g.dlq"),
        ("r", "published", f"{topic}.g.dlq"),
        ("r", "processed", "poison"),
    ]
    with DeadLetters(connect(), topic, "g") as dead:
        assert [letter.message.value for letter in dead.list()] == ["poison"]
