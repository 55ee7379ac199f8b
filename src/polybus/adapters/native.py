"""The native log engine as a backend: ``native:///path`` and ``memory://``.

URL options: ``fsync=always|interval|never`` (default interval),
``fsync_interval=<seconds>``, ``skip_corrupt=true``. ``memory://name`` shares
one in-memory log between buses of the same process; plain ``memory://`` is
private to its bus.

Transactions (``Capability.TRANSACTIONS``) are the engine's own
(:mod:`polybus.log.transaction`): the published records and the group's
offset commit take effect together even if the process is killed at any
instant; against power loss only with ``fsync=always``. They need a durable
group.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import ClosedError, ConfigurationError
from ..log import FsyncPolicy, Log, Record
from ..log import Transaction as LogTransaction
from ..log.group import Consumer
from .base import Capability, InRecord, OutRecord, Receipt, Start, Subscription, TopicSpec

__all__ = ["NativeBackend", "from_url"]

_shared: dict[str, tuple[Log, int]] = {}  # memory://name -> (log, users)
_shared_lock = threading.Lock()


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"expected true or false in the URL, got {value!r}")


def from_url(url: str) -> NativeBackend:
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(options) - {"fsync", "fsync_interval", "skip_corrupt"}
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {sorted(unknown)} in {url!r}; "
            "known: fsync, fsync_interval, skip_corrupt"
        )
    if parts.scheme == "memory":
        # memory:// is the process's one default store, memory://<name> a store of its own
        name = parts.netloc + parts.path
        with _shared_lock:
            log, users = _shared.get(name, (None, 0))
            if log is None or log._closed:
                log, users = Log(None), 0
            _shared[name] = (log, users + 1)
        return NativeBackend(log, shared_name=name)
    if parts.netloc:
        raise ConfigurationError(
            f"{url!r} names the host {parts.netloc!r}, not a directory: write "
            f"native:///{parts.netloc}{parts.path} for the absolute path "
            f"/{parts.netloc}{parts.path} (three slashes)"
        )
    path = unquote(parts.path)
    if not path:
        raise ConfigurationError(f"{url!r} names no directory: use native:///absolute/path")
    try:
        interval = float(options.get("fsync_interval", "1.0"))
    except ValueError:
        raise ConfigurationError(f"fsync_interval must be a number of seconds in {url!r}") from None
    log = Log(
        path,
        fsync=cast(FsyncPolicy, options.get("fsync", "interval")),
        fsync_interval=interval,
        skip_corrupt=_flag(options.get("skip_corrupt", "false")),
    )
    return NativeBackend(log)


class NativeSubscription:
    """A group member (or ephemeral reader) on the native log."""

    def __init__(
        self, topic: str, consumer: Consumer, forget: Callable[[NativeSubscription], None]
    ) -> None:
        self._topic = topic
        self._consumer = consumer
        self._forget = forget

    @property
    def group(self) -> str | None:
        return self._consumer.group

    def fetch(self, max_records: int, timeout: float) -> list[InRecord]:
        topic = self._topic
        return [
            InRecord(
                topic,
                r.partition,
                r.offset,
                r.value,
                r.key,
                r.headers,
                r.timestamp_ms,
                r.attempt,
                r,
            )
            for r in self._consumer.poll(max_records, timeout)
        ]

    def ack(self, records: Sequence[InRecord]) -> None:
        self._consumer.ack([cast(Record, r.handle) for r in records])

    def nack(self, records: Sequence[InRecord], *, requeue: bool) -> None:
        self._consumer.nack([cast(Record, r.handle) for r in records], requeue=requeue)

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp_ms: int | None = None
    ) -> None:
        if (offset is None) == (timestamp_ms is None):
            raise ConfigurationError("seek needs exactly one of offset= or timestamp_ms=")
        if isinstance(offset, str):
            raise ConfigurationError(f"native offsets are integers, got {offset!r}")
        if offset is None:
            assert timestamp_ms is not None
            offset = self._consumer.topic.partitions[partition].offset_for_time(timestamp_ms)
        self._consumer.seek(partition, offset)

    def lag(self) -> dict[int, int]:
        return self._consumer.lag()

    def commit(self) -> None:
        self._consumer.commit()

    def close(self) -> None:
        self._consumer.close()
        self._forget(self)


class NativeTransaction:
    """A :class:`~polybus.adapters.base.Transaction` over the engine's own."""

    def __init__(self, tx: LogTransaction) -> None:
        self._tx = tx

    def publish(self, topic: str, records: Sequence[OutRecord]) -> None:
        append = self._tx.append
        for r in records:
            append(
                topic,
                r.value,
                key=r.key,
                headers=r.headers,
                timestamp_ms=r.timestamp_ms,
                not_before_ms=r.not_before_ms,
            )

    def ack(self, records: Sequence[InRecord]) -> None:
        self._tx.ack([cast(Record, r.handle) for r in records])

    def commit(self) -> None:
        self._tx.commit()

    def abort(self) -> None:
        self._tx.abort()


class NativeBackend:
    """A :class:`~polybus.adapters.base.Backend` over a :class:`~polybus.log.Log`."""

    capabilities = (
        Capability.DURABLE_GROUPS
        | Capability.EPHEMERAL_GROUPS
        | Capability.KEY_ORDER
        | Capability.SEEK
        | Capability.SEEK_TIME
        | Capability.DELAY
        | Capability.LAG
        | Capability.COMPACTION
        | Capability.RETENTION
        | Capability.MULTI_PROCESS
        | Capability.TRANSACTIONS
    )

    def __init__(self, log: Log, *, shared_name: str | None = None) -> None:
        self.log = log
        if shared_name is not None:  # memory: other processes cannot reach it
            self.capabilities = NativeBackend.capabilities & ~Capability.MULTI_PROCESS
        self._shared_name = shared_name
        self._closed = False
        self._subscriptions: set[NativeSubscription] = set()

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("bus is closed; connect again")

    def declare_topic(self, topic: str, spec: TopicSpec) -> None:
        self._check()
        self.log.create_topic(
            topic,
            spec.partitions,
            default_partitions=spec.default_partitions,
            retention_ms=spec.retention_ms,
            retention_bytes=spec.retention_bytes,
            compact=spec.compact,
        )
        for group in spec.groups:
            self.log.create_group(topic, group)

    def publish(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        self._check()
        t = self.log.topic(topic)
        if len(records) == 1:
            r = records[0]
            p, offset = t.append(
                r.value,
                key=r.key,
                headers=r.headers,
                timestamp_ms=r.timestamp_ms,
                not_before_ms=r.not_before_ms,
            )
            return [Receipt(topic, p, offset)]
        by_partition: dict[int, list[int]] = {}
        for i, r in enumerate(records):
            by_partition.setdefault(t.partition_for(r.key), []).append(i)
        receipts: list[Receipt | None] = [None] * len(records)
        for p, idx in by_partition.items():
            batch = [records[i] for i in idx]
            base = t.partitions[p].append_batch(
                [r.value for r in batch],
                keys=[r.key for r in batch],
                headers=[r.headers for r in batch],
                timestamp_ms=[r.timestamp_ms for r in batch],
                not_before_ms=[r.not_before_ms for r in batch],
            )
            for n, i in enumerate(idx):
                receipts[i] = Receipt(topic, p, base + n)
        return cast(list[Receipt], receipts)

    def subscribe(
        self, topic: str, group: str | None, *, start: Start, session_timeout: float
    ) -> NativeSubscription:
        self._check()
        consumer = self.log.consumer(topic, group, start=start, session_timeout=session_timeout)
        sub = NativeSubscription(topic, consumer, self._subscriptions.discard)
        self._subscriptions.add(sub)
        return sub

    def transaction(self, subscription: Subscription) -> NativeTransaction:
        """Begin a transaction acking records ``subscription`` (a durable group member
        of this backend) fetched.

        Raises ConfigurationError for another bus's or an ephemeral subscription,
        ClosedError for a closed one.
        """
        self._check()
        if not isinstance(subscription, NativeSubscription):
            raise ConfigurationError("a transaction needs a subscription of this bus")
        consumer = subscription._consumer
        if consumer._closed:
            raise ClosedError("subscription is closed; subscribe again")
        if subscription not in self._subscriptions:
            raise ConfigurationError("a transaction needs a subscription of this bus")
        return NativeTransaction(consumer.transaction())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sub in list(self._subscriptions):
            sub.close()
        if self._shared_name is None:
            self.log.close()
            return
        with _shared_lock:
            log, users = _shared[self._shared_name]
            if users <= 1:
                del _shared[self._shared_name]
                log.close()
            else:
                _shared[self._shared_name] = (log, users - 1)
