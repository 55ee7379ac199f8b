"""Sessions replicated through RabbitMQ: every instance keeps them all in memory.

``amqp://`` / ``amqps://`` with options ``topic`` (default ``polybus.sessions``),
``codec``, ``catch_up_timeout`` (seconds, default 10), ``retention`` (seconds
the history keeps changes, default 1 day: longer than any absolute timeout)
and the RabbitMQ adapter's own options (``history=false`` among them).

A save is checked (compare-and-set) and applied in the saving instance's
memory, then broadcast through the topic's fanout exchange as the change it
makes: the keys it set or removed, each with a stamp (wall clock in ns, then
the instance id). Every instance applies every change it receives: per key,
the value with the highest stamp wins; a delete is final. This converges to
the same sessions on every instance whatever order changes arrive in, and
two instances changing different keys of one session both keep their change.
Two instances changing the same key at the same time is settled by last
writer wins (by stamp) rather than a SessionConflict: compare-and-set holds
within an instance, not between them (``linearizable`` is False).

A new instance catches up by replaying the topic's history stream (RabbitMQ
3.9+ streams, the adapter's default), and otherwise (``history=false``) by
asking the running instances for a snapshot: each sends every session it
holds, with its stamps. Opening returns once caught up. After a lost
connection an instance catches up the same way (the adapter replays the
history; without one, the instance asks for snapshots again).

Reads are local: an instance reads its own writes at once, and others'
within milliseconds (the broadcast's latency).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, ClassVar

from ...bus import Bus, Subscriber
from ...errors import ClosedError, DecodeError, PolybusError
from ...message import Message
from ...types import Capability
from ..base import (
    CODECS,
    ClientInfo,
    RecordCodec,
    SessionConflict,
    SessionRecord,
    SessionStoreUnavailable,
)
from . import bus_store_from_url, check_codec
from ._view import Item, View, item_of, record_of, records_of

__all__ = ["RabbitMQStore", "from_bus", "from_url"]

log = logging.getLogger("polybus.sessions")

# message kinds (the first field of every message)
_SAVE, _DELETE, _HELLO, _SNAPSHOT_DONE = "save", "delete", "hello", "done"
_TOMBSTONE_KEEP = 24 * 3600.0  # how long a deleted id is remembered
_NEVER = (0, "")


class _Replica:
    """One session's replicated state: its data with a stamp per key."""

    __slots__ = ("data", "last_seen", "removed", "stamps")

    def __init__(self) -> None:
        self.last_seen = 0.0
        self.data: dict[str, Any] = {}
        self.stamps: dict[str, tuple[int, str]] = {}  # key -> stamp of its value (or removal)
        self.removed: set[str] = set()


class RabbitMQStore:
    """A :class:`~polybus.sessions.base.SessionStore` replicated through RabbitMQ; see the
    module docstring. Opening blocks until this instance has caught up."""

    linearizable: ClassVar[bool] = False

    def __init__(
        self,
        bus: Bus,
        *,
        topic: str = "polybus.sessions",
        codec: str = "json",
        catch_up_timeout: float = 10.0,
        retention: float = 24 * 3600.0,
        snapshot_wait: float = 1.0,
        sweep_interval: float = 60.0,
        owns_bus: bool = False,
    ) -> None:
        self.codec: RecordCodec = CODECS[check_codec(codec)]
        self.topic = topic
        self.instance = uuid.uuid4().hex
        self._bus = bus
        self._owns_bus = owns_bus
        self._sweep_interval = sweep_interval
        self._view = View()
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # one save at a time: check, broadcast, apply
        self._last_stamp = 0
        self._seen_markers: set[str] = set()  # our hellos read back, snapshots done for us
        self._asked: set[str] = set()  # nonces of our hellos
        self._closed = False
        streams = self._streams = Capability.SEEK in bus.capabilities
        try:
            if streams:
                bus.declare(topic, retention=retention)
            else:
                bus.declare(topic)
            self._sub: Subscriber = bus.subscribe(
                topic, None, start="earliest" if streams else "latest"
            )
        except PolybusError as exc:
            raise _unavailable(exc) from exc
        self._thread = threading.Thread(target=self._pump, name="polybus-sessions", daemon=True)
        self._thread.start()
        try:
            # Our own hello comes back after everything the history held before it; without
            # a history it asks the running instances for their sessions.
            nonce = uuid.uuid4().hex
            self._asked.add(nonce)
            self._broadcast([_HELLO, self.instance, nonce, streams], key=None)
            self._wait(lambda: nonce in self._seen_markers, catch_up_timeout, "catch up")
            if not streams:
                # answers from running instances end with a "done" for our nonce
                done = f"done:{nonce}"
                try:
                    self._wait(lambda: done in self._seen_markers, snapshot_wait, "snapshot")
                except SessionStoreUnavailable:
                    log.info("no running instance sent a session snapshot; starting empty")
        except BaseException:
            self.close()
            raise

    # -- receiving ---------------------------------------------------------------------

    def _pump(self) -> None:
        sub = self._sub
        next_sweep = time.time() + self._sweep_interval
        lost = False
        while not self._closed:
            try:
                batch = sub.fetch(1, 0.2)
                if batch:
                    batch += sub.fetch(1000, 0.0)
            except ClosedError:
                return
            except PolybusError as exc:
                log.warning("session replication interrupted: %s", exc)
                lost = True
                with self._cond:
                    self._cond.wait(0.2)  # back off; close() wakes it
                continue
            if lost and not self._streams:
                # without a history, changes broadcast while the connection was down are
                # gone for this instance: ask the others for their sessions again
                lost = False
                nonce = uuid.uuid4().hex
                self._asked.add(nonce)
                try:
                    self._broadcast([_HELLO, self.instance, nonce, False], key=None)
                except SessionStoreUnavailable:
                    lost = True
            now = time.time()
            snapshot_for: list[str] = []
            with self._cond:
                for d in batch:
                    try:
                        msg = self.codec.load(d.message.payload or b"")
                        answer = self._apply(msg)
                    except (DecodeError, ValueError, TypeError, IndexError) as exc:
                        log.warning("undecodable session change skipped: %s", exc)
                        continue
                    if answer is not None:
                        snapshot_for.append(answer)
                if batch:
                    self._cond.notify_all()
                if now >= next_sweep:
                    next_sweep = now + self._sweep_interval
                    for sid in self._view.expired(now):
                        self._view.drop(sid)
            sub.ack(batch)
            for nonce in snapshot_for:
                self._send_snapshot(nonce)

    def _apply(self, msg: list[Any]) -> str | None:
        """Under the lock: apply one message; returns a nonce to answer with a snapshot."""
        kind = msg[0]
        if kind == _SAVE:
            self._merge(msg)
        elif kind == _DELETE:
            sid = msg[1]
            item = self._view.items.get(sid)
            user = item.user_id if item is not None else msg[2]
            self._view.put(sid, Item(0, time.time() + _TOMBSTONE_KEEP, user, b"", None))
        elif kind == _HELLO:
            _, origin, nonce, streams = msg
            if origin == self.instance:
                self._seen_markers.add(nonce)
            elif not streams:
                return str(nonce)
        elif kind == _SNAPSHOT_DONE and msg[1] in self._asked:
            self._seen_markers.add(f"done:{msg[1]}")
        return None

    def _merge(self, msg: list[Any]) -> None:
        """Apply a change: per key, the highest stamp wins; a deleted id stays deleted."""
        _, sid, user_id, version, created, last_seen, expires, client, fp, entries = msg
        view = self._view
        item = view.items.get(sid)
        if item is not None and not item.payload:
            return  # deleted: final
        replica: _Replica = item.extra if item is not None else _Replica()
        for key, value, stamp_ns, origin, removed in entries:
            stamp = (stamp_ns, origin)
            if stamp > replica.stamps.get(key, _NEVER):
                replica.stamps[key] = stamp
                if removed:
                    replica.data.pop(key, None)
                    replica.removed.add(key)
                else:
                    replica.data[key] = value
                    replica.removed.discard(key)
        if item is not None:
            version = max(version, item.version)
            expires = max(expires, item.expires_at)
        last_seen = replica.last_seen = max(last_seen, replica.last_seen)
        record = SessionRecord(
            sid,
            user_id,
            version,
            created,
            last_seen,
            expires,
            ClientInfo(*client),
            fp,
            replica.data,
        )
        payload, start = self.codec.encode_split(record)
        view.put(sid, item_of(record, payload, start, replica))

    def _send_snapshot(self, nonce: str) -> None:
        now = time.time()
        with self._cond:
            messages = [
                self._save_message(record_of(self.codec, item), item.extra, None)
                for sid in list(self._view.items)
                if (item := self._view.live(sid, now)) is not None
            ]
        try:
            for m in messages:
                self._broadcast(m, key=m[1])
            self._broadcast([_SNAPSHOT_DONE, nonce], key=None)
        except SessionStoreUnavailable as exc:
            log.warning("could not send a session snapshot: %s", exc)

    # -- sending -----------------------------------------------------------------------

    def _broadcast(self, msg: list[Any], *, key: str | None) -> None:
        try:
            self._bus.publish(self.topic, self.codec.dump(msg), key=key)
        except ClosedError:
            raise
        except PolybusError as exc:
            raise _unavailable(exc) from exc

    def _stamp(self) -> int:
        stamp = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        return stamp

    def _save_message(
        self, record: SessionRecord, replica: _Replica | None, changes: dict[str, Any] | None
    ) -> list[Any]:
        """A save message: ``changes`` stamped now, or (for a snapshot) every key with the
        stamp it has in ``replica``."""
        if changes is not None:
            stamp = self._stamp()
            entries = [
                [k, None if v is _REMOVED else v, stamp, self.instance, v is _REMOVED]
                for k, v in changes.items()
            ]
        else:
            assert replica is not None
            entries = [
                [k, replica.data.get(k), s[0], s[1], k in replica.removed]
                for k, s in replica.stamps.items()
            ]
        r = record
        return [
            _SAVE,
            r.id,
            r.user_id,
            r.version,
            r.created_at,
            r.last_seen,
            r.expires_at,
            list(r.client),
            r.fingerprint,
            entries,
        ]

    def _wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise SessionStoreUnavailable(
                        f"RabbitMQ session store could not {what} on {self.topic!r} within "
                        f"{timeout} s"
                    )
                self._cond.wait(left)

    # -- the protocol ------------------------------------------------------------------

    def load(self, session_id: str) -> SessionRecord | None:
        item = self._view.live(session_id, time.time())
        return None if item is None else record_of(self.codec, item)

    def save(self, record: SessionRecord) -> None:
        self.codec.encode(record)  # EncodeError before anything is sent
        with self._write_lock:
            with self._cond:
                item = self._view.live(record.id, time.time())
                current = 0 if item is None else item.version
                if current != record.version - 1:
                    raise SessionConflict.stale(
                        record.id, expected=record.version - 1, current=current
                    )
                before: dict[str, Any] = item.extra.data if item is not None else {}
                changes: dict[str, Any] = {
                    k: v
                    for k, v in record.data.items()
                    if k not in before or type(before[k]) is not type(v) or before[k] != v
                }
                changes.update((k, _REMOVED) for k in before if k not in record.data)
                msg = self._save_message(record, None, changes)
            self._broadcast(msg, key=record.id)
            with self._cond:
                self._merge(msg)

    def delete(self, session_id: str) -> bool:
        return self._delete([session_id]) > 0

    def _delete(self, ids: list[str]) -> int:
        now = time.time()
        with self._write_lock:
            with self._cond:
                messages = [
                    [_DELETE, sid, item.user_id]
                    for sid in ids
                    if (item := self._view.live(sid, now)) is not None
                ]
            if messages:
                try:
                    self._bus.publish_many(
                        self.topic, [Message(self.codec.dump(m), key=m[1]) for m in messages]
                    )
                except ClosedError:
                    raise
                except PolybusError as exc:
                    raise _unavailable(exc) from exc
                with self._cond:
                    for m in messages:
                        self._apply(m)
        return len(messages)

    def user_tag(self, user_id: str) -> None:
        return None  # the ids need no tag here

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        with self._cond:
            items = self._view.live_of(user_id, time.time())
        return records_of(self.codec, items)

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        with self._cond:
            ids = [sid for sid in self._view.user_ids(user_id) if sid != keep]
        return self._delete(ids)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        self._sub.close()
        if self._owns_bus:
            self._bus.close()


_REMOVED: Any = object()


def _unavailable(exc: BaseException) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(f"RabbitMQ session store unavailable: {exc}")


_OPTIONS = {
    "topic": str,
    "codec": str,
    "catch_up_timeout": float,
    "retention": float,
    "snapshot_wait": float,
    "sweep_interval": float,
}
_DEFAULTS = {"reconnect_timeout": "5"}  # a session request cannot wait 30 s for a broker


def from_url(url: str, **options: Any) -> RabbitMQStore:
    return bus_store_from_url(url, RabbitMQStore, _OPTIONS, _DEFAULTS, _unavailable, **options)


def from_bus(bus: Bus, **options: Any) -> RabbitMQStore:
    """A store on a :class:`polybus.Bus` opened on ``amqp://`` (left open by close)."""
    return RabbitMQStore(bus, **options)
