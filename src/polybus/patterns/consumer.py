"""The consumer loop behind every handler: fetch, per-key lanes, retries, dead
letters, settling and the outputs a handler returns.

:class:`~polybus.patterns.worker.App` registers handlers and
:class:`~polybus.patterns.worker.Worker` runs one :class:`Consumer` per
handler; the delivery guarantees are described in :mod:`polybus.patterns.worker`.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from ..bus import Bus, BusTransaction, Subscriber, out_record
from ..errors import (
    ClosedError,
    ConfigurationError,
    DecodeError,
    FencedError,
    PolybusError,
)
from ..message import Delivery, Message
from ..middleware import notify, process_chain
from ..types import Capability, OutRecord
from .dlq import dead_letter_copy, dead_letter_topic
from .inbox import Inbox
from .retry import DUE, NO_RETRY, RetryPolicy, failure_fields, retry_copy, retry_topic

__all__ = [
    "Consumer",
    "Guarantee",
    "Handler",
    "Invoke",
    "Output",
    "Stats",
    "call_handler",
    "derived_id",
]

log = logging.getLogger("polybus.worker")

Guarantee = Literal["at-most-once", "at-least-once", "exactly-once"]
Handler = Callable[[Delivery], Any]
#: how a handler is called: ``invoke(handler, delivery)``; async handlers use another
Invoke = Callable[[Handler, Delivery], Any]

_IDLE_WAIT = 0.25  # seconds a fetch waits when nothing is due sooner
_RETRY_FETCH_INTERVAL = 0.1  # seconds between reads of an idle retry topic


class Output(NamedTuple):
    """A message a handler returns, to be published because of the one it handled."""

    topic: str
    value: Any
    key: str | bytes | None = None
    headers: Mapping[str, str] | None = None
    content_type: str | None = None


def derived_id(parent: str, n: int) -> str:
    """A message id fixed by ``parent``'s id and ``n``: the same on every run."""
    h = hashlib.sha256(f"{parent}/{n}".encode()).hexdigest()
    # version 8 (RFC 9562 custom), variant 10
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def _outputs(result: Any, delivery: Delivery) -> list[tuple[str, OutRecord]]:
    """The records of the Outputs a handler returned for ``delivery``; any other result
    is ignored."""
    if isinstance(result, Output):
        items: list[Any] | tuple[Any, ...] = [result]
    elif isinstance(result, list | tuple) and any(isinstance(i, Output) for i in result):
        items = result
        if not all(isinstance(i, Output) for i in items):
            raise ConfigurationError("a handler's list of Outputs holds something else too")
    else:
        return []
    cause = delivery.message
    out = []
    for n, item in enumerate(items):
        message = Message(
            item.value,
            key=item.key,
            headers=item.headers,
            content_type=item.content_type,
            id=derived_id(cause.id, n),
            correlation_id=cause.correlation_id or cause.id,
            causation_id=cause.id,
        )
        out.append((item.topic, out_record(message, 0)))
    return out


def call_handler(handler: Handler, delivery: Delivery) -> Any:
    return handler(delivery)


@dataclass
class Stats:
    """What one consumer did since it started."""

    processed: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    last_error: str | None = None
    last_poll: float = field(default_factory=time.monotonic)


class _Lane:
    """One handler thread; a key always goes to the same lane, so it keeps its order."""

    def __init__(self, consumer: Consumer, n: int) -> None:
        self.jobs: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()
        self.thread = threading.Thread(
            target=self._run, args=(consumer,), name=f"polybus-{consumer.name}-{n}", daemon=True
        )
        self.thread.start()

    def _run(self, consumer: Consumer) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                consumer._run(job)
            finally:
                consumer._done()


def _check_settings(
    guarantee: str,
    inbox: object,
    transactional: bool,
    concurrency: int,
    strict_order: bool,
    batch: int,
    max_held: int,
) -> None:
    """Raise ConfigurationError for Consumer settings that cannot work on any bus."""
    if guarantee not in ("at-most-once", "at-least-once", "exactly-once"):
        raise ConfigurationError(
            f"guarantee must be at-most-once, at-least-once or exactly-once, not {guarantee!r}"
        )
    if guarantee == "exactly-once" and inbox is None and not transactional:
        raise ConfigurationError(
            "exactly-once needs an inbox (inbox=...) or transactional=True on a backend "
            "with transactions"
        )
    if transactional and guarantee == "at-most-once":
        raise ConfigurationError(
            "transactional=True commits the input with the outputs: it gives "
            "exactly-once, not at-most-once"
        )
    if transactional and inbox is not None:
        raise ConfigurationError(
            "transactional=True and inbox=... do not combine: the inbox commits in its own "
            "database, so a bus transaction aborted after it would lose the outputs; call "
            "inbox.process() around the database work inside the handler, or use one of them"
        )
    if transactional and (concurrency != 1 or strict_order):
        raise ConfigurationError(
            "a transactional consumer runs one transaction at a time: "
            "use concurrency=1 and no strict_order, and run more worker processes"
        )
    if concurrency < 1 or batch < 1 or max_held < 1:
        raise ConfigurationError("concurrency, batch and max_held must be at least 1")


class Consumer:
    """One handler over one topic's group: fetch, handle, retry, dead-letter, settle.

    ``concurrency`` handler threads run at once; messages of one key go to
    one thread in order. ``strict_order=True`` keeps per-key order through
    failures too: a failed message's later messages of the same key wait for
    its retry (held in memory, unacked, so a crash delivers them again), while
    other keys go on. Without it, a retry goes to the retry topic and the
    messages behind it do not wait. See the module docstring for guarantees.
    """

    def __init__(
        self,
        bus: Bus,
        topic: str,
        handler: Handler,
        *,
        group: str | None = None,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008  # frozen, so sharing one is safe
        dead_letters: bool = True,
        inbox: Inbox | None = None,
        guarantee: Guarantee = "at-least-once",
        transactional: bool = False,
        concurrency: int = 1,
        strict_order: bool = False,
        model: Any = None,
        batch: int = 100,
        session_timeout: float = 10.0,
        max_held: int = 1000,
        invoke: Invoke = call_handler,
    ) -> None:
        _check_settings(guarantee, inbox, transactional, concurrency, strict_order, batch, max_held)
        if transactional and Capability.TRANSACTIONS not in bus.capabilities:
            raise ConfigurationError(
                "transactional=True needs a backend with transactions (native, memory, "
                "Kafka); use an inbox for exactly-once here"
            )
        self.bus = bus
        self.topic = topic
        self.handler = handler
        self.group: str = group or str(getattr(handler, "__name__", "handler"))
        self.name = f"{topic}:{self.group}"
        self.retry = NO_RETRY if guarantee == "at-most-once" else retry
        self.dead_letters = dead_letters
        self.inbox = inbox
        self.guarantee = guarantee
        self.transactional = transactional
        self.concurrency = concurrency
        self.strict_order = strict_order
        self.model = model
        self.batch = batch
        self.session_timeout = session_timeout
        self.max_held = max_held
        self.invoke = invoke
        # the middleware's process hooks around the handler and its outputs, built once
        self._process = process_chain(bus.middleware, self._attempt)
        self.stats = Stats()
        self.retry_topic = retry_topic(topic, self.group)
        self.dead_letter_topic = dead_letter_topic(topic, self.group)
        self._held_by_backend = Capability.DELAY in bus.capabilities
        self._main: Subscriber | None = None
        self._retries: Subscriber | None = None
        self._lanes: list[_Lane] = []
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        self._held: list[tuple[int, int, Delivery]] = []  # (due ms, seq, delivery): a heap
        self._seq = itertools.count()
        self._blocked: dict[str | bytes, deque[Delivery]] = {}  #: strict order: key -> waiting
        self._retrying: set[int] = set()  #: strict order: id() of deliveries held for a retry
        self._next_retry_fetch = 0.0
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> Consumer:
        """Declare the topics and groups, subscribe, start the handler threads."""
        bus = self.bus
        bus.declare(self.topic, groups=[self.group])
        bus.declare(self.retry_topic, groups=[self.retry_topic])
        if self.dead_letters:
            bus.declare(self.dead_letter_topic, partitions=1, groups=[self.dead_letter_topic])
        self._main = bus.subscribe(
            self.topic, self.group, session_timeout=self.session_timeout, model=self.model
        )
        # The retry topic is read by a group of its own name (Kafka group ids are global).
        self._retries = bus.subscribe(
            self.retry_topic,
            self.retry_topic,
            session_timeout=self.session_timeout,
            model=self.model,
        )
        if self.concurrency > 1:
            self._lanes = [_Lane(self, n) for n in range(self.concurrency)]
        return self

    def poll(self, timeout: float = _IDLE_WAIT) -> int:
        """Fetch once from the topic and the retry topic and hand out what is due; return
        how many deliveries started. Waits at most ``timeout`` for the first."""
        main, retries = self._main, self._retries
        if main is None or retries is None:
            raise ClosedError(f"consumer {self.name} is not started (or stopped)")
        self.stats.last_poll = time.monotonic()
        started = self._release_due()
        if self._backlog() < self.max_held:
            wait = max(0.0, min(timeout, self._until_next_due()))
            batch = main.fetch(self.batch, timeout=0.0 if started else wait)
            started += self._take(main, batch)
            now = time.monotonic()
            # Retries are late by design: read their topic now and then, not every poll
            # (a fetch is a round trip on some brokers), unless it had more last time.
            if now >= self._next_retry_fetch and self._backlog() < self.max_held:
                retried = retries.fetch(self.batch, timeout=0.0)
                self._next_retry_fetch = now if retried else now + _RETRY_FETCH_INTERVAL
                started += self._take_retries(retried)
        elif not started:  # full: wait for what is held to come due, or for handlers
            time.sleep(min(timeout, self._until_next_due()))
        return started

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set. A backend error is logged and polling goes on."""
        while not stop.is_set():
            try:
                self.poll()
            except ClosedError:
                if stop.is_set() or self._stopping:
                    return
                raise
            except PolybusError as exc:
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("consumer %s: %s; polling again", self.name, exc)
                stop.wait(0.5)

    def stop(self, timeout: float = 30.0) -> bool:
        """Let started handlers finish (up to ``timeout`` seconds), commit, leave the groups.

        Messages fetched but not started, and held retries, stay unacked and go
        to the group again. Returns False if handlers were still running at the
        deadline (their messages are delivered again too). Idempotent.
        """
        self._stopping = True
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight and time.monotonic() < deadline:
                self._idle.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            finished = self._inflight == 0
            self._held.clear()
            self._blocked.clear()
        for lane in self._lanes:
            lane.jobs.put(None)
        for sub in (self._main, self._retries):
            if sub is not None:
                try:
                    sub.close()
                except PolybusError as exc:
                    log.warning("consumer %s: closing: %s", self.name, exc)
        self._main = self._retries = None
        if not finished:
            log.warning("consumer %s: handlers still running after %.0f s", self.name, timeout)
        return finished

    # -- handing out -------------------------------------------------------------

    def _backlog(self) -> int:
        return self._inflight + len(self._held)

    def _until_next_due(self) -> float:
        with self._lock:
            if not self._held:
                return _IDLE_WAIT
            return max(0.0, self._held[0][0] / 1000 - time.time())

    def _take(self, sub: Subscriber, batch: list[Delivery]) -> int:
        if not batch:
            return 0
        if self.guarantee == "at-most-once":
            sub.ack(batch)
            sub.commit()
        if self.transactional:
            self._run_transaction(sub, batch)
        else:
            self._start(batch)
        return len(batch)

    def _take_retries(self, batch: list[Delivery]) -> int:
        now_ms = int(time.time() * 1000)
        due_now = []
        for d in batch:
            due = d.header(DUE)
            if due is not None and due.isdigit() and int(due) > now_ms:
                with self._lock:
                    heapq.heappush(self._held, (int(due), next(self._seq), d))
            else:
                due_now.append(d)
        assert self._retries is not None
        return self._take(self._retries, due_now)

    def _release_due(self) -> int:
        now_ms = int(time.time() * 1000)
        due: list[Delivery] = []
        with self._lock:
            while self._held and self._held[0][0] <= now_ms:
                due.append(heapq.heappop(self._held)[2])
        if not due:
            return 0
        if self.transactional:
            assert self._retries is not None
            self._run_transaction(self._retries, due)
        else:
            self._start(due)
        return len(due)

    def _start(self, batch: list[Delivery]) -> None:
        """Hand ``batch`` to the lanes by key, or run it here when there are none. Once
        stopping, the rest is not started: unacked, the group delivers it again."""
        lanes = self._lanes
        if not lanes:
            with self._lock:
                self._inflight += 1  # the batch counts as one: stop() waits for it
            try:
                for d in batch:
                    if self._stopping:
                        break
                    self._run(d)
            finally:
                self._done()
            return
        for d in batch:
            if self._stopping:
                break
            with self._lock:
                self._inflight += 1
            key = d.record.key
            n = hash(key) if key is not None else next(self._turn)
            lanes[n % len(lanes)].jobs.put(d)

    def _done(self) -> None:
        with self._idle:
            self._inflight -= 1
            if not self._inflight:
                self._idle.notify_all()

    # -- handling ----------------------------------------------------------------

    def _run(self, d: Delivery) -> None:
        """Handle one delivery and settle it (in the poller or a lane thread)."""
        if self._stopping:
            return  # not started: unacked, so the group delivers it again
        key = d.record.key
        if self.strict_order and key is not None:
            with self._lock:
                waiting = self._blocked.get(key)
                if waiting is not None and id(d) not in self._retrying:
                    waiting.append(d)  # an earlier message of this key waits for its retry
                    return
        if self._handle(d) and self.strict_order and key is not None:
            self._drain(key)

    def _handle(self, d: Delivery) -> bool:
        """Try ``d`` through the middleware. False when it is held for a strict-order retry."""
        try:
            self._process(d)
        except Exception as exc:  # a process hook's own: the handler's are routed inside
            return self._failed(d, exc)
        return not (self.strict_order and id(d) in self._retrying)

    def _attempt(self, d: Delivery) -> None:
        """One try at ``d``, inside the middleware's process hooks: the handler and its
        outputs, then the ack; on a failure, its retry or dead letter instead, published
        while what the hooks set up (a trace span, say) is still current."""
        ran = True
        try:
            d.value  # noqa: B018  # decode now: an undecodable payload is dead-lettered
            if self.inbox is not None:
                ran, _ = self.inbox.process(
                    self.group, d.message.id, lambda: self._call_and_publish(d)
                )
            else:
                self._call_and_publish(d)
        except Exception as exc:
            self._failed(d, exc)
            return
        if self.guarantee != "at-most-once":
            d.ack()
        stats = self.stats
        with self._lock:
            if ran:
                stats.processed += 1
            else:
                stats.duplicates += 1
        if self.strict_order:
            self._retrying.discard(id(d))

    def _count(self, name: str, n: int = 1, error: BaseException | None = None) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)
            if error is not None:
                self.stats.last_error = f"{type(error).__name__}: {error}"

    def _call_and_publish(self, d: Delivery) -> None:
        for topic, record in _outputs(self.invoke(self.handler, d), d):
            self.bus.publish_records(topic, [record])

    def _failed(self, d: Delivery, exc: Exception) -> bool:
        self._count("failed", error=exc)
        notify(self.bus.middleware, "failed", d, exc)
        key = d.record.key
        if self.strict_order and key is not None and self.retry.retries(exc, d.attempt):
            delay = self.retry.delay(d.attempt, exc)
            self._log_failure(logging.INFO, "retry", d, exc, f"retry in {delay:.1f} s, in order")
            notify(self.bus.middleware, "retrying", d, exc, delay)
            self._hold(d, key, delay)
            self._count("retried")
            return False
        try:
            routed = self._route(d, exc)
            if routed is not None:
                self.bus.publish_records(*routed)
        except PolybusError as publish_error:
            # Could not record the failure: hand the message back to the group instead.
            log.warning("%s: could not route a failed message: %s", self.name, publish_error)
            self._settle_quietly(d, requeue=True)
            return True
        self._retrying.discard(id(d))
        self._settle_quietly(d, requeue=None)
        return True

    def _route(self, d: Delivery, exc: Exception) -> tuple[str, list[OutRecord]] | None:
        """Where a failed delivery goes, and the copy that goes there: the retry topic,
        the dead-letter topic, or nowhere (None: dropped, dead letters being off)."""
        attempt = d.attempt
        if self.retry.retries(exc, attempt):
            delay = self.retry.delay(attempt, exc)
            copy = retry_copy(
                d.record,
                exc,
                attempt=attempt + 1,
                due_ms=int((time.time() + delay) * 1000),
                held_by_backend=self._held_by_backend,
            )
            self._count("retried")
            self._log_failure(logging.INFO, "retry", d, exc, f"retry in {delay:.1f} s")
            notify(self.bus.middleware, "retrying", d, exc, delay)
            return self.retry_topic, [copy]
        if not self.dead_letters:
            self._log_failure(logging.ERROR, "drop", d, exc, "dropped: no dead-letter topic")
            return None
        if isinstance(exc, DecodeError):
            reason = "undecodable"
        elif attempt >= self.retry.max_attempts:
            reason = "exhausted"
        else:
            reason = "not-retryable"
        copy = dead_letter_copy(d.record, exc, group=self.group, attempts=attempt, reason=reason)
        self._count("dead_lettered")
        self._log_failure(logging.WARNING, "dead-letter", d, exc, f"gave up ({reason})")
        notify(self.bus.middleware, "dead_lettered", d, exc, reason)
        return self.dead_letter_topic, [copy]

    def _log_failure(
        self, level: int, outcome: str, d: Delivery, exc: Exception, then: str
    ) -> None:
        """One line per failed try: text for people, the fields in ``extra`` for a pipeline."""
        fields = failure_fields(d, exc, self.group, outcome)
        text = "%s: attempt %d of message %s failed (%s: %s); %s"
        args = (self.name, d.attempt, fields["message_id"], fields["error_type"], exc, then)
        log.log(level, text, *args, extra=fields)

    def _settle_quietly(self, d: Delivery, *, requeue: bool | None) -> None:
        try:
            if requeue is None:
                if self.guarantee != "at-most-once":
                    d.ack()
            else:
                d.nack(requeue=requeue)
        except PolybusError as exc:  # closed meanwhile: the group delivers it again
            log.info("%s: could not settle %s: %s", self.name, d.offset, exc)

    # -- strict per-key order ----------------------------------------------------

    def _hold(self, d: Delivery, key: str | bytes, delay: float) -> None:
        due_ms = int((time.time() + delay) * 1000)
        d.delivery_count += 1  # the next try is counted as a redelivery is
        with self._lock:
            self._retrying.add(id(d))
            self._blocked.setdefault(key, deque())
            heapq.heappush(self._held, (due_ms, next(self._seq), d))

    def _drain(self, key: str | bytes) -> None:
        """After ``key``'s held message settled, run the ones that waited behind it."""
        while True:
            with self._lock:
                waiting = self._blocked.get(key)
                if not waiting:
                    self._blocked.pop(key, None)
                    return
                d = waiting.popleft()
            if not self._handle(d):
                return  # failed again: it is held, the rest keep waiting

    # -- transactions ------------------------------------------------------------

    def _run_transaction(self, sub: Subscriber, batch: list[Delivery]) -> None:
        """Handle ``batch`` in one transaction: outputs, retries and acks commit together."""
        with self._lock:
            self._inflight += 1
        try:
            tx = self.bus.transaction(sub)
            try:
                for d in batch:
                    self._handle_in(tx, d)
                tx.commit()
            except FencedError as exc:
                log.info("%s: transaction fenced (%s); the input moved on", self.name, exc)
                return
            except BaseException:
                tx.abort()
                raise
            self._count("processed", len(batch))
        finally:
            self._done()

    def _handle_in(self, tx: BusTransaction, d: Delivery) -> None:
        def attempt(d: Delivery) -> None:  # as _attempt, into the transaction
            try:
                d.value  # noqa: B018  # decode now: an undecodable payload is dead-lettered
                for topic, record in _outputs(self.invoke(self.handler, d), d):
                    tx.publish_records(topic, [record])
            except Exception as exc:
                self._count("failed", error=exc)
                notify(self.bus.middleware, "failed", d, exc)
                routed = self._route(d, exc)
                if routed is not None:
                    tx.publish_records(*routed)  # with the ack: the failure is recorded atomically

        process_chain(self.bus.middleware, attempt)(d)
        tx.ack(d)
