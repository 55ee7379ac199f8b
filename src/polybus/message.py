"""Message and Delivery: what a publisher builds and what a consumer is handed.

The envelope header names they carry live in :mod:`polybus.envelope`; the
commonest are re-exported here.
"""

from __future__ import annotations

import binascii
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from .codecs import decoder_for
from .envelope import (
    ATTEMPT,
    CAUSATION_ID,
    CLOUDEVENTS_PREFIXES,
    CONTENT_TYPE,
    CORRELATION_ID,
    KEY_BINARY,
    MESSAGE_ID,
    RESERVED_PREFIX,
    TIMESTAMP,
    TRACEPARENT,
    TRACESTATE,
)
from .errors import ConfigurationError
from .types import InRecord

__all__ = [
    "ATTEMPT",
    "CAUSATION_ID",
    "CONTENT_TYPE",
    "CORRELATION_ID",
    "MESSAGE_ID",
    "TIMESTAMP",
    "TRACEPARENT",
    "TRACESTATE",
    "UNDECODED",
    "UNOWNED",
    "Delivery",
    "DeliveryOwner",
    "Message",
    "message_of",
    "uuid7",
    "uuid7s",
    "value_of",
]


#: the cached value of a message or delivery whose payload was not decoded yet
UNDECODED: Any = object()

_uuid_lock = threading.Lock()
_uuid_last_ms = 0
_uuid_seq = 0
_uuid_prefix = ""  # "tttttttt-tttt-7": the time and version part for _uuid_last_ms
_hex = ""  # random hex digits, taken 15 per id: cheaper than formatting random ints
_hex_at = 0
#: "sss-8" for every 12-bit counter value: formatting the counter was half an id's cost
_SEQ_DIGITS = [f"{seq:03x}-8" for seq in range(0x1000)]


def _forget_random() -> None:
    global _hex_at
    _hex_at = len(_hex)  # a forked child must not reuse its parent's random digits


os.register_at_fork(after_in_child=_forget_random)


def uuid7() -> str:
    """Return a new RFC 9562 UUIDv7 string, monotonic within this process.

    The 12-bit ``rand_a`` field is a counter seeded randomly each millisecond
    (RFC 9562 §6.2 method 1), so ids sort in creation order; 60 of the 62
    ``rand_b`` bits come from ``os.urandom``.
    """
    ms = time.time_ns() // 1_000_000
    with _uuid_lock:
        return _next_uuid7(ms)


def uuid7s(n: int) -> list[str]:
    """Return ``n`` new UUIDv7 strings as :func:`uuid7` makes them, with one clock read
    and one lock for the lot, their random digits drawn a thousand ids at a time (a
    batch of plain values is published this way).
    """
    global _uuid_last_ms, _uuid_seq, _uuid_prefix
    ms = time.time_ns() // 1_000_000
    if n < 8:  # too few to pay for a draw of their own (a urandom call: 2 µs for one id)
        with _uuid_lock:
            return [_next_uuid7(ms) for _ in range(n)]
    # 15 random digits an id, from 8 bytes; one byte more seeds the counter
    drawn = os.urandom(8 * min(n, _PIECE) + 1)
    pieces: list[tuple[str, int, int]] = []  # (prefix, first counter value, ids)
    with _uuid_lock:
        if ms > _uuid_last_ms:
            _uuid_last_ms, _uuid_seq = ms, (drawn[-1] << 3) - 1
            _uuid_prefix = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
        left = n
        while left:
            if _uuid_seq >= 0xFFF:  # counter spent: borrow the next millisecond
                _uuid_last_ms += 1
                _uuid_seq = -1
                _uuid_prefix = f"{_uuid_last_ms >> 16:08x}-{_uuid_last_ms & 0xFFFF:04x}-7"
            first = _uuid_seq + 1
            take = min(left, 0x1000 - first, _PIECE)
            pieces.append((_uuid_prefix, first, take))
            _uuid_seq = first + take - 1
            left -= take
    ids: list[str] = []
    for prefix, first, take in pieces:
        if ids:  # the first piece's digits were drawn above
            drawn = os.urandom(8 * take)
        ids += _uuid_piece(prefix, first, take, binascii.hexlify(drawn))
    return ids


#: the counter's three hex digits, one bytes object per digit position, indexed by value
_SEQ_COLUMNS = tuple(bytes(ord(f"{seq:03x}"[i]) for seq in range(0x1000)) for i in range(3))
_RANDOM_AT = (20, 21, 22, *range(24, 36))  #: where an id's 15 random digits go
#: ids made in one buffer at most: 37 KiB, below the sizes whose allocation or release
#: costs more (glibc consolidates its free lists on freeing 64 KiB, maps 128 KiB anew):
#: batches of 10,000 ids took 0.13 µs of CPU an id in one buffer, 0.10 in pieces
_PIECE = 1024


def _uuid_piece(prefix: str, first: int, take: int, digits: bytes) -> list[str]:
    """``take`` ids of ``prefix`` with the counter values from ``first`` on, their random
    digits 15 of each 16 of ``digits``.

    Written a column at a time into rows of one buffer, then split: an id costs one
    string, where formatting each took 0.23 µs (0.08 µs so, 1000 ids).
    """
    end = first + take
    rows = bytearray(f"{prefix}000-8000-000000000000,".encode() * take)
    for i, column in enumerate(_SEQ_COLUMNS):
        rows[15 + i :: 37] = column[first:end]
    for i, position in enumerate(_RANDOM_AT):
        rows[position::37] = digits[i : 16 * take : 16]
    ids = rows.decode("ascii").split(",")
    ids.pop()  # after the last comma
    return ids


def _next_uuid7(ms: int) -> str:
    """The next id at time ``ms``; the caller holds ``_uuid_lock``."""
    global _uuid_last_ms, _uuid_seq, _uuid_prefix, _hex, _hex_at
    at = _hex_at
    if at + 17 > len(_hex):
        _hex, at = os.urandom(8192).hex(), 0
    _hex_at = at + 15
    if ms > _uuid_last_ms:
        _hex_at += 2
        # the counter starts at a random value below 0x800, leaving room to count
        _uuid_last_ms, _uuid_seq = ms, int(_hex[at + 15 : at + 17], 16) << 3
        _uuid_prefix = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
    else:
        _uuid_seq += 1
        if _uuid_seq > 0xFFF:  # counter spent: borrow the next millisecond
            _uuid_last_ms += 1
            _uuid_seq = 0
            _uuid_prefix = f"{_uuid_last_ms >> 16:08x}-{_uuid_last_ms & 0xFFFF:04x}-7"
    return f"{_uuid_prefix}{_SEQ_DIGITS[_uuid_seq]}{_hex[at : at + 3]}-{_hex[at + 3 : at + 15]}"


class Message:
    """A message as the application sees it.

    ``value`` is any value the codecs can encode (bytes, str, JSON-able data,
    pydantic models); on receive it is decoded lazily from ``payload`` by its
    ``content_type``, raising :class:`~polybus.errors.DecodeError` on access if
    the payload does not match. A tombstone (:meth:`polybus.Bus.tombstone`)
    has ``payload`` and ``value`` None. ``id`` is a UUIDv7 made at construction.
    """

    __slots__ = (
        "_decoder",
        "_value",
        "causation_id",
        "content_type",
        "correlation_id",
        "headers",
        "id",
        "key",
        "payload",
        "timestamp",
    )

    def __init__(
        self,
        value: Any = None,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        id: str | None = None,
        timestamp: float | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        content_type: str | None = None,
    ) -> None:
        self._value = value
        self._decoder: Callable[[bytes], Any] | None = None
        self.payload: bytes | None = None
        self.key = key
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self.id = id or uuid7()
        self.timestamp = time.time() if timestamp is None else timestamp
        self.correlation_id = correlation_id
        self.causation_id = causation_id
        self.content_type = content_type

    @classmethod
    def of(cls, value: Any, **fields: Any) -> Message:
        """``value`` itself if it is a Message (``fields`` are then ignored), else a new
        Message of ``value`` with ``fields`` (key, headers, content_type, ...)."""
        return value if isinstance(value, Message) else cls(value, **fields)

    @classmethod
    def received(
        cls,
        payload: bytes | None,
        decoder: Callable[[bytes], Any],
        *,
        key: str | bytes | None,
        headers: dict[str, str],
        id: str,
        timestamp: float,
        correlation_id: str | None,
        causation_id: str | None,
        content_type: str | None,
    ) -> Message:
        """Build a message read from a backend; ``value`` decodes on first access."""
        msg = cls.__new__(cls)
        msg._value = UNDECODED
        msg._decoder = decoder
        msg.payload = payload
        msg.key = key
        msg.headers = headers
        msg.id = id
        msg.timestamp = timestamp
        msg.correlation_id = correlation_id
        msg.causation_id = causation_id
        msg.content_type = content_type
        return msg

    @property
    def value(self) -> Any:
        if self._value is UNDECODED:
            assert self._decoder is not None
            payload = self.payload
            self._value = None if payload is None else self._decoder(payload)  # None: tombstone
        return self._value

    def reply(self, value: Any = None, **kwargs: Any) -> Message:
        """A message caused by this one: same correlation id, causation id = this id."""
        kwargs.setdefault("correlation_id", self.correlation_id or self.id)
        kwargs.setdefault("causation_id", self.id)
        return Message(value, **kwargs)

    def __repr__(self) -> str:
        return f"Message(id={self.id!r}, key={self.key!r}, content_type={self.content_type!r})"


class Delivery(InRecord):
    """A message handed to a consumer, with where it came from and how to settle it.

    Settle each delivery exactly once with :meth:`ack` or :meth:`nack`; a second
    call is ignored. Unsettled deliveries are redelivered after the consumer
    closes or dies (at-least-once). ``value`` and ``message`` are decoded on
    first access, so a consumer that only routes or counts pays nothing for them.
    ``attempt`` is 1 on first delivery and counts every earlier try this
    message had, through redeliveries and retries alike.

    It is the backend's record itself: the raw fields of :class:`InRecord`
    (``payload``, ``key``, ``headers``, ``topic``, ``partition``, ``offset``, ...)
    plus decoding and settling. A backend builds Deliveries with InRecord's
    arguments, and the subscriber that fetched them becomes their owner, so a
    message is one object from the backend's batch to the handler (a second,
    wrapping object cost 0.14-0.3 µs a message).
    """

    __slots__ = ("_message", "_owner", "_value", "settled")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int | str,
        payload: bytes | None,
        key: bytes | None,
        headers: tuple[tuple[str, str], ...],
        timestamp_ms: int,
        delivery_count: int = 1,
        handle: object = None,
    ) -> None:
        super().__init__(
            topic, partition, offset, payload, key, headers, timestamp_ms, delivery_count, handle
        )
        self._owner: DeliveryOwner = UNOWNED
        self._message: Message | None = None
        self._value: Any = UNDECODED
        self.settled = False

    @property
    def message(self) -> Message:
        message = self._message
        if message is None:
            message = self._message = self._owner._message(self)
        return message

    @property
    def value(self) -> Any:
        """The message's decoded value: ``message.value``, without building the
        :class:`Message` when it was not built yet. Raises DecodeError."""
        value = self._value
        if value is UNDECODED:
            if self._message is not None:
                value = self._message.value
            else:
                decode = self._owner._value
                if decode is value_of:  # value_of(self) inlined: 0.29-0.31 -> 0.27 µs a read
                    payload = self.payload
                    content_type = None if payload is None else self.header(CONTENT_TYPE)
                    if payload is None or content_type is None:
                        value = payload  # a tombstone, or bytes: no content type
                    else:
                        value = decoder_for(content_type)(payload)
                else:
                    value = decode(self)
            self._value = value
        return value

    @property
    def record(self) -> InRecord:
        """The raw record (this delivery itself, seen as an :class:`InRecord`): for
        patterns that forward or copy a message without decoding it."""
        return self

    @property
    def group(self) -> str | None:
        return self._owner.group

    @property
    def attempt(self) -> int:
        value = self.header(ATTEMPT)
        if value is None:
            return self.delivery_count
        return (int(value) if value.isdigit() else 1) + self.delivery_count - 1

    def ack(self) -> None:
        """Mark the message processed; it will not be delivered to this group again."""
        if not self.settled:
            self.settled = True
            self._owner._ack((self,))

    def nack(self, *, requeue: bool = True) -> None:
        """Give the message back: redeliver it (``requeue=True``) or drop it for this group."""
        if not self.settled:
            self.settled = True
            self._owner._nack((self,), requeue=requeue)

    def __repr__(self) -> str:
        return (
            f"Delivery(topic={self.topic!r}, partition={self.partition}, offset={self.offset!r}, "
            f"group={self.group!r}, attempt={self.attempt}, message={self.message!r})"
        )


def message_of(record: InRecord) -> Message:
    """The :class:`Message` a record carries: its envelope headers taken out of
    ``headers``, its payload decoded by its content type on first access.

    A record without polybus's id that is a CloudEvent in binary content mode (one an
    SDK published) takes its id and timestamp from the event's ``id`` and ``time``;
    the event's attributes stay in ``headers`` (see :mod:`polybus.cloudevents`)."""
    fields = dict(record.headers)
    pop = fields.pop
    message_id = pop(MESSAGE_ID, None)
    stamp = pop(TIMESTAMP, None)
    content_type = pop(CONTENT_TYPE, None)
    correlation_id = causation_id = None
    raw_key = record.key
    binary = False
    if fields:  # more than the usual envelope: other envelope fields or the user's headers
        correlation_id = pop(CORRELATION_ID, None)
        causation_id = pop(CAUSATION_ID, None)
        binary = pop(KEY_BINARY, None) is not None
        if any(name.startswith(RESERVED_PREFIX) for name in fields):
            fields = {k: v for k, v in fields.items() if not k.startswith(RESERVED_PREFIX)}
    timestamp_ms = int(stamp) if stamp is not None and stamp.isdigit() else record.timestamp_ms
    if message_id is None and fields:  # not polybus's envelope: perhaps a CloudEvent's
        message_id, timestamp_ms = _cloud_event_id_and_time(fields, timestamp_ms)
    key: str | bytes | None = raw_key
    if raw_key is not None and not binary:
        key = raw_key.decode(errors="surrogateescape")
    message = _new_message(Message)
    message._value = UNDECODED
    message._decoder = decoder_for(content_type)
    message.payload = record.payload
    message.key = key
    message.headers = fields
    message.id = message_id or f"{record.topic}/{record.partition}/{record.offset}"
    message.timestamp = timestamp_ms / 1000
    message.correlation_id = correlation_id
    message.causation_id = causation_id
    message.content_type = content_type
    return message


_new_message = Message.__new__

#: (id, time) header names of a CloudEvent, under each binding's prefix
_CLOUD_EVENT_NAMES = [(prefix + "id", prefix + "time") for prefix in CLOUDEVENTS_PREFIXES]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def _cloud_event_id_and_time(fields: dict[str, str], timestamp_ms: int) -> tuple[str | None, int]:
    """The id and time (epoch ms) of the CloudEvent whose attributes are in ``fields``,
    or None and ``timestamp_ms`` for a record that is none. A time that is not RFC 3339
    leaves ``timestamp_ms``: a consumer reads the event rather than failing on it."""
    for id_name, time_name in _CLOUD_EVENT_NAMES:
        event_id = fields.get(id_name)
        if event_id is not None:
            text = fields.get(time_name)
            if text is not None:
                try:
                    moment = datetime.fromisoformat(text.upper())  # RFC 3339 allows t and z
                except ValueError:
                    return event_id, timestamp_ms
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=UTC)
                timestamp_ms = (moment - _EPOCH) // _MS
            return event_id, timestamp_ms
    return None, timestamp_ms


def value_of(record: InRecord) -> Any:
    """The payload of ``record`` decoded by its content type (bytes without one)."""
    payload, content_type = record.payload, record.header(CONTENT_TYPE)
    if payload is None or content_type is None:
        return payload  # a tombstone, or bytes: they travel without a content type
    return decoder_for(content_type)(payload)


class DeliveryOwner(Protocol):
    """What a :class:`Delivery` needs from the subscriber that fetched it."""

    @property
    def group(self) -> str | None: ...

    def _message(self, record: InRecord) -> Message: ...

    def _value(self, record: InRecord) -> Any: ...

    def _ack(self, records: Sequence[Delivery]) -> None: ...

    def _nack(self, records: Sequence[Delivery], *, requeue: bool) -> None: ...


class _Unowned:
    """The owner of a delivery no subscriber fetched (a record read from the engine
    directly): it decodes as a subscriber without a model would, and cannot settle."""

    group = None
    _message = staticmethod(message_of)
    _value = staticmethod(value_of)

    def _ack(self, records: Sequence[Delivery]) -> None:
        raise ConfigurationError(
            "this record was not fetched by a Subscriber: settle it through the consumer "
            "that read it (Consumer.ack / Consumer.nack)"
        )

    def _nack(self, records: Sequence[Delivery], *, requeue: bool) -> None:
        self._ack(records)


UNOWNED: DeliveryOwner = _Unowned()
