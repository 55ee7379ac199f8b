"""A subscription's Kafka transactions, and the transaction object it begins.

Transactions (``Capability.TRANSACTIONS``, consume → produce exactly once)
are Kafka transactions with the consumed offsets in them (EOS v2, KIP-447):

- each subscription that begins one gets a transactional producer of its own
  (``transactional.id`` ``polybus-<group>-<random>``, so the config may not set
  one), registered with ``init_transactions`` on its first transaction;
- ``publish`` and ``ack`` only stage: the records and acks wait in the
  transaction object, so ``abort()`` (or an exception in the ``with`` block)
  sends nothing and hands the acked records back to this member with
  ``attempt + 1``;
- ``commit()`` first checks that every acked record's partition is still this
  member's (else FencedError, nothing sent); then ``begin_transaction``,
  produce the staged records, ``send_offsets_to_transaction`` with the
  contiguous settled prefix of each acked partition, staged acks counted as
  settled, and ``consumer_group_metadata()`` (the broker refuses the offsets
  of a member whose group generation has passed: zombies are fenced), then
  ``commit_transaction``. Only then do the staged acks count as settled.
  Acks above an unsettled record wait for it, as plain acks do: should the
  partition move first, those records are processed again;
- a failed commit is aborted with ``abort_transaction`` and its acked records
  delivered again: FencedError when the generation passed or a newer producer
  took over, ConnectionLost when Kafka did not answer within the transaction
  timeout (the reconnect timeout + 5 s, ``transaction.timeout.ms``); if even
  the abort fails the outcome is unknown (its inputs may then be processed
  twice) and the next transaction's new producer, with the same id, fences
  the old one and aborts what it left open;
- before a transaction sends offsets, a synchronous commit waits out any
  plain asynchronous one still on its way, which could otherwise land after
  the transaction's and move the committed offsets back;
- a member that dies during ``commit()`` leaves an open transaction: readers
  of its output partitions wait until the broker aborts it after
  ``transaction.timeout.ms``, and the group's next member starts at the
  offsets committed before it.

:class:`_TransactionalMember` holds the transaction methods of
:class:`~polybus.adapters.kafka.subscription.KafkaSubscription`, which
inherits them: they share its per-partition state (:mod:`.acks`), its locks
and its consumer, all set by its ``__init__``. :class:`KafkaTransaction`
stages one transaction's records and acks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from ...errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    FencedError,
    PolybusError,
)
from ..base import Delivery, OutRecord
from .acks import _Partition
from .errors import (
    _CONNECTION,
    _COORDINATOR_GONE,
    _FENCED,
    _PRODUCER_FENCED,
    _kafka_error,
    map_error,
)
from .producer import _DELIVERY_GRACE, _encoded_headers

if TYPE_CHECKING:
    from .backend import KafkaBackend
    from .subscription import KafkaSubscription

log = logging.getLogger("polybus.kafka")


def _bounded(call: Callable[[], object], seconds: float, name: str) -> threading.Event | None:
    """Run ``call`` in a daemon thread, as librdkafka can block past its own timeouts, and
    wait up to ``seconds``. None when it returned (what it raised is raised here); else
    the event it sets when it finally does."""
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # raised in the caller's thread below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not done.wait(seconds):
        return done
    if failure:
        raise failure[0]
    return None


class _TransactionalMember:
    """The transaction half of :class:`~polybus.adapters.kafka.subscription.KafkaSubscription`."""

    # Set by KafkaSubscription.__init__, which says what they hold.
    _backend: KafkaBackend
    _topic: str
    _group: str | None
    _reconnect_timeout: float
    _lock: threading.Lock
    _partitions: dict[int, _Partition]
    _requeued: deque[Delivery]
    _consumer: Consumer
    _commit_lock: threading.Lock
    _sent_async: bool
    _transactional: Producer | None
    _transactional_id: str
    _transaction_timeout: float
    _failed_deliveries: list[KafkaError]

    if TYPE_CHECKING:

        def _check(self) -> None: ...

    def _start_transactions(self) -> None:
        """Make and register this subscription's transactional producer, once."""
        self._check()
        if self._group is None:
            raise ConfigurationError(
                f"a transaction commits a group's offsets: subscribe to {self._topic!r} with a "
                "group to use one"
            )
        with self._commit_lock:
            self._transactional_producer()

    def _transactional_producer(self) -> Producer:
        """The transactional producer, made if missing (under the commit lock)."""
        if self._transactional is not None:
            return self._transactional
        config = self._backend._transactional_config(
            self._transactional_id, self._on_failed_delivery
        )
        self._transaction_timeout = int(config.get("transaction.timeout.ms", 60_000)) / 1000
        try:
            producer = Producer(config)
            # A new producer with this id also aborts what an earlier one left open.
            producer.init_transactions(self._reconnect_timeout)
        except KafkaException as exc:
            raise map_error(exc) from exc
        self._transactional = producer
        return producer

    def _await_plain_commits(self) -> None:
        """Make sure no plain asynchronous commit is still on its way, before a transaction
        sends offsets: landing after the transaction's, it would move them back.

        A synchronous commit (of what is committed already) queued behind them returns
        once the broker applied them, as it handles one connection's requests in order.
        Raises ConnectionLost if that takes longer than the transaction timeout.
        """
        if not self._sent_async:
            return
        with self._lock:
            offsets = [
                TopicPartition(self._topic, p, state.committed)
                for p, state in self._partitions.items()
                if state.committed >= 0
            ]

        def commit() -> None:  # bounded: librdkafka waits for a coordinator for ever
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except (KafkaException, RuntimeError) as exc:  # they failed, or were applied
                log.info("Kafka commit for group %r failed: %s", self._group, exc)

        wait = self._transaction_timeout
        if offsets and _bounded(commit, wait, "polybus-kafka-commit") is not None:
            raise ConnectionLost(
                f"Kafka did not confirm group {self._group!r}'s earlier commits within "
                f"{self._transaction_timeout:.0f} s; the transaction was not sent"
            )
        self._sent_async = False

    def _on_failed_delivery(self, err: KafkaError, msg: Any) -> None:
        self._failed_deliveries.append(err)

    def _commit_transaction(
        self, outputs: Sequence[tuple[str, Sequence[OutRecord]]], acks: Sequence[Delivery]
    ) -> None:
        """Produce ``outputs`` and commit the settled prefix, counting ``acks``, in one
        Kafka transaction; on any failure the acked records are given back."""
        with self._commit_lock:
            try:
                self._check()
                planned = self._planned_offsets(acks)
                if outputs or planned:
                    self._run_transaction(outputs, planned)
            except BaseException:
                self._give_back(acks)
                raise
            with self._lock:
                for r in acks:
                    state: _Partition = r.handle  # type: ignore[assignment]
                    if state.live:
                        state.settled.add(r.offset)  # type: ignore[arg-type]
                for state, point in planned:
                    state.committed = point

    def _planned_offsets(self, acks: Sequence[Delivery]) -> list[tuple[_Partition, int]]:
        """The partitions whose commit point ``acks`` move, with the new point; raises
        FencedError if one of them is no longer this member's."""
        staged: dict[_Partition, set[int]] = {}
        for r in acks:
            staged.setdefault(r.handle, set()).add(r.offset)  # type: ignore[arg-type]
        planned = []
        with self._lock:
            lost = sorted(state.number for state in staged if not state.live)
            if lost:
                raise FencedError(
                    f"partition(s) {lost} of {self._topic!r} moved to another member of group "
                    f"{self._group!r} while the transaction was open; nothing was committed "
                    "and their records go to the new owner"
                )
            for state, offsets in staged.items():
                point = state.point_with(offsets)
                if point is not None and point != state.committed:
                    planned.append((state, point))
        return planned

    def _run_transaction(
        self,
        outputs: Sequence[tuple[str, Sequence[OutRecord]]],
        planned: Sequence[tuple[_Partition, int]],
    ) -> None:
        producer = self._transactional_producer()  # a new one after a failure dropped it
        if planned:
            self._await_plain_commits()
        self._failed_deliveries.clear()
        try:
            # Bounded waits, not librdkafka's "remaining transaction time": a broker that
            # never answers must not hang commit(); a producer left mid-call is replaced.
            timeout = self._transaction_timeout
            producer.begin_transaction()
            for topic, records in outputs:
                self._produce_all(producer, topic, records)
            if planned:
                offsets = [TopicPartition(self._topic, s.number, point) for s, point in planned]
                self._send_offsets(producer, offsets, timeout)
            producer.commit_transaction(timeout)
        except KafkaException as exc:
            raise self._transaction_failed(producer, exc) from exc
        except BaseException:
            if producer is self._transactional:  # not one dropped mid-call
                self._abort(producer)
            raise

    def _send_offsets(
        self, producer: Producer, offsets: list[TopicPartition], timeout: float
    ) -> None:
        """``send_offsets_to_transaction``, in a thread and bounded: librdkafka (up to
        2.16 at least, issues 5456 and 5511) can wait for ever, past its own timeout, for
        a group coordinator whose broker died. Then the producer is dropped, so its
        transaction is never committed, and ConnectionLost is raised."""
        metadata = self._consumer.consumer_group_metadata()
        stuck = _bounded(
            lambda: producer.send_offsets_to_transaction(offsets, metadata, timeout),
            timeout + _DELIVERY_GRACE,
            "polybus-kafka-send-offsets",
        )
        if stuck is not None:
            self._drop_transactional(idle=stuck)
            raise ConnectionLost(
                f"Kafka did not take group {self._group!r}'s offsets into the transaction "
                f"within {timeout:.0f} s (its group coordinator is unreachable); nothing "
                "of it is committed (the next transaction, or the broker at its timeout, "
                "aborts it) and its acked records are delivered again; retry it"
            )

    def _produce_all(self, producer: Producer, topic: str, records: Sequence[OutRecord]) -> None:
        produce = producer.produce
        deadline = 0.0
        for r in records:
            headers: Any = list(r.headers) if r.headers else None
            while True:
                try:
                    produce(topic, r.value, r.key, -1, None, None, r.timestamp_ms, headers)
                    break
                except BufferError:  # more records than the local queue holds: send some
                    now = time.monotonic()
                    deadline = deadline or now + self._backend._delivery_timeout
                    if now > deadline:
                        raise ConnectionLost(
                            "Kafka producer queue stayed full: the cluster is unreachable or "
                            "too slow"
                        ) from None
                    producer.poll(0.1)
                except UnicodeEncodeError:
                    headers = _encoded_headers(r.headers)
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"cannot publish to Kafka: {exc}") from exc

    def _transaction_failed(self, producer: Producer, exc: KafkaException) -> PolybusError:
        """Abort what can still be aborted; the error to raise for a failed transaction."""
        err = _kafka_error(exc) or KafkaError(KafkaError._FAIL, str(exc))
        if self._failed_deliveries and err.txn_requires_abort():
            err = self._failed_deliveries[0]  # the record's own error says more
        log.info("a Kafka transaction of group %r failed: %s", self._group, err)
        if err.fatal() or err.code() in _PRODUCER_FENCED:
            self._drop_transactional()  # done for: the next transaction makes a new one
            aborted = False
        else:
            aborted = self._abort(producer)
        text = f"Kafka {err.name()}: {err.str()}"
        if err.code() in _FENCED:
            return FencedError(
                f"{text}: the group moved on (the inputs' partitions belong to a newer "
                "generation) or a newer producer took over; nothing was committed"
            )
        if err.code() in _CONNECTION or err.code() in _COORDINATOR_GONE or err.retriable():
            if aborted:
                return ConnectionLost(
                    f"{text}: the transaction was aborted and its acked records are delivered "
                    "again; retry it"
                )
            return ConnectionLost(
                f"{text}: the transaction's outcome is unknown (it could not be aborted); its "
                "acked records are delivered again, so they are processed twice if it committed"
            )
        return map_error(KafkaException(err))

    def _abort(self, producer: Producer) -> bool:
        """Abort the open Kafka transaction; False (and the producer dropped) if that fails."""
        try:
            producer.abort_transaction(self._transaction_timeout)
            return True
        except (KafkaException, RuntimeError) as exc:
            log.info("aborting a Kafka transaction of group %r failed: %s", self._group, exc)
            self._drop_transactional()
            return False

    def _drop_transactional(self, idle: threading.Event | None = None) -> None:
        """Close the transactional producer; the next transaction makes a new one (with the
        same id, which fences this one and aborts what it left open). ``idle``, if given,
        is set once no call of ours is inside the producer: it is closed only then."""
        producer, self._transactional = self._transactional, None
        if producer is None:
            return

        def close() -> None:  # holds the last reference: librdkafka's destroy runs here too
            if idle is not None:
                idle.wait()
            try:
                producer.purge()
                producer.flush(0)
                close = getattr(producer, "close", None)  # confluent-kafka >= 2.13
                if close is not None:
                    close()
            except (KafkaException, RuntimeError) as exc:
                log.debug("closing a Kafka transactional producer: %s", exc)

        # In the background: a producer whose transaction is stuck on the broker can
        # take a transaction timeout or more to let go.
        threading.Thread(target=close, name="polybus-kafka-txn-close", daemon=True).start()

    def _give_back(self, acks: Sequence[Delivery]) -> None:
        """Deliver a failed or aborted transaction's acked records again (attempt + 1);
        those of partitions this member lost go to their new owner."""
        with self._lock:
            for r in acks:
                if cast(_Partition, r.handle).live:
                    r.delivery_count += 1
                    self._requeued.append(r)


class KafkaTransaction:
    """A :class:`~polybus.adapters.base.Transaction` of one Kafka subscription.

    Records and acks are staged here; :meth:`commit` runs the Kafka
    transaction from begin to end (see the module docstring), so an abort
    never reaches the broker. Used from one thread.
    """

    def __init__(self, subscription: KafkaSubscription) -> None:
        self._sub = subscription
        self._outputs: list[tuple[str, Sequence[OutRecord]]] = []
        self._acks: list[Delivery] = []
        self._spent = False

    def _check(self) -> None:
        if self._spent:
            raise ClosedError("this transaction was committed or aborted; begin a new one")

    def publish(self, topic: str, records: Sequence[OutRecord]) -> None:
        self._check()
        if any(r.not_before_ms for r in records):
            raise CapabilityError("Kafka cannot delay delivery (no DELAY capability)")
        self._outputs.append((topic, records))

    def ack(self, records: Sequence[Delivery]) -> None:
        self._check()
        for r in records:
            if not isinstance(r.handle, _Partition) or r.topic != self._sub._topic:
                raise ConfigurationError(
                    "a transaction can ack only records its own subscription fetched"
                )
        self._acks.extend(records)

    def commit(self) -> None:
        self._check()
        self._spent = True
        self._sub._commit_transaction(self._outputs, self._acks)

    def abort(self) -> None:
        if not self._spent:
            self._spent = True
            self._sub._give_back(self._acks)
