"""Message and Delivery: what a publisher builds and what a consumer is handed.

The envelope header names they carry live in :mod:`polybus.envelope`; the
commonest are re-exported here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from .envelope import (
    ATTEMPT,
    CAUSATION_ID,
    CONTENT_TYPE,
    CORRELATION_ID,
    MESSAGE_ID,
    TIMESTAMP,
    TRACEPARENT,
    TRACESTATE,
)
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
    "Delivery",
    "Message",
    "uuid7",
    "uuid7s",
]


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
    """Return ``n`` new UUIDv7 strings as :func:`uuid7` makes them, with one clock read,
    one lock and one draw of random digits for the lot (a batch of plain values is
    published this way: 0.22 µs an id, where formatting each as :func:`uuid7` does took 0.52).
    """
    global _uuid_last_ms, _uuid_seq, _uuid_prefix
    if n < 1:
        return []
    ms = time.time_ns() // 1_000_000
    digits = os.urandom(8 * n + 1).hex()  # 15 random digits an id, the last 2 seed the counter
    ids: list[str] = []
    with _uuid_lock:
        if ms > _uuid_last_ms:
            _uuid_last_ms, _uuid_seq = ms, (int(digits[-2:], 16) << 3) - 1
            _uuid_prefix = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
        while len(ids) < n:
            if _uuid_seq >= 0xFFF:  # counter spent: borrow the next millisecond
                _uuid_last_ms += 1
                _uuid_seq = -1
                _uuid_prefix = f"{_uuid_last_ms >> 16:08x}-{_uuid_last_ms & 0xFFFF:04x}-7"
            first, at = _uuid_seq + 1, 16 * len(ids)
            take = min(n - len(ids), 0x1000 - first)
            prefix = _uuid_prefix
            tails = [digits[i : i + 15] for i in range(at, at + 16 * take, 16)]
            ids += [
                f"{prefix}{seq}{tail[:3]}-{tail[3:]}"
                for seq, tail in zip(_SEQ_DIGITS[first : first + take], tails, strict=True)
            ]
            _uuid_seq = first + take - 1
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

    _MISSING: Any = object()

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
        msg._value = cls._MISSING
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
        if self._value is Message._MISSING:
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


class Delivery:
    """A message handed to a consumer, with where it came from and how to settle it.

    Settle each delivery exactly once with :meth:`ack` or :meth:`nack`; a second
    call is ignored. Unsettled deliveries are redelivered after the consumer
    closes or dies (at-least-once). ``message`` is decoded from the record on
    first access, so a consumer that only routes or counts pays nothing for it.
    ``attempt`` is 1 on first delivery and counts every earlier try this
    message had, through redeliveries and retries alike.
    """

    __slots__ = ("_message", "_owner", "_record", "_value", "settled")

    def __init__(self, record: InRecord, owner: DeliveryOwner) -> None:
        self._record = record
        self._owner = owner
        self._message: Message | None = None
        self._value: Any = Message._MISSING
        self.settled = False

    @property
    def message(self) -> Message:
        message = self._message
        if message is None:
            message = self._message = self._owner._message(self._record)
        return message

    @property
    def value(self) -> Any:
        """The message's decoded value: ``message.value``, without building the
        :class:`Message` when it was not built yet. Raises DecodeError."""
        value = self._value
        if value is Message._MISSING:
            message = self._message
            value = self._value = (
                self._owner._value(self._record) if message is None else message.value
            )
        return value

    @property
    def record(self) -> InRecord:
        """The backend's record, as fetched: raw value, key and headers, and position.
        For patterns that forward or copy a message without decoding it; do not
        change it."""
        return self._record

    @property
    def topic(self) -> str:
        return self._record.topic

    @property
    def partition(self) -> int:
        return self._record.partition

    @property
    def offset(self) -> int | str:
        return self._record.offset

    @property
    def group(self) -> str | None:
        return self._owner.group

    @property
    def attempt(self) -> int:
        record = self._record
        value = record.header(ATTEMPT)
        if value is None:
            return record.attempt
        return (int(value) if value.isdigit() else 1) + record.attempt - 1

    def header(self, name: str) -> str | None:
        """The raw header ``name`` as the backend carried it, envelope headers included."""
        return self._record.header(name)

    def ack(self) -> None:
        """Mark the message processed; it will not be delivered to this group again."""
        if not self.settled:
            self.settled = True
            self._owner._ack((self._record,))

    def nack(self, *, requeue: bool = True) -> None:
        """Give the message back: redeliver it (``requeue=True``) or drop it for this group."""
        if not self.settled:
            self.settled = True
            self._owner._nack((self._record,), requeue=requeue)

    def __repr__(self) -> str:
        return (
            f"Delivery(topic={self.topic!r}, partition={self.partition}, offset={self.offset!r}, "
            f"group={self.group!r}, attempt={self.attempt}, message={self.message!r})"
        )


class DeliveryOwner(Protocol):
    """What a :class:`Delivery` needs from the subscriber that fetched it."""

    @property
    def group(self) -> str | None: ...

    def _message(self, record: InRecord) -> Message: ...

    def _value(self, record: InRecord) -> Any: ...

    def _ack(self, records: Sequence[InRecord]) -> None: ...

    def _nack(self, records: Sequence[InRecord], *, requeue: bool) -> None: ...
