"""Transactions: appends to any topics and a group's offset commit, together or not at all.

A :class:`Transaction` belongs to one member of a durable group (a
:class:`~polybus.log.Consumer`). It stages records to append and records the
member polled to acknowledge; :meth:`Transaction.commit` makes both take effect
at once, with roll-forward recovery:

1. Under the group's lock (the one members take to heartbeat and commit), check
   that the member still owns the partition of every acknowledged record, with
   the epoch it read it under; if not, raise FencedError and write nothing.
2. Lock every output partition (in one order, so transactions never deadlock)
   and read its end offset: the transaction's batch for it goes exactly there.
3. Write the intent, ``groups/<topic>/<group>.txn``, in place: a random
   transaction id, the batches encoded for those offsets, and the group's
   committed offsets and transactionally acked ranges as they are once this
   transaction is applied (all partitions, not just the ones it touches). It
   has a CRC; under ``fsync="always"`` it is fsync'd before step 4.
4. Append the batches, one per output partition, each with the transaction id
   in its trailer; release the partition locks, then the group lock.

The intent is then the group's durable record of the commit: the state file
(``<group>.json``) is not rewritten by a transaction. Whoever next takes the
group lock (every member does, at least once a second and before it takes a
partition over) finds an intent whose id the state file does not name yet,
and applies it: it checks what is stored at each batch's offset and appends
any batch missing (at the current end if other producers appended there
since), sets the offsets from the intent, and writes the state file naming the
transaction. A torn intent is dropped: its writer died before appending
anything. Because each intent holds the whole commit state, a later intent
includes the effects of every earlier one, whoever applied them. (Should
retention or compaction have removed a batch's offset before anyone locked
the group again, the batch is appended again: a duplicate, never a loss.)

Why this shape: an intent holds its payloads, not only offsets, so that a
transaction with outputs in several partitions can always be finished (once the
first batch is visible, it cannot be taken back). Holding the output partitions'
locks from step 2 to step 4 costs their other producers a short wait and buys
exact offsets, so completing checks one batch per partition rather than
scanning the log. Not rewriting the state file saves its write-and-rename, the
largest cost of a commit (on ext4 a rename over a file flushes that file).

What a reader of an output topic sees, and when: a transaction's batches
become visible partition by partition during step 4, before ``commit()``
returns. Every output a reader can see belongs to a transaction whose intent is
recorded, so it has committed or will: a reader never sees the output of a
transaction that does not take effect. If the writer dies in step 4, the
batches it had not appended appear at the next lock of the group, by whoever
takes it; until then the inputs are not handed to another member either. The
group's committed offsets, as :meth:`Log.lag` reports them, include a
transaction from the moment its intent is recorded.

What is atomic under which ``fsync`` policy:

- A process crash (SIGKILL at any instant), under every policy: the outputs
  appear exactly once and the offsets are committed, or neither happens.
- Power loss or an OS crash: only under ``fsync="always"``, where the intent
  and then each batch are fsync'd before ``commit()`` returns. Under
  ``"interval"`` and ``"never"`` the last moments' writes to different files
  are lost independently, as for plain appends and acks: a transaction
  committed shortly before may come back without its commit (its inputs are
  processed again) or without its outputs.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import msgpack

from ..errors import ClosedError, ConfigurationError, FencedError, MessageTooLarge
from .format import (
    MAX_BATCH_BYTES,
    TXN_ID_SIZE,
    Headers,
    Record,
    batch_base_count,
    crc32c,
    encode_batch,
    rebase_batch,
)

if TYPE_CHECKING:
    from .group import Consumer
    from .groupfile import GroupFile, OwnedPartition
    from .partition import Partition

__all__ = ["Transaction"]

_INTENT_MAGIC: Final = 0x324E5458  # "XTN2"
#: an intent's frame: magic, payload length, CRC-32C of all that follows, then the
#: sequence number and transaction id, then the msgpack'd payload
_INTENT_HEAD = struct.Struct("<IIIQ16s")
_FRAMING = struct.Struct("<III")
_CHECKED_AT: Final = _FRAMING.size  # where the CRC'd bytes start
_PAYLOAD_AT: Final = _INTENT_HEAD.size
#: intents alternate between two slot files, so a torn write spares the latest whole one
SLOTS: Final = 2


class Intent(NamedTuple):
    """What a transaction will do, as recorded before it does any of it."""

    txn: bytes
    #: the group's committed offsets once applied, per partition ("0", "1", ...)
    commits: dict[str, int]
    #: the group's [start, end) ranges acked above those offsets, per partition
    acked: dict[str, list[list[int]]]
    outputs: list[list[Any]]  #: [topic, partition, batch encoded for its offset]


class Recorded(NamedTuple):
    """Where an intent is recorded: its slot file and sequence number."""

    slot: int
    seq: int
    txn: bytes


def write_intent(gf: GroupFile, intent: Intent) -> Recorded:
    """Under the group lock: record ``intent`` after the latest one (fsync'd under
    ``fsync="always"``), in the slot that does not hold it."""
    latest = gf.latest
    where = (
        Recorded(0, 1, intent.txn)
        if latest is None
        else (Recorded(1 - latest.slot, latest.seq + 1, intent.txn))
    )
    payload = msgpack.packb((intent.commits, intent.acked, intent.outputs))
    checked = struct.pack("<Q", where.seq) + intent.txn + payload
    frame = _FRAMING.pack(_INTENT_MAGIC, len(payload), crc32c(checked)) + checked
    fd = gf.intent_fd(where.slot)
    if os.pwrite(fd, frame, 0) != len(frame):
        raise OSError(f"short write to {gf.intent_path(where.slot)}")
    if os.fstat(fd).st_size > len(frame):
        os.ftruncate(fd, len(frame))  # the bytes of a larger earlier intent
    if gf.fsync:
        os.fdatasync(fd)
    gf.latest = where
    return where


def _recorded(gf: GroupFile) -> list[tuple[Recorded, int, int]]:
    """The intents whose headers are there, newest first: where, payload length, CRC."""
    found = []
    for slot in range(SLOTS):
        head = os.pread(gf.intent_fd(slot), _INTENT_HEAD.size, 0)
        if len(head) == _INTENT_HEAD.size:
            magic, length, crc, seq, txn = _INTENT_HEAD.unpack(head)
            if magic == _INTENT_MAGIC:
                found.append((Recorded(slot, seq, txn), length, crc))
    return sorted(found, key=lambda f: -f[0].seq)


def _read_intent(gf: GroupFile, where: Recorded, length: int, crc: int) -> Intent | None:
    """The intent recorded ``where``, or None if it is torn (its slot is then emptied)."""
    fd = gf.intent_fd(where.slot)
    size = _PAYLOAD_AT - _CHECKED_AT + length
    checked = os.pread(fd, size, _CHECKED_AT)
    if len(checked) != size or crc32c(checked) != crc:
        os.ftruncate(fd, 0)  # torn: its writer died before appending anything
        return None
    commits, acked, outputs = msgpack.unpackb(checked[_PAYLOAD_AT - _CHECKED_AT :])
    return Intent(where.txn, commits, acked, outputs)


def apply_commit(state: dict[str, Any], intent: Intent) -> None:
    """Set the group state's offsets from the intent and name it the last applied."""
    state["commits"].update(intent.commits)
    if intent.acked:
        state["acked"] = intent.acked
    else:
        state.pop("acked", None)
    state["txn"] = intent.txn.hex()


def recover_intent(gf: GroupFile, state: dict[str, Any]) -> bool:
    """Under the group lock: find the latest whole intent and, if the state does not
    name it, apply it, first appending any of its batches that are missing.

    Idempotent. Returns whether one was applied (the state then needs writing).
    """
    gf.latest = None
    for where, length, crc in _recorded(gf):
        if where.txn.hex() == state["txn"]:
            gf.latest = where
            return False
        intent = gf.last_intent
        if intent is None or gf.last_written != where:  # else this object wrote it all
            intent = _read_intent(gf, where, length, crc)
            if intent is None:
                continue
            _append_missing(gf, intent)
        gf.latest = where
        apply_commit(state, intent)
        return True
    return False


def _append_missing(gf: GroupFile, intent: Intent) -> None:
    """Append each batch of ``intent`` not stored at the offset it was encoded for."""
    for topic, p, batch in intent.outputs:
        part = gf.topic(topic).partitions[p]
        base, _count = batch_base_count(batch)
        with part.exclusive() as end:
            if end > base and part.batch_at(base) == batch:
                continue  # appended before the writer died
            part.append_encoded(rebase_batch(batch, end))


def merge_ranges(ranges: list[list[int]], offsets: Sequence[int]) -> list[list[int]]:
    """``ranges`` ([start, end) pairs, sorted) with ``offsets`` added, coalesced."""
    spans = sorted([*map(tuple, ranges), *((o, o + 1) for o in offsets)])
    out: list[list[int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


class _Outputs:
    """Records staged for one partition."""

    __slots__ = ("headers", "keys", "not_before", "partition", "timestamps", "values")

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.values: list[bytes | None] = []
        self.keys: list[bytes | None] = []
        self.headers: list[Headers | None] = []
        self.timestamps: list[int] = []
        self.not_before: list[int] = []


class Transaction:
    """Appends and acks of one group member that take effect together, or not at all.

    Made by :meth:`Consumer.transaction`. Use it from one thread; ``commit`` or
    ``abort`` spends it. As a context manager it commits on success and aborts
    on an exception. What is atomic, and what readers see meanwhile, is in the
    module docstring.
    """

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._outputs: dict[tuple[str, int], _Outputs] = {}
        #: (partition, offset) -> the record and the ownership it was polled under
        self._acks: dict[tuple[int, int], tuple[Record, OwnedPartition]] = {}
        self._lost: set[int] = set()  # partitions of acked records lost before commit
        self._done = False

    def _check(self) -> None:
        if self._done:
            raise ClosedError("transaction already committed or aborted; begin a new one")

    def append(
        self,
        topic: str,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        not_before_ms: int = 0,
    ) -> None:
        """Stage one record for its key's partition of ``topic``; appended by commit().

        Raises TopicNotFound for a topic that does not exist, ClosedError once spent.
        """
        self._check()
        t = self._consumer.topic_named(topic)
        p = t.partition_for(key)
        staged = self._outputs.get((topic, p))
        if staged is None:
            staged = self._outputs[topic, p] = _Outputs(t.partitions[p])
        staged.values.append(value)
        staged.keys.append(key)
        staged.headers.append(headers)
        staged.timestamps.append(
            time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        )
        staged.not_before.append(not_before_ms)

    def ack(self, records: Sequence[Record]) -> None:
        """Stage acks of records this member polled and has not settled.

        A record whose partition this member lost meanwhile makes commit() raise
        FencedError. Raises ConfigurationError for a record that is not in flight
        here (already settled, or polled by another consumer).
        """
        self._check()
        with self._consumer.members_partitions() as owned:
            for rec in records:
                o = owned.get(rec.partition)
                if o is None:
                    self._lost.add(rec.partition)
                elif o.inflight.get(rec.offset) is rec:
                    self._acks[rec.partition, rec.offset] = (rec, o)
                else:
                    raise ConfigurationError(
                        f"record {rec.partition}/{rec.offset} is not in flight in this consumer: "
                        "it was already acked or nacked, or another consumer polled it"
                    )

    def commit(self) -> None:
        """Append the staged records and commit the staged acks, atomically; blocks.

        On return the records are visible to every process and the acks
        committed (both fsync'd under ``fsync="always"``). Raises FencedError if
        this member lost the partition of an acked record, or the group's state
        was reset (nothing takes effect; the other acked records are delivered
        again, attempt + 1), ConfigurationError for an acked record settled
        outside the transaction meanwhile, MessageTooLarge if a
        partition's records exceed one batch, ClosedError once spent or after the
        consumer closed. After an OSError (a full disk) the transaction may have
        been recorded: it then completes at the next lock of the group.
        """
        self._check()
        self._done = True
        if not (self._outputs or self._acks or self._lost):
            return
        txn = os.urandom(TXN_ID_SIZE)
        recorded = False
        c = self._consumer
        try:
            batches = self._encode(txn)
            # the group's state is written back by the intent, not by the lock
            with c.group_locked("nothing was committed") as (owned, state):
                gf = c.group_file
                if "txn" not in state:
                    raise FencedError(
                        f"the state of group {c.group!r} was reset meanwhile; nothing was committed"
                    )
                self._check_owned(owned, state)
                commits, acked, apply_here = self._plan(owned, state)
                outputs: list[list[Any]] = []
                with ExitStack() as stack:
                    for (topic, p), part, batch in batches:
                        end = stack.enter_context(part.exclusive())
                        outputs.append([topic, p, rebase_batch(batch, end)])
                    intent = Intent(txn, commits, acked, outputs)
                    written = write_intent(gf, intent)
                    recorded = True
                    c.apply_later(apply_here)  # if what follows fails, the next lock does it
                    for ((_topic, _p), part, _b), (_t, _q, batch) in zip(
                        batches, outputs, strict=True
                    ):
                        part.append_encoded(batch)
                gf.last_intent, gf.last_written = intent, written
                c.apply_later(None)
                apply_here()
        except BaseException:
            if not recorded:
                self._redeliver()
            raise

    def _encode(self, txn: bytes) -> list[tuple[tuple[str, int], Partition, bytes]]:
        """One batch per output partition (in lock order), encoded for offset 0."""
        out = []
        for where in sorted(self._outputs):
            s = self._outputs[where]
            batch = encode_batch(0, s.values, s.keys, s.headers, s.timestamps, s.not_before, txn)
            if len(batch) > MAX_BATCH_BYTES:
                raise MessageTooLarge(
                    f"a transaction's records for partition {where[1]} of {where[0]!r} take "
                    f"{len(batch)} bytes, over the {MAX_BATCH_BYTES}-byte batch limit; "
                    "split the work into smaller transactions"
                )
            out.append((where, s.partition, batch))
        return out

    def _check_owned(self, owned: dict[int, OwnedPartition], state: dict[str, Any]) -> None:
        """Under both locks: raise FencedError (forgetting lost partitions) if this member
        no longer owns the partition of an acked record with the epoch it polled it."""
        c = self._consumer
        owners = state["owners"]
        lost = set(self._lost)
        for (p, offset), (rec, o) in self._acks.items():
            if owned.get(p) is not o or owners.get(str(p)) != [c.member_id, o.epoch]:
                lost.add(p)
            elif o.inflight.get(offset) is not rec:
                raise ConfigurationError(
                    f"record {p}/{offset} was settled outside this transaction (ack, nack "
                    "or seek) before it committed; nothing was committed"
                )
        if not lost:
            return
        for p in lost:
            mine = owned.get(p)
            if mine is not None and owners.get(str(p)) != [c.member_id, mine.epoch]:
                del owned[p]
        raise FencedError(
            f"partitions {sorted(lost)} of {c.topic.name!r} now belong to another member of "
            f"group {c.group!r}; nothing was committed and their records go to that member"
        )

    def _plan(
        self, owned: dict[int, OwnedPartition], state: dict[str, Any]
    ) -> tuple[dict[str, int], dict[str, list[list[int]]], Callable[[], None]]:
        """Under both locks: the group's committed offsets and acked ranges once this
        transaction is applied, and the function that settles its acked records here."""
        by_partition: dict[int, list[int]] = {}
        for p, offset in self._acks:
            by_partition.setdefault(p, []).append(offset)
        commits: dict[str, int] = dict(state["commits"])
        acked: dict[str, list[list[int]]] = dict(state.get("acked", {}))
        settle: list[tuple[OwnedPartition, list[int], int]] = []
        for p, offsets in by_partition.items():
            o = owned[p]
            staged = set(offsets)
            low = o.position
            rest = [k for k in o.inflight if k not in staged]
            if rest:
                low = min(low, min(rest))
            if o.redeliver:
                low = min(low, min(r.offset for r in o.redeliver))
            if o.delayed:
                low = min(low, min(d[1] for d in o.delayed))
            key = str(p)
            before = [] if o.forget_acked else acked.get(key, [])
            ranges = merge_ranges(before, [k for k in offsets if k >= low])
            commits[key] = low
            acked[key] = [[max(s, low), e] for s, e in ranges if e > low]
            if not acked[key]:
                del acked[key]
            settle.append((o, offsets, low))

        def apply_here() -> None:
            for o, offsets, low in settle:
                for k in offsets:
                    o.inflight.pop(k, None)
                o.committed = low
                o.forget_acked = False

        return commits, acked, apply_here

    def _redeliver(self) -> None:
        """Give the staged acks' records back to this member (attempt + 1)."""
        with self._consumer.members_partitions() as owned:
            for (p, offset), (rec, o) in self._acks.items():
                if owned.get(p) is o and o.inflight.get(offset) is rec:
                    del o.inflight[offset]
                    rec.delivery_count += 1
                    o.redeliver.append(rec)

    def abort(self) -> None:
        """Drop the staged records and acks; the acked records are delivered to this
        member again (attempt + 1). Idempotent; a no-op after commit()."""
        if not self._done:
            self._done = True
            self._redeliver()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, typ: type[BaseException] | None, *exc: object) -> None:
        if self._done:
            return
        if typ is None:
            self.commit()
        else:
            self.abort()
