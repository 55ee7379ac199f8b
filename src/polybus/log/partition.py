# Over 800 lines on purpose: the writer, the lock-free readers, crash recovery and compaction
# all follow the one file-and-lock protocol in the docstring, and are kept in one module so
# that protocol can be checked in one reading.
"""One partition: a directory of append-only segment files shared by processes.

Layout of ``<topic>/<n>/``::

    head                      shared state, mmap'd; its flock is the write lock
    00000000000000000000.log  segment named by its first offset
    00000000000000000000.idx  sparse index: (offset - base, position) every 4 KiB
    compact.lock              held by the one compaction running (compact=True topics)

Writers append one batch per call under an exclusive ``flock`` on ``head``:
``pwrite`` at the committed end, then publish the new end in ``head``.
Readers never lock: they read up to the published end of the active segment
and to the file end of sealed ones, so a reader can see less than is there but
never a half-written batch. A writer killed between ``pwrite`` and publishing
leaves bytes past the end that the next opener truncates.

Compaction rewrites sealed segments aside and swaps them in under the write
lock; a reader holding the old file open reads it whole, then lets it go.

After a reboot (``head`` records the boot id) the page cache is gone, so the
tail after the last fsync'd point (the recovery point) is re-scanned batch by
batch and a torn write is truncated.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Literal

from ..errors import (
    ClosedError,
    ConfigurationError,
    CorruptRecordError,
    MessageTooLarge,
    PolybusError,
)
from .format import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_BATCH_BYTES,
    BadBatch,
    Headers,
    KeyedBatch,
    Record,
    batch_base_count,
    check_batch,
    decode_batch,
    decode_batches,
    encode_batch,
    encode_one,
    scan_keys,
)

FsyncPolicy = Literal["always", "interval", "never"]

log = logging.getLogger("polybus")

INDEX_INTERVAL: Final = 4096
_IDX = struct.Struct("<II")
_HEAD_MAGIC: Final = 0x3130444145484250  # "PBHEAD01"
# head: magic, next_offset, end_pos, active_base, check, start_offset,
#       recovery_base, recovery_pos, recovery_offset, boot, last_index_pos
#       (then field 11, _SEALED_CHANGES, which the _HEAD writes leave alone)
_HEAD = struct.Struct("<11Q")
# field numbers (u64 each) for _get/_set
_NEXT, _END, _ACTIVE, _START, _RECOVERY_BASE, _RECOVERY_POS, _LAST_INDEX = 1, 2, 3, 5, 6, 7, 10
# counts the sealed segments compaction replaced or retention deleted, so that readers
# close the files they hold open of them (which would keep their disk space in use)
_SEALED_CHANGES = 11
_RECOVERY = struct.Struct("<3Q")  # recovery point: segment base, position, next offset
_RECOVERY_AT: Final = 8 * _RECOVERY_BASE
_STATE = struct.Struct("<4Q")  # next_offset, end_pos, active_base, check  (at byte 8)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MASK: Final = 0xFFFFFFFFFFFFFFFF
_LOCK_EX: Final = fcntl.LOCK_EX
_LOCK_UN: Final = fcntl.LOCK_UN
_flock = fcntl.flock
_HEAD_SIZE: Final = 4096


def _boot_id() -> int:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return int(f.read().strip().replace("-", "")[:16], 16)
    except (OSError, ValueError):
        return 0


BOOT_ID: Final = _boot_id()


def _check(next_offset: int, end_pos: int, active_base: int) -> int:
    """A checksum of the published state, so a writer killed mid-publish is detected."""
    return (next_offset ^ (end_pos << 1) ^ (active_base << 2) ^ _HEAD_MAGIC) & _MASK


def segment_name(base: int) -> str:
    return f"{base:020d}.log"


def _encode_runs(records: list[Record]) -> Iterator[tuple[int, bytes]]:
    """``records`` re-encoded as one batch per run of consecutive offsets."""
    runs: list[list[Record]] = []
    for rec in records:
        if runs and runs[-1][-1].offset + 1 == rec.offset:
            runs[-1].append(rec)
        else:
            runs.append([rec])
    for run in runs:
        yield (
            run[0].offset,
            encode_batch(
                run[0].offset,
                [r.value for r in run],
                [r.key for r in run],
                [r.headers for r in run],
                [r.timestamp_ms for r in run],
                [r.not_before_ms for r in run],
            ),
        )


@dataclass(frozen=True, slots=True)
class PartitionConfig:
    segment_bytes: int = 64 << 20
    retention_ms: int | None = None
    retention_bytes: int | None = None
    compact: bool = False
    #: how long compaction keeps a key's tombstone once it is the key's newest record (as
    #: Kafka's ``delete.retention.ms``): a reader from the start sees deletions that recent
    delete_retention_ms: int = 24 * 3600 * 1000
    fsync: FsyncPolicy = "interval"
    skip_corrupt: bool = False


class Partition:
    """An append-only, CRC-checked, multi-process log of records.

    ``append``/``append_batch`` return once the records are visible to every
    process on the host (and fsync'd under ``fsync="always"``). Offsets are
    dense and start at 0. Thread-safe.
    """

    def __init__(self, directory: str, index: int, config: PartitionConfig) -> None:
        self.dir = directory
        self.index = index
        self.config = config
        os.makedirs(directory, exist_ok=True)
        self._tlock = threading.Lock()  # flock is per open file, not per thread
        self._head_fd = os.open(os.path.join(directory, "head"), os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self._head_fd).st_size < _HEAD_SIZE:
            os.ftruncate(self._head_fd, _HEAD_SIZE)  # idempotent between racing openers
        self._mm = mmap.mmap(self._head_fd, _HEAD_SIZE)
        self._wfd = -1  # write fd of the active segment
        self._wbase = -1
        self._ifd = -1  # append fd of the index of segment _ibase
        self._ibase = -1
        self._rfds: dict[int, int] = {}  # segment base -> read fd
        self._rlock = threading.Lock()  # the read fds and the cursor
        self._sealed_seen = 0  # _SEALED_CHANGES when the read fds were last checked
        self._segments: list[int] = []
        self._index_cache: dict[int, list[tuple[int, int]]] = {}
        self._cursor = (-1, -1, -1)  # (segment base, next offset, position) of the last read
        self.dirty = False  # written since the last flush (for fsync="interval")
        self._compactor: threading.Thread | None = None
        self._compaction_due = False  # a roll happened while the compactor ran
        self.closed = False
        with self._locked():
            self._open_or_recover()

    # -- locking and shared state -------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._tlock:
            if self.closed:
                raise ClosedError(f"partition {self.dir} is closed; open the log again")
            fcntl.flock(self._head_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._head_fd, fcntl.LOCK_UN)

    def _publish(self, next_offset: int, end_pos: int, active_base: int) -> None:
        """Make a new end visible. A ``pwrite`` rather than a store into the mmap, so
        that waiting readers get their inotify event only once the end has moved."""
        check = _check(next_offset, end_pos, active_base)
        os.pwrite(self._head_fd, _STATE.pack(next_offset, end_pos, active_base, check), 8)

    def _set(self, field: int, value: int) -> None:
        struct.pack_into("<Q", self._mm, 8 * field, value)

    def _get(self, field: int) -> int:
        return struct.unpack_from("<Q", self._mm, 8 * field)[0]  # type: ignore[no-any-return]

    @property
    def head_path(self) -> str:
        """The file every append modifies last: watch it to learn of new records."""
        return os.path.join(self.dir, "head")

    @property
    def end_offset(self) -> int:
        """The offset the next appended record will get."""
        return self._get(_NEXT)

    @property
    def start_offset(self) -> int:
        """The first offset still stored (retention deletes older segments)."""
        return self._get(_START)

    def _path(self, base: int, suffix: str = ".log") -> str:
        return os.path.join(self.dir, f"{base:020d}{suffix}")

    # -- open and recovery -------------------------------------------------------

    def _open_or_recover(self) -> None:
        """Under the lock: initialise a new partition or validate the tail of an old one."""
        head = _HEAD.unpack_from(self._mm, 0)
        if head[0] != _HEAD_MAGIC:
            self._list_segments()
            if self._segments and os.path.getsize(self._path(self._segments[-1])) > 0:
                # head lost but data present: rebuild from the first segment
                self._recover(self._segments[0], 0, self._segments[0])
            else:
                open(self._path(0), "ab").close()
                _HEAD.pack_into(
                    self._mm, 0, _HEAD_MAGIC, 0, 0, 0, _check(0, 0, 0), 0, 0, 0, 0, BOOT_ID, 0
                )
            return
        _, next_offset, end_pos, active, check, _s, rbase, rpos, roff, boot, _li = head
        if boot != BOOT_ID or check != _check(next_offset, end_pos, active):
            self._recover(rbase, rpos, roff)  # rebooted, or a writer died mid-publish
            return
        path = self._path(active)
        if os.path.getsize(path) > end_pos:
            os.truncate(path, end_pos)  # bytes of a writer that died before publishing
        self._remove_torn_rolls(active)

    def _remove_torn_rolls(self, active: int) -> None:
        """Under the lock: delete segment files past the active one, left by a writer
        that died inside a roll before publishing it (they hold no records)."""
        for seg in self._list_segments():
            if seg > active:
                os.unlink(self._path(seg))
                self._segments.remove(seg)

    def _recover(self, base: int, pos: int, offset: int) -> None:
        """Re-scan from a known-good point to the end; truncate at the first bad batch."""
        self._list_segments()
        if not self._segments:
            open(self._path(0), "ab").close()
            self._segments = [0]
        if base not in self._segments:
            base, pos, offset = self._segments[0], 0, self._segments[0]
        last = self._segments[-1]
        for seg in self._segments[self._segments.index(base) :]:
            if seg != base:
                pos, offset = 0, seg
            path = self._path(seg)
            with open(path, "rb") as f:
                data = f.read()
            end = len(data)
            while pos < end:
                try:
                    b, count, size = check_batch(data, pos, end)
                except BadBatch:
                    break
                if b != offset:
                    break
                offset, pos = b + count, pos + size
            if pos < end:
                os.truncate(path, pos)
            if seg != last and pos == 0 and seg != self._segments[0]:
                os.unlink(path)  # an empty sealed segment after a torn roll
        self._segments = sorted(set(self._segments) & set(self._list_existing()))
        last = self._segments[-1]
        end_pos = os.path.getsize(self._path(last))
        self._rebuild_index(last, end_pos)
        _HEAD.pack_into(
            self._mm,
            0,
            _HEAD_MAGIC,
            offset,
            end_pos,
            last,
            _check(offset, end_pos, last),
            self._segments[0],
            last,
            end_pos,
            offset,
            BOOT_ID,
            end_pos - end_pos % INDEX_INTERVAL,
        )

    def recover(self) -> int:
        """Re-validate the whole partition as after a reboot; return the records kept.

        Intended for tools and benchmarks; opening already recovers as needed.
        """
        with self._locked():
            self._list_segments()
            first = self._segments[0] if self._segments else 0
            self._recover(first, 0, first)
            return self.end_offset - self.start_offset

    def _rebuild_index(self, base: int, end_pos: int) -> None:
        path = self._path(base)
        entries: list[bytes] = []
        with open(path, "rb") as f:
            data = f.read(end_pos)
        pos = last = 0
        while pos < end_pos:
            try:
                b, _count, size = check_batch(data, pos, end_pos)
            except BadBatch:
                break  # rotten below the recovery point: reads will report it
            if pos == 0 or pos - last >= INDEX_INTERVAL:
                entries.append(_IDX.pack(b - base, pos))
                last = pos
            pos += size
        with open(self._path(base, ".idx"), "wb") as f:
            f.write(b"".join(entries))
        self._index_cache.pop(base, None)

    def _list_existing(self) -> list[int]:
        return sorted(int(n[:-4]) for n in os.listdir(self.dir) if n.endswith(".log"))

    def _list_segments(self) -> list[int]:
        self._segments = self._list_existing()
        return self._segments

    # -- append ---------------------------------------------------------------------

    def append(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        not_before_ms: int = 0,
    ) -> int:
        """Append one record; return its offset."""
        ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
        with self._tlock:
            if self.closed:
                raise ClosedError(f"partition {self.dir} is closed; open the log again")
            fd = self._head_fd
            _flock(fd, _LOCK_EX)
            try:
                next_offset, end_pos, active = self._state()
                batch = encode_one(next_offset, value, key, headers, ts, not_before_ms)
                self._write(batch, next_offset, 1, end_pos, active)
            finally:
                _flock(fd, _LOCK_UN)
        return next_offset

    def append_batch(
        self,
        values: Sequence[bytes | None],
        *,
        keys: Sequence[bytes | None] | None = None,
        headers: Sequence[Headers | None] | None = None,
        timestamp_ms: int | Sequence[int] | None = None,
        not_before_ms: Sequence[int] | None = None,
    ) -> int:
        """Append records as one batch (one CRC, one write); return the first offset.

        ``keys``, ``headers`` and ``not_before_ms`` are per-record sequences as
        long as ``values``, or None. All or nothing: a batch is never half-stored.
        """
        n = len(values)
        if n == 0:
            return self.end_offset
        for seq in (keys, headers, not_before_ms):
            if seq is not None and len(seq) != n:
                raise ConfigurationError(
                    f"append_batch got {n} values but {len(seq)} keys/headers/not_before_ms"
                )
        if timestamp_ms is None:
            timestamp_ms = time.time_ns() // 1_000_000
        elif not isinstance(timestamp_ms, int) and len(timestamp_ms) != n:
            raise ConfigurationError(
                f"append_batch got {n} values but {len(timestamp_ms)} timestamps"
            )
        with self._tlock:
            if self.closed:
                raise ClosedError(f"partition {self.dir} is closed; open the log again")
            fd = self._head_fd
            _flock(fd, _LOCK_EX)
            try:
                next_offset, end_pos, active = self._state()
                batch = encode_batch(
                    next_offset, values, keys, headers, timestamp_ms, not_before_ms
                )
                self._write(batch, next_offset, n, end_pos, active)
            finally:
                _flock(fd, _LOCK_UN)
        return next_offset

    def exclusive(self) -> _Exclusive:
        """Hold the write lock (no process appends meanwhile); ``with`` it gives the end
        offset. Inside, :meth:`append_encoded` and :meth:`batch_at` may be called; plain
        appends from this thread would deadlock. Raises ClosedError."""
        return _Exclusive(self)

    def append_encoded(self, batch: bytes) -> None:
        """Inside :meth:`exclusive`: append a batch encoded for the end offset.

        Visible to every process on return (fsync'd under ``fsync="always"``).
        """
        next_offset, end_pos, active = self._state()
        base, count = batch_base_count(batch)
        if base != next_offset:
            raise ValueError(f"batch encoded for offset {base}, but the end is {next_offset}")
        self._write(batch, next_offset, count, end_pos, active)

    def batch_at(self, offset: int) -> bytes | None:
        """The stored bytes of the batch whose first record is at ``offset``, or None
        (no batch starts there, or it was deleted or compacted away)."""
        with self._rlock:
            self._check_read_fds()
            return self._batch_at(offset)

    def _batch_at(self, offset: int) -> bytes | None:
        if not self.start_offset <= offset < self.end_offset:
            return None
        base = self._segment_for(offset)
        try:
            fd = self._read_fd(base)
        except FileNotFoundError:
            return None
        limit = self._get(_END) if base == self._get(_ACTIVE) else os.fstat(fd).st_size
        pos = self._position(base, offset, fd)
        while pos + HEADER_SIZE <= limit:
            length, _crc, magic, _attrs, _r, first, count, _ts = HEADER.unpack(
                os.pread(fd, HEADER_SIZE, pos)
            )
            if magic != MAGIC or first > offset:
                return None
            if first == offset:
                data = os.pread(fd, length + 4, pos)
                return data if len(data) == length + 4 else None
            if first + count > offset:
                return None  # inside a batch
            pos += length + 4
        return None

    def _state(self) -> tuple[int, int, int]:
        """Under the lock: the published (next_offset, end_pos, active_base), repaired if torn."""
        next_offset, end_pos, active, check = _STATE.unpack_from(self._mm, 8)
        if check != (next_offset ^ (end_pos << 1) ^ (active << 2) ^ _HEAD_MAGIC) & _MASK:
            self._recover(*_RECOVERY.unpack_from(self._mm, _RECOVERY_AT))  # died mid-publish
            next_offset, end_pos, active, _ = _STATE.unpack_from(self._mm, 8)
        return next_offset, end_pos, active

    def _write(self, batch: bytes, next_offset: int, n: int, end_pos: int, active: int) -> None:
        """Under the lock: write a batch at the end, roll first if the segment is full."""
        size = len(batch)
        if size > MAX_BATCH_BYTES:
            raise MessageTooLarge(
                f"batch of {size} bytes exceeds the {MAX_BATCH_BYTES}-byte limit; "
                "split it into smaller batches"
            )
        if end_pos and end_pos + size > self.config.segment_bytes:
            active, end_pos = self._roll(next_offset, end_pos, active), 0
        if self._wbase != active:
            if self._wfd >= 0:
                os.close(self._wfd)
            self._wfd = os.open(self._path(active), os.O_WRONLY | os.O_CREAT, 0o644)
            self._wbase = active
        if os.pwrite(self._wfd, batch, end_pos) != size:
            raise OSError(f"short write to {self._path(active)} at byte {end_pos}")
        new_end, new_next = end_pos + size, next_offset + n
        always = self.config.fsync == "always"
        if always:
            os.fdatasync(self._wfd)
        mm = self._mm
        check = (new_next ^ (new_end << 1) ^ (active << 2) ^ _HEAD_MAGIC) & _MASK
        os.pwrite(self._head_fd, _STATE.pack(new_next, new_end, active, check), 8)  # see _publish
        if always:
            _RECOVERY.pack_into(mm, _RECOVERY_AT, active, new_end, new_next)
        else:
            self.dirty = True
        if end_pos - _U64.unpack_from(mm, 8 * _LAST_INDEX)[0] >= INDEX_INTERVAL or end_pos == 0:
            self._add_index(active, next_offset - active, end_pos)
            _U64.pack_into(mm, 8 * _LAST_INDEX, end_pos)

    def _add_index(self, base: int, relative: int, pos: int) -> None:
        if self._ibase != base:
            if self._ifd >= 0:
                os.close(self._ifd)
                self._ifd = -1
            self._ifd = os.open(
                self._path(base, ".idx"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )
            self._ibase = base
        os.write(self._ifd, _IDX.pack(relative, pos))

    def _roll(self, next_offset: int, end_pos: int, active: int) -> int:
        """Under the lock: seal the active segment and start a new one at ``next_offset``."""
        if self._wbase != active:
            if self._wfd >= 0:
                os.close(self._wfd)
            self._wfd = os.open(self._path(active), os.O_WRONLY | os.O_CREAT, 0o644)
            self._wbase = active
        os.ftruncate(self._wfd, end_pos)
        if self.config.fsync != "never":
            os.fdatasync(self._wfd)
        self._remove_torn_rolls(active)
        fd = os.open(self._path(next_offset), os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(self._wfd)
        self._wfd, self._wbase = fd, next_offset
        self._publish(next_offset, 0, next_offset)
        self._set(_LAST_INDEX, 0)
        if self.config.fsync != "never":
            _RECOVERY.pack_into(self._mm, _RECOVERY_AT, next_offset, 0, next_offset)
        self._enforce_retention()
        if self.config.compact:
            self._start_compaction()
        return next_offset

    def flush(self) -> None:
        """fsync what this process wrote and advance the recovery point."""
        with self._tlock:
            if self._wfd < 0 or self.closed:
                return
            self.dirty = False
            next_offset, end_pos, active, check = _STATE.unpack_from(self._mm, 8)
            os.fdatasync(self._wfd)
            if active != self._wbase or check != _check(next_offset, end_pos, active):
                return  # rolled (the roll fsynced) or torn: the next flush moves the point
            _flock(self._head_fd, _LOCK_EX)
            try:
                rbase, rpos, _ = _RECOVERY.unpack_from(self._mm, _RECOVERY_AT)
                if (rbase, rpos) < (active, end_pos):  # never move it backwards
                    _RECOVERY.pack_into(self._mm, _RECOVERY_AT, active, end_pos, next_offset)
            finally:
                _flock(self._head_fd, _LOCK_UN)

    # -- retention and compaction -------------------------------------------------

    def _enforce_retention(self) -> None:
        """Under the lock: delete the oldest sealed segments past the age or size limit."""
        cfg = self.config
        if cfg.retention_ms is None and cfg.retention_bytes is None:
            return
        segs = self._list_segments()
        sealed = segs[:-1]
        sizes = {s: os.path.getsize(self._path(s)) for s in segs}
        total = sum(sizes.values())
        now = time.time()
        doomed: list[int] = []
        for s in sealed:
            too_old = (
                cfg.retention_ms is not None
                and os.path.getmtime(self._path(s)) < now - cfg.retention_ms / 1000
            )
            too_big = cfg.retention_bytes is not None and total - sizes[s] >= cfg.retention_bytes
            if not (too_old or too_big):
                break
            doomed.append(s)
            total -= sizes[s]
        if not doomed:
            return
        self._set(_START, segs[len(doomed)])
        for s in doomed:
            self._unlink_segment(s)
        self._set(_SEALED_CHANGES, self._get(_SEALED_CHANGES) + 1)
        self._list_segments()

    def _unlink_segment(self, seg: int) -> None:
        for suffix in (".log", ".idx"):
            try:
                os.unlink(self._path(seg, suffix))
            except FileNotFoundError:
                pass
        self._index_cache.pop(seg, None)

    def enforce_retention(self) -> None:
        """Apply the age and size limits now (also done at every segment roll)."""
        with self._locked():
            self._enforce_retention()

    def compact(self) -> int:
        """Keep only the newest record per key in sealed segments; return records removed.

        Runs in a background thread after every roll of a ``compact=True``
        topic, so the append that fills a segment does not wait for it; this
        call compacts now (waiting for a compaction another thread or process
        is running). Offsets are kept, so compacted segments have gaps.
        Records without a key and the active segment are left alone. A
        tombstone (value None) stays while newer than ``delete_retention_ms``
        (24 h), so that readers see the deletion, then goes too.
        """
        return self._compact(wait=True)

    def _start_compaction(self) -> None:
        """Under the lock, at a roll: compact in a background thread (one at a time)."""
        running = self._compactor
        if running is not None and running.is_alive():
            self._compaction_due = True  # it goes round once more
            return
        self._compaction_due = False
        self._compactor = threading.Thread(
            target=self._compact_in_background, name="polybus-compact", daemon=True
        )
        self._compactor.start()

    def _compact_in_background(self) -> None:
        while not self.closed:
            try:
                self._compact(wait=False)
            except (OSError, ValueError, PolybusError) as exc:
                if not self.closed:  # the next roll tries again
                    log.warning("compaction of %s failed: %s", self.dir, exc)
                return
            if not self._compaction_due:
                return
            self._compaction_due = False

    def _compact(self, *, wait: bool) -> int:
        """Compact holding ``compact.lock`` (not the write lock: appends go on meanwhile).

        Without ``wait``, return 0 at once when another process holds it.
        """
        fd = os.open(os.path.join(self.dir, "compact.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                return 0
            return self._compact_sealed()
        finally:
            os.close(fd)  # releases the flock

    def _compact_sealed(self) -> int:
        """One pass over the keys of every segment finds each key's newest offset; a
        sealed segment holding an older one is rewritten, its batches that keep every
        record copied byte for byte.

        Only records that survive a power loss count as newer: the active segment
        is read to the recovery point (to the published end under
        ``fsync="never"``), so compaction never drops a record for one that a
        reboot could take away. Records appended meanwhile are newer still: not
        seeing them only keeps a few stale records for the next compaction.
        """
        for leftover in os.listdir(self.dir):  # of a compaction killed midway
            if leftover.endswith((".log.tmp", ".idx.tmp")):
                os.unlink(os.path.join(self.dir, leftover))
        with self._locked():
            _next, end_pos, active = self._state()
            rbase, rpos, _ = _RECOVERY.unpack_from(self._mm, _RECOVERY_AT)
        if self.config.fsync != "never":
            end_pos = min(end_pos, rpos) if rbase == active else 0
        latest: dict[bytes, int] = {}
        sealed: list[tuple[int, bytes, list[KeyedBatch]]] = []
        for seg in self._list_existing():
            if seg > active:
                break  # a torn roll's leftover
            try:
                with open(self._path(seg), "rb") as f:
                    data = f.read()
            except FileNotFoundError:  # deleted by retention meanwhile
                continue
            batches = self._keys_of(seg, data, end_pos if seg == active else len(data))
            for _pos, _size, base, keys, _tombstones, _ts in batches:
                if len(keys) == 1:
                    if keys[0] is not None:
                        latest[keys[0]] = base
                else:
                    for i, key in enumerate(keys):
                        if key is not None:
                            latest[key] = base + i
            if seg != active:
                sealed.append((seg, data, batches))
        removed = 0
        forgotten = time.time_ns() // 1_000_000 - self.config.delete_retention_ms
        for seg, data, batches in sealed:
            if self.closed:
                break
            chunks: list[tuple[int, bytes]] = []  # (first offset, batch)
            dropped = 0
            for pos, size, base, keys, tombstones, ts in batches:
                old = tombstones if tombstones is not None and ts < forgotten else None
                stale = [
                    i
                    for i, key in enumerate(keys)
                    if key is not None and (latest[key] != base + i or (old is not None and old[i]))
                ]
                if not stale:
                    chunks.append((base, data[pos : pos + size]))
                    continue
                dropped += len(stale)
                if len(stale) < len(keys):
                    records = decode_batch(data, pos, self.index)
                    for i in reversed(stale):
                        del records[i]
                    chunks.extend(_encode_runs(records))
            if dropped and self._rewrite(seg, chunks):
                removed += dropped
        return removed

    def _keys_of(self, seg: int, data: bytes, limit: int) -> list[KeyedBatch]:
        out: list[KeyedBatch] = []
        pos = 0
        while pos < limit:
            try:
                pos = scan_keys(data, pos, limit, out)
            except BadBatch as exc:
                bad = exc.args[1]
                pos = bad + self._skip(data, bad, seg, str(exc.args[0]), bad)
        return out

    def _rewrite(self, seg: int, chunks: list[tuple[int, bytes]]) -> bool:
        """Make ``chunks`` (first offset, batch) the content of sealed segment ``seg``:
        files written and synced aside, then swapped in under the write lock, unless
        retention deleted the segment meanwhile (False then). A segment left with
        nothing is deleted (but the first: it marks where the log starts)."""
        index: list[bytes] = []
        pos = last = 0
        for base, batch in chunks:
            if pos == 0 or pos - last >= INDEX_INTERVAL:
                index.append(_IDX.pack(base - seg, pos))
                last = pos
            pos += len(batch)
        tmp_log, tmp_idx = self._path(seg, ".log.tmp"), self._path(seg, ".idx.tmp")
        with open(tmp_log, "wb") as f:
            f.write(b"".join(batch for _, batch in chunks))
            f.flush()
            os.fsync(f.fileno())
        with open(tmp_idx, "wb") as f:
            f.write(b"".join(index))
        try:
            with self._locked():
                segs = self._list_segments()
                if seg not in segs:
                    return False
                if chunks or seg == segs[0]:
                    # a reader that has the old file open goes on reading it whole
                    os.replace(tmp_idx, self._path(seg, ".idx"))
                    os.replace(tmp_log, self._path(seg))
                    self._index_cache.pop(seg, None)
                else:  # readers skip the gap, as after a torn roll
                    self._unlink_segment(seg)
                    self._list_segments()
                self._set(_SEALED_CHANGES, self._get(_SEALED_CHANGES) + 1)
                return True
        finally:
            self._discard(tmp_log, tmp_idx)  # there unless swapped in

    @staticmethod
    def _discard(*paths: str) -> None:
        for path in paths:
            if os.path.exists(path):
                os.unlink(path)

    # -- read -------------------------------------------------------------------------

    @staticmethod
    def _cut(data: bytes, pos: int, available: int) -> bool:
        """Whether the batch at ``pos`` runs past the end of ``data`` but not of the segment."""
        if pos + 4 > len(data):
            return True
        end: int = pos + _U32.unpack_from(data, pos)[0] + 4
        return len(data) < end <= available

    def _skip(self, data: bytes, pos: int, seg: int, reason: str, file_pos: int) -> int:
        """A damaged batch at ``data[pos]`` (byte ``file_pos`` of segment ``seg``): raise
        CorruptRecordError, or with ``skip_corrupt`` return the distance to the next
        valid batch."""
        path = self._path(seg)
        if not self.config.skip_corrupt:
            raise CorruptRecordError(
                f"damaged record batch in {path} at byte {file_pos}: {reason}; "
                "open the log with skip_corrupt=True to skip past it",
                path=path,
                position=file_pos,
            )
        nxt = pos + 1
        while nxt < len(data):
            try:
                check_batch(data, nxt, len(data))
                break
            except BadBatch:
                nxt += 1
        return nxt - pos

    def _segment_for(self, offset: int) -> int:
        active = self._get(_ACTIVE)
        segs = self._segments
        if not segs or segs[-1] < active:
            segs = self._list_segments()
        # min(): a file past the active segment is an empty leftover of a torn roll
        i = bisect.bisect_right(segs, min(offset, active)) - 1
        return segs[max(i, 0)]

    def _check_read_fds(self) -> None:
        """Under the read lock: close the read fds if sealed segments changed since."""
        changes = self._get(_SEALED_CHANGES)
        if changes != self._sealed_seen:
            self._sealed_seen = changes
            for fd in self._rfds.values():
                os.close(fd)
            self._rfds.clear()
            self._index_cache.clear()
            self._cursor = (-1, -1, -1)
            self._list_segments()

    def _read_fd(self, base: int) -> int:
        fd = self._rfds.get(base)
        if fd is None:
            fd = os.open(self._path(base), os.O_RDONLY)
            self._rfds[base] = fd
        return fd

    def _position(self, base: int, offset: int, fd: int) -> int:
        """Byte position of the batch holding ``offset`` or one before it, per the index.

        An entry is trusted only if the batch header it points at agrees with
        it, so a damaged index costs a longer scan, never a wrong read.
        """
        seg_base, next_offset, pos = self._cursor
        if seg_base == base and next_offset == offset:
            return pos
        entries = self._index_cache.get(base)
        if entries is None or base == self._get(_ACTIVE):
            try:
                with open(self._path(base, ".idx"), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                raw = b""
            entries = list(_IDX.iter_unpack(raw[: len(raw) - len(raw) % 8]))
            if base != self._get(_ACTIVE):
                self._index_cache[base] = entries
        i = bisect.bisect_right(entries, (offset - base, 1 << 40)) - 1
        while i >= 0:
            relative, pos = entries[i]
            head = os.pread(fd, HEADER_SIZE, pos)
            if (
                len(head) == HEADER_SIZE
                and HEADER.unpack_from(head)[2] == MAGIC
                and HEADER.unpack_from(head)[5] == base + relative <= offset
            ):
                return pos
            i -= 1
        return 0

    def read(self, offset: int, max_records: int = 1000, max_bytes: int = 1 << 20) -> list[Record]:
        """Return up to ``max_records`` records from ``offset`` on; [] at the end.

        Offsets below ``start_offset`` (deleted by retention) read from the
        start. Raises CorruptRecordError for a damaged batch unless the log was
        opened with ``skip_corrupt=True``.
        """
        with self._rlock:
            if self.closed:
                raise ClosedError(f"partition {self.dir} is closed; open the log again")
            self._check_read_fds()
            return self._read(offset, max_records, max_bytes)

    def _read(self, offset: int, max_records: int, max_bytes: int) -> list[Record]:
        out: list[Record] = []
        offset = max(offset, self.start_offset)
        while len(out) < max_records:
            base = self._segment_for(offset)
            active = self._get(_ACTIVE)
            try:
                fd = self._read_fd(base)
            except FileNotFoundError:  # deleted by retention in another process
                self._list_segments()
                offset = max(offset, self.start_offset)
                continue
            limit = self._get(_END) if base == active else os.fstat(fd).st_size
            pos = self._position(base, offset, fd)
            if pos >= limit:
                if base == active or base == self._segments[-1]:
                    break
                nxt = self._segments[self._segments.index(base) + 1]
                offset = max(offset, nxt)
                continue
            data = os.pread(fd, min(max_bytes, limit - pos), pos)
            if len(data) >= 4:
                need = _U32.unpack_from(data)[0] + 4
                if need > len(data) and pos + need <= limit:
                    data = os.pread(fd, need, pos)  # one batch larger than the chunk
            p = 0
            while True:
                try:
                    p = decode_batches(
                        data, p, len(data), self.index, offset, max_records - len(out), out
                    )
                    break
                except BadBatch as exc:
                    bad = exc.args[1]
                    if len(data) < limit - pos:
                        if self._cut(data, bad, limit - pos):
                            p = bad  # the chunk ended inside this batch: read on from it
                            break
                        if self.config.skip_corrupt:  # look for the next batch in all that is left
                            pos, p = pos + bad, 0
                            data = os.pread(fd, limit - pos, pos)
                            continue
                    p = bad + self._skip(data, bad, base, str(exc.args[0]), pos + bad)
            if out:
                offset = out[-1].offset + 1
            self._cursor = (base, offset, pos + p)
            if base == active and pos + p >= limit:
                break
        return out

    def offset_for_time(self, timestamp_ms: int) -> int:
        """The first offset whose record timestamp is ≥ ``timestamp_ms`` (end if none)."""
        for rec in self._scan_from(self.start_offset):
            if rec.timestamp_ms >= timestamp_ms:
                return rec.offset
        return self.end_offset

    def _scan_from(self, offset: int) -> Iterator[Record]:
        while True:
            batch = self.read(offset, 10_000, 8 << 20)
            if not batch:
                return
            yield from batch
            offset = batch[-1].offset + 1

    def close(self) -> None:
        """Flush (unless ``fsync="never"``) and release files; idempotent."""
        if self.closed:
            return
        if self.dirty and self.config.fsync != "never":
            self.flush()
        compactor = self._compactor
        with self._tlock:
            self._close_files()
        if compactor is not None:
            compactor.join()  # it stops at the next segment, before writing one

    def _close_files(self) -> None:
        self.closed = True
        with self._rlock:
            for fd in self._rfds.values():
                os.close(fd)
            self._rfds.clear()
        for fd in (self._wfd, self._ifd):
            if fd >= 0:
                os.close(fd)
        self._wfd = self._ifd = -1
        self._mm.close()
        os.close(self._head_fd)


class _Exclusive:
    """:meth:`Partition.exclusive`'s context manager: a class, not a generator, as every
    save of the native session store enters one (2.2 -> 1.3 µs, side by side)."""

    __slots__ = ("_fd", "_partition")

    def __init__(self, partition: Partition) -> None:
        self._partition = partition
        self._fd = -1

    def __enter__(self) -> int:
        partition = self._partition
        partition._tlock.acquire()
        try:
            if partition.closed:
                raise ClosedError(f"partition {partition.dir} is closed; open the log again")
            self._fd = partition._head_fd
            _flock(self._fd, _LOCK_EX)
        except BaseException:
            partition._tlock.release()
            raise
        try:
            return partition._state()[0]
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            _flock(self._fd, _LOCK_UN)
        finally:
            self._partition._tlock.release()
