"""``KafkaSubscription``: a consumer group member, or a group-less reader, of one topic.

Assignment and the rebalance callbacks, commits of each partition's settled
prefix, ``fetch`` (a hot path: records are built and tracked in one loop),
``ack``, ``nack``, ``seek``, ``lag`` and ``close``. The transaction methods
are in :mod:`.transactions`, whose ``_TransactionalMember`` this class
inherits.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from ...errors import ClosedError, ConfigurationError, ConnectionLost, PolybusError, TopicNotFound
from ..base import Delivery, Start
from .acks import _Partition
from .errors import _CONFIG, _NOT_FOUND, _while_leaders_move, kafka_errors, map_error
from .transactions import _TransactionalMember

if TYPE_CHECKING:
    from .backend import KafkaBackend

log = logging.getLogger("polybus.kafka")

_COMMIT_INTERVAL = 0.2  # seconds between commits of acked prefixes from fetch()
_MAX_CONSUME = 100_000  # records per consume() call


def _ignore(offset: object) -> None:
    """Stands in for settling a record whose partition is no longer this member's."""


def _str_headers(headers: list[tuple[str, bytes | None]]) -> tuple[tuple[str, str], ...]:
    return tuple(
        [(k, "" if v is None else v.decode("utf-8", "surrogateescape")) for k, v in headers]
    )


_ABSENT = object()

_Headers = tuple[tuple[str, str], ...]


class _Record(Delivery):
    """A fetched record that reads its headers and timestamp from librdkafka's message
    only when asked, and keeps the headers its ``(name, bytes)`` pairs until all are read.

    The facade looks up a header or two per message (the content type, the
    attempt) and wants them all only for ``Delivery.message``, so decoding every
    header of every record up front was wasted: three tuples and two decodes a
    record, and the garbage collector's passes over those tuples. Not asking the
    message for them (nor for its timestamp, a tuple a call) at fetch: fetch() and
    the subscriber's part 0.39-0.42 -> 0.28-0.30 µs of Python a record, reading each
    value 0.25 -> 0.30 µs (its headers asked for then): 0.07 µs a message less for a
    consumer that reads every value (1000-record batches replayed, GC off).
    """

    __slots__ = ("_headers", "_message_in", "_timestamp")
    _message_in: Any  #: librdkafka's message (confluent_kafka.Message)
    _headers: list[tuple[str, bytes | None]] | _Headers | None  #: None: not asked for yet
    _timestamp: int | None  #: None: not asked for yet

    @property  # over InRecord's plain attribute: decoded on first access
    def headers(self) -> _Headers:
        headers = self._headers
        if headers is None or type(headers) is list:
            pairs = self._message_in.headers() if headers is None else headers
            headers = self._headers = _str_headers(pairs) if pairs else ()
        return cast(_Headers, headers)

    @headers.setter
    def headers(self, headers: _Headers) -> None:
        self._headers = headers

    @property  # over InRecord's plain attribute: read when asked
    def timestamp_ms(self) -> int:
        ts = self._timestamp
        if ts is None:
            ts = self._timestamp = max(0, self._message_in.timestamp()[1])  # -1: not available
        return ts

    @timestamp_ms.setter
    def timestamp_ms(self, timestamp_ms: int) -> None:
        self._timestamp = timestamp_ms

    def header(self, name: str) -> str | None:
        found: Any = _ABSENT
        headers = self._headers
        if headers is None:
            headers = self._headers = self._message_in.headers() or ()
        for key, value in headers:  # decoded or not: one pass, no decoding
            if key == name:
                found = value
        if found is _ABSENT:
            return None
        if type(found) is str:
            return found
        return "" if found is None else cast(bytes, found).decode("utf-8", "surrogateescape")


class KafkaSubscription(_TransactionalMember):
    """A consumer group member (or a group-less reader) of one topic.

    One thread fetches (and seeks); ``ack``/``nack`` may come from any
    thread. Acks of records whose partition was revoked or sought since are
    ignored: those records are redelivered to the partition's owner.
    """

    def __init__(
        self,
        backend: KafkaBackend,
        topic: str,
        group: str | None,
        config: dict[str, Any],
        start: Start,
    ) -> None:
        self._backend = backend
        self._topic = topic
        self._group = group
        self._reconnect_timeout = backend.reconnect_timeout
        self._lock = threading.Lock()
        self._partitions: dict[int, _Partition] = {}
        self._requeued: deque[Delivery] = deque()
        self._requeue_turn = True  #: with max_records=1, whether a requeued record goes next
        self._next_commit = 0.0
        self._down_since: float | None = None
        self._failure: KafkaError | None = None  #: fatal: every fetch raises it
        self._error: PolybusError | None = None  #: raised once by the next fetch
        self._joined = False  #: holds an assignment (a join is in flight while False)
        self._session_timeout = int(config.get("session.timeout.ms", 0)) / 1000
        self._closed = False
        self._commit_lock = threading.Lock()  #: one commit at a time, transactional or not
        self._sent_async = False  #: an asynchronous commit was sent since the last check
        self._transactional: Producer | None = None  #: made for the first transaction
        self._transactional_id = f"polybus-{group}-{uuid.uuid4().hex}"
        self._transaction_timeout = 0.0  #: seconds, set with the transactional producer
        self._failed_deliveries: list[KafkaError] = []  #: of the transaction committing
        config = {**config, "error_cb": self._on_error}
        if group is not None:
            config["on_commit"] = self._on_commit
        with kafka_errors():
            self._consumer = Consumer(config)
        try:
            if group is None:
                self._assign_all(start)
            else:
                self._consumer.subscribe(
                    [topic],
                    on_assign=self._on_assign,
                    on_revoke=self._on_revoke,
                    on_lost=self._on_lost,
                )
        except BaseException as exc:
            self._consumer.close()
            if isinstance(exc, KafkaException):
                raise map_error(exc) from exc
            raise

    @property
    def group(self) -> str | None:
        return self._group

    # -- assignment -------------------------------------------------------------

    def _assign_all(self, start: Start) -> None:
        """Read every partition from its current end (or beginning), resolved now so that
        whatever is published after subscribe() returns is seen."""
        consumer, topic, timeout = self._consumer, self._topic, self._reconnect_timeout
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise TopicNotFound(f"Kafka topic {topic!r} is not available")
        numbers = sorted(metadata.partitions)
        if start == "earliest":
            tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in numbers]
            self._partitions = {p: _Partition(p) for p in numbers}
            consumer.assign(tps)
            return
        now_ms = int(time.time() * 1000)
        by_time = _while_leaders_move(
            lambda: consumer.offsets_for_times(
                [TopicPartition(topic, p, now_ms) for p in numbers], timeout=timeout
            ),
            timeout,
        )
        tps = []
        for tp in by_time:
            state = _Partition(tp.partition)
            if tp.offset < 0:  # nothing at or after now: start at the end
                tp.offset = self._watermarks(tp)[1]
            else:
                # A broker answer to trust only as far as the records' timestamps agree:
                # skip older records until the first one stamped at or after now.
                state.skip_before_ms = now_ms
            state.next = tp.offset
            self._partitions[tp.partition] = state
            tps.append(TopicPartition(topic, tp.partition, tp.offset))
        consumer.assign(tps)

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """The low and high watermark of ``tp``, as its leader reports them."""
        timeout = self._reconnect_timeout
        return _while_leaders_move(
            lambda: self._consumer.get_watermark_offsets(tp, timeout), timeout
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = True
        with self._lock:
            for tp in partitions:
                old = self._partitions.get(tp.partition)
                if old is not None:
                    old.live = False
                self._partitions[tp.partition] = _Partition(tp.partition)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what was acked before the partitions move on, then forget their records.
        self._joined = False
        self._commit([tp.partition for tp in partitions], asynchronous=False)
        self._drop(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = False
        self._drop(partitions)  # already someone else's: committing would be refused

    def _drop(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                state = self._partitions.pop(tp.partition, None)
                if state is not None:
                    state.live = False
            if self._requeued:
                self._requeued = deque(r for r in self._requeued if cast(_Partition, r.handle).live)

    # -- commits ----------------------------------------------------------------

    def _commit(
        self, partitions: Sequence[int] | None, *, asynchronous: bool, strict: bool = False
    ) -> None:
        """Commit the settled prefix of ``partitions`` (all owned ones for None) if it moved.

        A group-less reader commits nothing but still trims its tracking here. A
        failed commit is logged and retried later, or raised when ``strict``.
        """
        with self._commit_lock:
            offsets = []
            with self._lock:
                states = self._partitions
                for number in states if partitions is None else partitions:
                    state = states.get(number)
                    if state is None:
                        continue
                    point = state.commit_point()
                    if self._group is not None and point is not None and point != state.committed:
                        state.committed = point
                        offsets.append(TopicPartition(self._topic, number, point))
            if not offsets:
                return
            try:
                if asynchronous:
                    self._sent_async = True
                    self._consumer.commit(offsets=offsets, asynchronous=True)
                else:
                    self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                # Not committed: the records are delivered again (at-least-once).
                log.info("Kafka commit for group %r failed: %s", self._group, exc)
                self._forget_commits(offsets)
                if strict:
                    raise map_error(exc) from exc

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = partitions if err is not None else [tp for tp in partitions if tp.error]
        if failed:
            log.info("Kafka commit for group %r failed: %s", self._group, err or failed)
            self._forget_commits(failed)

    def _forget_commits(self, offsets: list[TopicPartition]) -> None:
        with self._lock:
            for tp in offsets:
                state = self._partitions.get(tp.partition)
                if state is not None and state.committed == tp.offset:
                    state.committed = -1  # try again next time

    # -- errors -------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if self._down_since is None:
                self._down_since = time.monotonic()
        elif err.fatal():
            self._failure = err
        log.debug("Kafka consumer of %r: %s", self._topic, err)

    def _check_connection(self, timeout: float) -> None:
        """Raise ConnectionLost once no broker answered for ``reconnect_timeout``.

        librdkafka reports when every broker connection is down but not when
        one is back, so past the deadline a metadata request asks.
        """
        since = self._down_since
        if since is None or time.monotonic() - since < self._reconnect_timeout:
            return
        try:
            self._consumer.list_topics(self._topic, timeout=min(1.0, max(timeout, 0.2)))
        except KafkaException as exc:
            raise ConnectionLost(
                f"no Kafka broker answered for {time.monotonic() - since:.0f} s "
                f"(reconnect_timeout={self._reconnect_timeout:g}); still retrying: {exc}"
            ) from exc
        self._down_since = None

    # -- the Subscription protocol ---------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"subscription to {self._topic!r} is closed; subscribe again")

    def fetch(self, max_records: int, timeout: float) -> list[Delivery]:
        self._check()
        if self._failure is not None:
            raise map_error(KafkaException(self._failure))
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        now = time.monotonic()
        if now >= self._next_commit:
            self._next_commit = now + _COMMIT_INTERVAL
            self._commit(None, asynchronous=True)
        out: list[Delivery] = []
        if self._requeued:
            # Leave consume() room (every other call when max_records is 1): only it serves
            # rebalances, and a member whose given-back records keep failing, because the
            # coordinator forgot it, must still get to rejoin.
            take = max_records - 1 if max_records > 1 else int(self._requeue_turn)
            self._requeue_turn = not self._requeue_turn
            with self._lock:
                requeued = self._requeued
                while requeued and len(out) < take:
                    out.append(requeued.popleft())
        room = min(max_records - len(out), _MAX_CONSUME)
        if room <= 0:
            return out
        try:
            # consume(n, t) waits until n records came or t passed: take what is there,
            # else wait for one record only, then take whatever came with it.
            consume = self._consumer.consume
            messages: list[Any] = consume(room, 0.0)
            if not messages and not out and timeout > 0:
                messages = consume(1, timeout)
                if messages and room > 1:
                    messages += consume(room - 1, 0.0)
        except KafkaException as exc:
            raise map_error(exc) from exc
        except RuntimeError as exc:  # the consumer was closed by another thread
            raise ClosedError(f"subscription to {self._topic!r} is closed") from exc
        if out:  # a rebalance in consume() may have revoked these
            out = [r for r in out if cast(_Partition, r.handle).live]
        if not messages:
            self._check_connection(timeout)
            return out
        self._down_since = None
        topic = self._topic
        states = self._partitions
        append = out.append
        new = object.__new__
        last = -1
        state: _Partition | None = None
        track: Callable[[Any], None] = out.append  # placeholder: set with ``state`` below
        skip_before = 0
        with self._lock:
            for m in messages:
                if m.error() is not None:
                    self._on_message_error(m.error())
                    continue
                p = m.partition()
                if p != last:  # records come in runs per partition
                    last, state = p, states.get(p)
                    if state is not None:
                        track = state.pending.append
                        skip_before = state.skip_before_ms
                if state is None:
                    continue  # fetched before its partition was revoked
                if skip_before:
                    if m.timestamp()[1] < skip_before:
                        continue
                    skip_before = state.skip_before_ms = 0
                offset = m.offset()
                track(offset)
                # Built in place: Delivery(...) runs a Python __init__ (157 ns here; 96 ns so);
                # the subscriber that fetches it sets the rest of a Delivery's state.
                r = new(_Record)
                r.topic = topic
                r.partition = p
                r.offset = offset
                r.payload = m.value()
                r.key = m.key()
                r._message_in = m
                r._headers = None
                r._timestamp = None
                r.delivery_count = 1
                r.handle = state
                append(r)
        return out

    def _on_message_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            self._failure = err
        elif code in _NOT_FOUND or code in _CONFIG:
            self._error = map_error(KafkaException(err))  # raised by the next fetch
        else:
            log.debug("Kafka consumer of %r: %s", self._topic, err)  # librdkafka retries these

    def commit(self) -> None:
        self._check()
        self._commit(None, asynchronous=False, strict=True)

    def ack(self, records: Sequence[Delivery]) -> None:
        last: _Partition | None = None
        settle: Callable[[Any], None] = _ignore
        with self._lock:
            for r in records:
                state: _Partition = r.handle  # type: ignore[assignment]
                if state is not last:  # records come in runs per partition
                    last = state
                    settle = state.settled.add if state.live else _ignore
                settle(r.offset)

    def nack(self, records: Sequence[Delivery], *, requeue: bool) -> None:
        with self._lock:
            for r in records:
                state = cast(_Partition, r.handle)
                if not state.live:
                    continue
                if requeue:
                    r.delivery_count += 1
                    self._requeued.append(r)
                else:
                    state.settled.add(cast(int, r.offset))

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp_ms: int | None = None
    ) -> None:
        self._check()
        if (offset is None) == (timestamp_ms is None):
            raise ConfigurationError("seek needs exactly one of offset= or timestamp_ms=")
        if offset is not None and (isinstance(offset, str) or offset < 0):
            raise ConfigurationError(f"Kafka offsets are integers >= 0, got {offset!r}")
        with self._lock:
            old = self._partitions.get(partition)
        if old is None:
            raise ConfigurationError(
                f"partition {partition} of {self._topic!r} is not assigned to this member "
                f"(assigned: {sorted(self._partitions)}); seek after it is assigned"
            )
        target = TopicPartition(self._topic, partition, OFFSET_END)
        with kafka_errors():
            if offset is None:
                found = self._consumer.offsets_for_times(
                    [TopicPartition(self._topic, partition, cast(int, timestamp_ms))],
                    timeout=self._reconnect_timeout,
                )[0]
                if found.error is not None:
                    raise KafkaException(found.error)
                if found.offset >= 0:
                    target.offset = found.offset
            else:
                target.offset = offset
            self._consumer.seek(target)
        known = target.offset if target.offset >= 0 else None
        with self._lock:
            old.live = False
            self._partitions[partition] = _Partition(partition, next=known, committed=old.committed)
            self._requeued = deque(r for r in self._requeued if cast(_Partition, r.handle).live)

    def lag(self) -> dict[int, int]:
        """Records not yet committed by the group, per partition of the topic (for a
        group-less reader: not yet read, per partition)."""
        self._check()
        consumer, topic, timeout = self._consumer, self._topic, self._reconnect_timeout
        with kafka_errors():
            if self._group is None:
                positions = {}
                with self._lock:
                    for p, state in self._partitions.items():
                        state.commit_point()  # brings ``next`` up to date
                        positions[p] = state.next
                lags = {}
                for p, position in positions.items():
                    low, high = self._watermarks(TopicPartition(topic, p))
                    lags[p] = max(0, high - (low if position is None else position))
                return lags
            metadata = consumer.list_topics(topic, timeout=timeout).topics[topic]
            tps = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
            lags = {}
            for tp in consumer.committed(tps, timeout=timeout):
                low, high = self._watermarks(tp)
                lags[tp.partition] = max(0, high - (tp.offset if tp.offset >= 0 else low))
            return lags

    def _finish_join(self) -> None:
        """Wait (at most a session timeout) for a join in flight to complete.

        Leaving mid-join would queue the LeaveGroup behind the blocked
        JoinGroup; brokers then keep a member that never syncs, and some
        (Tansu) stall the whole group on it. Records fetched meanwhile are not
        delivered, so they stay uncommitted.
        """
        deadline = time.monotonic() + self._session_timeout
        while self._group is not None and not self._joined and time.monotonic() < deadline:
            self._consumer.poll(0.1)  # a record fetched meanwhile is not delivered

    def close(self) -> None:
        """Commit what was acked and leave the group; idempotent.

        Blocks while a rebalance completes, at most about a session timeout
        plus the reconnect timeout: with no broker reachable, librdkafka would
        wait for it indefinitely, so the consumer then finishes closing in
        the background and its unacked records go to the next owner.
        """
        if self._closed:
            return
        self._closed = True
        try:
            reachable = self._reachable()
            if reachable:
                self._finish_join()
            closer = threading.Thread(
                target=self._shutdown, args=(reachable,), name="polybus-kafka-close", daemon=True
            )
            closer.start()
            closer.join(self._session_timeout + self._reconnect_timeout)
            if closer.is_alive():
                log.warning(
                    "the Kafka consumer of %r did not close within %.0f s (no broker answers); "
                    "it finishes in the background",
                    self._topic,
                    self._session_timeout + self._reconnect_timeout,
                )
        finally:
            with self._lock:
                for state in self._partitions.values():
                    state.live = False
                self._partitions = {}
                self._requeued.clear()
            self._drop_transactional()  # not under the commit lock: a stuck commit may hold it
            self._backend._forget(self)

    def _reachable(self) -> bool:
        """Whether a broker answers (asked only after librdkafka reported all down)."""
        if self._down_since is None:
            return True
        try:
            self._consumer.list_topics(self._topic, timeout=1.0)
        except KafkaException:
            return False
        self._down_since = None
        return True

    def _shutdown(self, reachable: bool) -> None:
        try:
            if reachable:  # a synchronous commit would wait for a broker indefinitely
                self._commit(None, asynchronous=False)
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.info("closing the Kafka consumer of %r: %s", self._topic, exc)
