"""Reading a topic's history stream up to an end marker: ``_Replay`` is the state of a
seek (or of an ephemeral reader catching up after a reconnect) that a subscription
reads through, ``_HistoryCopy`` copies the history into a new group's queue.

Both first append a marker message to the stream and read until they meet it, so
everything published after they started lies beyond it. Polybus readers of a history
stream skip markers (``MARKER_HEADER``); a replayed record's offset is its stream
offset.
"""

from __future__ import annotations

import uuid
from collections import deque
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.spec  # type: ignore[import-untyped]

from ...errors import ConnectionLost, PolybusError
from ..base import Delivery
from .names import MARKER_HEADER
from .pika_hooks import _consume

_CLOCK_SLACK_MS = 1000  # a time seek starts this much earlier, for clock skew


def _uuid7_ms(value: str) -> int | None:
    """The millisecond timestamp inside a UUIDv7 string, or None."""
    try:
        u = uuid.UUID(value)
    except ValueError:
        return None
    return u.int >> 80 if u.version == 7 else None


class _Replay:
    """A seek in progress: reads the topic's history stream up to its end marker."""

    def __init__(
        self,
        start: object,
        from_id: str | None = None,
        from_ms: int | None = None,
        *,
        after: bool = False,
        catch_up: bool = False,
    ) -> None:
        self.start = start  #: x-stream-offset to (re)start from
        self.from_id = from_id  #: skip until the record with this message id...
        self.after = after  #: ...and that record too
        self.from_ms = from_ms  #: skip until the first record at or after this time
        self.catch_up = catch_up  #: an ephemeral reader catching up after a reconnect
        self.found = from_id is None and from_ms is None
        self.reopen = False  #: the connection was lost: open again once the queue is back
        self.marker = uuid.uuid4().hex
        self.buffer: deque[tuple[int, int, Delivery]] = deque()  #: (gen, tag, record)
        self.gen = 0  #: which replay channel a buffered delivery came from
        self.channel: Any = None
        self.next_offset: int | None = None  #: first stream offset not yet taken
        self.finished = False
        self.ready: Future[None] = Future()


def _stream_time(ms: int) -> datetime:
    """An x-stream-offset timestamp (whole seconds, rounded down)."""
    return datetime.fromtimestamp(max(ms, 0) // 1000, UTC)


class _HistoryCopy:
    """Publishes a history stream's messages, from ``start`` up to an end marker appended
    first, to ``exchange`` (I/O thread).

    A stream delivery is acknowledged (which is its credit) only once its copy is
    confirmed, so at most ``prefetch`` copies are in flight. ``done`` gets the stream
    offset after the marker.
    """

    def __init__(self, stream: str, exchange: str, start: object, prefetch: int) -> None:
        self.done: Future[int] = Future()
        self._stream, self._exchange, self._start = stream, exchange, start
        self._prefetch = prefetch
        self._marker = uuid.uuid4().hex
        self._out: Any = None
        self._reader: Any = None
        self._published = 0  # publisher-confirm tags used on the out channel
        self._copies: deque[tuple[int, int]] = deque()  # (copy's tag, stream delivery tag)
        self._confirmed_alone: set[int] = set()  # confirmed ahead of an older copy
        self._end: int | None = None

    def run(self, connection: Any) -> None:
        if connection is None or not connection.is_open:
            self._fail(ConnectionLost("the RabbitMQ connection went while filling a queue"))
            return
        self._out = connection.channel(on_open_callback=self._out_opened)
        self._out.add_on_close_callback(self._closed)

    def _out_opened(self, channel: Any) -> None:
        channel.confirm_delivery(self._confirmed, callback=lambda _f: self._append_marker())

    def _append_marker(self) -> None:
        end = pika.BasicProperties(delivery_mode=2, headers={MARKER_HEADER: self._marker})
        self._out.basic_publish("", self._stream, b"", end, mandatory=True)
        self._published = 1

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            self._fail(PolybusError("RabbitMQ refused a message copied from the history"))
            return
        tag = method.delivery_tag
        if tag == 1 and self._reader is None:  # the marker is in the stream: read up to it
            self._out.connection.channel(on_open_callback=self._reader_opened)
            return
        upto = tag if method.multiple else 0
        if not method.multiple:
            self._confirmed_alone.add(tag)
        acked = None
        copies, alone = self._copies, self._confirmed_alone
        while copies and (copies[0][0] <= upto or copies[0][0] in alone):
            alone.discard(copies[0][0])
            acked = copies.popleft()[1]
        if acked is not None:
            self._reader.basic_ack(acked, multiple=True)
        self._finish_if_done()

    def _reader_opened(self, channel: Any) -> None:
        self._reader = channel
        channel.add_on_close_callback(self._closed)
        channel.basic_qos(
            prefetch_count=self._prefetch,
            callback=lambda _f: _consume(
                channel,
                self._stream,
                self._delivered,
                lambda _f: None,
                {"x-stream-offset": self._start},
            ),
        )

    def _delivered(
        self, tag: int, _redelivered: bool, key: bytes, data: bytes, p: int, body: bytes
    ) -> None:
        if self._end is not None:
            return  # past the marker
        properties = pika.spec.BasicProperties()
        properties.decode(data, p)
        headers = properties.headers or {}
        offset = headers.pop("x-stream-offset", None)
        marker = headers.get(MARKER_HEADER)
        if marker == self._marker:
            if not isinstance(offset, int):
                self._fail(PolybusError(f"{self._stream!r} gave no stream offset"))
                return
            self._end = offset + 1
            self._finish_if_done()
        elif marker is None:  # another seek's marker is not a message
            self._out.basic_publish(
                self._exchange, key.decode("utf-8", "replace"), body, properties
            )
            self._published += 1
            self._copies.append((self._published, tag))
        elif not self._copies:
            self._reader.basic_ack(tag, multiple=True)
        else:
            self._copies.append((self._copies[-1][0], tag))

    def _finish_if_done(self) -> None:
        if self._end is not None and not self._copies and not self.done.done():
            self.done.set_result(self._end)
            self._close()

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        self._close()

    def _closed(self, _channel: Any, reason: BaseException) -> None:
        self._fail(reason)  # after done: nothing

    def _close(self) -> None:
        for channel in (self._reader, self._out):
            if channel is not None and channel.is_open:
                channel.close()
