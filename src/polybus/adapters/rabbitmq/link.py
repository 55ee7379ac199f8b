"""The I/O thread and the connections it owns: ``_Loop`` runs pika's IOLoop, ``_Link`` is
one AMQP connection that reconnects with backoff and declares again what the backend
declared (``_Declarations``), ``_Control`` runs declarations for user threads.

Every pika object is touched only on the I/O thread; user threads hand it work
(``_Loop.submit``) and wait for the outcome (``_wait``).
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar

import pika.exceptions as pex  # type: ignore[import-untyped]
from pika.adapters.select_connection import IOLoop  # type: ignore[import-untyped]

from ...errors import ClosedError, ConnectionLost, PolybusError
from .._support.backoff import Backoff
from .errors import _CONNECTION_ERRORS, _describe, _refused, map_error
from .names import BINDING_KEY, EXCHANGE_TYPE
from .pika_hooks import _Connection

log = logging.getLogger(__package__)  # the adapter's logger: polybus.adapters.rabbitmq

T = TypeVar("T")

_BUS_CLOSED = "bus is closed; connect again"
_CLOSE_WAIT = 5.0  # how long closing waits for the broker's close-ok


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
        self._backoff = Backoff(first=0.05, cap=2.0)
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
        self.loop.later(self._backoff.next_delay(), self._connect)

    def _on_open(self, connection: Any) -> None:
        if self._closing:
            connection.close()
            return
        self.connection = connection
        self._backoff.reset()
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

    def call(self, invoke: _Invoke, deadline: float | None = None) -> Any:
        """Run ``invoke(channel, done)`` on the I/O thread and return what ``done`` got.

        Retries across reconnects for ``reconnect_timeout``, or until ``deadline`` (a
        monotonic time), which also bounds the wait for the answer; raises the pika
        channel error (the caller maps it), ConnectionLost or ClosedError.
        """
        answer_by = deadline
        if deadline is None:
            deadline = time.monotonic() + self._link.reconnect_timeout
        with self._lock:
            while True:
                self._link.wait_open(deadline)
                fut: Future[Any] = Future()
                self._link.loop.submit(functools.partial(self._start, invoke, fut))
                try:
                    return _wait(fut, lambda: self._link.loop.stopped, answer_by)
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
