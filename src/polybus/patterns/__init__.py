"""The common messaging patterns, as configurations of topics and groups.

| pattern    | topic + group                                           |
|------------|---------------------------------------------------------|
| work queue | one topic, one shared durable group                     |
| pub/sub    | one topic, one ephemeral group per subscriber           |
| fan-out    | one topic, one durable group per downstream service     |
"""

from __future__ import annotations

from collections.abc import Sequence

from ..bus import Bus, Subscriber

__all__ = ["fanout", "pubsub", "work_queue"]


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
