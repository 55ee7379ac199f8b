"""The in-memory index every store but Redis keeps: sessions by id, and ids by user."""

from __future__ import annotations

from typing import Any, NamedTuple

from ...errors import DecodeError
from ...types import tuple_new
from ..base import Head, RecordCodec, SessionRecord, with_data


class Item(NamedTuple):
    """One session in a view: what the store decides on without decoding the record."""

    version: int
    expires_at: float
    user_id: str | None
    payload: bytes  #: the encoded record; b"" for a deleted session
    extra: Any = None  #: the store's own: a log offset, per-key stamps, ...
    head: Head | None = None  #: the record's fields before its data, decoded
    data_start: int = -1  #: where the data starts in ``payload``; -1: decode it whole


def item_of(record: SessionRecord, payload: bytes, data_start: int, extra: Any = None) -> Item:
    """The item of ``record``, encoded as ``payload`` with its data at ``data_start``."""
    return _new(Item, (record[2], record[5], record[1], payload, extra, record[:8], data_start))


_new = tuple_new(Item, 7)  # Item(...) without the Python-level __new__ of a NamedTuple


def record_of(codec: RecordCodec, item: Item) -> SessionRecord:
    """The record ``item`` holds, with a copy of the data of its own (decoded now).

    Raises DecodeError."""
    if item.head is not None and item.data_start >= 0:
        return with_data(item.head, codec.decode_data(item.payload, item.data_start))
    return codec.decode(item.payload)


def records_of(codec: RecordCodec, items: list[Item]) -> list[SessionRecord]:
    """The records of ``items``, oldest first; one that fails to decode is left out."""
    out = []
    for item in items:
        try:
            out.append(record_of(codec, item))
        except DecodeError:
            continue
    out.sort(key=lambda r: r.created_at)
    return out


class View:
    """Items by session id with a per-user index. Not thread-safe: the store locks."""

    __slots__ = ("items", "users")

    def __init__(self) -> None:
        self.items: dict[str, Item] = {}
        self.users: dict[str, set[str]] = {}

    def put(self, session_id: str, item: Item) -> None:
        old = self.items.get(session_id)
        self.items[session_id] = item
        if item.user_id is not None and (old is None or old.user_id != item.user_id):
            self.users.setdefault(item.user_id, set()).add(session_id)

    def drop(self, session_id: str) -> Item | None:
        item = self.items.pop(session_id, None)
        if item is not None and item.user_id is not None:
            ids = self.users.get(item.user_id)
            if ids is not None:
                ids.discard(session_id)
                if not ids:
                    del self.users[item.user_id]
        return item

    def live(self, session_id: str, now: float) -> Item | None:
        """The item if the session exists, is not deleted and has not expired."""
        item = self.items.get(session_id)
        if item is None or item.expires_at <= now or not item.payload:
            return None
        return item

    def user_ids(self, user_id: str) -> list[str]:
        return list(self.users.get(user_id, ()))

    def live_of(self, user_id: str, now: float) -> list[Item]:
        """The live items of ``user_id``'s sessions."""
        live = self.live
        return [i for sid in self.user_ids(user_id) if (i := live(sid, now)) is not None]

    def expired(self, now: float) -> list[str]:
        """Ids of the sessions past their expiry (deleted ones included)."""
        return [sid for sid, item in self.items.items() if item.expires_at <= now]
