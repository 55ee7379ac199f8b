"""Sessions in this process's memory: ``memory://`` (private) or ``memory://name`` (shared).

Records are kept encoded, as every other store keeps them, so what a test
sees here (tuples coming back as lists, undecodable data refused at save) is
what production sees. Expired records are never returned and are swept
every ``sweep_interval`` seconds by the next write.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ClassVar

from ...adapters._support import Options
from ..base import CODECS, RecordCodec, SessionConflict, SessionRecord
from . import check_codec
from ._view import View, item_of, record_of, records_of

__all__ = ["MemoryStore", "from_url"]

_shared: dict[str, tuple[_Table, int]] = {}  # name -> (table, users)
_shared_lock = threading.Lock()


class _Table:
    """The state behind one or more MemoryStore objects."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.view = View()
        self.next_sweep = 0.0


class MemoryStore:
    """A :class:`~polybus.sessions.base.SessionStore` in memory; see the module docstring.

    ``name`` shares one table between the stores of this process opened with it
    (several "instances" in one test); without it the table is private.
    """

    linearizable: ClassVar[bool] = True

    def __init__(
        self, name: str | None = None, *, codec: str = "json", sweep_interval: float = 10.0
    ) -> None:
        self.codec: RecordCodec = CODECS[check_codec(codec)]
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
        item = self._table.view.live(session_id, time.time())
        return None if item is None else record_of(self.codec, item)

    def save(self, record: SessionRecord) -> None:
        payload, start = self.codec.encode_split(record)  # before the lock: EncodeError
        t = self._table
        now = time.time()
        with t.lock:
            item = t.view.live(record.id, now)
            current = 0 if item is None else item.version
            if current != record.version - 1:
                raise SessionConflict.stale(record.id, expected=record.version - 1, current=current)
            t.view.put(record.id, item_of(record, payload, start))
            if now >= t.next_sweep:
                t.next_sweep = now + self._sweep_interval
                for sid in t.view.expired(now):
                    t.view.drop(sid)

    def delete(self, session_id: str) -> bool:
        with self._table.lock:
            item = self._table.view.drop(session_id)
        return item is not None and item.expires_at > time.time()

    def user_tag(self, user_id: str) -> None:
        return None  # the ids need no tag here

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        with self._table.lock:
            items = self._table.view.live_of(user_id, time.time())
        return records_of(self.codec, items)

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        now = time.time()
        view = self._table.view
        with self._table.lock:
            ids = [sid for sid in view.user_ids(user_id) if sid != keep]
            live = sum(view.live(sid, now) is not None for sid in ids)
            for sid in ids:
                view.drop(sid)
            return live

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
    parsed = Options(url, ours={"codec", "sweep_interval"})
    given: dict[str, Any] = {"codec": parsed.text("codec", "json")}
    if parsed.given("sweep_interval"):
        given["sweep_interval"] = parsed.seconds("sweep_interval", 1.0)
    parts = parsed.parts
    return MemoryStore((parts.netloc + parts.path) or None, **{**given, **options})
