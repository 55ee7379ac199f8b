"""Sessions on the native engine: ``native:///path`` (a log directory), ``memory://`` is not it.

Every save appends the whole record to one partition of a compacted topic
(``sessions`` unless ``topic=`` says otherwise), keyed by session id; a
delete appends a tombstone. Each store object keeps a view of the live
sessions in memory, built from the log when it opens (so sessions survive a
restart, a crash included: what a save returned for is kept under the log's
fsync policy) and brought up to date from the log before each operation, so
the processes of one host sharing the directory read each other's writes at
once.

Compare-and-set across processes: a save holds the partition's write lock
(:meth:`~polybus.log.partition.Partition.exclusive`, the lock every append
takes), catches its view up, compares the version and appends under it, so
between its check and its write no other process can append. Expired
sessions are never returned; every ``sweep_interval`` seconds a save also
writes their tombstones, so that compaction (after each segment roll)
reclaims them, and the tombstones themselves after a day. A session id
is never reused, and a late save of a forgotten one conflicts (its version
follows one the store no longer holds), so nothing comes back.

URL options: the engine's ``fsync`` and ``fsync_interval``, plus ``codec``,
``topic`` and ``sweep_interval``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, cast

from ...adapters._support.native import log_options, open_log
from ...errors import ClosedError, DecodeError, PolybusError
from ...log import Log, Record, encode_batch, encode_one
from ..base import CODECS, RecordCodec, SessionConflict, SessionRecord, SessionStoreUnavailable
from . import check_codec
from ._view import View, item_of, record_of, records_of

__all__ = ["NativeStore", "from_bus", "from_url"]

_SEGMENT_BYTES = 16 << 20  # small enough that rolls (and so compaction) happen


class NativeStore:
    """A :class:`~polybus.sessions.base.SessionStore` on a native log; see the module
    docstring. ``log`` stays open after :meth:`close` unless ``owns_log``."""

    linearizable: ClassVar[bool] = True

    def __init__(
        self,
        log: Log,
        *,
        topic: str = "sessions",
        codec: str = "json",
        sweep_interval: float = 60.0,
        owns_log: bool = False,
    ) -> None:
        self.codec: RecordCodec = CODECS[check_codec(codec)]
        self._log = log
        self._owns_log = owns_log
        self._partition = log.create_topic(
            topic, 1, segment_bytes=_SEGMENT_BYTES, compact=True
        ).partitions[0]
        self._lock = threading.Lock()  # the view's; taken before the partition's
        self._view = View()
        self._next = 0  # the next offset to apply
        self._sweep_interval = sweep_interval
        self._next_sweep = time.time() + sweep_interval
        self._closed = False
        with self._lock:
            self._catch_up()

    # -- the view ----------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Under the view's lock: apply every record appended since the last call."""
        p = self._partition
        while self._next < p.end_offset:
            records = p.read(self._next, 10_000, 8 << 20)
            if not records:
                break
            for r in records:
                self._apply(r)
            self._next = records[-1].offset + 1

    def _apply(self, r: Record) -> None:
        sid = cast(bytes, r.key).decode()
        if r.payload is None:
            self._view.drop(sid)
            return
        try:
            rec = self.codec.decode(r.payload)
        except DecodeError:
            self._view.drop(sid)  # a damaged record reads as absent
            return
        if rec.id != sid:  # not written by a session store: a record of another id
            self._view.drop(sid)
            return
        self._view.put(sid, item_of(rec, r.payload, self.codec.data_start(r.payload, rec)))

    # -- writing under the partition's write lock -------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the view's lock and the partition's write lock, with the view caught up."""
        with self._lock:
            if self._closed:
                raise ClosedError("session store is closed; open it again")
            try:
                with self._partition.exclusive() as end:
                    if self._next != end:
                        self._catch_up()
                    yield
            except (OSError, ValueError, PolybusError) as exc:  # disk full, directory gone
                raise _unavailable(self, exc) from exc

    def _tombstones(self, ids: list[str]) -> None:
        """Inside :meth:`_writing`: append tombstones for ``ids``, drop them from the view."""
        if not ids:
            return
        now_ms = time.time_ns() // 1_000_000
        keys = [i.encode() for i in ids]
        self._partition.append_encoded(
            encode_batch(self._next, [None] * len(ids), keys, None, now_ms, None)
        )
        self._next += len(ids)
        for sid in ids:
            self._view.drop(sid)

    # -- the protocol ------------------------------------------------------------------

    def load(self, session_id: str) -> SessionRecord | None:
        if self._next != self._partition.end_offset:
            try:
                with self._lock:
                    self._catch_up()
            except (OSError, ValueError, PolybusError) as exc:
                raise _unavailable(self, exc) from exc
        item = self._view.live(session_id, time.time())
        return None if item is None else record_of(self.codec, item)

    def save(self, record: SessionRecord) -> None:
        payload, start = self.codec.encode_split(record)
        now_ns = time.time_ns()
        now = now_ns / 1e9
        expected = record.version - 1
        p = self._partition
        # the path of every save, so written out rather than through _writing
        with self._lock:
            if self._closed:
                raise ClosedError("session store is closed; open it again")
            try:
                with p.exclusive() as end:
                    if self._next != end:
                        self._catch_up()
                    item = self._view.live(record.id, now)
                    current = 0 if item is None else item.version
                    if current == expected:
                        key = record.id.encode()
                        p.append_encoded(encode_one(end, payload, key, None, now_ns // 10**6, 0))
                        self._next = end + 1
                        new = item_of(record, payload, start)
                        if item is None:
                            self._view.put(record.id, new)
                        else:  # same id, same user: the index stays as it is
                            self._view.items[record.id] = new
                        if now >= self._next_sweep:
                            self._next_sweep = now + self._sweep_interval
                            self._tombstones(self._view.expired(now))
            except (OSError, ValueError, PolybusError) as exc:  # disk full, directory gone
                raise _unavailable(self, exc) from exc
        if current != expected:
            raise SessionConflict.stale(record.id, expected=expected, current=current)

    def delete(self, session_id: str) -> bool:
        with self._writing():
            if session_id not in self._view.items:
                return False
            live = self._view.live(session_id, time.time()) is not None
            self._tombstones([session_id])
            return live

    def user_tag(self, user_id: str) -> None:
        return None  # the ids need no tag here

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        try:
            with self._lock:
                self._catch_up()
                items = self._view.live_of(user_id, time.time())
        except (OSError, ValueError, PolybusError) as exc:
            raise _unavailable(self, exc) from exc
        return records_of(self.codec, items)

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        now = time.time()
        with self._writing():
            ids = [sid for sid in self._view.user_ids(user_id) if sid != keep]
            live = sum(self._view.live(sid, now) is not None for sid in ids)
            self._tombstones(ids)
            return live

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._owns_log:
            self._log.close()


def _unavailable(store: NativeStore, exc: BaseException) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(
        f"native session store at {store._partition.dir} failed: {type(exc).__name__}: {exc}"
    )


def from_url(url: str, **options: Any) -> NativeStore:
    """``native:///path[?fsync=always|interval|never&codec=...&topic=...]``."""
    parsed = log_options(url, {"codec", "topic", "sweep_interval"})
    given: dict[str, Any] = {
        name: parsed.text(name, "") for name in ("codec", "topic") if parsed.given(name)
    }
    if parsed.given("sweep_interval"):
        given["sweep_interval"] = parsed.seconds("sweep_interval", 1.0)
    log, release = open_log(parsed)
    try:
        return NativeStore(log, owns_log=True, **{**given, **options})
    except BaseException:
        release()
        raise


def from_bus(bus: Any, **options: Any) -> NativeStore:
    """A store on the log of a :class:`polybus.Bus` opened on ``native://``."""
    return NativeStore(bus.backend.log, **options)
