"""One back-off for every retry loop: exponential, jittered, capped, within a deadline.

>>> backoff = Backoff(first=0.02, cap=1.0)
>>> delays = [backoff.next_delay() for _ in range(8)]   # ~0.02, 0.04, ... then 1.0 at most

Jitter (each delay drawn from 50-150% of the nominal one) keeps the clients that
lost one broker at the same moment from reconnecting in step.
"""

from __future__ import annotations

import random
import time

__all__ = ["Backoff"]


class Backoff:
    """Delays that double from ``first`` up to ``cap`` seconds, jittered unless
    ``jitter=False``; :meth:`reset` after a success starts over."""

    def __init__(self, *, first: float = 0.02, cap: float = 1.0, jitter: bool = True) -> None:
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self._nominal = first

    def next_delay(self) -> float:
        """The next delay, in seconds (for callers that schedule rather than sleep)."""
        nominal = self._nominal
        self._nominal = min(nominal * 2, self.cap)
        return nominal * (0.5 + random.random()) if self.jitter else nominal

    def sleep(self, deadline: float) -> None:
        """Sleep the next delay, but not past ``deadline`` (a ``time.monotonic()`` value)."""
        time.sleep(max(0.0, min(self.next_delay(), deadline - time.monotonic())))

    def reset(self) -> None:
        self._nominal = self.first
