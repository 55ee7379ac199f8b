"""Publishing on the backend's own producer: ``KafkaBackend.publish`` and what it needs.

:class:`_Publisher` holds the publishing methods of
:class:`~polybus.adapters.kafka.backend.KafkaBackend`, which inherits them, so
``publish`` stays a plain method of the backend with no call in between. It
makes and replaces the idempotent producer, picks partitions by the
partitioner's murmur2 hash, ties delivery reports back to records and serves
them. Its state is set by ``KafkaBackend.__init__``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import KafkaError, KafkaException, Producer

from ...errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    PolybusError,
    TopicNotFound,
)
from ...types import OutRecord, Receipt, ValueBatch, tuple_new
from .errors import _SESSION_LOST, map_error
from .scopes import CONSUMER_ONLY, without


def _librdkafka_chooses(key: bytes, partition_count: int) -> int:
    return -1  # RD_KAFKA_PARTITION_UA: the producer's partitioner picks


try:  # the partitioner's own hash; confluent-kafka exposes it since late 2025
    from confluent_kafka import murmur2 as murmur2  # "as": the backend imports it from here
except ImportError:  # older clients: every record gets its own delivery callback
    murmur2 = _librdkafka_chooses

log = logging.getLogger("polybus.kafka")

_DELIVERY_GRACE = 5.0  # seconds past message.timeout.ms a delivery report may take to arrive
_METADATA_TTL = 30.0  # seconds a topic's partition count is reused before a new lookup
_new_receipt = tuple_new(Receipt, 3)  # Receipt(...) without its Python-level __new__
tuple_new(OutRecord, 5)  # publish unpacks records: fails at import if OutRecord changes


def _encoded_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """Header values as bytes, keeping undecodable bytes a consumer received intact."""
    return [(k, v.encode("utf-8", "surrogateescape")) for k, v in headers]


class _Publisher:
    """The publishing half of :class:`~polybus.adapters.kafka.backend.KafkaBackend`."""

    # Set by KafkaBackend.__init__, which says what they hold.
    config: dict[str, Any]
    reconnect_timeout: float
    _own_producer: bool
    _producer_lock: threading.Lock
    _ordered_reports: bool
    _partition_counts: dict[str, tuple[int, float]]
    _keyless_turn: itertools.count[int]
    _poll_lock: threading.Lock
    _polled: threading.Condition
    _servings: int
    _failed_producer: Producer | None
    _delivery_timeout: float
    _producer: Producer

    if TYPE_CHECKING:

        def _check(self) -> None: ...

    def _new_producer(self) -> Producer:
        producer: Producer | None = None

        def on_error(err: KafkaError) -> None:
            if err.fatal():
                log.error("Kafka producer failed: %s; publishing continues on a new one", err)
                self._failed_producer = producer
            else:
                log.debug("Kafka producer: %s", err)

        config = {
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",  # the Java client's: keys land where JVM apps put them
            "message.timeout.ms": int(self.reconnect_timeout * 1000),
            **without(self.config, CONSUMER_ONLY),
            "error_cb": on_error,
        }
        try:
            producer = Producer(config)
        except KafkaException as exc:
            raise map_error(exc) from exc
        return producer

    def _replace_producer(self, old: Producer) -> None:
        """Publish on a new producer from now on (ours only); ``old`` fails what it holds."""
        with self._producer_lock:
            if self._producer is not old:
                return  # another thread did it
            self._producer = self._new_producer()
        old.purge()  # its waiting publishers get their delivery reports (failed) now

    def _serve(self, producer: Producer, timeout: float) -> None:
        """Send what is queued now and serve delivery reports (anyone's) for up to
        ``timeout`` s, or wait while another thread does.

        ``flush`` rather than ``poll``: it sends at once instead of waiting out
        ``linger.ms``, which a caller waiting for its reports gains nothing from.
        On Apache Kafka here (2 runs each): sequential ``publish`` went from 129-160
        to 4,087-4,822 msg/s, batches of 1000 from 77-91 k to 271-278 k msg/s, and
        8 threads publishing one at a time from 1.2 k msg/s (p50 6.4 ms, p99 13 ms)
        to 5.5-5.7 k msg/s (p50 1.3 ms, p99 3.6-4.7 ms). One thread at
        a time serves, so reports reach their callbacks in the order librdkafka
        emitted them (the partitioned path relies on it).
        """
        seen = self._servings
        if self._poll_lock.acquire(blocking=False):
            try:
                producer.flush(timeout)
            except KafkaException as exc:  # raised by a callback
                raise map_error(exc) from exc
            except RuntimeError as exc:  # closed by another thread
                raise ClosedError("bus is closed; connect again") from exc
            finally:
                self._poll_lock.release()
            with self._polled:
                self._servings += 1
                self._polled.notify_all()
        else:
            with self._polled:
                if self._servings == seen:  # else it ended before this thread could wait
                    self._polled.wait(timeout)

    def _partition_count_for_publish(self, producer: Producer, topic: str) -> int:
        now = time.monotonic()
        known = self._partition_counts.get(topic)
        if known is not None and known[1] > now:
            return known[0]
        try:
            metadata = producer.list_topics(topic, timeout=self.reconnect_timeout).topics.get(topic)
        except KafkaException as exc:
            raise map_error(exc) from exc
        if metadata is not None and metadata.error is not None:
            raise map_error(KafkaException(metadata.error))
        count = 0 if metadata is None else len(metadata.partitions)
        if not count:
            raise TopicNotFound(f"Kafka has no partitions of topic {topic!r}; declare it first")
        self._partition_counts[topic] = (count, now + _METADATA_TTL)
        return count

    def publish(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        """Publish ``records`` in order; return their receipts once the broker stored all.

        Waits only for these records' delivery reports, at most about
        ``message.timeout.ms`` (the reconnect timeout). Raises ConnectionLost
        when the cluster stayed unreachable that long, MessageTooLarge,
        TopicNotFound, or CapabilityError for a delayed record. When it
        raises, any of the records may or may not have been stored.
        """
        self._check()
        producer = self._producer
        if producer is self._failed_producer:
            self._replace_producer(producer)
            producer = self._producer
        n = len(records)
        if not n:
            return []
        # Two ways to tie delivery reports back to records. With our idempotent producer
        # the broker takes a partition's batches only in sequence, so that partition's
        # reports arrive in produce order: we pick partitions ourselves (the murmur2 hash
        # the partitioner uses; keyless records in runs of 1024 per partition) and share
        # one callback. Any other producer gives each record its own callback.
        ordered = self._ordered_reports
        count = self._partition_count_for_publish(producer, topic) if ordered else 0
        # One partition: no partition picked per record, and a callback that does not ask
        # the report for its partition (with the above, 0.42-0.45 -> 0.36-0.37 us of Python
        # a record, measured against a stand-in producer).
        several = count > 1
        base = next(self._keyless_turn) * 1024
        offsets: list[list[int]] = [[] for _ in range(count)]
        chosen: list[int] = []
        choose = chosen.append
        failures: list[KafkaError] = []
        reports: list[Any] = [] if ordered else [None] * n
        setitem = reports.__setitem__
        scan = 0

        if several:
            stored = [o.append for o in offsets]

            def on_delivery(err: KafkaError | None, msg: Any) -> None:  # one call per record
                if err is None:
                    stored[msg.partition()](msg.offset())
                else:
                    failures.append(err)

        elif ordered:
            store = offsets[0].append

            def on_delivery(err: KafkaError | None, msg: Any) -> None:  # one call per record
                if err is None:
                    store(msg.offset())
                else:
                    failures.append(err)

        def missing() -> int:
            nonlocal scan
            if ordered:
                return n - len(failures) - sum(map(len, offsets))
            try:
                scan = reports.index(None, scan)
            except ValueError:
                return 0
            return n - scan

        produce = producer.produce
        deadline = 0.0
        partition = 0 if ordered else -1  # -1: the producer's partitioner picks
        callback: Any = on_delivery if ordered else None
        rows: Iterable[tuple[Any, ...]] = records
        if type(records) is ValueBatch:
            # Its columns, no record object (see ValueBatch for what that buys): each
            # message's header list is made in C as it is produced and freed right after.
            ids = zip(repeat(records.id_header), records.ids)
            pairs_each = map(list, zip(ids, repeat(records.shared)))
            stamp, delay = records.timestamp_ms, records.not_before_ms
            rows = zip(records.values, repeat(None), pairs_each, repeat(stamp), repeat(delay))
        # Unpacked in one step: 53 ns a record, the six field reads it replaces 75 ns
        # (OutRecord's field count is checked at import).
        for i, (value, key, headers, timestamp_ms, not_before_ms) in enumerate(rows):
            if not_before_ms:
                raise CapabilityError("Kafka cannot delay delivery (no DELAY capability)")
            if several:
                partition = ((base + i) >> 10) % count if key is None else murmur2(key, count)
                choose(partition)
            elif not ordered:
                callback = lambda _err, msg, i=i: setitem(i, msg)  # noqa: E731
            pairs: Any = headers if type(headers) is list else list(headers) if headers else None
            while True:
                try:
                    # positional: keyword parsing costs more than the rest of the call
                    produce(topic, value, key, partition, callback, None, timestamp_ms, pairs)
                    break
                except BufferError:
                    # The local queue is full: serve reports to make room, but not forever.
                    now = time.monotonic()
                    deadline = deadline or now + self._delivery_timeout
                    if now > deadline:
                        raise ConnectionLost(
                            f"Kafka producer queue stayed full for {self._delivery_timeout:.0f}"
                            " s: the cluster is unreachable or too slow"
                        ) from None
                    self._serve(producer, 0.1)
                except UnicodeEncodeError:
                    pairs = _encoded_headers(headers)
                except KafkaException as exc:
                    raise map_error(exc) from exc
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"cannot publish to Kafka: {exc}") from exc
                except RuntimeError as exc:  # closed by another thread
                    raise ClosedError("bus is closed; connect again") from exc
        self._await(producer, missing)
        if not ordered:
            failures = [msg.error() for msg in reports if msg.error() is not None]
        if failures:
            raise self._failed(producer, topic, failures[0])
        if not ordered:
            return [Receipt(topic, msg.partition(), msg.offset()) for msg in reports]
        # Receipts built in C: Receipt's own __new__ is a Python call per record.
        if several:
            in_order: Iterable[int] = map(next, map([iter(o) for o in offsets].__getitem__, chosen))
            numbers: Iterable[int] = chosen
        else:
            in_order, numbers = offsets[0], repeat(0)
        receipts = map(_new_receipt, repeat(Receipt), zip(repeat(topic), numbers, in_order))
        return cast(list[Receipt], list(receipts))

    def _failed(self, producer: Producer, topic: str, err: KafkaError) -> PolybusError:
        """The error to raise for a failed delivery, recovering the producer if needed."""
        code = err.code()
        if code in (KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART):
            self._partition_counts.pop(topic, None)  # look the partitions up again
        if self._own_producer and (err.fatal() or code in _SESSION_LOST):
            # Not a fencing of the application: our producer id is no longer accepted
            # (e.g. after an epoch bump the broker refused). A new producer gets a new id.
            self._replace_producer(producer)
            return ConnectionLost(
                f"Kafka {err.name()}: {err.str()}; the producer was replaced, retry "
                "(the records may or may not have been stored)"
            )
        return map_error(KafkaException(err))

    def _await(self, producer: Producer, missing: Callable[[], int]) -> None:
        deadline = time.monotonic() + self._delivery_timeout
        while left := missing():
            if time.monotonic() > deadline:
                raise ConnectionLost(
                    f"Kafka did not confirm {left} record(s) within "
                    f"{self._delivery_timeout:.0f} s; they may still be stored"
                )
            self._serve(producer, 0.1)
