"""Sessions on Kafka: a compacted topic, and a view of it that every instance keeps current.

``kafka://host:port[,host:port]`` with options ``topic`` (default
``polybus.sessions``), ``codec``, ``write_timeout`` (seconds a save waits to
see its own record, default 10) and the Kafka adapter's own options; unless
the URL sets them, ``reconnect_timeout=5``, ``fetch.wait.max.ms=10`` and
``linger.ms=0`` keep a save to milliseconds.

Each save appends the whole record, keyed by session id, to the topic's one
partition (one partition keeps one order for everything); a delete appends an
empty value. Every instance reads the topic from the start, without a
consumer group, into a view in memory, and goes on reading it: a load is a
lookup in that view, so an instance reads its own writes at once and other
instances' writes as soon as they arrive (milliseconds).

Compare-and-set is decided by the log's order, the same way on every
instance: a record is applied only if it is version ``n + 1`` of a session
the view holds at ``n`` (or the first record of an id never seen), so of two
saves made from the same version only the first in the log counts. A save
returns once its instance has read its own record and knows which it was;
the loser gets SessionConflict and appends the winner's record again, so
that compaction (which keeps the last record per key) keeps the winner. A
delete first reads the topic to its current end (through a marker record of
its own), so it also ends sessions other instances saved a moment before.

Expired sessions are never returned. Every ``sweep_interval`` seconds an
instance forgets them and appends a deletion for those it wrote last (and
for any nobody deleted within an hour of expiry), so compaction shrinks them
to a small deletion record.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from ...bus import Bus, Subscriber
from ...errors import ClosedError, DecodeError, PolybusError
from ...message import Delivery, Message
from ..base import CODECS, RecordCodec, SessionConflict, SessionRecord, SessionStoreUnavailable
from . import bus_store_from_url, check_codec
from ._view import View, item_of, record_of, records_of

__all__ = ["KafkaStore", "from_bus", "from_url"]

log = logging.getLogger("polybus.sessions")

MARKER = "polybus:marker"  #: key of the records an instance appends to learn it has caught up
ORIGIN = "session-origin"  #: header naming the instance that wrote a record
WRITE = "session-write"  #: header with a unique id per write, by which its writer finds it
_DELETED = b""
_TOMBSTONE_KEEP = 24 * 3600.0  # how long a deleted id is remembered, so late saves stay refused


class KafkaStore:
    """A :class:`~polybus.sessions.base.SessionStore` on a Kafka topic; see the module
    docstring. Opening blocks until the view holds the whole topic."""

    linearizable: ClassVar[bool] = True

    def __init__(
        self,
        bus: Bus,
        *,
        topic: str = "polybus.sessions",
        codec: str = "json",
        write_timeout: float = 10.0,
        sweep_interval: float = 60.0,
        owns_bus: bool = False,
    ) -> None:
        self.codec: RecordCodec = CODECS[check_codec(codec)]
        self.topic = topic
        self._bus = bus
        self._owns_bus = owns_bus
        self._write_timeout = write_timeout
        self._sweep_interval = sweep_interval
        self._view = View()
        self._cond = threading.Condition()
        self._failure: PolybusError | None = None
        self.instance = uuid.uuid4().hex
        # Writes are found by an id of their own, not by the offset the broker reports
        # for them: the log's order decides, whatever a broker says about offsets.
        self._awaited: dict[str, bool | None] = {}  # write id -> accepted? once read back
        self._closed = False
        try:
            bus.declare(topic, partitions=1, compact=True)
            self._sub: Subscriber = bus.subscribe(topic, None, start="earliest")
        except PolybusError as exc:
            raise _unavailable(exc) from exc
        self._thread = threading.Thread(target=self._pump, name="polybus-sessions", daemon=True)
        self._thread.start()
        self._append(MARKER, uuid.uuid4().bytes)

    # -- the view ----------------------------------------------------------------------

    def _pump(self) -> None:
        sub = self._sub
        next_sweep = time.time() + self._sweep_interval
        while not self._closed:
            try:
                # fetch(1) returns as soon as a record is there; then take what is buffered
                batch = sub.fetch(1, 0.2)
                if batch:
                    batch += sub.fetch(1000, 0.0)
            except ClosedError:
                return
            except PolybusError as exc:
                with self._cond:
                    self._failure = exc
                    self._cond.notify_all()
                    self._cond.wait(0.2)  # back off; close() wakes it
                continue
            now = time.time()
            with self._cond:
                self._failure = None
                for d in batch:
                    accepted = self._apply(d)
                    write = d.message.headers.get(WRITE)
                    if write is not None and self._awaited.get(write, False) is None:
                        self._awaited[write] = accepted  # the first copy decides
                if batch:
                    self._cond.notify_all()
                doomed: list[str] = []
                if now >= next_sweep:
                    next_sweep = now + self._sweep_interval
                    doomed = self._sweep(now)
            sub.ack(batch)
            if doomed:
                try:
                    self._bus.publish_many(
                        self.topic, [Message(_DELETED, key=sid) for sid in doomed]
                    )
                except PolybusError as exc:  # the next sweep tries again
                    log.warning("could not delete expired sessions from %s: %s", self.topic, exc)

    def _sweep(self, now: float) -> list[str]:
        """Under the lock: forget what expired; return the expired sessions whose
        deletion this instance writes to the topic (so compaction can shrink them): those
        it wrote last, and those nobody deleted within an hour of their expiry."""
        doomed = []
        for sid in self._view.expired(now):
            item = self._view.items[sid]
            if item.payload and (item.extra == self.instance or now > item.expires_at + 3600):
                doomed.append(sid)  # dropped when its deletion is read back
            else:
                self._view.drop(sid)
        return doomed

    def _apply(self, d: Delivery) -> bool:
        """Under the condition's lock: apply one record by the compare-and-set rule;
        whether it counted (markers and deletions always do)."""
        message = d.message
        sid = message.key
        if not isinstance(sid, str) or sid == MARKER:
            return True
        view = self._view
        current = view.items.get(sid)
        payload = message.payload or _DELETED
        if payload == _DELETED:
            if current is not None and current.payload:
                keep = time.time() + _TOMBSTONE_KEEP
                view.put(sid, current._replace(payload=_DELETED, expires_at=keep))
            return True
        try:
            rec = self.codec.decode(payload)
        except DecodeError:
            log.warning(
                "undecodable session record at offset %s of %s skipped", d.offset, self.topic
            )
            return False
        accepted = rec.id == sid and (
            current is None or (bool(current.payload) and current.version == rec.version - 1)
        )
        if accepted:
            origin = message.headers.get(ORIGIN)
            view.put(sid, item_of(rec, payload, self.codec.data_start(payload, rec), origin))
        return accepted

    def _append(self, key: str, payload: bytes) -> bool:
        """Append one record and block until the view has read it back; whether it counted.
        SessionStoreUnavailable past the write timeout."""
        return self._append_all([(key, payload)])

    def _append_all(self, records: list[tuple[str, bytes]]) -> bool:
        """Append ``(key, payload)`` records in order and block until the view has read the
        last back (one partition: the others are read before it); whether that one counted."""
        write = uuid.uuid4().hex
        origin = {ORIGIN: self.instance}
        stamped = [Message(payload, key=key, headers=origin) for key, payload in records]
        stamped[-1].headers = {**origin, WRITE: write}
        deadline = time.monotonic() + self._write_timeout
        with self._cond:  # awaited before the publish: the pump may read it back first
            self._awaited[write] = None
        try:
            try:
                self._bus.publish_many(self.topic, stamped)
            except ClosedError:
                raise
            except PolybusError as exc:
                raise _unavailable(exc) from exc
            with self._cond:
                while (accepted := self._awaited[write]) is None:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closed:
                        cause = f": {self._failure}" if self._failure else ""
                        raise SessionStoreUnavailable(
                            f"Kafka session store: a write to {self.topic!r} was not read back "
                            f"within {self._write_timeout} s{cause}"
                        )
                    self._cond.wait(left)
                return accepted
        finally:
            with self._cond:
                del self._awaited[write]

    # -- the protocol ------------------------------------------------------------------

    def load(self, session_id: str) -> SessionRecord | None:
        item = self._view.live(session_id, time.time())
        return None if item is None else record_of(self.codec, item)

    def save(self, record: SessionRecord) -> None:
        payload = self.codec.encode(record)
        with self._cond:
            item = self._view.live(record.id, time.time())
        current = 0 if item is None else item.version
        if current != record.version - 1:  # refused before it costs a round trip
            raise SessionConflict.stale(record.id, expected=record.version - 1, current=current)
        if self._append(record.id, payload):
            return
        with self._cond:
            item = self._view.items.get(record.id)
        # another save of this version came first: put the winner last again for compaction
        if item is not None:
            self._append(record.id, item.payload)
        current = item.version if item is not None and item.payload else 0
        raise SessionConflict.stale(record.id, expected=record.version - 1, current=current)

    def delete(self, session_id: str) -> bool:
        return self._delete(lambda: [session_id]) > 0

    def _delete(self, ids_of: Callable[[], list[str]]) -> int:
        """Delete the live sessions among ``ids_of()``, asked under the view's lock once
        the view holds the whole topic as it is now: a session another instance saved a
        moment ago is found (and deleted) too."""
        self._append(MARKER, uuid.uuid4().bytes)
        now = time.time()
        with self._cond:
            known = [sid for sid in ids_of() if self._view.live(sid, now) is not None]
        if known:
            self._append_all([(sid, _DELETED) for sid in known])
        return len(known)

    def user_tag(self, user_id: str) -> None:
        return None  # the ids need no tag here

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        with self._cond:
            items = self._view.live_of(user_id, time.time())
        return records_of(self.codec, items)

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        return self._delete(lambda: [sid for sid in self._view.user_ids(user_id) if sid != keep])

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self._sub.close()
        if self._owns_bus:
            self._bus.close()


def _unavailable(exc: BaseException) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(f"Kafka session store unavailable: {exc}")


_OPTIONS = {"topic": str, "codec": str, "write_timeout": float, "sweep_interval": float}
# A session request cannot wait 30 s for a broker, nor a save half a second to read its
# own record back (brokers may hold a fetch for fetch.wait.max.ms even when data arrives).
_DEFAULTS = {"reconnect_timeout": "5", "fetch.wait.max.ms": "10", "linger.ms": "0"}


def from_url(url: str, **options: Any) -> KafkaStore:
    return bus_store_from_url(url, KafkaStore, _OPTIONS, _DEFAULTS, _unavailable, **options)


def from_bus(bus: Bus, **options: Any) -> KafkaStore:
    """A store on a :class:`polybus.Bus` opened on ``kafka://`` (left open by close)."""
    return KafkaStore(bus, **options)
