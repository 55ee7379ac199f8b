"""A durable group's shared state: the file every member reads and writes under an
exclusive ``flock`` (members, owners and epochs, committed offsets, acked ranges),
each member's view of the partitions it owns, and the helpers on them. The
protocol is described in :mod:`polybus.log.group`; :class:`~polybus.log.group.Consumer`
runs it.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PolybusError, TopicNotFound
from ..types import Start
from .format import Record
from .transaction import SLOTS, Intent, Recorded, recover_intent

if TYPE_CHECKING:
    from .engine import Topic

#: finds a topic of the log by name (``Log.topic``)
Topics = Callable[[str], "Topic"]


@dataclass
class OwnedPartition:
    """This member's view of one partition it reads."""

    position: int  #: next offset to read
    committed: int
    epoch: int
    inflight: dict[int, Record] = field(default_factory=dict)
    redeliver: deque[Record] = field(default_factory=deque)
    delayed: list[tuple[int, int, Record]] = field(default_factory=list)  # heap (due, offset)
    revoked_at: float | None = None
    #: [start, end) ranges at or after ``position`` that a transaction acked: not read again
    skip: list[list[int]] = field(default_factory=list)
    #: the group's ``acked`` ranges are stale (after a seek) and must be dropped
    forget_acked: bool = False

    def low_water(self) -> int:
        """Everything below this offset is settled and may be committed."""
        low = self.position
        if self.inflight:
            low = min(low, min(self.inflight))
        if self.redeliver:
            low = min(low, min(r.offset for r in self.redeliver))
        if self.delayed:
            low = min(low, min(d[1] for d in self.delayed))
        return low

    def settled(self) -> bool:
        return not (self.inflight or self.redeliver or self.delayed)

    def drop_skipped(self, records: list[Record]) -> list[Record]:
        """``records`` (read in order, ending before ``position``) without those a
        transaction already acked; forgets the ranges passed."""
        skip = self.skip
        kept = [r for r in records if not any(s <= r.offset < e for s, e in skip)]
        self.skip = [r for r in skip if r[1] > self.position]
        return kept


class GroupFile:
    """The shared state of one durable group; use :meth:`locked` to read-modify-write."""

    def __init__(
        self, root: str, topic: str, group: str, topics: Topics | None, *, fsync: bool
    ) -> None:
        d = os.path.join(root, "groups", topic)
        os.makedirs(d, exist_ok=True)
        self.dir = d
        self.path = os.path.join(d, f"{group}.json")
        self._intent_base = os.path.join(d, f"{group}.txn")
        self._topics = topics
        self.fsync = fsync  #: fsync="always": state writes and intents are fsync'd
        self._lock_fd = os.open(os.path.join(d, f"{group}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._intent_fds = [-1] * SLOTS
        #: the latest whole intent recorded, as found under the lock (None: none)
        self.latest: Recorded | None = None
        #: the last intent written through this object whose batches were all appended
        self.last_intent: Intent | None = None
        self.last_written: Recorded | None = None

    def topic(self, name: str) -> Topic:
        """A topic of the log this group belongs to (for completing a transaction)."""
        if self._topics is None:
            raise TopicNotFound(f"group {self.path} cannot open topic {name!r} on its own")
        return self._topics(name)

    def intent_path(self, slot: int) -> str:
        return f"{self._intent_base}{slot}"

    def intent_fd(self, slot: int) -> int:
        """The open intent file of ``slot`` (created if missing)."""
        fd = self._intent_fds[slot]
        if fd < 0:
            fd = self._intent_fds[slot] = os.open(
                self.intent_path(slot), os.O_RDWR | os.O_CREAT, 0o644
            )
        return fd

    @contextmanager
    def locked(self, *, durable: bool = False, write_back: bool = True) -> Iterator[dict[str, Any]]:
        """Yield the state dict under the lock; it is written back if changed, unless
        ``write_back`` is False (a transaction's intent records it instead).

        Under ``fsync="always"`` the write is fsync'd, and with ``durable`` (or
        after applying a transaction) so is the directory. Raises PolybusError
        for a damaged state file.
        """
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            try:
                with open(self.path, "rb") as f:
                    raw = f.read()
                state: dict[str, Any] = json.loads(raw)
            except FileNotFoundError:
                raw, state = b"", {}
            except ValueError as exc:
                raise PolybusError(
                    f"group state {self.path} is damaged ({exc}); restore it, or delete it "
                    "to restart the group from its start position"
                ) from exc
            state.setdefault("members", {})
            state.setdefault("owners", {})
            state.setdefault("commits", {})
            state.setdefault("generation", 0)
            # a group that uses transactions: complete one whose writer died
            recovered = "txn" in state and recover_intent(self, state)
            yield state
            new = json.dumps(state, sort_keys=True).encode() if write_back else raw
            if new != raw:
                tmp = self.path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(new)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, self.path)
                if self.fsync and (durable or recovered):
                    fsync_dir(self.dir)
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._lock_fd, *self._intent_fds):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = -1
        self._intent_fds = [-1] * SLOTS


def group_lag(
    root: str, topic: Topic, group: str, topics: Topics, *, fsync: bool
) -> dict[int, int]:
    """Records not yet committed by ``group``, per partition; does not join the group."""
    gf = GroupFile(root, topic.name, group, topics, fsync=fsync)
    try:
        with gf.locked() as state:
            commits = state["commits"]
    finally:
        gf.close()
    return {
        p: part.end_offset - max(commits.get(str(p), part.start_offset), part.start_offset)
        for p, part in enumerate(topic.partitions)
    }


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` durable (after a create or rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_acked(state: dict[str, Any], key: str, low: int, *, forget: bool = False) -> None:
    """Drop the group's ``acked`` ranges of partition ``key`` below ``low`` (all if ``forget``)."""
    acked = state["acked"]
    ranges = [] if forget else [[max(s, low), e] for s, e in acked.get(key, ()) if e > low]
    if ranges:
        acked[key] = ranges
    else:
        acked.pop(key, None)
        if not acked:
            del state["acked"]


def initial_offset(topic: Topic, partition: int, start: Start) -> int:
    p = topic.partitions[partition]
    return p.start_offset if start == "earliest" else p.end_offset


def ensure_group(
    root: str, topic: Topic, group: str, start: Start, topics: Topics, *, fsync: bool
) -> None:
    """Create a durable group with its starting offsets if it does not exist; idempotent."""
    gf = GroupFile(root, topic.name, group, topics, fsync=fsync)
    try:
        with gf.locked() as state:
            for p in range(len(topic.partitions)):
                state["commits"].setdefault(str(p), initial_offset(topic, p, start))
    finally:
        gf.close()
