"""``RabbitMQSubscription``: a member of a group, or an ephemeral reader, consuming one
queue, settling what it read, and seeking through the topic's history.

Over 600 lines on purpose: the subscription is one object whose consuming, settling
and replaying share one state (the channel generation that makes deliveries and acks
of a lost channel stale, the buffers ``fetch`` takes from, the wake-up event, the
replay in progress), and the I/O-thread callbacks of each part check the others'.
Cut into mixins over several modules, each part would have to declare the others'
attributes, and a reader would lose sight of those shared invariants. Its helpers
live elsewhere: the wire format in ``wire``, the replay's state in ``replay``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

import pika  # type: ignore[import-untyped]
import pika.exceptions as pex  # type: ignore[import-untyped]
import pika.spec  # type: ignore[import-untyped]
from pika.data import decode_value  # type: ignore[import-untyped]

from ...envelope import CONTENT_TYPE, CORRELATION_ID, MESSAGE_ID, TIMESTAMP
from ...errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    PolybusError,
)
from ..base import Delivery
from .errors import _describe, _reply, map_error
from .link import _CLOSE_WAIT, _Link, _wait
from .names import BINDING_KEY, KEY_HEADER, MARKER_HEADER, history_queue_name, queue_name
from .pika_hooks import _consume, close_without_cancel
from .replay import _CLOCK_SLACK_MS, _Replay, _stream_time, _uuid7_ms
from .wire import (
    _BROKER_HEADERS,
    _FLAG_CONTENT_ENCODING,
    _FLAG_CONTENT_TYPE,
    _FLAG_CORRELATION_ID,
    _FLAG_DELIVERY_MODE,
    _FLAG_EXPIRATION,
    _FLAG_HEADERS,
    _FLAG_MESSAGE_ID,
    _FLAG_PRIORITY,
    _FLAG_REPLY_TO,
    _FLAG_TIMESTAMP,
    _LAX,
    _U32,
    _U64,
    _text,
)

if TYPE_CHECKING:
    from .backend import RabbitMQBackend

log = logging.getLogger(__package__)  # the adapter's logger: polybus.adapters.rabbitmq

_SUBSCRIPTION_CLOSED = "subscription is closed; subscribe again"
_ACK, _REQUEUE, _DROP, _CREDIT = 0, 1, 2, 3


class RabbitMQSubscription:
    """A member of a group (or an ephemeral reader) consuming one queue.

    One thread fetches; ``ack``/``nack`` may come from any thread (they are
    handed to the I/O thread). Deliveries arrive ahead of ``fetch`` up to
    ``prefetch``; deliveries not yet acked when the subscription closes or
    its connection drops go back to the queue for any member.
    """

    def __init__(
        self,
        backend: RabbitMQBackend,
        link: _Link,
        topic: str,
        group: str | None,
        queue_arguments: dict[str, Any],
    ) -> None:
        self._backend = backend
        self._link = link
        self._loop = link.loop
        self.topic = topic
        self._group = group
        self._queue = queue_name(topic, group) if group is not None else ""
        self._queue_arguments = queue_arguments
        self._prefetch = backend.prefetch
        self._closed = False
        self._error: PolybusError | None = None
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._buffer: deque[Delivery] = deque()
        self._gen = 0  # channel generation: deliveries and acks of an older channel are stale
        self._token = uuid.uuid4().hex[:8]  # offsets of messages that carry no id
        self._channel: Any = None
        self._settle_queue: deque[tuple[int, Any]] = deque()  # (action, handles)
        self._settle_pending = False
        self._floor = 0  # every delivery tag <= floor is settled
        self._above: set[int] = set()  # settled tags above the floor
        self._replay: _Replay | None = None
        self._redeliver: deque[Delivery] = deque()  # replayed records nacked with requeue
        self._consumer_tag: str | None = None
        self._seek_error: PolybusError | None = None
        # An ephemeral reader's queue dies with its connection; with a history, it
        # catches up after a reconnect from the oldest record it has not settled.
        self._catches_up = group is None and backend.history
        self._unsettled: dict[object, str] = {}  # handle -> message id, oldest first
        self._unsettled_lock = threading.Lock()
        self._last_id: str | None = None
        self._closing: Future[None] = Future()

    @property
    def group(self) -> str | None:
        return self._group

    # user threads

    def _check(self) -> None:
        if self._closed or self._backend.closed:
            raise ClosedError(_SUBSCRIPTION_CLOSED)
        if self._error is not None:
            raise self._error.with_traceback(None)
        error, self._seek_error = self._seek_error, None
        if error is not None:
            raise error

    def fetch(self, max_records: int, timeout: float) -> list[Delivery]:
        self._check()
        deadline = time.monotonic() + timeout
        while True:
            out = self._take(max_records)
            if out:
                return out  # a seek error found meanwhile is raised by the next fetch
            self._check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                link = self._link
                if not self._ready.is_set() and link.down_for() > link.reconnect_timeout:
                    raise ConnectionLost(
                        f"no connection to RabbitMQ at {link.where} for {link.down_for():.0f}s: "
                        f"{_describe(link.error)}; fetch again to retry"
                    )
                return []
            self._wake.clear()
            if self._buffer or self._redeliver or (self._replay and self._replay.buffer):
                continue
            self._wake.wait(remaining)

    def _take(self, max_records: int) -> list[Delivery]:
        out: list[Delivery] = []
        redeliver = self._redeliver
        while redeliver and len(out) < max_records:
            out.append(redeliver.popleft())
        replay = self._replay
        if replay is not None and not replay.finished:
            out.extend(self._take_replayed(replay, max_records - len(out)))
            if not replay.finished:
                return out
        first = len(out)
        popleft = self._buffer.popleft
        try:
            out += [popleft() for _ in range(min(len(self._buffer), max_records - first))]
        except IndexError:
            pass  # the I/O thread dropped the buffer of a lost channel meanwhile
        if self._catches_up and len(out) > first:
            with self._unsettled_lock:
                for record in out[first:]:
                    offset = str(record.offset)
                    if not offset.startswith(self._token):  # a message id, to find again
                        self._unsettled[record.handle] = self._last_id = offset
        return out

    def _take_replayed(self, replay: _Replay, max_records: int) -> list[Delivery]:
        out: list[Delivery] = []
        last_tag = 0
        gen = replay.gen
        while replay.buffer and len(out) < max_records:
            g, tag, record = replay.buffer.popleft()
            if g != gen:
                continue
            last_tag = tag
            headers = dict(record.headers)
            marker = headers.get(MARKER_HEADER)
            if marker is not None:
                if marker == replay.marker:
                    self._replay_reached_end(replay)
                    break
                continue  # another seek's marker
            if isinstance(record.offset, int):
                replay.next_offset = record.offset + 1
            if not replay.found:
                if replay.from_id is not None:
                    if headers.get(MESSAGE_ID) != replay.from_id:
                        continue
                    replay.found = True
                    if replay.after:
                        continue
                elif replay.from_ms is not None and record.timestamp_ms < replay.from_ms:
                    continue
                replay.found = True
            out.append(record)
        if last_tag:
            self._settle_queue.append((_CREDIT, (gen, last_tag)))
            self._schedule_flush()
        return out

    def _replay_reached_end(self, replay: _Replay) -> None:
        if not replay.found and replay.start != "first":
            # the target is older than its time suggested (clock skew): scan from the start
            replay.start = "first"
            replay.next_offset = None
            self._loop.submit(lambda: self._reopen_replay(replay))
            return
        replay.finished = True
        if self._replay is replay:
            self._replay = None
        self._loop.submit(lambda: self._end_replay(replay))
        if not replay.found and replay.catch_up:
            log.warning(
                "polybus: %r expired from the history of %r: an ephemeral subscriber may have "
                "missed messages published while it was disconnected",
                replay.from_id,
                self.topic,
            )
        elif not replay.found:
            self._seek_error = ConfigurationError(
                f"seek target {replay.from_id!r} is not in the history of {self.topic!r} "
                "(expired by retention, or never published to it); reading the group's "
                "queue again"
            )

    def _record(
        self,
        tag: int,
        redelivered: bool,
        routing_key: bytes,
        data: bytes,
        p: int,
        body: bytes,
        handle: object,
        replay: bool = False,
    ) -> Delivery:
        """The record of a delivery whose content properties start at ``data[p]``
        (AMQP 0-9-1 section 4.2.6.1): they and the header table become text headers."""
        flags = data[p] << 8 | data[p + 1]
        p += 2
        headers: list[tuple[str, str]] = []
        message_id: str | None = None
        if flags & _FLAG_CONTENT_TYPE:
            n = data[p]
            headers.append((CONTENT_TYPE, data[p + 1 : p + 1 + n].decode("utf-8", _LAX)))
            p += n + 1
        if flags & _FLAG_CONTENT_ENCODING:
            p += data[p] + 1
        table = table_end = 0
        if flags & _FLAG_HEADERS:
            table = p + 4
            table_end = p = table + _U32.unpack_from(data, p)[0]
        p += (flags & _FLAG_DELIVERY_MODE != 0) + (flags & _FLAG_PRIORITY != 0)  # an octet each
        if flags & _FLAG_CORRELATION_ID:
            n = data[p]
            headers.append((CORRELATION_ID, data[p + 1 : p + 1 + n].decode("utf-8", _LAX)))
            p += n + 1
        if flags & _FLAG_REPLY_TO:
            p += data[p] + 1
        if flags & _FLAG_EXPIRATION:
            p += data[p] + 1
        if flags & _FLAG_MESSAGE_ID:
            n = data[p]
            message_id = data[p + 1 : p + 1 + n].decode("utf-8", _LAX)
            headers.append((MESSAGE_ID, message_id))
            p += n + 1
        sent_s = _U64.unpack_from(data, p)[0] if flags & _FLAG_TIMESTAMP else None  # AMQP: seconds
        timestamp_ms = 0
        attempt = 2 if redelivered else 1
        key: bytes | None = routing_key or None
        stream_offset: object = None
        p = table
        while p < table_end:
            n = data[p]
            name = data[p + 1 : p + 1 + n].decode("utf-8", _LAX)
            p += n + 1
            if data[p] == 83:  # "S", a long string: the usual kind, decoded here
                n = _U32.unpack_from(data, p + 1)[0]
                text = data[p + 5 : p + 5 + n].decode("utf-8", _LAX)
                p += n + 5
            else:
                value, p = decode_value(data, p)
                if name in _BROKER_HEADERS:
                    if name == "x-stream-offset":
                        stream_offset = value
                    elif isinstance(value, int):  # x-delivery-count
                        attempt = value + 1
                    continue
                text = _text(value)
            if name == TIMESTAMP:
                if text.isdigit():
                    timestamp_ms = int(text)
            elif name == KEY_HEADER:
                try:
                    key = base64.b64decode(text, validate=True)
                    continue
                except (binascii.Error, ValueError):
                    pass
            elif name == MESSAGE_ID and message_id is None:
                message_id = text
            headers.append((name, text))
        if not timestamp_ms:
            timestamp_ms = sent_s * 1000 if sent_s is not None else int(time.time() * 1000)
        position: int | str
        if replay and isinstance(stream_offset, int):
            position = stream_offset
        else:
            position = message_id or f"{self._token}.{self._gen}.{tag}"
        return Delivery(
            self.topic, 0, position, body, key, tuple(headers), timestamp_ms, attempt, handle
        )

    def ack(self, records: Sequence[Delivery]) -> None:
        self._settle(records, _ACK)

    def commit(self) -> None:
        """Send every queued ack now; AMQP acks are not confirmed, so sent is durable."""
        self._check()
        done: Future[None] = Future()

        def flush() -> None:
            self._flush()
            done.set_result(None)

        self._loop.submit(flush)
        _wait(done, lambda: self._closed or self._backend.closed)

    def nack(self, records: Sequence[Delivery], *, requeue: bool) -> None:
        self._settle(records, _REQUEUE if requeue else _DROP)

    def _settle(self, records: Sequence[Delivery], action: int) -> None:
        if self._closed or self._backend.closed:
            raise ClosedError(_SUBSCRIPTION_CLOSED)
        handles = [record.handle for record in records]
        self._settle_queue.append((action, handles))
        self._schedule_flush()
        if self._catches_up:
            with self._unsettled_lock:
                for handle in handles:
                    self._unsettled.pop(handle, None)
        if action == _REQUEUE:
            for record in records:
                if type(record.handle) is _Replay:
                    # a replay is this member's own read of the history: redeliver it locally
                    record.delivery_count += 1
                    self._redeliver.append(record)
                    self._wake.set()

    def _schedule_flush(self) -> None:
        # _flush clears the flag before it drains, so it sees what was queued before
        if not self._settle_pending:
            self._settle_pending = True
            try:
                self._loop.submit(self._flush)
            except ClosedError:
                pass

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp_ms: int | None = None
    ) -> None:
        self._check()
        if not self._backend.history:
            raise CapabilityError("seek needs the topic history: connect with history=true")
        if partition != 0:
            raise ConfigurationError(
                f"RabbitMQ topics deliver everything as partition 0; cannot seek partition "
                f"{partition}"
            )
        if (offset is None) == (timestamp_ms is None):
            raise ConfigurationError("seek needs exactly one of offset= or timestamp_ms=")
        if isinstance(offset, int):
            replay = _Replay(max(offset, 0))
        elif isinstance(offset, str):
            ms = _uuid7_ms(offset)
            start: object = "first" if ms is None else _stream_time(ms - _CLOCK_SLACK_MS)
            replay = _Replay(start, offset)
        else:
            assert timestamp_ms is not None
            replay = _Replay(_stream_time(timestamp_ms - _CLOCK_SLACK_MS), from_ms=timestamp_ms)
        self._start_replay(replay)

    def _start_replay(self, replay: _Replay) -> None:
        deadline = time.monotonic() + self._link.reconnect_timeout
        self._link.wait_open(deadline)
        old, self._replay = self._replay, replay

        def begin() -> None:
            if old is not None:
                self._end_replay(old)
            connection = self._link.connection
            if connection is None or not connection.is_open or not self._ready.is_set():
                replay.reopen = True  # _resume starts it once the queue consumes again
                return
            self._open_replay(replay, connection, marker=True)

        self._loop.submit(begin)
        try:
            _wait(replay.ready, lambda: self._backend.closed, deadline)
        except BaseException as exc:
            self._replay = None
            self._loop.submit(lambda: self._end_replay(replay))
            if isinstance(exc, pex.ChannelClosedByBroker) and _reply(exc)[0] == 404:
                raise CapabilityError(
                    f"cannot seek: topic {self.topic!r} has no history stream "
                    f"{history_queue_name(self.topic)!r} (declared without history?)"
                ) from exc
            raise map_error(exc) from exc

    def lag(self) -> dict[int, int]:
        raise CapabilityError(
            "RabbitMQ does not report lag: AMQP does not tell the messages other members hold"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()  # a fetch waiting in another thread raises ClosedError now
        self._backend._forget(self)
        try:
            self._loop.submit(self._shutdown)
        except ClosedError:
            return
        try:
            self._closing.result(_CLOSE_WAIT)
        except (FutureTimeout, Exception):
            pass

    # I/O thread

    def setup(self) -> None:
        self._link.attach(self)

    def link_opened(self, connection: Any) -> None:
        if not self._closed:
            self._open(connection)  # replays resume once the queue is back (_resume)

    def link_lost(self, error: BaseException) -> None:
        self._ready.clear()
        self._channel = None
        self._gen += 1
        self._buffer.clear()
        replay = self._replay
        if replay is not None:
            replay.channel = None
            replay.gen += 1
            replay.buffer.clear()
            replay.reopen = True
            if replay.next_offset is not None:
                replay.start = replay.next_offset
        elif self._catches_up:
            self._replay = self._catch_up()

    def _catch_up(self) -> _Replay | None:
        """A replay from the oldest unsettled record (or after the last one fetched)."""
        with self._unsettled_lock:
            oldest = next(iter(self._unsettled.values()), None)
            self._unsettled.clear()
        target = oldest or self._last_id
        if target is None:
            return None
        ms = _uuid7_ms(target)
        start = "first" if ms is None else _stream_time(ms - _CLOCK_SLACK_MS)
        replay = _Replay(start, target, after=oldest is None, catch_up=True)
        replay.reopen = True
        return replay

    def _resume(self, connection: Any) -> None:
        """After the queue consumes again: read the history up to a marker written now,
        so nothing published since the old queue went is missed."""
        replay = self._replay
        if replay is not None and replay.reopen and not replay.finished:
            replay.reopen = False
            self._open_replay(replay, connection, marker=True)

    def _open(self, connection: Any) -> None:
        self._gen += 1
        gen = self._gen
        self._floor = 0
        self._above.clear()

        def opened(channel: Any) -> None:
            if gen != self._gen:
                channel.close()
                return
            self._channel = channel
            channel.add_on_close_callback(lambda ch, reason: self._on_channel_closed(gen, reason))
            channel.add_on_cancel_callback(lambda _f: self._on_cancelled(gen))
            channel.basic_qos(prefetch_count=self._prefetch, callback=lambda _f: declare(channel))

        def declare(channel: Any) -> None:
            if self._group is None:
                channel.queue_declare(
                    "", exclusive=True, auto_delete=True, callback=lambda f: bind(channel, f)
                )
            else:
                channel.queue_declare(
                    self._queue,
                    durable=True,
                    arguments=self._queue_arguments,
                    callback=lambda f: bind(channel, f),
                )

        def bind(channel: Any, frame: Any) -> None:
            queue = frame.method.queue
            channel.queue_bind(
                queue, self.topic, BINDING_KEY, callback=lambda _f: consume(channel, queue)
            )

        def consume(channel: Any, queue: str) -> None:
            sink = functools.partial(self._delivered, gen)
            self._consumer_tag = _consume(channel, queue, sink, lambda _f: ready())

        def ready() -> None:
            if gen == self._gen:
                self._ready.set()
                self._resume(connection)

        connection.channel(on_open_callback=opened)

    def _delivered(
        self, gen: int, tag: int, redelivered: bool, key: bytes, data: bytes, p: int, body: bytes
    ) -> None:
        if gen == self._gen:  # else the channel is closing: the broker takes the delivery back
            self._buffer.append(self._record(tag, redelivered, key, data, p, body, (gen, tag)))
            if not self._wake.is_set():
                self._wake.set()

    def _on_channel_closed(self, gen: int, reason: BaseException) -> None:
        if gen != self._gen or self._closed:
            return
        self._channel = None
        if not isinstance(reason, pex.ChannelClosedByBroker):
            return  # the connection went: link_lost and link_opened take over
        if self._ready.is_set():
            # e.g. an ack timeout (consumer_timeout): the broker returned the unacked
            # messages; consume again on a new channel
            log.warning("polybus: RabbitMQ closed the channel of %r: %r", self.topic, reason)
            self._again()
        else:
            self._fail(map_error(reason))  # a setup error, e.g. a queue declared differently

    def _on_cancelled(self, gen: int) -> None:
        if gen == self._gen and not self._closed:
            log.warning(
                "polybus: RabbitMQ cancelled the consumer of %r (queue deleted?)", self.topic
            )
            channel, self._channel = self._channel, None
            if channel is not None and channel.is_open:
                channel.close()
            self._again()

    def _again(self) -> None:
        """Set the consumer up again soon, on a new channel (stale deliveries are dropped)."""
        self._ready.clear()
        self._gen += 1
        self._buffer.clear()

        def reopen() -> None:
            connection = self._link.connection
            if not self._closed and connection is not None and connection.is_open:
                self._open(connection)

        self._loop.later(0.1, reopen)

    def _fail(self, error: PolybusError) -> None:
        self._error = error
        self._wake.set()
        self._ready.set()  # wake subscribe(), which reports the error

    def _flush(self) -> None:
        """Send the acks and nacks user threads queued, as few frames as possible."""
        self._settle_pending = False
        queue = self._settle_queue
        channel = self._channel
        live = channel is not None and channel.is_open
        gen = self._gen
        acks: list[int] = []
        while queue:
            action, handles = queue.popleft()
            if action == _CREDIT:  # more credit for a replay's stream consumer
                g, tag = handles
                replay = self._replay
                credit = replay.channel if replay is not None and g == replay.gen else None
                if credit is not None and credit.is_open:
                    credit.basic_ack(tag, multiple=True)
                continue
            if not live:
                continue  # that channel is gone: the broker redelivers its messages
            # replayed records and those of an older channel are not this channel's
            tags = [h[1] for h in handles if type(h) is tuple and h[0] == gen]
            if action == _ACK:
                acks += tags
                continue
            for tag in tags:
                if self._mark(tag):
                    if action == _REQUEUE:
                        channel.basic_nack(tag, requeue=True)
                    else:
                        channel.basic_reject(tag, requeue=False)
        if not acks:
            return
        acks.sort()
        upto = 0  # a run from the floor up goes in one multiple ack
        for tag in acks:
            if tag == self._floor + 1:
                self._mark(tag)
                upto = tag
            elif self._mark(tag):
                channel.basic_ack(tag)
        if upto:
            channel.basic_ack(upto, multiple=True)

    def _mark(self, tag: int) -> bool:
        """Record ``tag`` as settled, moving the floor over every settled tag; False if
        it was settled already (settling a tag twice would close the channel)."""
        floor = self._floor
        above = self._above
        if tag != floor + 1:
            if tag <= floor or tag in above:
                return False
            above.add(tag)
            return True
        floor = tag
        while above and floor + 1 in above:
            floor += 1
            above.remove(floor)
        self._floor = floor
        return True

    def _shutdown(self) -> None:
        """Send the acks, then close the channel: the broker returns what is unacked."""
        self._link.detach(self)
        self._flush()
        if self._replay is not None:
            self._end_replay(self._replay)
        channel, tag = self._channel, self._consumer_tag
        self._channel = None
        self._gen += 1
        if channel is None or not (channel.is_open or channel.is_opening):
            self._close_done()
            return
        channel.add_on_close_callback(lambda _ch, _r: self._close_done())
        # Close without basic.cancel: a quorum queue requeues deliveries that reach a
        # cancelled consumer at the back of the queue, so the next member would read out
        # of order. Closing the channel returns every unacked delivery to the front, in
        # order.
        close_without_cancel(channel, tag)

    def _close_done(self) -> None:
        self._buffer.clear()
        if not self._closing.done():
            self._closing.set_result(None)

    # replay channel (I/O thread)

    def _open_replay(self, replay: _Replay, connection: Any, *, marker: bool) -> None:
        """Consume the history from ``replay.start``; with ``marker``, first append a new
        end marker and wait for its confirm, so everything published after the seek
        returned lies beyond it."""
        replay.gen += 1
        gen = replay.gen
        stream = history_queue_name(self.topic)

        def opened(channel: Any) -> None:
            if gen != replay.gen or replay.finished:
                channel.close()
                return
            replay.channel = channel
            channel.add_on_close_callback(lambda _ch, reason: closed(reason))
            channel.basic_qos(prefetch_count=self._prefetch, callback=lambda _f: qos_ok(channel))

        def qos_ok(channel: Any) -> None:
            if not marker:
                consume(channel)
                return
            replay.marker = uuid.uuid4().hex
            channel.confirm_delivery(
                lambda frame: confirmed(channel, frame), callback=lambda _f: publish(channel)
            )

        def publish(channel: Any) -> None:
            properties = pika.BasicProperties(
                delivery_mode=2, headers={MARKER_HEADER: replay.marker}
            )
            channel.basic_publish("", stream, b"", properties, mandatory=True)

        def confirmed(channel: Any, frame: Any) -> None:
            if isinstance(frame.method, pika.spec.Basic.Ack):
                consume(channel)
            elif not replay.ready.done():
                replay.ready.set_exception(PolybusError("RabbitMQ refused the replay marker"))

        def consume(channel: Any) -> None:
            _consume(
                channel,
                stream,
                delivered,
                lambda _f: None if replay.ready.done() else replay.ready.set_result(None),
                {"x-stream-offset": replay.start},
            )

        def delivered(
            tag: int, redelivered: bool, key: bytes, data: bytes, p: int, body: bytes
        ) -> None:
            if gen == replay.gen:
                record = self._record(tag, redelivered, key, data, p, body, replay, replay=True)
                replay.buffer.append((gen, tag, record))
                if not self._wake.is_set():
                    self._wake.set()

        def closed(reason: BaseException) -> None:
            if gen == replay.gen:
                replay.channel = None
            if not replay.ready.done():
                replay.ready.set_exception(reason)

        connection.channel(on_open_callback=opened)

    def _reopen_replay(self, replay: _Replay) -> None:
        """Read the history again from ``replay.start``, up to the same marker."""
        channel, replay.channel = replay.channel, None
        if channel is not None and channel.is_open:
            channel.close()
        replay.buffer.clear()
        connection = self._link.connection
        if connection is not None and connection.is_open and not self._closed:
            self._open_replay(replay, connection, marker=False)

    def _end_replay(self, replay: _Replay) -> None:
        replay.finished = True
        replay.gen += 1
        replay.buffer.clear()
        channel, replay.channel = replay.channel, None
        if channel is not None and channel.is_open:
            channel.close()
        if self._replay is replay:
            self._replay = None
        self._wake.set()
