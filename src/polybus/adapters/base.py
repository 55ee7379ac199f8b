"""The adapter protocol: what every backend implements, and nothing more.

A backend moves :class:`OutRecord` batches into topics and hands
:class:`~polybus.message.Delivery` batches to group members: a Delivery is an
:class:`InRecord` (built with the same arguments) that the facade hands on as it
is, so a message is one object from the backend to the handler. The envelope,
codecs, patterns and reliability features are written once above this layer.
The value types (:mod:`polybus.types`) and Delivery are re-exported here, as
every adapter needs them.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from ..message import Delivery
from ..types import (
    BusStats,
    Capability,
    GroupStats,
    InRecord,
    OutRecord,
    PartitionStats,
    Receipt,
    Start,
    TopicSpec,
    TopicStats,
    tombstone_refused,
)

__all__ = [
    "Backend",
    "BusStats",
    "Capability",
    "Delivery",
    "GroupStats",
    "InRecord",
    "OutRecord",
    "PartitionStats",
    "Receipt",
    "Start",
    "StatsBackend",
    "Subscription",
    "TopicSpec",
    "TopicStats",
    "Transaction",
    "TransactionalBackend",
    "tombstone_refused",
]


class Subscription(Protocol):
    """One member of a group (or an ephemeral reader) on one topic.

    Not thread-safe: one thread fetches; ``ack``/``nack`` may come from others.
    """

    @property
    def group(self) -> str | None: ...

    def fetch(self, max_records: int, timeout: float) -> list[Delivery]:
        """Return up to ``max_records`` records, waiting at most ``timeout`` seconds.

        Returns an empty list on timeout; never blocks longer.
        """
        ...

    def ack(self, records: Sequence[Delivery]) -> None:
        """Mark records processed; the contiguous acked prefix becomes committed."""
        ...

    def nack(self, records: Sequence[Delivery], *, requeue: bool) -> None:
        """Redeliver records (``requeue``) or drop them for this group."""
        ...

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp_ms: int | None = None
    ) -> None:
        """Move this member's position in ``partition`` to ``offset`` (as in a received
        record) or to the first record at or after ``timestamp_ms``. CapabilityError if
        unsupported."""
        ...

    def lag(self) -> dict[int, int]:
        """Records not yet committed, per partition this member can see."""
        ...

    def commit(self) -> None:
        """Make every ack so far durable before returning (blocks).

        Without it acks become durable soon (within about 0.2 s) or at close.
        Raises FencedError if a partition moved to another member meanwhile.
        """
        ...

    def close(self) -> None:
        """Commit what was acked, leave the group; idempotent."""
        ...


class Backend(Protocol):
    """A connection to one broker (or one native log directory)."""

    capabilities: Capability
    #: the wire protocol its records travel in: "kafka", "amqp-0-9-1", "redis" or "native"
    #: (another backend names its own). Conventions defined per protocol, such as the
    #: header names of a CloudEvents binding, are chosen by it, never by the backend's type.
    wire_protocol: str

    def declare_topic(self, topic: str, spec: TopicSpec) -> None:
        """Create the topic (and ``spec.groups``) if missing; idempotent."""
        ...

    def publish(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        """Store records durably per the backend's settings; returns one receipt each."""
        ...

    def subscribe(
        self, topic: str, group: str | None, *, start: Start, session_timeout: float
    ) -> Subscription:
        """Join ``group`` (durable) or, with ``group=None``, read as an ephemeral member."""
        ...

    def close(self) -> None:
        """Release every connection and file; idempotent."""
        ...


class StatsBackend(Backend, Protocol):
    """A backend that reports its topics' offsets and its groups' lag (``Bus.stats``)."""

    def stats(
        self, topics: Collection[str] | None, groups: Collection[str] | None, *, timeout: float
    ) -> BusStats:
        """The offsets of ``topics`` (None: every topic it can list) and the lag of their
        durable ``groups`` (None: every one it can list), read with administrative calls
        only: it joins no group and changes nothing. A named topic or group that does not
        exist is left out; a number the broker does not keep is None, never 0.

        Answers within about ``timeout`` seconds or raises ConnectionLost.
        """
        ...


class Transaction(Protocol):
    """Records published and records acked that take effect together, or not at all.

    Used from one thread. After ``commit`` or ``abort`` the object is spent.
    """

    def publish(self, topic: str, records: Sequence[OutRecord]) -> None:
        """Stage ``records`` for ``topic``; no consumer sees them before ``commit``."""
        ...

    def ack(self, records: Sequence[Delivery]) -> None:
        """Stage acks of records the transaction's subscription fetched."""
        ...

    def commit(self) -> None:
        """Make the staged records visible and commit the staged acks, atomically.

        Raises FencedError when the subscription lost a partition of an acked
        record (nothing took effect; those records go to the partition's new
        owner), ConnectionLost when the outcome could not be learnt within the
        reconnect deadline (then aborted if it can still be), ClosedError once
        spent.
        """
        ...

    def abort(self) -> None:
        """Drop the staged records and acks; the acked records are delivered again
        (``attempt`` + 1). Idempotent."""
        ...


class TransactionalBackend(Backend, Protocol):
    """A backend with ``Capability.TRANSACTIONS``."""

    def transaction(self, subscription: Subscription) -> Transaction:
        """Begin a transaction whose acks settle records ``subscription`` fetched."""
        ...
