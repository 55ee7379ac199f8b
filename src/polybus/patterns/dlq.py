"""Dead letters: where a group's messages go when it gives up on them.

A message lands in ``<topic>.<group>.dlq`` (one partition, so it lists in the
order the group gave up) after its last attempt, on an error
its retry policy does not retry, or when its payload cannot be decoded. The
copy keeps the payload byte for byte, the key and the envelope (same message
id), and adds provenance headers any plain client can read: the original topic,
partition and offset, the group, the number of attempts, the exception type and
text, the first and last failure time (epoch ms) and why it was given up on.

:class:`DeadLetters` lists, inspects, re-drives and purges them through the
same Bus API on every backend (``polybus dlq ...`` from the shell). It reads
through a durable group of its own (named like the dead-letter topic), so run
one at a time per dead-letter topic. Listing is non-destructive. A re-driven
message goes to its group's retry topic with a fresh attempt budget, so it
reaches that group only. Acting on some ids rewrites the topic: the others are
published to it again (same ids) before the read ones are acked, so a crash in
between may leave an entry twice (listed once), never lose one.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from ..bus import Bus, Subscriber, out_record
from ..envelope import ATTEMPT, ATTEMPTS, DEAD_LETTER_GROUP, DEAD_LETTER_REASON, FAILURE_HEADERS
from ..errors import DeadLetterNotFound
from ..message import Delivery, Message
from ..types import Capability, InRecord, OutRecord
from .retry import (
    DUE,
    ERROR,
    ERROR_TYPE,
    FIRST_FAILURE,
    LAST_FAILURE,
    ORIGIN_OFFSET,
    ORIGIN_PARTITION,
    ORIGIN_TOPIC,
    failure_headers,
    retry_topic,
)

__all__ = [
    "ATTEMPTS",
    "DEAD_LETTER_GROUP",
    "DEAD_LETTER_REASON",
    "DeadLetter",
    "DeadLetterNotFound",
    "DeadLetters",
    "dead_letter_copy",
    "dead_letter_topic",
]


_JOIN_WAIT = 15.0  # seconds the first read may take to join the group (Kafka rebalances)


def dead_letter_topic(topic: str, group: str) -> str:
    """The topic holding the messages ``group`` gave up on from ``topic``."""
    return f"{topic}.{group}.dlq"


def dead_letter_copy(
    record: InRecord, exc: BaseException, *, group: str, attempts: int, reason: str
) -> OutRecord:
    """The copy of ``record`` for ``group``'s dead-letter topic, with its provenance."""
    now_ms = int(time.time() * 1000)
    headers = [(k, v) for k, v in failure_headers(record, exc, now_ms) if k != DUE]
    headers += [(DEAD_LETTER_GROUP, group), (DEAD_LETTER_REASON, reason), (ATTEMPTS, str(attempts))]
    return OutRecord(record.payload, record.key, tuple(headers), now_ms)


def _ms(value: str | None) -> float:
    return int(value) / 1000 if value and value.isdigit() else 0.0


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter and where it came from. Times are epoch seconds."""

    message: Message
    topic: str  #: where the message was first published
    partition: int
    offset: int | str
    group: str
    attempts: int
    error_type: str
    error: str
    first_failure: float
    last_failure: float
    reason: str

    @property
    def id(self) -> str:
        return self.message.id

    @classmethod
    def of(cls, delivery: Delivery) -> DeadLetter:
        header = delivery.header
        offset: int | str = header(ORIGIN_OFFSET) or ""
        if isinstance(offset, str) and offset.lstrip("-").isdigit():
            offset = int(offset)
        partition = header(ORIGIN_PARTITION) or "0"
        return cls(
            message=delivery.message,
            topic=header(ORIGIN_TOPIC) or "",
            partition=int(partition) if partition.isdigit() else 0,
            offset=offset,
            group=header(DEAD_LETTER_GROUP) or "",
            attempts=int(header(ATTEMPTS) or 0),
            error_type=header(ERROR_TYPE) or "",
            error=header(ERROR) or "",
            first_failure=_ms(header(FIRST_FAILURE)),
            last_failure=_ms(header(LAST_FAILURE)),
            reason=header(DEAD_LETTER_REASON) or "",
        )


class DeadLetters:
    """The dead letters ``group`` has for ``topic``; a context manager.

    It reads the dead-letter topic through a group of its own and holds what
    it read, unsettled, until it acts on it or closes (then the rest goes
    back to the topic). Every method first reads what arrived since, waiting
    up to ``wait`` seconds for more (and, the first time, for the group
    join); none blocks longer.
    """

    def __init__(self, bus: Bus, topic: str, group: str, *, wait: float = 1.0) -> None:
        self.bus = bus
        self.topic = topic
        self.group = group
        self.dlq = dead_letter_topic(topic, group)
        self.wait = wait
        bus.declare(self.dlq, partitions=1, groups=[self.dlq])
        self._sub: Subscriber | None = None
        self._held: dict[str, Delivery] = {}  #: id -> delivery, in the order they came

    def _refresh(self) -> builtins.list[Delivery]:
        """Read what arrived since the last call; return everything held."""
        first = self._sub is None
        if self._sub is None:
            self._sub = self.bus.subscribe(self.dlq, self.dlq)
        sub = self._sub
        # With lag known, read that many; else until nothing came for ``wait`` seconds.
        expected = -1
        if Capability.LAG in self.bus.capabilities:
            expected = sum(sub.lag().values()) - len(self._held)
        # the first read of a known backlog may have to wait for a group join
        wait = max(self.wait, _JOIN_WAIT) if first and expected > 0 else self.wait
        got = 0
        while expected and (batch := sub.fetch(1000, timeout=wait)):
            for d in batch:
                if d.message.id in self._held:
                    d.ack()  # a crash while rewriting left a second copy
                else:
                    self._held[d.message.id] = d
            got += len(batch)
            wait = min(self.wait, 0.2) if expected > 0 else self.wait
            if 0 < expected <= got:
                break
        return builtins.list(self._held.values())

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead letters, oldest first (at most ``limit``). Changes nothing."""
        return [DeadLetter.of(d) for d in self._refresh()[:limit]]

    def get(self, message_id: str) -> DeadLetter:
        """The dead letter of ``message_id``; raises DeadLetterNotFound."""
        self._refresh()
        if message_id not in self._held:
            raise DeadLetterNotFound(f"no dead letter with id {message_id!r} in {self.dlq!r}")
        return DeadLetter.of(self._held[message_id])

    def redrive(
        self,
        ids: Collection[str] | None = None,
        *,
        edit: Callable[[Message], Any] | None = None,
    ) -> int:
        """Send dead letters (all, or those in ``ids``) back to the group, each with a
        fresh attempt budget; return how many.

        ``edit(message)`` may return a new value (or a :class:`Message`) to send
        instead; the id and envelope stay. Raises DeadLetterNotFound, before
        changing anything, for an id that is not there.
        """
        target = retry_topic(self.topic, self.group)
        self.bus.declare(target, groups=[target])

        def again(d: Delivery) -> OutRecord:
            record = d.record
            if edit is None:
                value, key, envelope = record.payload, record.key, record.headers
            else:
                new = edit(d.message)
                message = new if isinstance(new, Message) else _edited(d.message, new)
                out = out_record(message, 0)
                value, key, envelope = out.value, out.key, out.headers
            headers = tuple(h for h in envelope if h[0] not in _PROVENANCE)
            return OutRecord(value, key, (*headers, (ATTEMPT, "1")), int(time.time() * 1000))

        chosen = self._choose(ids)
        if chosen:
            self.bus.publish_records(target, [again(d) for d in chosen])
        return self._settle(chosen)

    def purge(self, ids: Collection[str] | None = None) -> int:
        """Delete dead letters (all, or those in ``ids``); return how many.

        Raises DeadLetterNotFound, before deleting anything, for an id that is
        not there.
        """
        return self._settle(self._choose(ids))

    def _choose(self, ids: Collection[str] | None) -> builtins.list[Delivery]:
        held = self._refresh()
        if ids is None:
            return held
        missing = set(ids) - self._held.keys()
        if missing:
            raise DeadLetterNotFound(f"no dead letter with id(s) {sorted(missing)} in {self.dlq!r}")
        return [d for d in held if d.message.id in ids]

    def _settle(self, chosen: builtins.list[Delivery]) -> int:
        """Ack every held one; those not chosen are first written to the topic again, so
        that the acks form one committed prefix (a log commits no gaps)."""
        assert self._sub is not None
        taken = {d.message.id for d in chosen}
        others = [_as_out(d) for d in self._held.values() if d.message.id not in taken]
        if others:
            self.bus.publish_records(self.dlq, others)
        self._sub.ack(self._held.values())
        self._sub.commit()
        self._held.clear()
        return len(chosen)

    def close(self) -> None:
        """Hand back what is held (it stays in the topic); idempotent."""
        if self._sub is not None:
            self._sub.close()
            self._sub = None
            self._held.clear()

    def __enter__(self) -> DeadLetters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: the headers a re-drive drops: the message starts over
_PROVENANCE = frozenset({*FAILURE_HEADERS, DEAD_LETTER_GROUP, DEAD_LETTER_REASON, ATTEMPTS})


def _as_out(delivery: Delivery) -> OutRecord:
    record = delivery.record
    return OutRecord(record.payload, record.key, record.headers, int(time.time() * 1000))


def _edited(message: Message, value: Any) -> Message:
    return Message(
        value,
        key=message.key,
        headers=message.headers,
        id=message.id,
        timestamp=message.timestamp,
        correlation_id=message.correlation_id,
        causation_id=message.causation_id,
    )
