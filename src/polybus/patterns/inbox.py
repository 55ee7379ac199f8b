"""The inbox: an idempotent consumer remembers which messages its group processed.

A redelivered message (at-least-once) whose id the inbox knows is skipped and
acknowledged, so its handler takes effect once. An inbox remembers an id for
``ttl`` seconds; make it longer than any redelivery or re-drive can take.

What "once" means depends on where the inbox keeps its ids. The handler's
effects and the inbox entry are written in one transaction only by an SQL
inbox whose handler writes to the same database; with any other inbox a crash
after the handler's effects and before the entry is written runs the handler
again on redelivery.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = ["DEFAULT_TTL", "Inbox", "MemoryInbox"]

T = TypeVar("T")

DEFAULT_TTL = 7 * 24 * 3600.0  #: seconds an id is remembered: Kafka's default retention


class Inbox(Protocol):
    """Remembers the message ids each group has processed."""

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        """Run ``handler`` unless ``group`` already processed ``message_id``.

        Returns ``(True, result)`` when it ran and the id is now remembered,
        ``(False, None)`` for a duplicate. When ``handler`` raises, nothing is
        remembered and the exception propagates. Safe to call from several
        threads at once. Raises ConnectionLost when the inbox's store is
        unreachable (the handler did not run).
        """
        ...

    def close(self) -> None:
        """Release the inbox's connections; idempotent."""
        ...


class MemoryInbox:
    """An inbox in this process's memory: it dedups redeliveries while the process lives.

    Also refuses a second concurrent run of one id: a duplicate that arrives
    while the first copy is still being handled is skipped.
    """

    def __init__(self, *, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], float] = {}  #: (group, id) -> forget after
        self._running: set[tuple[str, str]] = set()
        self._next_sweep = 0.0

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        entry = (group, message_id)
        now = time.monotonic()
        with self._lock:
            if now >= self._next_sweep:
                self._sweep(now)
            forget_at = self._done.get(entry)
            if entry in self._running or (forget_at is not None and forget_at > now):
                return False, None
            self._running.add(entry)
        try:
            result = handler()
        finally:
            with self._lock:
                self._running.discard(entry)
        with self._lock:
            self._done[entry] = time.monotonic() + self.ttl
        return True, result

    def _sweep(self, now: float) -> None:
        self._done = {k: t for k, t in self._done.items() if t > now}
        self._next_sweep = now + min(self.ttl, 60.0)

    def __len__(self) -> int:
        return len(self._done)

    def close(self) -> None:
        pass
