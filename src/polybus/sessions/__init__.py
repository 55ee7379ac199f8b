"""Server-side sessions shared by many instances of a service, on any polybus backend.

>>> from polybus.sessions import SessionManager
>>> with SessionManager("memory://") as manager:
...     session = manager.load(None)          # no cookie yet: a new session
...     session["theme"] = "dark"
...     stored = manager.save(session)        # True: send session.id as the cookie
...     manager.load(session.id)["theme"]
'dark'

See :mod:`polybus.sessions.manager` for the manager's API and
:mod:`polybus.sessions.stores` for the store URLs.
"""

from .base import (
    ClientInfo,
    Session,
    SessionConflict,
    SessionError,
    SessionRecord,
    SessionStore,
    SessionStoreUnavailable,
    new_session_id,
)
from .manager import SessionInfo, SessionManager, handle_of
from .stores import open_store

__all__ = [
    "ClientInfo",
    "Session",
    "SessionConflict",
    "SessionError",
    "SessionInfo",
    "SessionManager",
    "SessionRecord",
    "SessionStore",
    "SessionStoreUnavailable",
    "handle_of",
    "new_session_id",
    "open_sessions",
    "open_store",
]


def open_sessions(store: str | SessionStore, **options: object) -> SessionManager:
    """A :class:`SessionManager` on the store a URL names (``options``: the manager's)."""
    return SessionManager(store, **options)  # type: ignore[arg-type]
