"""Publishing: each ``publish`` call is a job whose records go out on one confirm-mode
channel, keeping up to ``confirm_window`` of them unconfirmed, their frames written many
messages to a socket write.

``publish`` returns once every record is confirmed and raises on a nack, on an
unroutable return, or when the connection stays down past ``reconnect_timeout``.
Records unconfirmed when a channel or connection drops are sent again on the next one
(at-least-once).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import pika.exceptions as pex  # type: ignore[import-untyped]
import pika.frame  # type: ignore[import-untyped]
import pika.spec  # type: ignore[import-untyped]

from ...errors import (
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
)
from ..base import OutRecord
from .errors import _channel_error, _describe, _reply, map_error
from .link import _BUS_CLOSED, _Link
from .pika_hooks import frame_emitter
from .wire import (
    _BASIC,
    _FRAME_BODY,
    _FRAME_END_BYTE,
    _FRAME_HEAD,
    _FRAME_HEADER,
    _HEADER_ARGS,
    _HEADER_FRAME,
    _content,
    _pika_properties,
)

DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size


class _Job:
    """One publish call: its records, what is sent and confirmed, and how it ended."""

    __slots__ = ("done", "error", "exchange", "next", "records", "remaining", "resend", "since")

    def __init__(self, exchange: str, records: Sequence[OutRecord]) -> None:
        self.exchange = exchange
        self.records = records
        self.next = 0  #: next record never sent
        self.resend: list[int] = []  #: records to send again after a lost channel
        self.remaining = len(records)  #: records not yet confirmed
        self.error: PolybusError | None = None
        self.done = threading.Event()
        self.since = time.monotonic()

    def fail(self, error: PolybusError) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class _FrameWriter:
    """Publishes on a channel, writing the frames of many messages with one socket write.

    pika sends every frame (three per message) with its own send() call and
    encodes properties generically; building the frames here and joining them
    takes most of the client's CPU cost out of publishing. Falls back to
    ``basic_publish`` where pika_hooks finds no way to write to the connection's
    socket (``frame_emitter``).
    """

    _FLUSH_BYTES = 1 << 20

    def __init__(self, channel: Any, mandatory: bool) -> None:
        self._channel = channel
        self._mandatory = mandatory
        self._connection = channel.connection
        self._emit: Callable[[bytes], None] | None = frame_emitter(self._connection)
        self._number: int = channel.channel_number
        overhead = pika.spec.FRAME_HEADER_SIZE + pika.spec.FRAME_END_SIZE
        self._body_max: int = self._connection.params.frame_max - overhead
        self._methods: dict[tuple[str, str], bytes] = {}
        self._frames: list[bytes] = []
        self._size = 0

    def publish(self, exchange: str, record: OutRecord) -> None:
        """Queue one record; raises ConfigurationError for a header AMQP cannot carry."""
        routing_key, content = _content(record)
        body = cast(bytes, record.value)  # the adapter's publish refuses tombstones
        if self._emit is None:
            properties = _pika_properties(content)
            self._channel.basic_publish(exchange, routing_key, body, properties, self._mandatory)
            return
        number = self._number
        method = self._methods.get((exchange, routing_key))
        if method is None:
            publish = pika.spec.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=self._mandatory
            )
            method = self._methods[exchange, routing_key] = pika.frame.Method(
                number, publish
            ).marshal()
        size = len(body)
        frames = self._frames
        head = _HEADER_FRAME.pack(
            _FRAME_HEADER, number, len(content) + _HEADER_ARGS, _BASIC, 0, size
        )
        frames += (method, head, content, _FRAME_END_BYTE)
        step = self._body_max
        for start in range(0, size, step):
            chunk = body[start : start + step] if size > step else body
            frames += (_FRAME_HEAD.pack(_FRAME_BODY, number, len(chunk)), chunk, _FRAME_END_BYTE)
        self._size += size
        if self._size >= self._FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._frames or self._emit is None:
            return
        data = b"".join(self._frames)
        self._connection.bytes_sent += len(data)
        self._frames = []
        self._size = 0
        self._emit(data)


class _Publisher:
    """Publishes jobs on a confirm-mode channel, keeping up to ``window`` unconfirmed.

    State lives on the I/O thread; user threads only add jobs and wait.
    """

    def __init__(self, link: _Link, window: int, mandatory: bool) -> None:
        self._link = link
        self._window = window
        self._mandatory = mandatory
        self.max_message = DEFAULT_MAX_MESSAGE
        self._channel: Any = None  # open, in confirm mode
        self._opening: Any = None  # the channel being opened
        self._jobs: deque[_Job] = deque()  # jobs with records to send, oldest first
        self._inflight: dict[int, tuple[_Job, int]] = {}  # delivery tag -> (job, record)
        self._tag = 0  # last delivery tag used on this channel
        self._lowest = 1  # no smaller tag is in flight
        self._ticking = False

    def add(self, job: _Job) -> None:
        if self._link.loop.stopped or self not in self._link.users:
            job.fail(ClosedError(_BUS_CLOSED))
            return
        self._jobs.append(job)
        if self._channel is None:
            self._tick()
        else:
            self._pump()

    def _pump(self) -> None:
        """Send records while the confirm window has room."""
        channel = self._channel
        budget = self._window - len(self._inflight)
        if channel is None or budget <= 0 or not self._jobs:
            return
        out = _FrameWriter(channel, self._mandatory)
        publish = out.publish
        inflight = self._inflight
        jobs = self._jobs
        tag = self._tag
        while budget > 0 and jobs:
            job = jobs[0]
            indices: Sequence[int]
            if job.resend:  # sent before a channel was lost; oldest last
                indices = [job.resend.pop() for _ in range(min(budget, len(job.resend)))]
            else:
                indices = range(job.next, min(job.next + budget, len(job.records)))
                job.next = indices.stop
            if not indices or job.done.is_set():
                jobs.popleft()
                continue
            records, exchange = job.records, job.exchange
            try:
                for i in indices:
                    publish(exchange, records[i])
                    tag += 1
                    inflight[tag] = (job, i)
            except (ConfigurationError, pex.AMQPError) as exc:
                job.fail(map_error(exc))
                jobs.popleft()
            budget = self._window - len(inflight)
        self._tag = tag
        out.flush()

    def _confirmed(self, channel: Any, frame: Any) -> None:
        if channel is not self._channel:
            return  # a confirm of a closed channel: its records are being sent again
        method = frame.method
        tag = method.delivery_tag
        inflight = self._inflight
        if method.multiple:
            entries = [inflight.pop(t, None) for t in range(self._lowest, tag + 1)]
            self._lowest = max(self._lowest, tag + 1)
        else:
            entries = [inflight.pop(tag, None)]
            while self._lowest <= self._tag and self._lowest not in inflight:
                self._lowest += 1
        jobs = Counter(entry[0] for entry in entries if entry is not None)
        if isinstance(method, pika.spec.Basic.Ack):
            for job, confirmed in jobs.items():
                job.remaining -= confirmed
                if job.remaining <= 0:
                    job.done.set()
        else:
            for job in jobs:
                job.fail(PolybusError(f"RabbitMQ refused to store a message for {job.exchange!r}"))
        self._pump()

    def _returned(self, channel: Any, method: Any, _properties: Any, _body: bytes) -> None:
        if channel is not self._channel:
            return
        # Every topic has its history stream bound, so an unroutable message means
        # the topic's bindings were removed; all in-flight records to it share the fate.
        for job, _ in list(self._inflight.values()):
            if job.exchange == method.exchange:
                job.fail(
                    PolybusError(
                        f"RabbitMQ returned a message to {method.exchange!r} as unroutable "
                        f"({method.reply_code} {method.reply_text}): no queue is bound to it"
                    )
                )

    def _requeue_inflight(self) -> None:
        """Send every unconfirmed record again on the next channel (at-least-once)."""
        retry: dict[_Job, None] = {}  # in the order they were sent
        for job, i in self._inflight.values():
            if not job.done.is_set():
                job.resend.append(i)
                retry[job] = None
        self._inflight.clear()
        self._tag, self._lowest = 0, 1
        for job in retry:
            job.resend.sort(reverse=True)  # pop() takes the oldest first
        self._jobs.extendleft(reversed([job for job in retry if job not in self._jobs]))

    # channel life

    def link_opened(self, connection: Any) -> None:
        self._open(connection)

    def _open(self, connection: Any) -> None:
        """Open the confirm-mode channel, unless one is open or opening."""
        if self._channel is not None or self._opening is not None:
            return

        def opened(channel: Any) -> None:
            channel.add_on_return_callback(self._returned)
            channel.confirm_delivery(
                lambda frame: self._confirmed(channel, frame), callback=lambda _f: ready(channel)
            )

        def ready(channel: Any) -> None:
            if channel is self._opening:
                self._opening = None
                self._channel = channel
                self._pump()

        self._opening = connection.channel(on_open_callback=opened)
        self._opening.add_on_close_callback(self._closed)

    def link_lost(self, error: BaseException) -> None:
        self._channel = self._opening = None
        self._requeue_inflight()
        self._tick()

    def _closed(self, channel: Any, reason: BaseException) -> None:
        if channel is self._opening:
            self._opening = None
        elif channel is self._channel:
            self._channel = None
            if isinstance(reason, pex.ChannelClosedByBroker):
                self._blame(reason)
            self._requeue_inflight()
        else:
            return
        self._tick()
        self._link.loop.later(0.01, self._reopen)  # not at once: never spin on a failing channel

    def _reopen(self) -> None:
        connection = self._link.connection
        if connection is not None and connection.is_open:
            self._open(connection)

    def _blame(self, reason: BaseException) -> None:
        """Fail the jobs a broker channel error is about; the others are sent again."""
        code, text = _reply(reason)
        jobs = {job for job, _ in self._inflight.values()}
        blamed = False
        if code == 404 and (m := re.search(r"no exchange '([^']*)'", text)):
            for job in jobs:
                if job.exchange == m.group(1):
                    job.fail(TopicNotFound(f"topic {job.exchange!r} does not exist ({text})"))
                    blamed = True
        elif code == 406 and (m := re.search(r"max size (\d+)", text)):
            self.max_message = int(m.group(1))
            for job in jobs:
                if any(len(cast(bytes, r.value)) > self.max_message for r in job.records):
                    job.fail(MessageTooLarge(f"RabbitMQ refused an oversized message: {text}"))
                    blamed = True
        if not blamed:  # not attributable: sending the same again would fail the same way
            for job in jobs:
                job.fail(_channel_error(code, text))

    def _tick(self) -> None:
        """While there is no channel, check job deadlines every 50 ms."""
        if not self._ticking:
            self._ticking = True
            self._link.loop.later(0.05, self._expire)

    def _expire(self) -> None:
        """Fail jobs that waited for a connection longer than the reconnect deadline."""
        self._ticking = False
        if self._channel is not None:
            return
        link = self._link
        if link.down_since is not None:
            now = time.monotonic()
            for job in self._jobs:
                if now - max(job.since, link.down_since) >= link.reconnect_timeout:
                    job.fail(
                        ConnectionLost(
                            f"no connection to RabbitMQ at {link.where} for "
                            f"{link.reconnect_timeout:g}s: {_describe(link.error)}; the batch "
                            "may or may not have been stored"
                        )
                    )
            while self._jobs and self._jobs[0].done.is_set():
                self._jobs.popleft()
        if self._jobs:
            self._tick()

    def close(self) -> None:
        """Fail every job not yet done with ClosedError (I/O thread)."""
        self._link.detach(self)
        for job in {*self._jobs, *(job for job, _ in self._inflight.values())}:
            job.fail(ClosedError(_BUS_CLOSED))
        self._jobs.clear()
