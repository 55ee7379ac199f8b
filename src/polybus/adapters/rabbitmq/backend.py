"""``RabbitMQBackend``: declarations, publishing and subscribing on one broker, and its
construction from a URL (``from_url``) or from pika's connection parameters
(``from_client``).

The backend owns the I/O thread and two connections (``link``): one publishes and
declares, one is shared by the subscriptions. A new group's queue is first filled
from the topic's history (``replay._HistoryCopy``) under a lock queue, while a flag
exchange marks the copy as incomplete.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import pika  # type: ignore[import-untyped]
import pika.exceptions as pex  # type: ignore[import-untyped]

from ...envelope import MESSAGE_ID
from ...errors import (
    BrokerUnreachable,
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
)
from .._support import Options, ensure_reachable
from ..base import (
    BusStats,
    Capability,
    GroupStats,
    OutRecord,
    PartitionStats,
    Receipt,
    Start,
    TopicSpec,
    TopicStats,
    tombstone_refused,
)
from .errors import _declare_error, _describe, _reply, amqp_errors
from .link import _BUS_CLOSED, _Control, _Declarations, _Link, _Loop, _run_op, _wait
from .names import (
    _check_name,
    _history_arguments,
    filling_flag_name,
    history_queue_name,
    partitions_exchange_name,
    queue_arguments,
    queue_name,
)
from .pika_hooks import URL_OPTIONS
from .publisher import _Job, _Publisher
from .replay import _HistoryCopy, _Replay
from .subscription import RabbitMQSubscription

_HANDSHAKE_TIMEOUT = 5.0  # at least this long for a reachable broker to open a connection

_OPTIONS = (
    "confirm_window",
    "connect_timeout",
    "history",
    "prefetch",
    "queue_type",
    "reconnect_timeout",
)


def from_url(url: str) -> RabbitMQBackend:
    """Connect to the broker ``url`` names: ``amqp[s]://user:password@host:port/vhost?options``."""
    options = Options(url, ours=_OPTIONS, passes=URL_OPTIONS, what="RabbitMQ")
    if options.parts.scheme.lower() not in ("amqp", "amqps"):
        raise options.error("not a RabbitMQ URL: use amqp:// or amqps://")
    try:
        parameters = pika.URLParameters(options.passed_url())
    except (ValueError, TypeError) as exc:
        raise options.error(str(exc)) from None
    timeout = options.connect_timeout()
    # read before connecting: a bad option is said at once
    reconnect_timeout = options.seconds("reconnect_timeout", 30.0)
    queue_type = options.text("queue_type", "") or None
    prefetch = options.number("prefetch", 1000, minimum=1)
    confirm_window = options.number("confirm_window", 1000, minimum=1)
    history = options.flag("history", True)
    ensure_reachable("RabbitMQ", [(parameters.host, parameters.port)], timeout)
    return RabbitMQBackend(
        parameters,
        reconnect_timeout=reconnect_timeout,
        queue_type=queue_type,
        prefetch=prefetch,
        confirm_window=confirm_window,
        history=history,
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

    wire_protocol = "amqp-0-9-1"

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
        #: topics declared or subscribed to here, with their durable groups: what stats()
        #: reports unless told names, as AMQP can list neither exchanges nor queues
        self._used: dict[str, set[str]] = {}
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
        self._note_used(topic, spec.groups)

    def _note_used(self, topic: str, groups: Sequence[str]) -> None:
        with self._lock:
            self._used.setdefault(topic, set()).update(groups)

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
        return self._passive(invoke) is not None

    def _passive(
        self, invoke: Callable[[Any, Callable[[Any], None]], None], deadline: float | None = None
    ) -> Any:
        """The frame a passive declare ``invoke`` was answered with, or None if the broker
        has no such exchange or queue."""
        with amqp_errors():
            try:
                return self._control.call(invoke, deadline)
            except pex.ChannelClosedByBroker as exc:
                if _reply(exc)[0] == 404:
                    return None
                raise

    def stats(
        self, topics: Collection[str] | None, groups: Collection[str] | None, *, timeout: float
    ) -> BusStats:
        """Each group's lag is the message count of its queue, by a passive declare: the
        messages waiting, not those its members hold unacknowledged (up to ``prefetch``
        each). AMQP lists no exchanges or queues and the management plugin is not
        assumed, so unnamed topics and groups are those this backend declared or
        subscribed to (``complete`` is False). A topic's offsets are None: its history
        stream counts no messages over AMQP."""
        self._check()
        deadline = time.monotonic() + timeout
        with self._lock:
            used = {topic: sorted(groups) for topic, groups in self._used.items()}
        found = {}
        for topic in used if topics is None else topics:
            if self._passive(functools.partial(_passive_exchange, topic), deadline) is None:
                continue
            lags = {}
            for group in used.get(topic, []) if groups is None else groups:
                queue = functools.partial(_passive_queue, queue_name(topic, group))
                frame = self._passive(queue, deadline)
                if frame is not None:
                    lags[group] = GroupStats((frame.method.message_count,))
            found[topic] = TopicStats((PartitionStats(None, None),), lags)
        return BusStats(found, complete=False)

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
        self._note_used(topic, [] if group is None else [group])
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


def _passive_exchange(name: str, channel: Any, done: Callable[[Any], None]) -> None:
    channel.exchange_declare(name, passive=True, callback=done)


def _passive_queue(name: str, channel: Any, done: Callable[[Any], None]) -> None:
    channel.queue_declare(name, passive=True, callback=done)


def _declare_exclusive(name: str, channel: Any, done: Callable[[Any], None]) -> None:
    channel.queue_declare(name, exclusive=True, auto_delete=True, callback=done)
