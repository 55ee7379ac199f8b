"""Consumers: durable groups coordinated through a file, and ephemeral readers.

A durable group lives in ``groups/<topic>/<group>.json``, read and written
under an exclusive ``flock``. It holds the live members with their lease
deadlines, the owner and epoch of each partition, and the committed offsets.

Every member heartbeats from a background thread. Partitions are assigned
round-robin over the sorted live members; a partition moves only when its
owner has released it (after its in-flight records are settled) or its lease
has expired, so two live members never read the same partition. Commits are
fenced: a member may commit a partition only while it is its recorded owner.
The contiguous acked prefix is what gets committed, so a dead member's
unacked records go to the next owner (at-least-once).

Records acknowledged by a transaction (see :mod:`polybus.log.transaction`)
above that prefix are also recorded, as ``acked`` offset ranges per partition,
so that the next owner skips them rather than processing them again. The state
file then also names the last transaction applied (``txn``), and the group's
lock is where a transaction whose writer died is completed.
"""

from __future__ import annotations

import heapq
import logging
import operator
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..errors import ClosedError, ConfigurationError, FencedError, PolybusError, TopicNotFound
from ..types import Start
from .format import Record
from .groupfile import (
    GroupFile,
    OwnedPartition,
    Topics,
    fsync_dir,
    group_lag,
    initial_offset,
    prune_acked,
)
from .notify import Waiter
from .transaction import SLOTS, Transaction

if TYPE_CHECKING:
    from .engine import Topic

log = logging.getLogger("polybus")
_COMMIT_INTERVAL = 0.2  # seconds between automatic commits from poll()
_offset = operator.attrgetter("offset")
_not_before = operator.attrgetter("not_before_ms")


class Consumer:
    """Reads a topic as a member of a durable group, or alone (``group=None``).

    ``poll`` hands out records; each must be settled with ``ack`` or ``nack``.
    Records with a not-before time are held back until due, without blocking
    the records behind them. Acks commit automatically every 0.2 s, on
    ``commit()`` and on ``close()``. ``poll`` runs on one thread; ``ack`` and
    ``nack`` may be called from any thread.
    """

    def __init__(
        self,
        root: str,
        topic: Topic,
        group: str | None,
        *,
        start: Start = "earliest",
        session_timeout: float = 10.0,
        fsync: bool = False,
        topics: Topics | None = None,
    ) -> None:
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', not {start!r}")
        if session_timeout <= 0:
            raise ConfigurationError("session_timeout must be positive (seconds)")
        self.topic = topic
        self.group = group
        self._root = root
        self.start: Start = start
        self.session_timeout = session_timeout
        self.member_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._fsync = fsync
        self._topics = topics or self._own_topic
        #: applies here a transaction whose intent was recorded before its commit()
        #: raised; whoever next locks the group completes it, so the next lock runs this
        self._unapplied: Callable[[], None] | None = None
        self._transactional = False  # the group state is marked as using transactions
        self._lock = threading.RLock()
        self._owned: dict[int, OwnedPartition] = {}
        self._closed = False
        self._rotate = 0
        self._last_commit = 0.0
        self._waiter = Waiter()
        for part in topic.partitions:
            self._waiter.watch(part.head_path)
        self._gf: GroupFile | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        if group is None:
            for i in range(len(topic.partitions)):
                pos = initial_offset(topic, i, start)
                self._owned[i] = OwnedPartition(position=pos, committed=pos, epoch=0)
        else:
            self._gf = GroupFile(root, topic.name, group, self._topics, fsync=fsync)
            self._sync()
            self._thread = threading.Thread(
                target=self._heartbeat, name=f"polybus-heartbeat-{group}", daemon=True
            )
            self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _own_topic(self, name: str) -> Topic:
        if name != self.topic.name:
            raise TopicNotFound(f"topic {name!r} is not known to this consumer; use Log.consumer")
        return self.topic

    # -- group membership -------------------------------------------------------------

    @property
    def assignment(self) -> frozenset[int]:
        """Partitions this member reads now."""
        with self._lock:
            return frozenset(p for p, o in self._owned.items() if o.revoked_at is None)

    def _heartbeat(self) -> None:
        interval = min(1.0, self.session_timeout / 4)
        while not self._stop.is_set():
            try:
                pending = self._sync()
            except (OSError, PolybusError):
                # keep trying: if it lasts, the lease lapses and others take over
                log.exception("heartbeat of %s in group %r failed", self.member_id, self.group)
                pending = False
            self._stop.wait(0.05 if pending else interval)

    def _sync(self, leaving: bool = False) -> bool:
        """Renew the lease, release revoked partitions, claim free ones, commit.

        Returns True while a rebalance is in progress for this member.
        """
        assert self._gf is not None
        nparts = len(self.topic.partitions)
        pending = False
        with self._lock, self._gf.locked() as state:
            now = time.time()
            members: dict[str, float] = state["members"]
            owners: dict[str, list[Any] | None] = state["owners"]
            commits: dict[str, int] = state["commits"]
            before = set(members)
            if leaving:
                members.pop(self.member_id, None)
            else:
                members[self.member_id] = now + self.session_timeout
            for mid in [m for m, deadline in members.items() if deadline < now]:
                del members[mid]
            if set(members) != before:
                state["generation"] += 1
            live = sorted(members)
            self._commit_to(state)
            for p in range(nparts):
                key = str(p)
                owner = owners.get(key)
                mine = self._owned.get(p)
                target = live[p % len(live)] if live else None
                if mine is not None:
                    if target == self.member_id:
                        mine.revoked_at = None  # given back to us before we let it go
                    else:
                        if mine.revoked_at is None:
                            mine.revoked_at = now
                        if (
                            leaving
                            or mine.settled()
                            or now - mine.revoked_at > self.session_timeout
                        ):
                            owners[key] = None
                            del self._owned[p]
                        else:
                            pending = True
                elif target == self.member_id:
                    if owner is None or owner[0] not in members:
                        epoch = (owner[1] if owner else 0) + 1
                        owners[key] = [self.member_id, epoch]
                        pos = commits.get(key)
                        if pos is None:
                            pos = commits[key] = initial_offset(self.topic, p, self.start)
                        pos = max(pos, self.topic.partitions[p].start_offset)
                        mine = self._owned[p] = OwnedPartition(
                            position=pos, committed=pos, epoch=epoch
                        )
                        acked = state.get("acked", {}).get(key)
                        if acked:
                            mine.skip = [r for r in acked if r[1] > pos]
                    else:
                        pending = True
        return pending

    # -- consuming -------------------------------------------------------------------

    def poll(self, max_records: int = 1000, timeout: float = 1.0) -> list[Record]:
        """Return up to ``max_records`` due records; wait up to ``timeout`` s for the first.

        Returns [] on timeout. Raises ClosedError after close().
        """
        deadline = time.monotonic() + timeout
        while True:
            out, next_due = self._take(max_records)
            if out:
                return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return out
            wait = remaining if next_due is None else min(remaining, next_due)
            self._waiter.wait(min(wait, 0.25))  # re-check assignment at least 4x a second

    def _take(self, max_records: int) -> tuple[list[Record], float | None]:
        with self._lock:
            if self._closed:
                raise ClosedError("consumer is closed; create a new one")
            out: list[Record] = []
            now_ms = time.time_ns() // 1_000_000
            next_due: float | None = None
            parts = [(p, o) for p, o in self._owned.items() if o.revoked_at is None]
            if parts:
                self._rotate = (self._rotate + 1) % len(parts)
                parts = parts[self._rotate :] + parts[: self._rotate]
            for p, o in parts:
                while o.redeliver and len(out) < max_records:
                    rec = o.redeliver.popleft()
                    o.inflight[rec.offset] = rec
                    out.append(rec)
                while o.delayed and o.delayed[0][0] <= now_ms and len(out) < max_records:
                    rec = heapq.heappop(o.delayed)[2]
                    o.inflight[rec.offset] = rec
                    out.append(rec)
                while len(out) < max_records:
                    recs = self.topic.partitions[p].read(o.position, max_records - len(out))
                    if not recs:
                        break
                    o.position = recs[-1].offset + 1
                    if o.skip:
                        recs = o.drop_skipped(recs)
                        if not recs:
                            continue
                    if max(map(_not_before, recs)) <= now_ms:  # the usual case, at C speed
                        o.inflight.update(zip(map(_offset, recs), recs, strict=True))
                        out.extend(recs)
                        continue
                    for rec in recs:
                        if rec.not_before_ms > now_ms:
                            heapq.heappush(o.delayed, (rec.not_before_ms, rec.offset, rec))
                        else:
                            o.inflight[rec.offset] = rec
                            out.append(rec)
                if o.delayed:
                    due = (o.delayed[0][0] - now_ms) / 1000
                    next_due = due if next_due is None else min(next_due, due)
            if self._gf is not None and time.time() - self._last_commit > _COMMIT_INTERVAL:
                self._commit()
            return out, next_due

    def ack(self, records: Sequence[Record]) -> None:
        """Mark records processed. Records of partitions no longer owned are ignored."""
        with self._lock:
            owned = self._owned
            partition, pop = -1, None
            for rec in records:
                if rec.partition != partition:
                    partition = rec.partition
                    o = owned.get(partition)
                    pop = None if o is None else o.inflight.pop
                if pop is not None:
                    pop(rec.offset, None)

    def nack(self, records: Sequence[Record], *, requeue: bool = True) -> None:
        """Redeliver records (attempt + 1) or, with ``requeue=False``, drop them."""
        with self._lock:
            for rec in records:
                o = self._owned.get(rec.partition)
                if o is None or o.inflight.pop(rec.offset, None) is None:
                    continue
                if requeue:
                    rec.delivery_count += 1
                    o.redeliver.append(rec)

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` next; unsettled records there are forgotten."""
        with self._lock:
            o = self._owned.get(partition)
            if o is None:
                raise ConfigurationError(
                    f"partition {partition} is not assigned to this consumer "
                    f"(assigned: {sorted(self._owned)}); seek after it is assigned"
                )
            o.position = max(offset, self.topic.partitions[partition].start_offset)
            o.inflight.clear()
            o.redeliver.clear()
            o.delayed.clear()
            o.skip = []  # a replay reads what transactions acked too
            o.forget_acked = True

    def commit(self) -> None:
        """Commit the contiguous settled prefix of every owned partition now.

        Raises FencedError if a partition was taken over by another member.
        """
        with self._lock:
            if self._closed:
                raise ClosedError("consumer is closed")
            if self._gf is None:
                for o in self._owned.values():
                    o.committed = o.low_water()
                return
            lost = self._commit()
        if lost:
            raise FencedError(
                f"partitions {sorted(lost)} of {self.topic.name!r} now belong to another member "
                f"of group {self.group!r}; their unacked records will be redelivered there"
            )

    def _commit(self) -> set[int]:
        """Under self._lock: write committed offsets; return partitions found fenced."""
        assert self._gf is not None
        with self._gf.locked() as state:
            return self._commit_to(state)

    def _catch_up(self) -> None:
        """Under both locks: apply here a transaction the lock's recovery completed."""
        if self._unapplied is not None:
            apply, self._unapplied = self._unapplied, None
            apply()

    def _commit_to(self, state: dict[str, Any]) -> set[int]:
        """Under both locks: drop partitions another member took over (returned),
        record the settled prefix of the others."""
        self._catch_up()
        owners, commits = state["owners"], state["commits"]
        lost: set[int] = set()
        for p, o in list(self._owned.items()):
            key = str(p)
            if owners.get(key) != [self.member_id, o.epoch]:
                lost.add(p)
                del self._owned[p]
                continue
            low = o.low_water()
            if low != o.committed or o.forget_acked:
                commits[key] = o.committed = low
                if "acked" in state:
                    prune_acked(state, key, low, forget=o.forget_acked)
                o.forget_acked = False
        self._last_commit = time.time()
        return lost

    # -- the seam a Transaction works through (log/transaction.py), and nothing else --

    def topic_named(self, name: str) -> Topic:
        """Another topic of this consumer's log (a transaction's output)."""
        return self._topics(name)

    @contextmanager
    def members_partitions(self) -> Iterator[dict[int, OwnedPartition]]:
        """Hold this member's lock; yield the partitions it owns (partition -> state),
        which the caller may settle records of and drop lost ones from."""
        with self._lock:
            yield self._owned

    @contextmanager
    def group_locked(self, what: str) -> Iterator[tuple[dict[int, OwnedPartition], dict[str, Any]]]:
        """Hold this member's lock and the group's (write-back left to the caller),
        with any transaction the lock's recovery completed applied here; yield the owned
        partitions and the group state. ClosedError saying ``what`` when closed."""
        with self._lock:
            if self._closed:
                raise ClosedError(f"consumer is closed; {what}")
            assert self._gf is not None
            with self._gf.locked(write_back=False) as state:
                self._catch_up()
                yield self._owned, state

    @property
    def group_file(self) -> GroupFile:
        """The group's state file (transactions record their intent in it)."""
        assert self._gf is not None
        return self._gf

    def apply_later(self, apply: Callable[[], None] | None) -> None:
        """Under :meth:`group_locked`: have the next lock of the group run ``apply``
        here (a recorded transaction whose commit may yet fail), or forget it (None)."""
        self._unapplied = apply

    def transaction(self) -> Transaction:
        """Begin a :class:`~polybus.log.transaction.Transaction`: appends to any topics of
        this log and acks of records this member polled, committed together.

        Raises ConfigurationError for a consumer without a group, ClosedError after close.
        """
        if self._gf is None:
            raise ConfigurationError(
                "a transaction commits a group's offsets: subscribe with a group to use one"
            )
        with self._lock:
            if self._closed:
                raise ClosedError("consumer is closed")
            if not self._transactional:
                with self._gf.locked(durable=True) as state:
                    if "txn" not in state:
                        # an intent left by an earlier group of this name must not be applied
                        for slot in range(SLOTS):
                            fd = self._gf.intent_fd(slot)
                            os.ftruncate(fd, 0)
                            if self._fsync:
                                os.fsync(fd)
                        if self._fsync:
                            fsync_dir(self._gf.dir)
                        self._gf.latest = None
                        state["txn"] = ""  # from now on every lock checks the intent
                self._transactional = True
        return Transaction(self)

    def lag(self) -> dict[int, int]:
        """Records not yet committed by this group (or read by this reader), per partition."""
        if self._gf is None:
            with self._lock:
                return {
                    p: self.topic.partitions[p].end_offset - o.position
                    for p, o in self._owned.items()
                }
        assert self.group is not None
        return group_lag(self._root, self.topic, self.group, self._topics, fsync=self._fsync)

    def close(self) -> None:
        """Commit what was acked, leave the group (its partitions move on); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._gf is not None:
            self._sync(leaving=True)
            self._gf.close()
        self._waiter.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
