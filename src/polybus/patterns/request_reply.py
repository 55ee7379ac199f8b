"""Request-reply over topics: many requests in flight, each answered by correlation.

A :class:`Requester` publishes each request to ``topic`` with two headers: the
reply topic (``<topic>.replies``) and its own id. It reads the reply topic
through an ephemeral subscriber of its own, so it sees the replies published
after it started. A responder (:func:`responder`, run by a
:class:`~polybus.patterns.worker.Consumer` or ``App.responder``) handles each
request in its group and publishes the handler's return value, or the
exception it raised, to the reply topic with causation id = the request's id;
the requester matches replies by that id.

A request not answered within its timeout fails with
:class:`~polybus.errors.RequestTimeout`; its reply, if it comes later, is
dropped and counted in :attr:`Requester.late_replies`, never handed to another
caller. Every requester reads every reply of its topic and skips the others'
(one requester per process serves any number of threads and requests).
Responders do not retry: a failure goes back to the caller as
:class:`~polybus.errors.RemoteError`.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

from ..bus import Bus
from ..envelope import REMOTE_ERROR, REMOTE_ERROR_TYPE, REPLY_TO, REQUESTER
from ..errors import ClosedError, PolybusError, RemoteError, RequestTimeout
from ..message import Delivery, Message, uuid7
from .consumer import Output
from .retry import error_type

__all__ = [
    "REMOTE_ERROR",
    "REMOTE_ERROR_TYPE",
    "REPLY_TO",
    "REQUESTER",
    "Requester",
    "reply_topic",
    "responder",
]

log = logging.getLogger("polybus.request_reply")


_MAX_WAIT = 0.25  # seconds the reply reader waits before checking deadlines again


def reply_topic(topic: str) -> str:
    """The topic replies to requests on ``topic`` go to."""
    return f"{topic}.replies"


class Requester:
    """Sends requests to ``topic`` and waits for their replies; thread-safe.

    ``timeout`` (seconds) is the default for each request. ``group`` is the
    responders' group (``App.responder``'s default): it is declared here, as a
    RabbitMQ producer declares the queue it sends to, so requests sent before any
    responder runs wait for one. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, bus: Bus, topic: str, *, timeout: float = 30.0, group: str = "responders"
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.timeout = timeout
        self.id = uuid7()
        self.reply_topic = reply_topic(topic)
        self.late_replies = 0  #: replies that came after their request timed out
        bus.declare(topic, groups=[group])
        bus.declare(self.reply_topic)
        self._replies = bus.subscribe(self.reply_topic)
        self._lock = threading.Lock()
        self._pending: dict[str, Future[Message]] = {}
        self._deadlines: list[tuple[float, int, str]] = []  # (monotonic, seq, request id)
        self._seq = itertools.count()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="polybus-replies", daemon=True)
        self._reader.start()

    def submit(
        self,
        value: Any,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
        timeout: float | None = None,
    ) -> Future[Message]:
        """Send a request; the future resolves to the reply :class:`Message`.

        The future fails with RequestTimeout after ``timeout`` seconds, or with
        RemoteError when the responder's handler raised. Publishing errors
        (ConnectionLost, EncodeError, ...) are raised here.
        """
        if self._closed.is_set():
            raise ClosedError("requester is closed; create another")
        message = Message.of(
            value,
            key=key,
            headers=headers,
            content_type=content_type,
            correlation_id=correlation_id,
        )
        message.headers[REPLY_TO] = self.reply_topic
        message.headers[REQUESTER] = self.id
        future: Future[Message] = Future()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            self._pending[message.id] = future
            heapq.heappush(self._deadlines, (deadline, next(self._seq), message.id))
        try:
            self.bus.publish(self.topic, message)
        except BaseException:
            with self._lock:
                self._pending.pop(message.id, None)
            raise
        return future

    def request(self, value: Any, **options: Any) -> Message:
        """Send a request and block until its reply; see :meth:`submit` for what it raises."""
        return self.submit(value, **options).result()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                batch = self._replies.fetch(1000, timeout=self._next_wait())
            except ClosedError:
                return
            except PolybusError as exc:
                log.warning("reading replies on %r: %s", self.reply_topic, exc)
                self._closed.wait(0.2)
                continue
            for d in batch:
                self._answer(d)
            if batch:
                self._replies.ack(batch)
            self._expire()

    def _next_wait(self) -> float:
        with self._lock:
            if not self._deadlines:
                return _MAX_WAIT
            return min(_MAX_WAIT, max(0.0, self._deadlines[0][0] - time.monotonic()))

    def _answer(self, d: Delivery) -> None:
        request_id = d.message.causation_id
        with self._lock:
            future = self._pending.pop(request_id, None) if request_id else None
        if future is None:
            if d.header(REQUESTER) == self.id:
                self.late_replies += 1  # its caller gave up; never someone else's answer
            return
        failed = d.header(REMOTE_ERROR_TYPE)
        if failed is not None:
            future.set_exception(RemoteError(failed, d.header(REMOTE_ERROR) or ""))
        else:
            future.set_result(d.message)

    def _expire(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, request_id = heapq.heappop(self._deadlines)
                future = self._pending.pop(request_id, None)
                if future is not None:
                    expired.append((request_id, future))
        for request_id, future in expired:
            future.set_exception(
                RequestTimeout(f"no reply to request {request_id} on {self.topic!r} in time")
            )

    def close(self) -> None:
        """Stop reading replies; waiting requests fail with ClosedError. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._reader.join()
        self._replies.close()
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ClosedError("requester closed before the reply came"))

    def __enter__(self) -> Requester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reply(d: Delivery, reply_to: str, outcome: Any, exc: BaseException | None) -> Output:
    headers = {REQUESTER: d.header(REQUESTER) or ""}
    if exc is not None:
        headers[REMOTE_ERROR_TYPE] = error_type(exc)
        headers[REMOTE_ERROR] = str(exc)[:2000]
        return Output(reply_to, None, headers=headers)
    if isinstance(outcome, Message):
        return Output(reply_to, outcome.value, outcome.key, {**outcome.headers, **headers})
    return Output(reply_to, outcome, headers=headers)


def responder(handler: Callable[[Delivery], Any]) -> Callable[[Delivery], Any]:
    """Wrap ``handler`` (sync or async) so that its return value, or the exception it
    raises, becomes the reply to the request it was given.

    Run the result as a Consumer handler with ``retry=NO_RETRY`` (``App.responder``
    does). A message without a reply topic is logged and acked. The result keeps
    ``handler``'s name and docstring.
    """

    def target(d: Delivery) -> str | None:
        reply_to = d.header(REPLY_TO)
        if not reply_to:
            log.warning(
                "message %s on %r is not a request (no %s)", d.message.id, d.topic, REPLY_TO
            )
        return reply_to

    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def respond_async(d: Delivery) -> Output | None:
            reply_to = target(d)
            if reply_to is None:
                return None
            try:
                result = await handler(d)
            except Exception as exc:
                return _reply(d, reply_to, None, exc)
            return _reply(d, reply_to, result, None)

        return respond_async

    @functools.wraps(handler)
    def respond(d: Delivery) -> Output | None:
        reply_to = target(d)
        if reply_to is None:
            return None
        try:
            result = handler(d)
        except Exception as exc:
            return _reply(d, reply_to, None, exc)
        return _reply(d, reply_to, result, None)

    return respond
