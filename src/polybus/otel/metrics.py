"""Metrics through OpenTelemetry's metrics API, as middleware.

>>> bus = polybus.connect(url, middleware=[Metrics()])

The instruments, named after OpenTelemetry's messaging conventions where they
have a name for the thing, else under ``polybus.``:

================================================  ====================  =========
name                                              kind                  unit
================================================  ====================  =========
``messaging.client.sent.messages``                counter               {message}
``messaging.client.consumed.messages``            counter               {message}
``messaging.process.duration``                    histogram             s
``polybus.consumer.retried.messages``             counter               {message}
``polybus.consumer.dead_lettered.messages``       counter               {message}
``polybus.consumer.in_flight.messages``           up-down counter       {message}
``polybus.consumer.lag``                          gauge                 {message}
================================================  ====================  =========

Every one carries ``messaging.system`` (from the bus's wire protocol:
``polybus`` for the native engine, ``kafka``, ``rabbitmq``, ``redis``) and
``messaging.destination.name`` (the topic); those of consuming carry
``messaging.consumer.group.name``. Sent, consumed and processed messages carry
``messaging.operation.name`` (``send``, ``receive``, ``process``, as the spans
of :mod:`polybus.otel.tracing` do). A failed publish or try, a retry and a dead
letter carry ``error.type`` (the exception's class name); a dead letter also
``polybus.dead_letter.reason`` (``exhausted``, ``not-retryable``,
``undecodable``); lag, ``messaging.destination.partition.id``.

What is counted: every publish (retries, dead letters, replies and a
transaction's staged records included, to the topic they go to), every
fetched delivery, every try by a worker (a retried message's under its retry
topic, where the worker reads it). Lag is that of each durable group this
middleware saw receive, from ``Bus.stats`` when the metrics are collected: a
few administrative round trips, no group joined, on every backend.

Cost, measured with the SDK: the counts are kept here and read at collection
(asynchronous instruments, the same data as synchronous ones) for about 0.2 µs
a message, where the SDK's ``add`` costs 5-10 µs; a try costs about 11 µs, 8-9
of them the SDK's histogram ``record`` of its duration. A worker whose handler
does nothing (6-7 µs of CPU a message on memory://, native, Redis) then goes at
0.3-0.5x; one whose handler spends 40 µs, at 0.75-0.85x. With no SDK, every
instrument is a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from ..errors import ConfigurationError, PolybusError
from ..message import Delivery
from ..middleware import Host, Middleware, ProcessNext, PublishNext
from ..types import OutRecord, Receipt
from .tracing import SYSTEMS  # the spans' messaging.system, so metrics match them

__all__ = ["Metrics"]

log = logging.getLogger("polybus.otel")

SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
GROUP = "messaging.consumer.group.name"
OPERATION = "messaging.operation.name"
PARTITION = "messaging.destination.partition.id"
ERROR_TYPE = "error.type"
REASON = "polybus.dead_letter.reason"

#: the boundaries the messaging conventions advise for durations, in seconds
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)

Attributes = dict[str, str]


class _Total:
    """A running total for one set of attributes, read when the metrics are collected."""

    __slots__ = ("attributes", "value")

    def __init__(self, attributes: Attributes) -> None:
        self.attributes = attributes
        self.value = 0


class _Totals:
    """The totals behind one asynchronous instrument, one per attribute set.

    Counting here is an addition under a lock, about 0.2 µs; a synchronous
    instrument's ``add`` costs 5-10 µs in the SDK, which checks and hashes the
    attributes of every measurement: as much as a consumer spends on a message.
    The exported data is the same (a cumulative sum per attribute set).
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._by_attributes: dict[frozenset[tuple[str, str]], _Total] = {}

    def total(self, attributes: Attributes) -> _Total:
        """The one total of ``attributes``, whichever instance asks."""
        key = frozenset(attributes.items())
        with self._lock:
            total = self._by_attributes.get(key)
            if total is None:
                total = self._by_attributes[key] = _Total(attributes)
        return total

    def add(self, total: _Total, n: int) -> None:
        with self._lock:
            total.value += n

    def observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(t.value, t.attributes) for t in self._by_attributes.values()]


class _Instruments:
    """The instruments of one meter provider and the totals behind them, shared by every
    :class:`Metrics` made with it: the SDK keeps the first observable instrument of a
    name and drops a later one's callbacks, so a second set would never be read."""

    def __init__(self, meter_provider: MeterProvider | None) -> None:
        meter = metrics.get_meter("polybus", meter_provider=meter_provider)
        lock = threading.Lock()  # one for all: each holder only adds to an integer
        self.sent = _Totals(lock)
        self.consumed = _Totals(lock)
        self.retried = _Totals(lock)
        self.dead_lettered = _Totals(lock)
        self.in_flight = _Totals(lock)
        self.users: weakref.WeakSet[Metrics] = weakref.WeakSet()  # whose groups' lag to read
        self.users_lock = threading.Lock()
        message = "{message}"
        meter.create_observable_counter(
            "messaging.client.sent.messages",
            [self.sent.observe],
            message,
            "Number of messages producer attempted to send to the broker.",
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            [self.consumed.observe],
            message,
            "Number of messages that were delivered to the application.",
        )
        self.duration = meter.create_histogram(
            "messaging.process.duration",
            "s",
            "Duration of processing operation.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        meter.create_observable_counter(
            "polybus.consumer.retried.messages",
            [self.retried.observe],
            message,
            "Failed messages a worker scheduled to be tried again.",
        )
        meter.create_observable_counter(
            "polybus.consumer.dead_lettered.messages",
            [self.dead_lettered.observe],
            message,
            "Messages a worker gave up on and published to the dead-letter topic.",
        )
        meter.create_observable_up_down_counter(
            "polybus.consumer.in_flight.messages",
            [self.in_flight.observe],
            message,
            "Messages a worker's handlers are processing now.",
        )
        meter.create_observable_gauge(
            "polybus.consumer.lag",
            [self.observe_lag],
            message,
            "Messages a durable group has not settled yet, per partition.",
        )

    def observe_lag(self, options: CallbackOptions) -> Iterable[Observation]:
        with self.users_lock:
            users = list(self.users)
        seen: set[tuple[str, ...]] = set()
        return [o for m in users for o in m._lag(options.timeout_millis / 1000, seen)]


_SHARED: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_SHARED_LOCK = threading.Lock()


def _instruments(meter_provider: MeterProvider | None) -> _Instruments:
    provider = meter_provider or metrics.get_meter_provider()
    with _SHARED_LOCK:
        found = _SHARED.get(provider)
        if found is None:
            found = _SHARED[provider] = _Instruments(provider)
    return found


class Metrics(Middleware):
    """Middleware that measures publishing and consuming with OpenTelemetry's metrics API
    (the module docstring lists the instruments and their attributes).

    ``meter_provider`` makes the instruments; by default the global one
    (``opentelemetry.metrics.set_meter_provider``), so that with no SDK configured
    each is a no-op. Several instances share the instruments of a provider.

    One instance labels everything with one ``messaging.system`` (the hooks are not
    told which bus called them): it may serve several buses of one backend, and
    refuses a bus of another with ConfigurationError (give that one its own).
    """

    def __init__(self, meter_provider: MeterProvider | None = None) -> None:
        self._instruments = _instruments(meter_provider)
        with self._instruments.users_lock:
            self._instruments.users.add(self)
        self.system = ""  #: set by the first bus this is added to
        self._lock = threading.Lock()
        self._buses: weakref.WeakSet[Host] = weakref.WeakSet()
        self._groups: set[tuple[str, str]] = set()  #: (topic, durable group) seen receiving
        # attributes and totals, built once per topic (and group): a message costs a
        # lookup and an addition or two, and a try one histogram record
        self._sent: dict[str, _Total] = {}
        self._consumed: dict[tuple[str, str | None], _Total] = {}
        self._processing: dict[tuple[str, str | None], tuple[Attributes, _Total]] = {}
        #: id() of each delivery inside process() -> the handler's error, told by failed()
        self._trying: dict[int, BaseException | None] = {}

    def attach(self, bus: Host) -> None:
        system = SYSTEMS.get(bus.wire_protocol, bus.wire_protocol)
        with self._lock:
            if self.system and self.system != system:
                raise ConfigurationError(
                    f"this Metrics labels what it counts messaging.system={self.system}; "
                    f"give the {system} bus a Metrics of its own"
                )
            self.system = system
            self._buses.add(bus)

    def _attributes(
        self,
        topic: str,
        group: str | None,
        operation: str | None = None,
        error: BaseException | None = None,
    ) -> Attributes:
        attributes = {SYSTEM: self.system, DESTINATION: topic}
        if group is not None:
            attributes[GROUP] = group
        if operation is not None:
            attributes[OPERATION] = operation
        if error is not None:
            attributes[ERROR_TYPE] = type(error).__qualname__
        return attributes

    def publish(
        self, topic: str, records: Sequence[OutRecord], call_next: PublishNext
    ) -> list[Receipt]:
        sent = self._instruments.sent
        try:
            receipts = call_next(topic, records)
        except Exception as exc:
            sent.add(sent.total(self._attributes(topic, None, "send", exc)), len(records))
            raise
        total = self._sent.get(topic)
        if total is None:
            total = self._sent[topic] = sent.total(self._attributes(topic, None, "send"))
        sent.add(total, len(records))
        return receipts

    def received(self, deliveries: list[Delivery]) -> None:
        first = deliveries[0]  # a batch comes from one subscriber: one topic and group
        topic, group = first.topic, first.group
        consumed = self._instruments.consumed
        total = self._consumed.get((topic, group))
        if total is None:
            total = consumed.total(self._attributes(topic, group, "receive"))
            self._consumed[topic, group] = total
            if group is not None:
                with self._lock:
                    self._groups.add((topic, group))
        consumed.add(total, len(deliveries))

    def process(self, delivery: Delivery, call_next: ProcessNext) -> Any:
        instruments = self._instruments
        key = (delivery.topic, delivery.group)
        processing = self._processing.get(key)
        if processing is None:
            in_flight = instruments.in_flight.total(self._attributes(*key))
            processing = self._processing[key] = (self._attributes(*key, "process"), in_flight)
        attributes, in_flight = processing
        instruments.in_flight.add(in_flight, 1)
        trying = self._trying
        trying[id(delivery)] = None
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return call_next(delivery)
        except Exception as exc:  # an inner hook's own failure
            error = exc
            raise
        finally:
            elapsed = time.perf_counter() - start
            told = trying.pop(id(delivery))
            if told is not None:
                error = told
            if error is not None:
                attributes = self._attributes(*key, "process", error)
            instruments.duration.record(elapsed, attributes)
            instruments.in_flight.add(in_flight, -1)

    def failed(self, delivery: Delivery, error: BaseException) -> None:
        if id(delivery) in self._trying:  # the handler's failure, inside process()
            self._trying[id(delivery)] = error

    def retrying(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        retried = self._instruments.retried
        attributes = self._attributes(delivery.topic, delivery.group, error=error)
        retried.add(retried.total(attributes), 1)

    def dead_lettered(self, delivery: Delivery, error: BaseException, reason: str) -> None:
        dead = self._instruments.dead_lettered
        attributes = self._attributes(delivery.topic, delivery.group, error=error)
        attributes[REASON] = reason
        dead.add(dead.total(attributes), 1)

    def _lag(self, timeout: float, seen: set[tuple[str, ...]]) -> list[Observation]:
        """The lag of the durable groups seen receiving, per partition, from each bus's
        stats; one already in ``seen`` (reported by another bus or instance) is skipped."""
        with self._lock:
            buses, groups = list(self._buses), set(self._groups)
        observations = []
        for bus in buses if groups else ():
            try:
                stats = bus.stats({t for t, _ in groups}, {g for _, g in groups}, timeout=timeout)
            except PolybusError as exc:  # closed, or the broker did not answer in time
                log.debug("no lag from a %s bus: %s", self.system, exc)
                continue
            for topic, of_topic in stats.topics.items():
                for group, of_group in of_topic.groups.items():
                    for partition, lag in enumerate(of_group.lag):
                        key = (self.system, topic, group, str(partition))
                        if (topic, group) not in groups or lag is None or key in seen:
                            continue
                        seen.add(key)  # a group's lag is the same whichever bus reports it
                        attributes = self._attributes(topic, group)
                        attributes[PARTITION] = str(partition)
                        observations.append(Observation(lag, attributes))
        return observations
