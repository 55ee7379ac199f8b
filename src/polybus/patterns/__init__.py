"""The common messaging patterns, as configurations of topics and groups, and the
reliability written once above the adapters.

| pattern       | topic + group                                                        |
|---------------|----------------------------------------------------------------------|
| work queue    | one topic, one shared durable group                                  |
| pub/sub       | one topic, one ephemeral group per subscriber                        |
| fan-out       | one topic, one durable group per downstream service                  |
| request-reply | a request topic with a responder group, a reply topic read by each   |
|               | requester alone; the causation id links a reply to its request       |

Reliability: :mod:`.worker` (handlers, guarantees, workers), :mod:`.retry`,
:mod:`.dlq`, :mod:`.request_reply`, :mod:`.inbox`, :mod:`.outbox`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bus import Bus, Subscriber
from .dlq import DeadLetter, DeadLetters
from .inbox import Inbox, MemoryInbox
from .request_reply import Requester, responder
from .retry import NO_RETRY, Retry, RetryPolicy
from .worker import App, Consumer, Output, Worker

__all__ = [
    "NO_RETRY",
    "App",
    "Consumer",
    "DeadLetter",
    "DeadLetters",
    "Inbox",
    "MemoryInbox",
    "Output",
    "Requester",
    "Retry",
    "RetryPolicy",
    "Worker",
    "fanout",
    "pubsub",
    "responder",
    "work_queue",
]


def work_queue(
    bus: Bus, topic: str, group: str = "workers", *, session_timeout: float = 10.0
) -> Subscriber:
    """Join the shared durable ``group``: each message goes to one worker, none is lost
    while no worker runs."""
    bus.declare(topic, groups=[group])
    return bus.subscribe(topic, group, session_timeout=session_timeout)


def pubsub(bus: Bus, topic: str) -> Subscriber:
    """Listen to messages published from now on; nothing is kept once this subscriber closes."""
    return bus.subscribe(topic, None)


def fanout(bus: Bus, topic: str, groups: Sequence[str]) -> None:
    """Declare one durable group per downstream service so each gets every message,
    including those published before the service first subscribes."""
    bus.declare(topic, groups=groups)
