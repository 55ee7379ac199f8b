"""The acknowledgement tracking of one partition a subscription reads.

A record carries the :class:`_Partition` it was fetched under. A
subscription's plain acks (:mod:`.subscription`) and its transactions
(:mod:`.transactions`) settle records and compute commit points through it,
so it is the one piece of per-partition state both share.
"""

from __future__ import annotations

from collections import deque


class _Partition:
    """Acknowledgement tracking for one partition this member reads.

    A new object replaces it on every (re)assignment and seek; records carry
    the object they were fetched under, so acks of records from an earlier
    ownership are recognised (``live`` is False) and ignored.
    """

    __slots__ = ("committed", "live", "next", "number", "pending", "settled", "skip_before_ms")

    def __init__(self, number: int, *, next: int | None = None, committed: int = -1) -> None:
        self.number = number
        self.pending: deque[int] = deque()  #: offsets fetched and not yet below the commit point
        self.settled: set[int] = set()  #: offsets in ``pending`` acked or dropped
        self.next = next  #: offset after the last one fetched (updated by commit_point)
        self.committed = committed  #: what this member last committed, -1 if unknown
        self.live = True
        self.skip_before_ms = 0  #: an ephemeral reader's start time, until a newer record

    def commit_point(self) -> int | None:
        """Offset everything before which is settled (called under the subscription lock)."""
        pending, settled = self.pending, self.settled
        if pending:
            self.next = pending[-1] + 1
            if len(settled) >= len(pending) and settled.issuperset(pending):
                settled.difference_update(pending)  # the usual case, in C: all were settled
                pending.clear()
            else:
                while pending and pending[0] in settled:
                    settled.discard(pending.popleft())
        return pending[0] if pending else self.next

    def point_with(self, staged: set[int]) -> int | None:
        """The commit point were ``staged`` settled as well; changes nothing but trims."""
        self.commit_point()
        settled = self.settled
        for offset in self.pending:
            if offset not in settled and offset not in staged:
                return offset
        return self.next
