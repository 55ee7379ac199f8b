"""Sessions in this process's memory: ``memory://`` (private) or ``memory://name`` (shared).

Records are kept encoded, as every other store keeps them, so what a test
sees here (tuples coming back as lists, undecodable data refused at save) is
what production sees. Expired records are never returned and are swept
every ``sweep_interval`` seconds by the next write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar
from urllib.parse import urlsplit

from ..base import CODECS, RecordCodec, SessionConflict, SessionRecord
from . import check_codec, url_options

__all__ = ["MemoryStore"]

_shared: dict[str, tuple[_Table, int]] = {}  # name -> (table, users)
_shared_lock = threading.Lock()


class _Table:
    """The state behind one or more MemoryStore objects."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # id -> (version, expires_at, user_id, encoded record)
        self.items: dict[str, tuple[int, float, str | None, bytes]] = {}
        self.users: dict[str, set[str]] = {}
        self.next_sweep = 0.0


class MemoryStore:
    """A :class:`~polybus.sessions.base.SessionStore` in memory; see the module docstring.

    ``name`` shares one table between the stores of this process opened with it
    (several "instances" in one test); without it the table is private.
    """

    linearizable: ClassVar[bool] = True

    def __init__(
        self,
        name: str | None = None,
        *,
        codec: str = "json",
        sweep_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec: RecordCodec = CODECS[check_codec(codec)]
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._name = name
        self._closed = False
        if name is None:
            self._table = _Table()
        else:
            with _shared_lock:
                table, users = _shared.get(name, (_Table(), 0))
                _shared[name] = (table, users + 1)
            self._table = table

    def load(self, session_id: str) -> SessionRecord | None:
        item = self._table.items.get(session_id)
        if item is None or item[1] <= self._clock():
            return None
        return self.codec.decode(item[3])

    def save(self, record: SessionRecord) -> None:
        payload = self.codec.encode(record)  # before the lock: it may raise EncodeError
        t = self._table
        now = self._clock()
        with t.lock:
            item = t.items.get(record.id)
            current = 0 if item is None or item[1] <= now else item[0]
            if current != record.version - 1:
                raise SessionConflict(
                    f"session is at version {current}, not {record.version - 1}",
                    session_id=record.id,
                    current_version=current,
                )
            t.items[record.id] = (record.version, record.expires_at, record.user_id, payload)
            if record.user_id is not None and item is None:
                t.users.setdefault(record.user_id, set()).add(record.id)
            if now >= t.next_sweep:
                t.next_sweep = now + self._sweep_interval
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        t = self._table
        for sid in [sid for sid, item in t.items.items() if item[1] <= now]:
            self._drop(sid)

    def _drop(self, session_id: str) -> bool:
        t = self._table
        item = t.items.pop(session_id, None)
        if item is None:
            return False
        user = item[2]
        if user is not None:
            ids = t.users.get(user)
            if ids is not None:
                ids.discard(session_id)
                if not ids:
                    del t.users[user]
        return item[1] > self._clock()

    def delete(self, session_id: str) -> bool:
        with self._table.lock:
            return self._drop(session_id)

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        with self._table.lock:
            ids = list(self._table.users.get(user_id, ()))
        out = []
        for sid in ids:
            try:
                record = self.load(sid)
            except ValueError:  # DecodeError: listed by no one, swept by expiry
                continue
            if record is not None:
                out.append(record)
        out.sort(key=lambda r: r.created_at)
        return out

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        with self._table.lock:
            ids = [sid for sid in self._table.users.get(user_id, ()) if sid != keep]
            return sum(self._drop(sid) for sid in ids)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._name is not None:
            with _shared_lock:
                table, users = _shared.get(self._name, (self._table, 1))
                if users <= 1:
                    _shared.pop(self._name, None)
                else:
                    _shared[self._name] = (table, users - 1)


def from_url(url: str, **options: Any) -> MemoryStore:
    """``memory://`` or ``memory://name``; options ``codec`` and ``sweep_interval``."""
    parts = urlsplit(url)
    query = url_options(url, {"codec", "sweep_interval"})
    if "sweep_interval" in query:
        options.setdefault("sweep_interval", float(query.pop("sweep_interval")))
    options = {**query, **options}
    return MemoryStore((parts.netloc + parts.path) or None, **options)
