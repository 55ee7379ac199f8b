# Over 800 lines until the adapter becomes a package (names, errors, wire, link, publisher,
# subscription, backend): the publisher, the subscription and the hand-cut AMQP frames share
# pika's private connection state, which must first move behind one module that checks
# those internals at import.
"""RabbitMQ as a backend: ``amqp://`` and ``amqps://`` URLs, on pika.

How the topic/group model maps onto RabbitMQ. Names are predictable, so plain
clients and the management UI find everything (``%`` and ``/`` in topic and
group names are percent-escaped in queue names, so no two names collide):

- **topic** ``T``: a durable fanout exchange ``T``. A plain client publishing
  to it reaches every group. Its partition count is metadata only (RabbitMQ
  has no partitions; delivered records say partition 0); it is kept as the
  ``alternate-exchange`` argument of an internal exchange
  ``polybus.partitions.T`` that nothing publishes to, because that is the one
  exchange argument RabbitMQ compares when an exchange is declared again.
- **history** (unless ``history=false``): a stream queue ``T.history`` bound
  to ``T`` keeps every message for replay. Retention maps to its ``x-max-age``
  (default 7 days) and ``x-max-length-bytes``; a group's queue keeps its
  backlog until the group consumes it, as RabbitMQ queues do.
- **durable group** ``G``: a durable queue ``T/G`` bound to ``T``, a quorum
  queue unless ``queue_type=classic``. Created by ``declare(groups=...)`` or a
  first subscribe with ``start="earliest"``, it is first filled with a copy of
  ``T.history`` (about 27 k msg/s here), so it holds what the topic keeps, as
  a new group does on every backend; without a history, or made by a subscribe
  with ``start="latest"``, it gets what is published from then on. While it is
  filled an exclusive queue ``polybus.filling-lock.T/G`` keeps other processes
  waiting, and an exchange ``polybus.filling.T/G`` exists until the copy is
  complete: a copy cut short is done again (at-least-once).
- **ephemeral subscriber**: an exclusive, auto-delete, server-named queue
  bound to ``T``; ``start="earliest"`` first replays the history.
- **order**: members of a group compete for one queue, so there is no per-key
  order (no ``KEY_ORDER``); a group with a single member reads in publish order.
- **ack** is basic.ack (runs of acks coalesced into one ``multiple`` ack),
  **nack(requeue=True)** is basic.nack with requeue, **nack(requeue=False)**
  is basic.reject (dropped); a quorum queue redelivers a requeued message
  after the ones already waiting. A member that closes or loses its channel
  gives its unacked deliveries (prefetched ones too) back to the front of the
  queue. ``attempt`` is quorum's ``x-delivery-count`` + 1 (it counts those
  returns too); on classic queues it is 2 for any redelivery. Dead members are
  found by their connection (heartbeats), so ``session_timeout`` does not apply.
- **seek** replays ``T.history`` from a record's offset (a replayed record's
  offset is its stream offset, a queue-delivered record's offset is its
  message id) or from a time, up to the end of the history as of the seek (a
  marker message the seek appends to the stream, invisible to polybus readers),
  then the member continues with its group's queue. Replayed records are
  settled locally (the group's queue is untouched).
- **lag** is not offered: AMQP 0-9-1 reports a queue's ready messages but not
  the messages other members hold unacknowledged.
- **delay** and **compaction** are not offered.

Threads: one I/O thread per backend owns its two pika connections (one
publishes and declares, one consumes, so a publisher throttled by a broker
alarm never stalls acks); every public method may be called from any thread
and hands its work to it. Open a backend after ``fork()``, not before.
Connections lost are opened again with backoff, everything this backend
declared is declared again, and consumers consume again; deliveries not
acked by then are redelivered by the broker (their acks are ignored).

Publishing uses publisher confirms with a window of unconfirmed messages
(``confirm_window``), so a batch costs far fewer round trips than messages;
``publish`` returns once every record is confirmed and raises on a nack, on an
unroutable return, or when the connection stays down past
``reconnect_timeout``. Records unconfirmed when a connection drops are
published again after reconnecting (at-least-once).

URL options (besides pika's own: ``heartbeat``, ``socket_timeout``,
``ssl_options``, ...): ``reconnect_timeout=<seconds>`` (30), ``connect_timeout=<seconds>``
(2: how long opening a bus waits for the broker to accept a connection before raising
BrokerUnreachable; then at least 5 s more for it to open the AMQP connection),
``queue_type=quorum|classic``, ``prefetch=<n>`` (basic.qos per subscriber,
1000; lower it for slow handlers, so that the members of a work queue share
the work), ``confirm_window=<n>`` (1000), ``history=true|false`` (true; false
drops the replay stream and with it seek and retention, and saves the broker
writing every message twice).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import logging
import re
import struct
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika  # type: ignore[import-untyped]
import pika.exceptions as pex  # type: ignore[import-untyped]
import pika.frame  # type: ignore[import-untyped]
import pika.spec  # type: ignore[import-untyped]
from pika.adapters.select_connection import (  # type: ignore[import-untyped]
    IOLoop,
    SelectConnection,
)
from pika.adapters.utils import connection_workflow  # type: ignore[import-untyped]
from pika.data import decode_value  # type: ignore[import-untyped]

from ..errors import (
    BrokerUnreachable,
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
    redact_url,
)
from ..message import CONTENT_TYPE, CORRELATION_ID, MESSAGE_ID, TIMESTAMP
from ._support import connect_timeout, ensure_reachable
from .base import (
    Capability,
    InRecord,
    OutRecord,
    Receipt,
    Start,
    TopicSpec,
    tombstone_refused,
)

__all__ = [
    "BINDING_KEY",
    "EXCHANGE_TYPE",
    "RabbitMQBackend",
    "RabbitMQSubscription",
    "filling_flag_name",
    "from_client",
    "from_url",
    "history_queue_name",
    "map_error",
    "partitions_exchange_name",
    "queue_arguments",
    "queue_name",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: a binary or long key travels base64-encoded in this header (routing keys are short text)
KEY_HEADER = "polybus-key"
#: marks the end of a replay; polybus readers of a history stream skip these
MARKER_HEADER = "polybus-replay-end"
_BROKER_HEADERS = frozenset({"x-delivery-count", "x-stream-offset"})
_LAX = "surrogateescape"  # text that is not UTF-8 keeps its bytes
_PROPERTIES = frozenset({MESSAGE_ID, CONTENT_TYPE, CORRELATION_ID})  # carried as AMQP properties
_KEY_NAME = bytes((len(KEY_HEADER),)) + KEY_HEADER.encode()  # as an AMQP short string

DEFAULT_HISTORY_AGE_S = 7 * 24 * 3600
DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size
_CLOCK_SLACK_MS = 1000  # a time seek starts this much earlier, for clock skew
_MIN_BACKOFF, _MAX_BACKOFF = 0.05, 2.0
_BUS_CLOSED = "bus is closed; connect again"
_SUBSCRIPTION_CLOSED = "subscription is closed; subscribe again"
_CLOSE_WAIT = 5.0  # how long closing waits for the broker's close-ok
_HANDSHAKE_TIMEOUT = 5.0  # at least this long for a reachable broker to open a connection

_OPTIONS = (
    "confirm_window",
    "connect_timeout",
    "history",
    "prefetch",
    "queue_type",
    "reconnect_timeout",
)
_PIKA_OPTIONS = tuple(
    sorted(
        n.removeprefix("_set_url_") for n in dir(pika.URLParameters) if n.startswith("_set_url_")
    )
)


# -- names ---------------------------------------------------------------------


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


#: the exchange type of a topic: every queue bound to it (every group) gets every message
EXCHANGE_TYPE = "fanout"
#: the routing key queues are bound with (a fanout exchange routes without it); a
#: message's key travels as its routing key
BINDING_KEY = ""


def queue_name(topic: str, group: str) -> str:
    """The durable queue of ``group`` on ``topic``: ``topic/group`` (``%`` and ``/`` escaped)."""
    return f"{_escape(topic)}/{_escape(group)}"


def queue_arguments(queue_type: str = "quorum") -> dict[str, Any]:
    """The arguments a durable group's queue is declared with (``queue_type=`` option)."""
    return {"x-queue-type": queue_type}


def history_queue_name(topic: str) -> str:
    """The stream queue keeping ``topic``'s history: ``topic.history`` (escaped as above)."""
    return f"{_escape(topic)}.history"


def partitions_exchange_name(topic: str) -> str:
    """The internal exchange whose ``alternate-exchange`` argument records the partition count."""
    return f"polybus.partitions.{topic}"


def _check_name(kind: str, name: str) -> None:
    if not name:
        raise ConfigurationError(f"{kind} name must not be empty")
    if len(name.encode()) > 255:
        raise ConfigurationError(
            f"{kind} name {name[:40]!r}... is too long: RabbitMQ names hold at most 255 bytes"
        )
    if name.startswith("amq."):
        raise ConfigurationError(f"{kind} name {name!r}: names starting with 'amq.' are reserved")


# -- errors --------------------------------------------------------------------

_CONNECTION_ERRORS = (
    pex.AMQPConnectionError,
    connection_workflow.AMQPConnectorException,
    pex.ConnectionClosed,
)
_REFUSED = (pex.AuthenticationError, pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError)


def _refused(error: BaseException) -> bool:
    """The broker refused the login or the vhost (pika only guesses from the stage at which
    a connection dropped; a guess without the broker's Connection.Close is a network
    problem)."""
    if isinstance(error, pex.AuthenticationError):
        return True
    return isinstance(error, _REFUSED) and "ConnectionClosedByBroker" in str(error.args)


_INEQUIVALENT = re.compile(
    r"inequivalent arg '([^']+)' for (\w+) '([^']*)' in vhost '[^']*': (.*)$"
)


def _reply(exc: BaseException) -> tuple[int, str]:
    """(reply code, reply text) of a pika close exception; (0, str(exc)) if it has none."""
    args = exc.args
    if len(args) >= 2 and isinstance(args[0], int):
        return args[0], str(args[1])
    return 0, str(exc)


def _describe(exc: BaseException | None) -> str:
    """repr() of a client exception, even one whose own repr fails."""
    try:
        return repr(exc)
    except Exception:
        return f"{type(exc).__name__}{exc.args!r}" if exc is not None else "None"


def map_error(exc: BaseException) -> PolybusError:
    """Translate a pika exception into the polybus tree (never raises).

    Transport problems become ConnectionLost; broker channel errors by reply
    code: 404 TopicNotFound, 406 ConfigurationError naming the difference (or
    MessageTooLarge), 403 ConfigurationError about permissions.
    """
    try:
        return _map_error(exc)
    except Exception as failure:  # a malformed exception must not hide the original
        return PolybusError(f"RabbitMQ error {type(exc).__name__}: {_describe(exc)} ({failure!r})")


def _map_error(exc: BaseException) -> PolybusError:
    if isinstance(exc, PolybusError):
        return exc
    name = type(exc).__name__
    if _refused(exc):
        return ConfigurationError(
            f"RabbitMQ refused the connection ({name}): check the user, password and "
            f"virtual host: {_describe(exc)}"
        )
    if isinstance(exc, pex.ConnectionClosedByBroker):
        code, text = _reply(exc)
        if code in (403, 530):
            return ConfigurationError(f"RabbitMQ refused access ({code}): {text}")
        return ConnectionLost(f"RabbitMQ closed the connection ({code}): {text}")
    if isinstance(exc, pex.ConnectionClosedByClient):
        return ClosedError(f"the RabbitMQ connection was closed: {_reply(exc)[1]}")
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectionLost(f"connection to RabbitMQ lost ({name}): {_describe(exc)}")
    if isinstance(exc, pex.ChannelClosedByBroker):
        return _channel_error(*_reply(exc))
    if isinstance(exc, pex.ChannelClosedByClient | pex.ChannelWrongStateError):
        return ClosedError(f"the RabbitMQ channel is closed ({name}): {_describe(exc)}")
    if isinstance(exc, pex.ChannelClosed):
        return _channel_error(*_reply(exc))
    if isinstance(exc, pex.UnroutableError):
        return PolybusError(
            "RabbitMQ returned a message as unroutable: no queue is bound to the topic's "
            f"exchange ({_describe(exc)})"
        )
    if isinstance(exc, pex.NackError):
        return PolybusError(f"RabbitMQ refused to store a message (basic.nack): {_describe(exc)}")
    if isinstance(exc, pex.ShortStringTooLong):
        return ConfigurationError(f"a name or property is longer than 255 bytes: {_describe(exc)}")
    if isinstance(exc, pex.BodyTooLongError):
        return MessageTooLarge(f"a message body exceeds its declared size: {_describe(exc)}")
    if isinstance(exc, pex.MethodNotImplemented):
        return CapabilityError(f"this RabbitMQ server does not implement {_describe(exc)}")
    if isinstance(exc, pex.ConsumerCancelled):
        return PolybusError("RabbitMQ cancelled the consumer (was its queue deleted?)")
    if isinstance(exc, pex.ProtocolSyntaxError | pex.InvalidChannelNumber):
        return ConnectionLost(f"AMQP protocol error ({name}): {_describe(exc)}")
    return PolybusError(f"RabbitMQ client error ({name}): {_describe(exc)}")


def _channel_error(code: int, text: str) -> PolybusError:
    if code == 404:
        return TopicNotFound(f"RabbitMQ: {text}")
    if code == 403:
        return ConfigurationError(f"RabbitMQ refused access ({code}); check permissions: {text}")
    if code == 406:
        if "max size" in text:
            return MessageTooLarge(f"RabbitMQ refused an oversized message: {text}")
        match = _INEQUIVALENT.search(text)
        if match:
            arg, kind, name, difference = match.groups()
            return ConfigurationError(
                f"{kind} {name!r} already exists with a different {arg!r} ({difference}); "
                "declare it the same way everywhere, or delete it first"
            )
        return ConfigurationError(f"RabbitMQ refused the declaration (406): {text}")
    if code == 405:
        return ConfigurationError(f"RabbitMQ: the resource is locked by another connection: {text}")
    return PolybusError(f"RabbitMQ closed the channel ({code}): {text}")


# -- construction --------------------------------------------------------------


def _number(options: dict[str, str], name: str, default: float, url: str) -> float:
    try:
        value = float(options.get(name, default))
    except ValueError:
        raise ConfigurationError(f"{name} must be a number in {redact_url(url)!r}") from None
    if value <= 0:
        raise ConfigurationError(f"{name} must be positive in {redact_url(url)!r}")
    return value


def from_url(url: str) -> RabbitMQBackend:
    """Connect to the broker ``url`` names: ``amqp[s]://user:password@host:port/vhost?options``."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"not a RabbitMQ URL: {redact_url(url)!r}; use amqp:// or amqps://"
        )
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    unknown: list[str] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            ours[name] = value
        elif name in _PIKA_OPTIONS:
            theirs.append((name, value))
        else:
            unknown.append(name)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {sorted(unknown)} in {redact_url(url)!r}; "
            f"known: {', '.join(sorted(_OPTIONS + _PIKA_OPTIONS))}"
        )
    try:
        parameters = pika.URLParameters(urlunsplit(parts._replace(query=urlencode(theirs))))
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad RabbitMQ URL {redact_url(url)!r}: {exc}") from None
    history = ours.get("history", "true").lower()
    if history not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ConfigurationError(f"history must be true or false in {redact_url(url)!r}")
    timeout = connect_timeout(ours.get("connect_timeout"))
    ensure_reachable("RabbitMQ", [(parameters.host, parameters.port)], timeout)
    return RabbitMQBackend(
        parameters,
        reconnect_timeout=_number(ours, "reconnect_timeout", 30.0, url),
        queue_type=ours.get("queue_type"),
        prefetch=int(_number(ours, "prefetch", 1000, url)),
        confirm_window=int(_number(ours, "confirm_window", 1000, url)),
        history=history in ("true", "1", "yes", "on"),
        # the broker answered TCP; a healthy one then opens in milliseconds
        handshake_timeout=max(timeout, _HANDSHAKE_TIMEOUT),
    )


def from_client(client: object) -> RabbitMQBackend:
    """Wrap connection settings of pika: a ``pika.ConnectionParameters`` or
    ``pika.URLParameters`` (the backend opens its own connections from them).

    A pika connection object is refused: pika connections are not thread-safe
    and the backend needs connections it owns.
    """
    if isinstance(client, pika.connection.Parameters):
        return RabbitMQBackend(client)
    raise ConfigurationError(
        f"cannot build a RabbitMQ backend from a {type(client).__name__}: pass "
        "pika.ConnectionParameters(...) or pika.URLParameters(url) (a connection cannot be "
        "shared: pika connections are not thread-safe)"
    )


# -- the I/O thread --------------------------------------------------------------


class _Loop:
    """One thread running a pika IOLoop. Every pika object is touched only on it."""

    def __init__(self) -> None:
        self.ioloop = IOLoop()
        self.stopped = False
        self._thread = threading.Thread(target=self._run, name="polybus-rabbitmq-io", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.stopped:
            try:
                self.ioloop.start()
            except Exception:  # a bug in a callback must not kill every connection
                log.exception("polybus: error on the RabbitMQ I/O thread")
        self.ioloop.close()

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread soon (thread-safe); ClosedError once stopped."""
        if not self.stopped:
            try:
                self.ioloop.add_callback_threadsafe(fn)
                return
            except (OSError, AttributeError):  # the loop closed meanwhile
                pass
        raise ClosedError(_BUS_CLOSED)

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread after ``delay`` seconds (I/O thread only)."""
        self.ioloop.call_later(delay, fn)

    def in_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self) -> None:
        if self.stopped:
            return
        self.ioloop.add_callback_threadsafe(self._stop)
        self._thread.join(_CLOSE_WAIT)

    def _stop(self) -> None:
        self.stopped = True
        self.ioloop.stop()


#: (delivery tag, redelivered, routing key, buffer, offset of the content properties, body)
_Sink = Callable[[int, bool, bytes, bytes, int, bytes], None]

_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
#: a method frame's head, its method (class id << 16 | method id), a short string's length
_DELIVER_HEAD = struct.Struct(">BHIIB")
_BASIC_DELIVER = 60 << 16 | 60
_DELIVER_ARGS = struct.Struct(">QBB")  # delivery tag, redelivered, the exchange's length
_HEADER_HEAD = struct.Struct(">BHI4xQ")  # a content header frame's head, its body size
_body_head = functools.partial(_FRAME_HEAD.pack, 3)  # (channel, size) -> a body frame's head
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_FRAME_END = 0xCE
_WAIT = -1  # _cut_deliveries: the delivery at the front is incomplete; wait for more data
#: a delivery larger than this is left to pika when it arrives in pieces: waiting for it
#: whole would copy the growing read buffer once per read
_WAIT_MAX = 1 << 17
_BULK_READ = 1 << 17  # bytes per recv() on a consuming connection


def _cut_deliveries(buf: bytes, sinks: dict[bytes, _Sink]) -> int:
    """Hand the complete deliveries at the front of ``buf`` to their consumers' sinks.

    Returns the bytes used (0: the next frame is not a delivery to a sink), or _WAIT
    when the delivery at the front is not all there yet.
    """
    size = len(buf)
    pos = 0
    while size - pos > 12:
        kind, channel, length, method, n = _DELIVER_HEAD.unpack_from(buf, pos)
        if kind != 1 or method != _BASIC_DELIVER:
            return pos
        header = pos + length + 8  # the content header frame
        if header + 21 > size:
            return pos or _WAIT
        sink = sinks.get(buf[pos + 12 : pos + 12 + n])
        kind, header_channel, length, body_size = _HEADER_HEAD.unpack_from(buf, header)
        if sink is None or kind != 2 or header_channel != channel or buf[header - 1] != _FRAME_END:
            return pos
        at = header + length + 8  # the first body frame
        if at > size:
            return pos or _WAIT
        if buf[at - 1] != _FRAME_END:
            return pos
        body, at = _body(buf, at, channel, body_size)
        if at <= 0:
            if at == 0 and body_size <= _WAIT_MAX:
                return pos or _WAIT
            return pos  # something else came between, or a big body in pieces: for pika
        p = pos + 12 + n
        tag, redelivered, n = _DELIVER_ARGS.unpack_from(buf, p)
        p += n + 11  # past the exchange
        n = buf[p - 1]
        sink(tag, redelivered == 1, buf[p : p + n], buf, header + 19, body)
        pos = at
    return pos


def _body(buf: bytes, at: int, channel: int, size: int) -> tuple[bytes, int]:
    """The body of ``size`` bytes in the frames from ``at``, and where they end; the end is
    0 if they are not all there yet, -1 if another frame comes between."""
    end = at + 7 + size
    if end < len(buf) and buf[end] == _FRAME_END and buf[at : at + 7] == _body_head(channel, size):
        return buf[at + 7 : end], end + 1  # the usual: one frame
    chunks = []
    while size:
        if len(buf) - at < 8:
            return b"", 0
        kind, body_channel, length = _FRAME_HEAD.unpack_from(buf, at)
        end = at + 7 + length
        if kind != 3 or body_channel != channel or length > size:
            return b"", -1
        if end >= len(buf):
            return b"", 0
        if buf[end] != _FRAME_END:
            return b"", -1
        chunks.append(buf[at + 7 : end])
        size -= length
        at = end + 1
    return b"".join(chunks), at


class _Connection(SelectConnection):  # type: ignore[misc]
    """A SelectConnection that cuts deliveries to the consumers in ``sinks`` straight out
    of its read buffer; every other frame takes pika's path.

    pika decodes each of a delivery's three frames into objects, and its properties
    through a generic codec, which costs more than everything else done per message.
    """

    def __init__(self, *, bulk: bool, **kwargs: Any) -> None:
        self.sinks: dict[bytes, _Sink] = {}  # consumer tag -> sink
        self._bulk = bulk
        super().__init__(**kwargs)

    def _proto_connection_made(self, transport: Any) -> None:
        if self._bulk and hasattr(transport, "_MAX_RECV_BYTES"):
            # pika reads 4 KiB at a time: per read, a trip through the event loop and a
            # chance for the GIL to change threads. (Not for connections whose frames all
            # take pika's path: it copies what is left of the buffer after every frame.)
            transport._MAX_RECV_BYTES = _BULK_READ
        super()._proto_connection_made(transport)

    def _on_data_available(self, data_in: bytes) -> None:
        if not self.sinks:
            super()._on_data_available(data_in)
            return
        self._frame_buffer += data_in
        while self._frame_buffer:
            used = _cut_deliveries(self._frame_buffer, self.sinks)
            if used == _WAIT:
                return
            if used:
                self._trim_frame_buffer(used)
                continue
            consumed, frame = self._read_frame()
            if not frame:
                return
            self._trim_frame_buffer(consumed)
            self._process_frame(frame)


def _via_pika(sink: _Sink) -> Callable[[Any, Any, Any, bytes], None]:
    """A pika consumer callback feeding ``sink``: for the deliveries pika decoded itself."""

    def deliver(_channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if properties.headers:  # as text what pika decodes but cannot encode (floats)
            properties.headers = {  # an int stays one, in pika's own int type too (a long)
                k: v if isinstance(v, (str, bytes, int)) else _text(v)
                for k, v in properties.headers.items()
            }
        key = method.routing_key
        key = key.encode("utf-8", _LAX) if isinstance(key, str) else bytes(key)
        sink(method.delivery_tag, method.redelivered, key, b"".join(properties.encode()), 0, body)

    return deliver


def _consume(
    channel: Any,
    queue: str,
    sink: _Sink,
    callback: Callable[[Any], None],
    arguments: dict[str, Any] | None = None,
) -> str:
    """basic.consume ``queue`` on ``channel`` (of a _Connection), every delivery to ``sink``.

    Returns the consumer tag.
    """
    tag: str = channel.basic_consume(queue, _via_pika(sink), arguments=arguments, callback=callback)
    sinks = channel.connection.sinks
    key = tag.encode()
    sinks[key] = sink
    channel.add_on_close_callback(lambda _ch, _reason: sinks.pop(key, None))
    return tag


def _wait(fut: Future[T], closed: Callable[[], bool], deadline: float | None = None) -> T:
    """The future's result, polling ``closed`` so a closed bus never leaves a thread waiting.

    Past ``deadline`` (a monotonic time) raises ConnectionLost.
    """
    while True:
        try:
            return fut.result(timeout=0.25)
        except FutureTimeout:
            if fut.done():
                continue
            if closed():
                raise ClosedError(_BUS_CLOSED) from None
            if deadline is not None and time.monotonic() >= deadline:
                raise ConnectionLost("RabbitMQ did not answer in time") from None


class _LinkUser(Protocol):
    def link_opened(self, connection: Any) -> None: ...

    def link_lost(self, error: BaseException) -> None: ...


class _Declarations:
    """What this backend declared, replayed on every new connection (idempotent).

    Durable exchanges and queues survive a reconnect on the same broker; a
    broker that lost its definitions gets them back before anyone publishes.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ops: dict[tuple[Any, ...], None] = {}

    def add(self, op: tuple[Any, ...]) -> None:
        with self._lock:
            self._ops[op] = None

    def replay(self, connection: Any, then: Callable[[], None]) -> None:
        """Declare everything again, one after the other, then call ``then`` (I/O thread).

        A declaration the broker refuses (someone changed it meanwhile) is
        logged and skipped: its owner reports the error when it uses it.
        """
        with self._lock:
            ops = deque(self._ops)

        def step(channel: Any) -> None:
            if not ops:
                channel.close()
                then()
                return
            _run_op(channel, ops.popleft(), lambda _f: step(channel))

        def closed(_channel: Any, reason: BaseException) -> None:
            if isinstance(reason, pex.ChannelClosedByBroker):
                log.warning("polybus: declaring again after a reconnect failed: %r", reason)
                open_channel()  # go on with the next declaration
            # else the connection went, or step() closed the channel when done

        def open_channel() -> None:
            if connection.is_open:
                channel = connection.channel(on_open_callback=step)
                channel.add_on_close_callback(closed)

        if ops:
            open_channel()
        else:
            then()


def _run_op(channel: Any, op: tuple[Any, ...], callback: Callable[[Any], None]) -> None:
    """Issue one recorded declaration; ``callback`` gets the broker's reply."""
    kind = op[0]
    if kind == "exchange":
        _, name, internal, args = op
        channel.exchange_declare(
            name,
            EXCHANGE_TYPE,
            durable=True,
            internal=internal,
            arguments=dict(args),
            callback=callback,
        )
    elif kind == "queue":
        _, name, args = op
        channel.queue_declare(name, durable=True, arguments=dict(args), callback=callback)
    else:
        _, queue, exchange = op
        channel.queue_bind(queue, exchange, BINDING_KEY, callback=callback)


class _Link:
    """One AMQP connection that reconnects with backoff until its users are done.

    ``users`` are told on the I/O thread when the connection opens (after the
    declarations were replayed) and when it is lost.
    """

    def __init__(
        self,
        loop: _Loop,
        parameters: Any,
        name: str,
        reconnect_timeout: float,
        declarations: _Declarations,
        *,
        consumes: bool = False,
    ) -> None:
        self.loop = loop
        self.name = name
        self._consumes = consumes  # reads in bulk (see _Connection)
        self.reconnect_timeout = reconnect_timeout
        self.connection: Any = None
        self.users: list[_LinkUser] = []
        self.opened = threading.Event()
        self.down_since: float | None = time.monotonic()
        self.error: BaseException | None = None  # why the last attempt or connection failed
        self.fatal: PolybusError | None = None  # a first connection that can never succeed
        self.server_version: tuple[int, ...] = ()
        self._parameters = parameters
        self._declarations = declarations
        self._backoff = _MIN_BACKOFF
        self._ever_opened = False
        self._closing = False
        self._closed: Future[None] = Future()
        self._attempt: Any = None  # the connection being opened

    @property
    def where(self) -> str:
        p = self._parameters
        return f"{p.host}:{p.port}{p.virtual_host if p.virtual_host != '/' else ''}"

    def start(self) -> None:
        self.loop.submit(self._connect)

    def attach(self, user: _LinkUser) -> None:
        """Add a user (I/O thread); it hears of the connection from now on."""
        self.users.append(user)
        if self.opened.is_set() and self.connection is not None:
            user.link_opened(self.connection)

    def detach(self, user: _LinkUser) -> None:
        if user in self.users:
            self.users.remove(user)

    def wait_open(self, deadline: float) -> None:
        """Block until the connection is open; ConnectionLost after ``deadline``."""
        while not self.opened.is_set():
            if self.loop.stopped or self._closing:
                raise ClosedError(_BUS_CLOSED)
            if self.fatal is not None:
                raise self.fatal
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConnectionLost(
                    f"no connection to RabbitMQ at {self.where} within "
                    f"{self.reconnect_timeout:g}s: {_describe(self.error)}"
                )
            self.opened.wait(min(remaining, 0.1))

    def down_for(self) -> float:
        since = self.down_since
        return 0.0 if since is None else time.monotonic() - since

    # I/O thread only below

    def _connect(self) -> None:
        if self._closing:
            return
        try:
            self._attempt = _Connection(
                bulk=self._consumes,
                parameters=self._parameters,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_close,
                custom_ioloop=self.loop.ioloop,
            )
        except Exception as exc:
            self._on_open_error(None, exc)

    def _retry(self) -> None:
        self.loop.later(self._backoff, self._connect)
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF)

    def _on_open(self, connection: Any) -> None:
        if self._closing:
            connection.close()
            return
        self.connection = connection
        self._backoff = _MIN_BACKOFF
        self.server_version = _version(connection.server_properties)
        self._declarations.replay(connection, lambda: self._ready(connection))

    def _ready(self, connection: Any) -> None:
        if connection is not self.connection or not connection.is_open:
            return
        self.down_since = None
        self.error = None
        self._ever_opened = True
        self.opened.set()
        for user in list(self.users):
            try:
                user.link_opened(connection)
            except Exception:
                log.exception("polybus: RabbitMQ reconnect step failed")

    def _on_open_error(self, _connection: Any, error: BaseException) -> None:
        self.error = error
        if self._closing:
            if not self._closed.done():
                self._closed.set_result(None)
            return
        if not self._ever_opened and _refused(error):
            self.fatal = map_error(error)
            return
        self._retry()

    def _on_close(self, connection: Any, error: BaseException) -> None:
        if connection is self.connection:
            self.connection = None
        self.opened.clear()
        self.down_since = time.monotonic()
        self.error = error
        if self._closing:
            if not self._closed.done():
                self._closed.set_result(None)
            return
        log.warning("polybus: RabbitMQ connection %s lost, reconnecting: %r", self.name, error)
        for user in list(self.users):
            try:
                user.link_lost(error)
            except Exception:
                log.exception("polybus: RabbitMQ connection-loss step failed")
        self._retry()

    def close(self) -> None:
        """Close the connection (any thread); waits briefly for the broker's close-ok."""
        if self.loop.stopped:
            return

        def shut() -> None:
            self._closing = True
            conn = self.connection or self._attempt
            if conn is not None and not (conn.is_closed or conn.is_closing):
                conn.close()
            elif not self._closed.done():
                self._closed.set_result(None)

        if self.loop.in_thread():
            shut()
            return
        self.loop.submit(shut)
        try:
            self._closed.result(_CLOSE_WAIT)
        except FutureTimeout:
            pass


def _version(server_properties: Any) -> tuple[int, ...]:
    raw = (server_properties or {}).get("version", "")
    if isinstance(raw, bytes):
        raw = raw.decode(errors="replace")
    return tuple(int(p) for p in re.findall(r"\d+", str(raw))[:3])


_Invoke = Callable[[Any, Callable[[Any], None]], None]  # (channel, done) -> None


class _Control:
    """Declarations for user threads, one at a time, each on a channel of its own (a broker
    error closes the channel it happens on)."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._lock = threading.Lock()

    def call(self, invoke: _Invoke) -> Any:
        """Run ``invoke(channel, done)`` on the I/O thread and return what ``done`` got.

        Retries across reconnects for ``reconnect_timeout``; raises the pika
        channel error (the caller maps it), ConnectionLost or ClosedError.
        """
        deadline = time.monotonic() + self._link.reconnect_timeout
        with self._lock:
            while True:
                self._link.wait_open(deadline)
                fut: Future[Any] = Future()
                self._link.loop.submit(functools.partial(self._start, invoke, fut))
                try:
                    return _wait(fut, lambda: self._link.loop.stopped)
                except _CONNECTION_ERRORS as exc:
                    if time.monotonic() >= deadline:
                        raise map_error(exc) from exc

    def _start(self, invoke: _Invoke, fut: Future[Any]) -> None:
        conn = self._link.connection
        if conn is None or not conn.is_open:
            fut.set_exception(pex.ConnectionWrongStateError("connection is not open"))
            return

        def run(channel: Any) -> None:
            def done(frame: Any) -> None:
                channel.close()
                if not fut.done():
                    fut.set_result(frame)

            try:
                invoke(channel, done)
            except Exception as exc:
                channel.close()
                if not fut.done():
                    fut.set_exception(exc)

        def closed(_channel: Any, reason: BaseException) -> None:
            if not fut.done():
                fut.set_exception(reason)

        conn.channel(on_open_callback=run).add_on_close_callback(closed)


# -- publishing ----------------------------------------------------------------


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


_BYTE = tuple(bytes((n,)) for n in range(256))  # n -> the octet n
_U16 = struct.Struct(">H")
_HEADER_FRAME = struct.Struct(">BHIHHQ")  # frame head, class id, weight, body size


def _shortstr(text: str) -> bytes:
    """``text`` as an AMQP short string; ConfigurationError past 255 bytes."""
    data = text.encode("utf-8", _LAX)
    if len(data) > 255:
        raise ConfigurationError(
            f"{text[:40]!r}... is longer than 255 bytes (an AMQP short string)"
        )
    return _BYTE[len(data)] + data


def _content(record: OutRecord) -> tuple[str, bytes]:
    """The routing key and the AMQP content properties (flags first; AMQP 0-9-1 section
    4.2.6.1) of ``record``, a persistent message.

    Envelope headers become their AMQP properties (unless too long for one), the
    others a table; a key that is not a short text travels base64'd in a header.
    Raises ConfigurationError for a header name AMQP cannot carry.
    """
    content_type = message_id = correlation_id = b""
    table: list[bytes] = []
    for name, value in record.headers:
        data = value.encode("utf-8", _LAX)
        if len(data) <= 255 and name in _PROPERTIES:
            if name == MESSAGE_ID:
                message_id = _BYTE[len(data)] + data
            elif name == CONTENT_TYPE:
                content_type = _BYTE[len(data)] + data
            else:
                correlation_id = _BYTE[len(data)] + data
        else:
            table += (_shortstr(name), b"S", _U32.pack(len(data)), data)
    routing_key = ""
    key = record.key
    if key is not None:
        try:
            routing_key = key.decode() if len(key) <= 255 else ""
        except UnicodeDecodeError:
            pass
        if not routing_key:
            data = base64.b64encode(key)
            table += (_KEY_NAME, b"S", _U32.pack(len(data)), data)
    flags = 0x1000  # delivery-mode
    parts = [b""]
    if content_type:
        flags |= 0x8000
        parts.append(content_type)
    if table:
        flags |= 0x2000
        encoded = b"".join(table)
        parts += (_U32.pack(len(encoded)), encoded)
    parts.append(b"\x02")  # persistent
    if correlation_id:
        flags |= 0x0400
        parts.append(correlation_id)
    if message_id:
        flags |= 0x0080
        parts.append(message_id)
    if record.timestamp_ms > 0:
        flags |= 0x0040
        parts.append(_U64.pack(record.timestamp_ms // 1000))  # seconds; ms stay in a header
    parts[0] = _U16.pack(flags)
    return routing_key, b"".join(parts)


def _pika_properties(content: bytes) -> Any:
    """``content`` (as from _content) as pika properties."""
    properties = pika.BasicProperties()
    properties.decode(content)
    return properties


class _FrameWriter:
    """Publishes on a channel, writing the frames of many messages with one socket write.

    pika sends every frame (three per message) with its own send() call and
    encodes properties generically; building the frames here and joining them
    takes most of the client's CPU cost out of publishing. Falls back to
    ``basic_publish`` if the connection lacks pika's ``_adapter_emit_data``
    hook (there since pika 1.0).
    """

    _FLUSH_BYTES = 1 << 20

    def __init__(self, channel: Any, mandatory: bool) -> None:
        self._channel = channel
        self._mandatory = mandatory
        self._connection = channel.connection
        self._emit: Callable[[bytes], None] | None = getattr(
            self._connection, "_adapter_emit_data", None
        )
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
        head = _HEADER_FRAME.pack(2, number, len(content) + 12, 60, 0, size)
        frames += (method, head, content, b"\xce")
        step = self._body_max
        for start in range(0, size, step):
            chunk = body[start : start + step] if size > step else body
            frames += (_FRAME_HEAD.pack(3, number, len(chunk)), chunk, b"\xce")
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


# -- consuming -----------------------------------------------------------------


def _text(value: object) -> str:
    """A header value from any client as text (AMQP tables carry many types)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _uuid7_ms(value: str) -> int | None:
    """The millisecond timestamp inside a UUIDv7 string, or None."""
    try:
        u = uuid.UUID(value)
    except ValueError:
        return None
    return u.int >> 80 if u.version == 7 else None


_ACK, _REQUEUE, _DROP, _CREDIT = 0, 1, 2, 3


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
        self.buffer: deque[tuple[int, int, InRecord]] = deque()  #: (gen, tag, record)
        self.gen = 0  #: which replay channel a buffered delivery came from
        self.channel: Any = None
        self.next_offset: int | None = None  #: first stream offset not yet taken
        self.finished = False
        self.ready: Future[None] = Future()


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
        self._buffer: deque[InRecord] = deque()
        self._gen = 0  # channel generation: deliveries and acks of an older channel are stale
        self._token = uuid.uuid4().hex[:8]  # offsets of messages that carry no id
        self._channel: Any = None
        self._settle_queue: deque[tuple[int, Any]] = deque()  # (action, handles)
        self._settle_pending = False
        self._floor = 0  # every delivery tag <= floor is settled
        self._above: set[int] = set()  # settled tags above the floor
        self._replay: _Replay | None = None
        self._redeliver: deque[InRecord] = deque()  # replayed records nacked with requeue
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

    def fetch(self, max_records: int, timeout: float) -> list[InRecord]:
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

    def _take(self, max_records: int) -> list[InRecord]:
        out: list[InRecord] = []
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

    def _take_replayed(self, replay: _Replay, max_records: int) -> list[InRecord]:
        out: list[InRecord] = []
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
    ) -> InRecord:
        """The record of a delivery whose content properties start at ``data[p]``
        (AMQP 0-9-1 section 4.2.6.1): they and the header table become text headers."""
        flags = data[p] << 8 | data[p + 1]
        p += 2
        headers: list[tuple[str, str]] = []
        message_id: str | None = None
        if flags & 0x8000:  # content-type
            n = data[p]
            headers.append((CONTENT_TYPE, data[p + 1 : p + 1 + n].decode("utf-8", _LAX)))
            p += n + 1
        if flags & 0x4000:  # content-encoding
            p += data[p] + 1
        table = table_end = 0
        if flags & 0x2000:  # headers
            table = p + 4
            table_end = p = table + _U32.unpack_from(data, p)[0]
        p += (flags & 0x1000 != 0) + (flags & 0x0800 != 0)  # delivery-mode, priority
        if flags & 0x0400:  # correlation-id
            n = data[p]
            headers.append((CORRELATION_ID, data[p + 1 : p + 1 + n].decode("utf-8", _LAX)))
            p += n + 1
        if flags & 0x0200:  # reply-to
            p += data[p] + 1
        if flags & 0x0100:  # expiration
            p += data[p] + 1
        if flags & 0x0080:  # message-id
            n = data[p]
            message_id = data[p + 1 : p + 1 + n].decode("utf-8", _LAX)
            headers.append((MESSAGE_ID, message_id))
            p += n + 1
        sent_s = _U64.unpack_from(data, p)[0] if flags & 0x0040 else None  # AMQP: seconds
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
        return InRecord(
            self.topic, 0, position, body, key, tuple(headers), timestamp_ms, attempt, handle
        )

    def ack(self, records: Sequence[InRecord]) -> None:
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

    def nack(self, records: Sequence[InRecord], *, requeue: bool) -> None:
        self._settle(records, _REQUEUE if requeue else _DROP)

    def _settle(self, records: Sequence[InRecord], action: int) -> None:
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
                    record.attempt += 1
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
        # order. pika cancels each consumer it knows before closing, so hide ours and
        # drop what still arrives (it is unacked, so the broker returns it too).
        consumers = getattr(channel, "_consumers", None)
        if tag is not None and isinstance(consumers, dict) and tag in consumers:
            del consumers[tag]
            channel.close()
            consumers[tag] = lambda *_: None
        else:
            channel.close()

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


def _stream_time(ms: int) -> datetime:
    """An x-stream-offset timestamp (whole seconds, rounded down)."""
    return datetime.fromtimestamp(max(ms, 0) // 1000, UTC)


# -- the backend ---------------------------------------------------------------


class RabbitMQBackend:
    """A :class:`~polybus.adapters.base.Backend` on a RabbitMQ broker.

    Thread safety: every method may be called from any thread. One I/O thread
    per backend owns its pika connections (pika connections are not
    thread-safe): one for publishing and declaring, one shared by the
    subscriptions (so that a publisher throttled by a broker alarm never
    stalls acks). User threads hand work to it and wait for the outcome.

    ``parameters`` is a ``pika.ConnectionParameters`` or ``pika.URLParameters``;
    the backend connects at once and raises ConnectionLost if it cannot within
    ``reconnect_timeout`` (ConfigurationError for refused credentials). With
    ``handshake_timeout``, a broker that does not finish opening the connection
    within it (one that accepts TCP connections but is overloaded or stuck)
    raises BrokerUnreachable instead.
    """

    def __init__(
        self,
        parameters: Any,
        *,
        reconnect_timeout: float = 30.0,
        queue_type: str | None = None,
        prefetch: int = 1000,
        confirm_window: int = 1000,
        history: bool = True,
        handshake_timeout: float | None = None,
    ) -> None:
        if not isinstance(parameters, pika.connection.Parameters):
            raise ConfigurationError(
                f"expected pika.ConnectionParameters or pika.URLParameters, got "
                f"{type(parameters).__name__}"
            )
        if queue_type not in (None, "quorum", "classic"):
            raise ConfigurationError(
                f"queue_type must be 'quorum' or 'classic', not {queue_type!r}"
            )
        if reconnect_timeout <= 0 or prefetch < 1 or confirm_window < 1:
            raise ConfigurationError(
                "reconnect_timeout, prefetch and confirm_window must be positive"
            )
        parameters = copy.copy(parameters)
        parameters.connection_attempts = 1  # the backend retries, with its own deadline
        parameters.retry_delay = 0
        self.reconnect_timeout = reconnect_timeout
        self.prefetch = prefetch
        self.closed = False
        self._parameters = parameters
        self._subscriptions: set[RabbitMQSubscription] = set()
        self._lock = threading.Lock()
        self._declarations = _Declarations()
        self._filling = threading.Lock()  # one copy into a new group's queue at a time
        self._loop = _Loop()
        self._link = _Link(self._loop, parameters, "publish", reconnect_timeout, self._declarations)
        self._consumer_link: _Link | None = None
        try:
            self._link.start()
            self._open_first(handshake_timeout)
        except BaseException:
            self._link.close()
            self._loop.stop()
            self.closed = True
            raise
        version = self._link.server_version
        streams = version >= (3, 9)
        self.history = history and streams
        self.queue_type = queue_type or ("quorum" if version >= (3, 8) else "classic")
        self._control = _Control(self._link)
        self._publisher = _Publisher(self._link, confirm_window, mandatory=self.history)
        self.capabilities = (
            Capability.DURABLE_GROUPS | Capability.EPHEMERAL_GROUPS | Capability.MULTI_PROCESS
        )
        if self.history:
            self.capabilities |= Capability.SEEK | Capability.SEEK_TIME | Capability.RETENTION
        self._loop.submit(lambda: self._link.attach(self._publisher))

    def _open_first(self, handshake_timeout: float | None) -> None:
        if handshake_timeout is None:
            self._link.wait_open(time.monotonic() + self.reconnect_timeout)
            return
        try:
            self._link.wait_open(time.monotonic() + handshake_timeout)
        except ConnectionLost:
            raise BrokerUnreachable(
                f"RabbitMQ at {self._link.where} did not open a connection within "
                f"{handshake_timeout:g} s ({_describe(self._link.error)}): it accepts TCP "
                "connections but is overloaded, stuck or out of file handles (URL option "
                "connect_timeout=<seconds> waits longer)"
            ) from None

    def _check(self) -> None:
        if self.closed:
            raise ClosedError(_BUS_CLOSED)

    # declarations

    def declare_topic(self, topic: str, spec: TopicSpec) -> None:
        self._check()
        _check_name("topic", topic)
        for group in spec.groups:
            _check_name("group", group)
            _check_name("queue", queue_name(topic, group))
        if spec.compact:
            raise CapabilityError("RabbitMQ cannot compact a topic (keep the last value per key)")
        retention = spec.retention_ms is not None or spec.retention_bytes is not None
        if retention and not self.history:
            raise CapabilityError(
                "retention applies to the topic history, which this connection does not keep "
                "(history=false or a broker without streams)"
            )
        if spec.partitions is not None and spec.partitions < 1:
            raise ConfigurationError(f"partitions must be at least 1, not {spec.partitions}")
        partitions = spec.partitions
        if partitions is None and not self._exists(
            lambda ch, done: ch.exchange_declare(topic, passive=True, callback=done)
        ):
            partitions = spec.default_partitions
        if partitions is not None:
            self._declare_partitions(topic, partitions, strict=spec.partitions is not None)
        self._declare(("exchange", topic, False, ()), f"topic {topic!r}")
        if self.history:
            self._declare_history(topic, spec)
        for group in spec.groups:
            self._declare_group(topic, group)

    def _declare_partitions(self, topic: str, partitions: int, *, strict: bool) -> None:
        name = partitions_exchange_name(topic)
        _check_name("exchange", name)
        op = ("exchange", name, True, (("alternate-exchange", str(partitions)),))
        try:
            self._rpc(op)
        except pex.AMQPError as exc:
            code, text = _reply(exc)
            found = re.search(r"received '([^']*)' but current is '([^']*)'", text)
            if code != 406 or not found:
                raise _declare_error(exc, f"partition count of topic {topic!r}") from exc
            if strict:
                raise ConfigurationError(
                    f"topic {topic!r} already exists with partitions={found.group(2)}; this "
                    f"declaration asks for partitions={found.group(1)}"
                ) from None
            return  # partitions=None: as the topic exists
        self._declarations.add(op)

    def _declare_history(self, topic: str, spec: TopicSpec) -> None:
        stream = history_queue_name(topic)
        _check_name("queue", stream)
        op = ("queue", stream, _history_arguments(spec.retention_ms, spec.retention_bytes))
        strict = spec.retention_ms is not None or spec.retention_bytes is not None
        try:
            self._rpc(op)
        except pex.AMQPError as exc:
            code, text = _reply(exc)
            retention = re.search(r"inequivalent arg 'x-max-(age|length-bytes)'", text)
            if strict or code != 406 or not retention:
                raise _declare_error(exc, f"history of topic {topic!r}") from exc
            # retention unspecified: keep the stream's own
        else:
            self._declarations.add(op)
        self._declare(("bind", stream, topic), f"history of topic {topic!r}")

    def _declare_group(self, topic: str, group: str) -> None:
        """Declare ``group``'s queue; a queue new here first gets the topic's history."""
        queue = queue_name(topic, group)
        args = tuple(self._queue_arguments().items())
        what = f"group {group!r} of topic {topic!r}"
        self._fill_if_new(topic, queue, args, what)
        self._declare(("queue", queue, args), what)
        self._declare(("bind", queue, topic), what)

    def _fill_if_new(self, topic: str, queue: str, args: tuple[Any, ...], what: str) -> None:
        """Fill ``queue`` from the topic's history if it does not exist yet."""
        if self.history and self._needs_history(queue):
            try:
                with self._filling:
                    self._fill_from_history(topic, queue, args)
            except pex.AMQPError as exc:
                raise _declare_error(exc, what) from exc

    def _needs_history(self, queue: str) -> bool:
        """``queue`` does not exist yet, or a copy of the history into it was cut short."""
        flag = filling_flag_name(queue)
        return not self._exists(
            lambda ch, done: ch.queue_declare(queue, passive=True, callback=done)
        ) or self._exists(lambda ch, done: ch.exchange_declare(flag, passive=True, callback=done))

    def _fill_from_history(self, topic: str, queue: str, args: tuple[Any, ...]) -> None:
        """Create ``queue`` holding every message ``topic``'s history keeps, then bind it.

        An exclusive queue is the lock, so that one process copies while the others
        wait. A flag exchange exists until the copy is complete: a copy cut short (a
        crash) is done again by the next declaration, duplicating what was copied
        (at-least-once). The bulk is copied before the queue is bound, so it keeps its
        order; what is published while the binding is made may arrive twice.
        """
        flag = filling_flag_name(queue)
        lock = f"polybus.filling-lock.{queue}"
        _check_name("exchange", flag)
        _check_name("queue", lock)
        self._take_lock(lock)
        try:
            if not self._needs_history(queue):
                return  # another process filled it while this one waited for the lock
            # copies go through the flag exchange, which keeps their routing keys (keys)
            self._rpc(("exchange", flag, False, ()))
            self._rpc(("queue", queue, args))
            self._rpc(("bind", queue, flag))
            offset = self._copy_history(topic, flag, "first")
            self._rpc(("bind", queue, topic))
            self._copy_history(topic, flag, offset)  # what came during the binding
            self._control.call(lambda ch, done: ch.exchange_delete(flag, callback=done))
        finally:
            with contextlib.suppress(PolybusError, pex.AMQPError):
                self._control.call(lambda ch, done: ch.queue_delete(lock, callback=done))

    def _take_lock(self, lock: str) -> None:
        declare = functools.partial(_declare_exclusive, lock)
        while True:
            try:
                self._control.call(declare)
                return
            except pex.ChannelClosedByBroker as exc:
                if _reply(exc)[0] != 405:  # RESOURCE_LOCKED: another process holds it
                    raise
            time.sleep(0.1)
            self._check()

    def _copy_history(self, topic: str, exchange: str, start: object) -> int:
        copy = _HistoryCopy(history_queue_name(topic), exchange, start, self.prefetch)
        self._loop.submit(lambda: copy.run(self._link.connection))
        return _wait(copy.done, lambda: self.closed)

    def _queue_arguments(self) -> dict[str, Any]:
        return queue_arguments(self.queue_type)

    def _rpc(self, op: tuple[Any, ...]) -> Any:
        return self._control.call(lambda ch, done: _run_op(ch, op, done))

    def _declare(self, op: tuple[Any, ...], what: str) -> None:
        try:
            self._rpc(op)
        except pex.AMQPError as exc:
            raise _declare_error(exc, what) from exc
        self._declarations.add(op)

    def _exists(self, invoke: Callable[[Any, Callable[[Any], None]], None]) -> bool:
        try:
            self._control.call(invoke)
        except pex.ChannelClosedByBroker as exc:
            if _reply(exc)[0] == 404:
                return False
            raise map_error(exc) from exc
        except pex.AMQPError as exc:
            raise map_error(exc) from exc
        return True

    # publishing

    def publish(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        self._check()
        if not records:
            return []
        limit = self._publisher.max_message
        try:
            largest = max([len(record.value) for record in records])  # type: ignore[arg-type]
        except TypeError:  # None: a tombstone
            raise tombstone_refused("RabbitMQ") from None
        if largest > limit:
            raise MessageTooLarge(
                f"a message of {largest} bytes exceeds RabbitMQ's limit of {limit} bytes; "
                "nothing was published"
            )
        job = _Job(topic, records)
        self._loop.submit(lambda: self._publisher.add(job))
        while not job.done.wait(0.25):
            if self.closed:
                raise ClosedError(_BUS_CLOSED)
        if job.error is not None:
            raise job.error
        return [Receipt(topic, 0, _message_id(record)) for record in records]

    # consuming

    def subscribe(
        self, topic: str, group: str | None, *, start: Start, session_timeout: float
    ) -> RabbitMQSubscription:
        """Join ``group``'s queue or read through a new exclusive queue.

        ``session_timeout`` does not apply: RabbitMQ notices a dead member by
        its connection (heartbeats) and returns its unacked messages then.
        """
        self._check()
        _check_name("topic", topic)
        if group is not None:
            queue = queue_name(topic, group)
            _check_name("queue", queue)
            if start == "earliest":  # a group new here starts with the history; the
                # subscription declares and binds its queue, as it does after a reconnect
                args = tuple(self._queue_arguments().items())
                self._fill_if_new(topic, queue, args, f"group {group!r} of topic {topic!r}")
        if group is None and start == "earliest" and not self.history:
            raise CapabilityError("start='earliest' needs the topic history (history=true)")
        link = self._consumer()
        sub = RabbitMQSubscription(self, link, topic, group, self._queue_arguments())
        with self._lock:
            self._subscriptions.add(sub)
        try:
            deadline = time.monotonic() + self.reconnect_timeout
            link.wait_open(deadline)
            self._loop.submit(sub.setup)
            while not sub._ready.wait(0.1):
                self._check()
                if time.monotonic() >= deadline:
                    raise ConnectionLost(
                        f"could not subscribe to {topic!r} on RabbitMQ at {link.where} within "
                        f"{self.reconnect_timeout:g}s: {_describe(link.error)}"
                    )
            if sub._error is not None:
                raise sub._error
            if group is None and start == "earliest":
                sub._start_replay(_Replay("first"))
        except BaseException:
            sub.close()
            raise
        return sub

    def _consumer(self) -> _Link:
        with self._lock:
            if self._consumer_link is None:
                self._consumer_link = _Link(
                    self._loop,
                    self._parameters,
                    "consume",
                    self.reconnect_timeout,
                    self._declarations,
                    consumes=True,
                )
                self._consumer_link.start()
            return self._consumer_link

    def _forget(self, sub: RabbitMQSubscription) -> None:
        with self._lock:
            self._subscriptions.discard(sub)

    def close(self) -> None:
        if self.closed:
            return
        with self._lock:
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close()
        self.closed = True
        try:
            self._loop.submit(self._publisher.close)
        except ClosedError:
            pass
        if self._consumer_link is not None:
            self._consumer_link.close()
        self._link.close()
        self._loop.stop()


def _message_id(record: OutRecord) -> str:
    for name, value in record.headers:
        if name == MESSAGE_ID:
            return value
    return ""


def _history_arguments(retention_ms: int | None, retention_bytes: int | None) -> tuple[Any, ...]:
    age = DEFAULT_HISTORY_AGE_S if retention_ms is None else max(1, -(-retention_ms // 1000))
    args: list[tuple[str, Any]] = [("x-queue-type", "stream"), ("x-max-age", f"{age}s")]
    if retention_bytes is not None:
        args.append(("x-max-length-bytes", retention_bytes))
    return tuple(args)


def filling_flag_name(queue: str) -> str:
    """The exchange that exists while ``queue`` is being filled from its topic's history."""
    return f"polybus.filling.{queue}"


def _declare_exclusive(name: str, channel: Any, done: Callable[[Any], None]) -> None:
    channel.queue_declare(name, exclusive=True, auto_delete=True, callback=done)


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


def _declare_error(exc: BaseException, what: str) -> PolybusError:
    error = map_error(exc)
    if isinstance(error, ConfigurationError):
        return ConfigurationError(f"cannot declare the {what}: {error}")
    return error
