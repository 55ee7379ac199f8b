"""The facade: :func:`connect` returns a :class:`Bus`, the one interface over every backend."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any

from .adapters.base import Backend, StatsBackend, Subscription, Transaction, TransactionalBackend
from .codecs import decoder_for, encode
from .envelope import CAUSATION_ID, CONTENT_TYPE, CORRELATION_ID, KEY_BINARY, MESSAGE_ID, TIMESTAMP
from .errors import CapabilityError, ClosedError, ConfigurationError, DecodeError
from .message import UNDECODED, Delivery, Message, message_of, uuid7s, value_of
from .middleware import Middleware, notify, publish_chain
from .model import check_name
from .registry import open_backend
from .types import (
    BusStats,
    Capability,
    InRecord,
    OutRecord,
    Receipt,
    Start,
    TopicSpec,
    ValueBatch,
    tuple_new,
)

__all__ = ["Bus", "BusTransaction", "Subscriber", "connect", "out_record"]


def connect(
    url: str | Backend | object,
    *,
    default_partitions: int = 4,
    middleware: Sequence[Middleware] = (),
) -> Bus:
    """Connect to the backend ``url`` names, e.g. ``native:///var/lib/app/bus``.

    ``url`` may also be a client object (``redis.Redis(...)``,
    ``pika.ConnectionParameters(...)``, ``confluent_kafka.Producer(...)``) or a
    Backend built by an adapter, e.g. ``KafkaBackend(config)``.

    Topics used before being declared are created with ``default_partitions``;
    ``middleware`` hooks into publishing and consuming (:mod:`polybus.middleware`).
    Raises ConfigurationError for a bad URL and BackendUnavailable for an
    unknown scheme or a missing client library (naming the extra to install).
    """
    return Bus(open_backend(url), default_partitions=default_partitions, middleware=middleware)


def _key_bytes(key: object, headers: list[tuple[str, str]]) -> bytes | None:
    if key is None or type(key) is bytes:
        if key is not None:
            headers.append((KEY_BINARY, "1"))
        return key
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytearray):
        headers.append((KEY_BINARY, "1"))
        return bytes(key)
    raise ConfigurationError(f"message key must be str, bytes or None, not {type(key).__name__}")


def out_record(message: Message, not_before_ms: int = 0) -> OutRecord:
    """The record ``message`` is published as: its value encoded and its envelope in
    the headers. Patterns that publish records of their own start from it."""
    value, content_type = message._value, message.content_type
    payload: bytes | None
    if value is UNDECODED:  # received and never decoded: forward the payload (or tombstone)
        payload = message.payload
        headers = [(MESSAGE_ID, message.id)]
        if content_type is not None:
            headers.append((CONTENT_TYPE, content_type))
    elif content_type is None and type(value) is bytes:
        payload = value  # bytes need no content-type header: its absence means bytes
        headers = [(MESSAGE_ID, message.id)]
    else:
        payload, content_type = encode(value, content_type)
        headers = [(MESSAGE_ID, message.id), (CONTENT_TYPE, content_type)]
    if message.correlation_id:
        headers.append((CORRELATION_ID, message.correlation_id))
    if message.causation_id:
        headers.append((CAUSATION_ID, message.causation_id))
    key = _key_bytes(message.key, headers)
    for name, value in message.headers.items():
        if type(name) is not str or type(value) is not str:
            raise ConfigurationError(
                f"header {name!r} must map str to str (got {type(value).__name__}); "
                "encode other values yourself, e.g. with str() or json.dumps()"
            )
        headers.append((name, value))
    ts_ms = int(message.timestamp * 1000)
    headers.append((TIMESTAMP, str(ts_ms)))
    return OutRecord(payload, key, tuple(headers), ts_ms, not_before_ms)


_new_record = tuple_new(OutRecord, 5)  # OutRecord(...) through its generated __new__ costs more


def _value_out(
    value: Any, message_id: str, ts_ms: int, stamp: tuple[str, str], not_before_ms: int
) -> OutRecord:
    """The record of a plain value: what ``out_record(Message(value))`` gives, without the
    Message (one is built per published value, so this path is kept short)."""
    if type(value) is bytes:
        headers: tuple[tuple[str, str], ...] = ((MESSAGE_ID, message_id), stamp)
        return _new_record(OutRecord, (value, None, headers, ts_ms, not_before_ms))
    payload, content_type = encode(value)
    headers = ((MESSAGE_ID, message_id), (CONTENT_TYPE, content_type), stamp)
    return _new_record(OutRecord, (payload, None, headers, ts_ms, not_before_ms))


class Subscriber:
    """A consumer of one topic, in a group or alone; iterate it or call :meth:`fetch`.

    Every delivery must be settled with ``ack()`` or ``nack()`` (or many at once
    with :meth:`ack` and :meth:`nack` here); unsettled ones are redelivered
    after this subscriber closes or dies.
    """

    def __init__(self, bus: Bus, topic: str, subscription: Subscription, model: Any) -> None:
        self.topic = topic
        self._bus = bus
        self._sub = subscription
        self._model = model
        self._closed = False
        self._ack = subscription.ack  # a Delivery calls it directly: one call per ack
        # and, without a model, value_of: a call less per value read (0.1 µs of about 1.3)
        self._value: Callable[[InRecord], Any] = value_of if model is None else self._model_value

    @property
    def group(self) -> str | None:
        return self._sub.group

    def _message(self, record: InRecord) -> Message:
        message = message_of(record)
        if self._model is not None:
            message._decoder = self._model_decoder(message._decoder)
        return message

    def _model_value(self, record: InRecord) -> Any:
        payload = record.payload
        if payload is None:
            return None  # a tombstone
        return self._model_decoder(decoder_for(record.header(CONTENT_TYPE)))(payload)

    def _nack(self, records: Sequence[Delivery], *, requeue: bool) -> None:
        self._sub.nack(records, requeue=requeue)

    def fetch(self, max_messages: int = 100, timeout: float = 1.0) -> list[Delivery]:
        """Return up to ``max_messages`` deliveries, waiting at most ``timeout`` seconds.

        Returns [] on timeout. Raises ClosedError after close().
        """
        if self._closed:
            raise ClosedError(f"subscriber to {self.topic!r} is closed; subscribe again")
        if max_messages < 1:
            raise ConfigurationError("max_messages must be at least 1")
        deliveries = self._sub.fetch(max_messages, max(0.0, timeout))
        # A Delivery's state is set here, for every backend: an adapter may build its
        # records in place (only InRecord's fields), and a redelivery may be the object
        # handed out before.
        for delivery in deliveries:
            delivery._owner = self
            delivery._message = None
            delivery._value = UNDECODED
            delivery.settled = False
        if deliveries and self._bus.middleware:
            notify(self._bus.middleware, "received", deliveries)
        return deliveries

    def ack(self, deliveries: Iterable[Delivery]) -> None:
        """Ack many deliveries in one backend call; settled ones are skipped."""
        unsettled = []
        for d in deliveries:
            if not d.settled:
                d.settled = True
                unsettled.append(d)
        if unsettled:
            self._ack(unsettled)

    def nack(self, deliveries: Iterable[Delivery], *, requeue: bool = True) -> None:
        """Nack many deliveries in one backend call; settled ones are skipped."""
        unsettled = []
        for d in deliveries:
            if not d.settled:
                d.settled = True
                unsettled.append(d)
        if unsettled:
            self._sub.nack(unsettled, requeue=requeue)

    def commit(self) -> None:
        """Make every ack so far durable before returning (blocks).

        Acks become durable by themselves within about 0.2 s and at close; call
        this when a step must not run before they are (at-most-once).
        Raises FencedError if a partition moved to another member meanwhile.
        """
        if self._closed:
            raise ClosedError(f"subscriber to {self.topic!r} is closed; subscribe again")
        self._sub.commit()

    def _model_decoder(self, inner: Any) -> Any:
        model = self._model

        def decode(payload: bytes) -> Any:
            data = inner(payload)
            try:
                return model.model_validate(data)
            except Exception as exc:  # pydantic.ValidationError, without importing pydantic
                raise DecodeError(f"payload does not match {model.__name__}: {exc}") from exc

        return decode

    def __iter__(self) -> Iterator[Delivery]:
        """Yield deliveries until the subscriber is closed."""
        while not self._closed:
            try:
                yield from self.fetch(100, 0.5)
            except ClosedError:
                return

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp: float | None = None
    ) -> None:
        """Read ``partition`` from ``offset`` (a delivery's ``offset``), or from the first
        message at or after ``timestamp``.

        Raises CapabilityError on backends without replay.
        """
        needed = Capability.SEEK if timestamp is None else Capability.SEEK_TIME
        if needed not in self._bus.capabilities:
            raise CapabilityError(f"this backend cannot seek ({needed.name} is missing)")
        ts = None if timestamp is None else int(timestamp * 1000)
        self._sub.seek(partition, offset=offset, timestamp_ms=ts)

    def lag(self) -> dict[int, int]:
        """Messages not yet committed by this group, per partition."""
        if Capability.LAG not in self._bus.capabilities:
            raise CapabilityError("this backend does not report lag")
        return self._sub.lag()

    def close(self) -> None:
        """Commit what was acked and leave the group; idempotent."""
        if not self._closed:
            self._closed = True
            self._sub.close()
            self._bus._subscribers.discard(self)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BusTransaction:
    """Publishes and acks that take effect together, or not at all.

    >>> with bus.transaction(sub) as tx:              # doctest: +SKIP
    ...     for d in sub.fetch(100):
    ...         tx.publish("totals", total(d.message.value), key=d.message.key)
    ...         tx.ack(d)

    Leaving the block commits; an exception in it aborts, and the deliveries
    acked in it are delivered again. Use it from one thread.
    """

    def __init__(self, bus: Bus, subscriber: Subscriber, tx: Transaction) -> None:
        self._bus = bus
        self._subscriber = subscriber
        self._tx = tx
        self._done = False
        self._publish = publish_chain(bus.middleware, self._stage)

    def _stage(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        self._tx.publish(topic, records)
        return []  # receipts exist only once the transaction commits

    def publish(
        self,
        topic: str,
        value: Any,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> None:
        """Stage one message (or a :class:`Message`); visible to consumers only after commit."""
        message = Message.of(
            value,
            key=key,
            headers=headers,
            content_type=content_type,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        self.publish_records(topic, [out_record(message)])

    def publish_records(self, topic: str, records: Sequence[OutRecord]) -> None:
        """Stage records as they are, envelope and all (see :meth:`Bus.publish_records`)."""
        self._bus.declare_once(topic)
        self._publish(topic, records)

    def ack(self, delivery: Delivery) -> None:
        """Stage the ack of ``delivery`` (fetched by this transaction's subscriber)."""
        if delivery._owner is not self._subscriber:
            raise ConfigurationError(
                "a transaction can ack only deliveries of the subscriber it was begun on"
            )
        if not delivery.settled:
            delivery.settled = True
            self._tx.ack([delivery])

    def commit(self) -> None:
        """Make the staged messages visible and commit the acks, atomically.

        Raises FencedError (nothing took effect: the input moved to another
        member) or ConnectionLost (aborted if it still could be).
        """
        self._done = True
        self._tx.commit()

    def abort(self) -> None:
        """Drop what was staged; the acked deliveries are delivered again. Idempotent."""
        self._done = True
        self._tx.abort()

    def __enter__(self) -> BusTransaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Bus:
    """Publish to topics and subscribe groups, on whichever backend the URL named.

    Thread-safe for publishing. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        default_partitions: int = 4,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.backend = backend
        self.default_partitions = default_partitions
        self.middleware: tuple[Middleware, ...] = ()
        self._declared: set[str] = set()
        self._subscribers: set[Subscriber] = set()
        self._closed = False
        self.use(*middleware)

    def use(self, *middleware: Middleware) -> None:
        """Add ``middleware`` after (inside) the bus's own, for publishing from now on and
        for deliveries fetched from now on; a worker started later uses them too.

        Each is attached (:meth:`Middleware.attach`) first; if one refuses the bus,
        none is added."""
        for m in middleware:
            if not isinstance(m, Middleware):
                raise ConfigurationError(
                    f"middleware must subclass polybus.middleware.Middleware, "
                    f"not {type(m).__name__}"
                )
        for m in middleware:
            m.attach(self)
        self.middleware += middleware
        # built once here: with no publish hook it is backend.publish itself
        self._publish = publish_chain(self.middleware, self.backend.publish)

    @property
    def capabilities(self) -> Capability:
        return self.backend.capabilities

    @property
    def wire_protocol(self) -> str:
        """The backend's wire protocol: "kafka", "amqp-0-9-1", "redis" or "native"."""
        return self.backend.wire_protocol

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def declared(self) -> frozenset[str]:
        """The topics this bus declared (or published to, which declares them)."""
        return frozenset(self._declared)

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("bus is closed; connect again")

    def declare(
        self,
        topic: str,
        *,
        partitions: int | None = None,
        groups: Sequence[str] = (),
        retention: float | None = None,
        retention_bytes: int | None = None,
        compact: bool = False,
    ) -> None:
        """Create ``topic`` and its durable ``groups`` if missing; idempotent.

        ``partitions=None`` keeps an existing topic's count or uses the bus
        default. A group new here gets every message the topic keeps, and then
        every one published, even before a member subscribes (fan-out); on
        RabbitMQ with ``history=false`` only those published from its declaration
        on. ``retention``
        is in seconds. Raises ConfigurationError if the topic exists with another
        partition count.
        """
        self._check()
        # one rule on every backend, so that code moved between them keeps working
        check_name("topic", topic)
        for group in groups:
            check_name("group", group)
        spec = TopicSpec(
            partitions=partitions,
            default_partitions=self.default_partitions,
            retention_ms=None if retention is None else int(retention * 1000),
            retention_bytes=retention_bytes,
            compact=compact,
            groups=tuple(groups),
        )
        self.backend.declare_topic(topic, spec)
        self._declared.add(topic)

    def stats(
        self,
        topics: Collection[str] | None = None,
        groups: Collection[str] | None = None,
        *,
        timeout: float = 5.0,
    ) -> BusStats:
        """Each topic's offsets per partition and each durable group's lag, read without
        joining a group (what ``polybus stats`` prints).

        ``topics`` and ``groups`` narrow it to those names (None: all the backend can
        list). A number a backend cannot say is None, never 0. Raises ConnectionLost
        past ``timeout`` seconds, CapabilityError if the backend reports no stats.
        """
        self._check()
        if not hasattr(self.backend, "stats"):
            raise CapabilityError(f"{type(self.backend).__name__} reports no stats")
        backend: StatsBackend = self.backend  # type: ignore[assignment]
        return backend.stats(topics, groups, timeout=timeout)

    def declare_once(self, topic: str) -> None:
        """Declare ``topic`` with the defaults unless this bus declared it already."""
        if topic not in self._declared:
            self.declare(topic)

    def publish(
        self,
        topic: str,
        value: Any,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        delay: float | None = None,
    ) -> Receipt:
        """Publish one message; return where it was stored.

        ``value`` may be a :class:`Message`. ``delay`` (seconds) holds delivery
        back (needs Capability.DELAY). Raises EncodeError, MessageTooLarge,
        ConnectionLost; nothing is stored when it raises.
        """
        if key is None and not headers and not (content_type or correlation_id or causation_id):
            return self.publish_many(topic, [value], delay=delay)[0]  # no Message: 1.5 µs less
        message = Message.of(
            value,
            key=key,
            headers=headers,
            content_type=content_type,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        return self.publish_many(topic, [message], delay=delay)[0]

    def publish_many(
        self, topic: str, messages: Iterable[Message | Any], *, delay: float | None = None
    ) -> list[Receipt]:
        """Publish messages (or plain values) in order, as few backend calls as possible."""
        self._check()
        if delay and Capability.DELAY not in self.capabilities:
            raise CapabilityError("this backend cannot delay delivery")
        now = time.time()
        not_before = math.ceil((now + delay) * 1000) if delay else 0
        ts_ms = int(now * 1000)
        stamp = (TIMESTAMP, str(ts_ms))
        items: list[Any] = messages if isinstance(messages, list) else list(messages)
        kinds = set(map(type, items))
        records: Sequence[OutRecord]
        if kinds == {bytes}:  # plain bytes, the commonest batch: their records made when used
            records = ValueBatch(items, MESSAGE_ID, uuid7s(len(items)), stamp, ts_ms, not_before)
        else:
            # the plain values' ids in one step: one lock and one clock read for the batch
            ids = iter(uuid7s(sum(not isinstance(m, Message) for m in items)))
            records = [
                out_record(m, not_before)
                if isinstance(m, Message)
                else _value_out(m, next(ids), ts_ms, stamp, not_before)
                for m in items
            ]
        if not records:
            return []
        self.declare_once(topic)
        return self._publish(topic, records)

    def tombstone(
        self, topic: str, key: str | bytes, *, headers: Mapping[str, str] | None = None
    ) -> Receipt:
        """Publish a tombstone: a record of ``key`` with no value, which tells a compacted
        topic to forget the key. Consumers get it with ``value`` None.

        Needs Capability.COMPACTION (native, Kafka); raises CapabilityError otherwise,
        ConfigurationError for a key of None.
        """
        self._check()
        if Capability.COMPACTION not in self.capabilities:
            raise CapabilityError(
                "tombstones need a backend with compacted topics (native, memory, Kafka)"
            )
        if key is None:
            raise ConfigurationError("a tombstone needs the key it deletes")
        record = out_record(Message(b"", key=key, headers=headers), 0)._replace(value=None)
        self.declare_once(topic)
        return self._publish(topic, [record])[0]

    def publish_records(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        """Publish records as they are, envelope and all: what patterns that forward,
        retry or dead-letter messages use (:func:`out_record` builds one). Raises as
        :meth:`publish_many` does."""
        self._check()
        if not records:
            return []
        if Capability.DELAY not in self.capabilities and any(r.not_before_ms for r in records):
            raise CapabilityError("this backend cannot delay delivery")
        self.declare_once(topic)
        return self._publish(topic, records)

    def subscribe(
        self,
        topic: str,
        group: str | None = None,
        *,
        start: Start | None = None,
        session_timeout: float = 10.0,
        model: Any = None,
    ) -> Subscriber:
        """Subscribe to ``topic`` as a member of durable ``group``, or ephemerally.

        Members of one group share the messages; every group gets them all. A
        durable group keeps its position while nobody listens; an ephemeral
        subscriber (``group=None``) sees messages published from now on
        (``start="latest"``, its default) and vanishes on close. ``model``, a
        pydantic model class, decodes each value into that model.
        """
        self._check()
        self.declare_once(topic)
        if group is not None:
            check_name("group", group)
        if group is None and Capability.EPHEMERAL_GROUPS not in self.capabilities:
            raise CapabilityError("this backend has no ephemeral subscriptions")
        start = start or ("latest" if group is None else "earliest")
        sub = self.backend.subscribe(topic, group, start=start, session_timeout=session_timeout)
        subscriber = Subscriber(self, topic, sub, model)
        self._subscribers.add(subscriber)
        return subscriber

    def transaction(self, subscriber: Subscriber) -> BusTransaction:
        """Begin a transaction: publishes and acks of ``subscriber``'s deliveries that
        take effect together (consume → produce exactly once).

        Raises CapabilityError on backends without Capability.TRANSACTIONS.
        """
        self._check()
        if Capability.TRANSACTIONS not in self.capabilities:
            raise CapabilityError(
                "this backend has no transactions (TRANSACTIONS is missing); use an inbox "
                "for exactly-once processing instead"
            )
        backend: TransactionalBackend = self.backend  # type: ignore[assignment]
        return BusTransaction(self, subscriber, backend.transaction(subscriber._sub))

    def close(self) -> None:
        """Close every subscriber and the backend connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()
        self.backend.close()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
