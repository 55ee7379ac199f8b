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
    store_key,
)
from .context import ContextRefused, UserContext
from .manager import SessionInfo, SessionManager, handle_of
from .middleware import CookieSettings, SessionMiddleware, WSGISessionMiddleware, session_of
from .sticky import HashRing, NoLiveInstance, StickyRouter
from .stores import open_store
from .tokens import (
    Ed25519Key,
    HMACKey,
    InvalidToken,
    Keyring,
    Revocations,
    RevocationUnavailable,
    SharedRevocations,
    StoreNonces,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenReplayed,
    TokenRevoked,
    Tokens,
)

__all__ = [
    "ClientInfo",
    "ContextRefused",
    "CookieSettings",
    "Ed25519Key",
    "HMACKey",
    "HashRing",
    "InvalidToken",
    "Keyring",
    "NoLiveInstance",
    "RevocationUnavailable",
    "Revocations",
    "Session",
    "SessionConflict",
    "SessionError",
    "SessionInfo",
    "SessionManager",
    "SessionMiddleware",
    "SessionRecord",
    "SessionStore",
    "SessionStoreUnavailable",
    "SharedRevocations",
    "StickyRouter",
    "StoreNonces",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenRevoked",
    "Tokens",
    "UserContext",
    "WSGISessionMiddleware",
    "handle_of",
    "new_session_id",
    "open_sessions",
    "open_store",
    "session_of",
    "store_key",
]


def open_sessions(store: str | SessionStore, **options: object) -> SessionManager:
    """A :class:`SessionManager` on the store a URL names (``options``: the manager's)."""
    return SessionManager(store, **options)  # type: ignore[arg-type]
