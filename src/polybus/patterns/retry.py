"""Retries that never block a partition and never live only in memory.

A failed message is published again, to its group's own retry topic
(``<topic>.<group>.retry``), with its attempt count, the error and the time it
is due in headers; then the original is acknowledged. The messages behind it
go on being processed. Only that group reads its retry topic, so in a fan-out
a retry of one group never reaches another. Stop a consumer during a backoff
and start it again: the retry is still in the topic and runs when it is due.

On a backend with ``Capability.DELAY`` the retry topic holds the copy back
itself. Elsewhere (Kafka, RabbitMQ) the consumer reads the copy at once and
keeps it, unacknowledged, until it is due; what it holds is bounded, and a
crash hands the held copies back to the group like any unacked message.

After the last attempt, on an error the policy does not retry, or when the
payload cannot be decoded, the message goes to the group's dead-letter topic
instead (see :mod:`polybus.patterns.dlq`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from ..envelope import (
    ATTEMPT,
    DUE,
    ERROR,
    ERROR_TYPE,
    FIRST_FAILURE,
    LAST_FAILURE,
    MESSAGE_ID,
    ORIGIN_OFFSET,
    ORIGIN_PARTITION,
    ORIGIN_TOPIC,
)
from ..errors import ConfigurationError, Rejected
from ..message import Delivery, message_of
from ..types import InRecord, OutRecord

__all__ = [
    "ATTEMPT",
    "DUE",
    "ERROR",
    "ERROR_TYPE",
    "FIRST_FAILURE",
    "LAST_FAILURE",
    "NO_RETRY",
    "ORIGIN_OFFSET",
    "ORIGIN_PARTITION",
    "ORIGIN_TOPIC",
    "Retry",
    "RetryPolicy",
    "failure_fields",
    "failure_headers",
    "retry_copy",
    "retry_topic",
]


MAX_ERROR_TEXT = 2000  #: characters of an exception's text kept in headers


def retry_topic(topic: str, group: str) -> str:
    """The topic holding ``group``'s retries of messages from ``topic``."""
    return f"{topic}.{group}.retry"


class Retry(Exception):  # a signal a handler raises, not a failure: outside PolybusError
    """Raise from a handler to try the message again later, e.g. ``raise Retry(delay=30)``.

    ``delay`` (seconds) overrides the policy's backoff for this attempt; the
    policy's ``max_attempts`` still applies.
    """

    def __init__(self, reason: str = "", *, delay: float | None = None) -> None:
        super().__init__(reason or "retry requested")
        if delay is not None and delay < 0:
            raise ConfigurationError(f"Retry delay must be >= 0 seconds, got {delay}")
        self.delay = delay


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how soon a failed message is tried again.

    ``max_attempts`` counts every try, the first included (1 = no retries). The
    delay before try *n + 1* is ``initial_delay * multiplier ** (n - 1)``, capped
    at ``max_delay``, less a random share of up to ``jitter`` of it (so retries
    of many messages that failed together spread out). Exceptions in
    ``retry_on`` are retried unless they are also in ``give_up_on``; a
    :class:`~polybus.errors.Rejected` (e.g. a DecodeError) never is: the message will
    not change.
    """

    max_attempts: int = 5
    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    give_up_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts counts the first try too: it must be >= 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ConfigurationError(
                "delays must be >= 0 seconds and multiplier >= 1 "
                f"(got initial_delay={self.initial_delay}, max_delay={self.max_delay}, "
                f"multiplier={self.multiplier})"
            )
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError(f"jitter is a share between 0 and 1, got {self.jitter}")

    def retries(self, exc: BaseException, attempt: int) -> bool:
        """Whether a message whose try number ``attempt`` raised ``exc`` is tried again."""
        if attempt >= self.max_attempts or isinstance(exc, Rejected):
            return False
        if isinstance(exc, Retry):
            return True
        return isinstance(exc, self.retry_on) and not isinstance(exc, self.give_up_on)

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait after try number ``attempt`` failed with ``exc``."""
        if isinstance(exc, Retry) and exc.delay is not None:
            return exc.delay
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return base * (1 - self.jitter * random.random())


#: a policy that sends every failure straight to the dead-letter topic
NO_RETRY = RetryPolicy(max_attempts=1)


#: headers each new copy of a failed message replaces
_REPLACED = frozenset({ATTEMPT, DUE, ERROR_TYPE, ERROR, LAST_FAILURE})


def error_type(exc: BaseException) -> str:
    """``exc``'s class as ``module.QualName`` (builtins without the module)."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def failure_headers(record: InRecord, exc: BaseException, now_ms: int) -> list[tuple[str, str]]:
    """``record``'s headers with the failure recorded: its origin and first failure (kept
    from an earlier copy), the error and the time of this failure."""
    headers = [(k, v) for k, v in record.headers if k not in _REPLACED]
    present = {k for k, _ in headers}
    if MESSAGE_ID not in present:  # a plain client's message: keep the id it was given
        headers.append((MESSAGE_ID, message_of(record).id))  # a CloudEvent's, or its position
    if ORIGIN_TOPIC not in present:
        headers += [
            (ORIGIN_TOPIC, record.topic),
            (ORIGIN_PARTITION, str(record.partition)),
            (ORIGIN_OFFSET, str(record.offset)),
        ]
    if FIRST_FAILURE not in present:
        headers.append((FIRST_FAILURE, str(now_ms)))
    headers += [
        (ERROR_TYPE, error_type(exc)),
        (ERROR, str(exc)[:MAX_ERROR_TEXT]),
        (LAST_FAILURE, str(now_ms)),
    ]
    return headers


def failure_fields(d: Delivery, exc: BaseException, group: str, outcome: str) -> dict[str, Any]:
    """What a log line about a failed try at ``d`` carries besides its text: the message's
    ids and position, the attempt, the error's type and the ``outcome`` (retry,
    dead-letter, drop); never the payload, nor a header other than the ids."""
    message = d.message
    return {
        "message_id": message.id,
        "correlation_id": message.correlation_id,
        "topic": d.topic,  # where partition and offset point: the retry topic for a retry
        "group": group,
        "partition": d.partition,
        "offset": d.offset,
        "attempt": d.attempt,
        "error_type": error_type(exc),
        "outcome": outcome,
    }


def retry_copy(
    record: InRecord, exc: BaseException, *, attempt: int, due_ms: int, held_by_backend: bool
) -> OutRecord:
    """The copy of ``record`` that retries it as try number ``attempt`` at ``due_ms``.

    ``held_by_backend``: the retry topic's backend has Capability.DELAY and
    holds the copy back itself.
    """
    headers = failure_headers(record, exc, int(time.time() * 1000))
    headers += [(ATTEMPT, str(attempt)), (DUE, str(due_ms))]
    return OutRecord(
        record.payload,
        record.key,
        tuple(headers),
        int(time.time() * 1000),
        due_ms if held_by_backend else 0,
    )
