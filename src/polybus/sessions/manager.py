"""The session manager: ids, timeouts, rotation, versioned saves and the per-user index.

API (stable; the middleware is built on it)::

    manager = SessionManager("redis://localhost:6379/0")   # a URL or a SessionStore
    session = manager.load(cookie_value, ClientInfo(user_agent, ip))
    #   never raises for a bad, unknown, expired or mismatched id: returns a new
    #   session (session.is_new) with a fresh id; the unknown id is never reused
    session["cart"] = ["book"]                             # a MutableMapping
    session = manager.login(session, "user-42")            # new id; the old one is dead
    session = manager.rotate(session)                      # on a privilege change
    if manager.save(session):                              # compare-and-set, merging
        set_cookie(session.id)                             # True: it is stored
    else:
        clear_cookie()                                     # False: nothing to keep
    manager.logout(session)                                # destroyed server-side
    manager.sessions_of("user-42")     # [SessionInfo(handle, created_at, last_seen, ...)]
    manager.end_session("user-42", handle)                 # one device, by its handle
    manager.logout_everywhere("user-42")                   # also: a disabled user
    manager.logout_others(session)                         # every session but this one

Every method blocks on the store and is thread-safe (an asyncio server calls
them in a worker thread); one :class:`Session` is used by one request at a
time. The store decides how fast other instances see a change: at once on
memory, native and Redis, within milliseconds on Kafka and RabbitMQ, whose
instances read from a local view (``store.linearizable`` tells whether
compare-and-set holds across instances). Store failures follow
``on_unavailable``: ``"fail_closed"`` (default) raises
:class:`SessionStoreUnavailable`; ``"fail_open"`` serves a new, unsaved session
and logs a warning (the middleware leaves the cookie as it is, so the session is
the user's again once the store is back). Logout, rotation and revocation always raise when the
store is down: they cannot be confirmed otherwise.

A store never holds a session id: it keeps each session under
:func:`~polybus.sessions.base.store_key` of the id (a SHA-256 digest), so a
leaked store (a Redis dump, a topic, log files) holds no cookie that works.
:attr:`SessionInfo.handle` and :func:`handle_of` name a session by that key.

Concurrent requests on one session: a save is a compare-and-set on the
session's version. When another request saved first, the manager reloads the
session and merges by key: keys changed by only one side keep that change. A
key changed by both (even to equal values) is a real conflict, settled by
``on_conflict``: ``"raise"`` (default, :class:`SessionConflict`), ``"ours"``
or ``"theirs"``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from ..errors import ConfigurationError, DecodeError
from .base import (
    _MISSING,
    _UNKNOWN,
    ClientInfo,
    Session,
    SessionConflict,
    SessionRecord,
    SessionStore,
    SessionStoreUnavailable,
    new_session_id,
    store_key,
)
from .stores import open_store

__all__ = ["ConflictPolicy", "SessionInfo", "SessionManager", "UnavailablePolicy", "handle_of"]

log = logging.getLogger("polybus.sessions")

ConflictPolicy = Literal["raise", "ours", "theirs"]
UnavailablePolicy = Literal["fail_closed", "fail_open"]

#: what :func:`new_session_id` makes: an optional user tag, then 256 bits in base64url
SESSION_ID = re.compile(r"(?:[0-9a-f]{4}\.)?[A-Za-z0-9_-]{43}")
MAX_MERGE_ATTEMPTS = 32


class SessionInfo(NamedTuple):
    """One of a user's sessions, for a "where you're logged in" page.

    ``handle`` names the session without being its id (the id is a credential
    and is never shown); pass it to :meth:`SessionManager.end_session`.
    """

    handle: str
    created_at: float
    last_seen: float
    expires_at: float
    client: ClientInfo


def handle_of(session_id: str) -> str:
    """A short, non-secret name of a session, safe to show and to log."""
    return _handle(store_key(session_id))


def _handle(key: str) -> str:
    """The handle of the session a store keeps under ``key``."""
    return hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


class SessionManager:
    """Sessions on one store; see the module docstring for the whole API.

    ``idle_timeout`` and ``absolute_timeout`` (seconds, OWASP's 30 minutes and
    8 hours by default) both apply. A session read but not changed is written
    again (to move its idle deadline) at most every ``touch_interval`` seconds.
    ``bind_user_agent`` / ``bind_ip`` bind a session to the client's user agent
    and to its IP prefix (/24 for IPv4, /64 for IPv6): a request that does not
    match ends the session. ``clock`` is for tests.
    """

    def __init__(
        self,
        store: SessionStore | str,
        *,
        idle_timeout: float = 30 * 60,
        absolute_timeout: float = 8 * 3600,
        touch_interval: float = 60.0,
        on_conflict: ConflictPolicy = "raise",
        on_unavailable: UnavailablePolicy = "fail_closed",
        bind_user_agent: bool = False,
        bind_ip: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < idle_timeout <= absolute_timeout:
            raise ConfigurationError(
                f"need 0 < idle_timeout <= absolute_timeout, got {idle_timeout} and "
                f"{absolute_timeout} seconds"
            )
        if not 0 <= touch_interval < idle_timeout:
            raise ConfigurationError(
                f"touch_interval must be at least 0 and below idle_timeout ({idle_timeout} s), "
                f"not {touch_interval}"
            )
        if on_conflict not in ("raise", "ours", "theirs"):
            raise ConfigurationError(
                f"on_conflict must be 'raise', 'ours' or 'theirs', not {on_conflict!r}"
            )
        if on_unavailable not in ("fail_closed", "fail_open"):
            raise ConfigurationError(
                f"on_unavailable must be 'fail_closed' or 'fail_open', not {on_unavailable!r}"
            )
        self._owns_store = isinstance(store, str)
        self.store: SessionStore = open_store(store)
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.touch_interval = touch_interval
        self.on_conflict = on_conflict
        self.on_unavailable = on_unavailable
        self.bind_user_agent = bind_user_agent
        self.bind_ip = bind_ip
        self._clock = clock

    # -- one request ------------------------------------------------------------------

    def new(self, client: ClientInfo | None = None) -> Session:
        """A new anonymous session with a fresh id, not stored until saved."""
        client = client or ClientInfo()
        now = self._clock()
        session_id = new_session_id()
        return Session(
            SessionRecord(
                store_key(session_id),
                None,
                0,
                now,
                now,
                now + self.idle_timeout,
                client,
                self._fingerprint(client),
                {},
            ),
            session_id,
        )

    def load(self, session_id: str | None, client: ClientInfo | None = None) -> Session:
        """The session ``session_id`` names, or a new one.

        A new session (``is_new``) with a fresh id comes back when the id is
        missing, malformed, unknown (never issued, or destroyed), expired by
        either timeout, bound to another client, or undecodable (logged); the
        presented id is never adopted. Raises SessionStoreUnavailable when the
        store is down and the policy is ``fail_closed``.
        """
        client = client or ClientInfo()
        if not session_id or not SESSION_ID.fullmatch(session_id):
            return self.new(client)
        key = store_key(session_id)
        try:
            record = self.store.load(key)
        except DecodeError as exc:
            log.warning(
                "session %s could not be decoded (%s); starting a new session",
                _handle(key),
                exc,
            )
            self._forget(key)
            return self.new(client)
        except SessionStoreUnavailable as exc:
            return self._unavailable(exc, client)
        if record is None:
            return self.new(client)
        now = self._clock()
        if (
            now >= record.expires_at
            or now >= record.last_seen + self.idle_timeout
            or now >= record.created_at + self.absolute_timeout
        ):
            self._forget(key)
            return self.new(client)
        if record.fingerprint is not None and record.fingerprint != self._fingerprint(client):
            log.warning("session %s presented by another client; it is ended", _handle(key))
            self._forget(key)
            return self.new(client)
        return Session(record, session_id)

    def save(self, session: Session) -> bool:
        """Store the session's changes; True if it is stored afterwards (set the cookie).

        Writes when something changed, when the session is new and holds data
        or a user, or when its idle deadline is due to move (``touch_interval``).
        Returns False for an ended session, for an empty anonymous one, and for
        one that was destroyed meanwhile (logged out elsewhere: it is not brought
        back). Raises SessionConflict for a real conflict under
        ``on_conflict="raise"`` (nothing written), EncodeError for data that is
        not JSON/msgpack data, SessionStoreUnavailable under ``fail_closed``.
        """
        if session.ended:
            return False
        now = self._clock()
        if session.version == 0:
            if not session._data and session.user_id is None:
                return False
        elif not session._original and now - session.last_seen < self.touch_interval:
            return True
        expires_at = min(now + self.idle_timeout, session.created_at + self.absolute_timeout)
        record = SessionRecord(
            session.store_key,
            session.user_id,
            session.version + 1,
            session.created_at,
            now,
            expires_at,
            session.client,
            session.fingerprint,
            session._data,
        )
        try:
            try:
                self.store.save(record)
            except SessionConflict:
                return self._save_merging(session, record)
        except SessionStoreUnavailable as exc:
            if self.on_unavailable == "fail_closed":
                raise
            log.warning("session store unavailable, session changes not saved: %s", exc)
            return False
        session.version = record.version
        session.last_seen = now
        session.expires_at = expires_at
        session._original.clear()
        return True

    def _save_merging(self, session: Session, record: SessionRecord) -> bool:
        """Reload, merge and save again until the compare-and-set holds."""
        for attempt in range(MAX_MERGE_ATTEMPTS):
            if attempt:  # lost again: step aside a random moment, so writers do not convoy
                time.sleep(random.random() * min(0.01, 0.0002 * 2**attempt))
            try:
                current = self.store.load(session.store_key) if session.version else None
            except DecodeError:
                current = None  # the stored copy is damaged: it is not ours to merge into
                self._forget(session.store_key)
            if current is None:  # destroyed meanwhile (logged out elsewhere): not revived
                session.ended = True
                return False
            session._data = self._merge(session, current)
            session.version = current.version
            record = record._replace(version=current.version + 1, data=session._data)
            try:
                self.store.save(record)
            except SessionConflict:
                continue
            session.version = record.version
            session.last_seen = record.last_seen
            session.expires_at = record.expires_at
            session._original.clear()
            return True
        raise SessionConflict(
            f"session kept changing under {MAX_MERGE_ATTEMPTS} save attempts; try again",
            session_id=session.store_key,
            current_version=session.version,
        )

    def _merge(self, session: Session, current: SessionRecord) -> dict[str, Any]:
        """``current``'s data with this session's changed keys applied; a key the other
        side changed too is settled by ``on_conflict``. Changes nothing when it raises."""
        theirs = current.data
        merged = dict(theirs)
        bases: dict[str, Any] = {}  # what the next attempt's base holds, per changed key
        for key, before in session._original.items():
            mine = session._data.get(key, _MISSING)
            other = theirs.get(key, _MISSING)
            bases[key] = other
            # changed by both sides is a conflict even when both wrote the same value
            # (two increments of a counter from 5 both write 6); a key mutated in place
            # has no known value before, so it cannot be told to be one
            both = before is not _UNKNOWN and other is not before and other != before
            if both:
                if self.on_conflict == "raise":
                    raise SessionConflict(
                        f"session key {key!r} was changed by another request at the same time; "
                        "reload the session and try again",
                        session_id=session.store_key,
                        current_version=current.version,
                    )
                if self.on_conflict == "theirs":
                    continue
            if mine is _MISSING:
                merged.pop(key, None)
            else:
                merged[key] = mine
        session._original.update(bases)
        return merged

    # -- id rotation and termination ---------------------------------------------------

    def login(self, session: Session, user_id: str, *, client: ClientInfo | None = None) -> Session:
        """A stored, new session of ``user_id`` with a new id, and ``session``'s data if
        it was anonymous or ``user_id``'s: another user's login starts with no data, so
        it never sees what the previous user stored.

        ``session`` (its id) stops working before this returns. Its absolute
        timeout starts anew: this is a new authentication.
        """
        if not isinstance(user_id, str) or not user_id:
            raise ConfigurationError(f"user_id must be a non-empty str, not {user_id!r}")
        now = self._clock()
        client = client or session.client
        session_id = new_session_id(self.store.user_tag(user_id))
        record = SessionRecord(
            store_key(session_id),
            user_id,
            1,
            now,
            now,
            now + self.idle_timeout,  # <= the absolute deadline, which starts now
            client,
            self._fingerprint(client),
            dict(session._data) if session.user_id in (None, user_id) else {},
        )
        return self._replace(session, record, session_id)

    def rotate(self, session: Session) -> Session:
        """The same session (user, data, absolute deadline) under a new id, stored.

        Call it when the session's privileges change. The old id stops working
        before this returns, and changes another request saved meanwhile are
        merged in (a real conflict follows ``on_conflict``). A session ended
        meanwhile (logged out here or elsewhere) is not brought back: a new
        anonymous session comes back instead. A session never stored only
        gets a new id; it is stored by the next save, as before.
        """
        tag = self.store.user_tag(session.user_id) if session.user_id is not None else None
        session_id = new_session_id(tag)
        if not session.version:
            session.ended = True
            return Session(session.record(id=store_key(session_id)), session_id)
        current = self.store.load(session.store_key)
        if current is None:  # ended meanwhile, and stays ended
            session.ended = True
            return self.new(session.client)
        same = current.version == session.version  # a real conflict raises, changing nothing
        data = dict(session._data) if same else self._merge(session, current)
        now = self._clock()
        record = session.record(
            id=store_key(session_id),
            version=1,
            last_seen=now,
            expires_at=min(now + self.idle_timeout, session.created_at + self.absolute_timeout),
            data=data,
        )
        # The new id is stored before the old one is deleted, so a "log out everywhere"
        # at any moment finds one of them. If the old one is gone by the delete, the
        # session was ended meanwhile: the new one is deleted too, and it stays ended.
        self.store.save(record)
        session.ended = True
        if not self.store.delete(session.store_key):
            self.store.delete(record.id)
            return self.new(session.client)
        return Session(record, session_id)

    def _replace(self, old: Session, record: SessionRecord, session_id: str) -> Session:
        self.store.save(record)
        if old.version:
            self.store.delete(old.store_key)
        old.ended = True
        return Session(record, session_id)

    def logout(self, session: Session) -> None:
        """Destroy the session in the store; its id stops working at once. Idempotent."""
        if session.version:
            self.store.delete(session.store_key)
        session.ended = True

    def sessions_of(self, user_id: str) -> list[SessionInfo]:
        """The user's live sessions, oldest first."""
        now = self._clock()
        return [
            SessionInfo(_handle(r.id), r.created_at, r.last_seen, r.expires_at, r.client)
            for r in self.store.user_sessions(user_id)
            if now < r.expires_at
            and now < r.last_seen + self.idle_timeout
            and now < r.created_at + self.absolute_timeout
        ]

    def end_session(self, user_id: str, handle: str) -> bool:
        """End the session of ``user_id`` that :attr:`SessionInfo.handle` names."""
        for record in self.store.user_sessions(user_id):
            if _handle(record.id) == handle:
                return self.store.delete(record.id)
        return False

    def logout_everywhere(self, user_id: str) -> int:
        """End every session of ``user_id`` (also what to do for a disabled user)."""
        return self.store.delete_user(user_id)

    def logout_others(self, session: Session) -> int:
        """End every session of this session's user except this one."""
        if session.user_id is None:
            return 0
        return self.store.delete_user(session.user_id, keep=session.store_key)

    def close(self) -> None:
        """Close the store if this manager opened it (from a URL); idempotent."""
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> SessionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------

    def _fingerprint(self, client: ClientInfo) -> str | None:
        if not (self.bind_user_agent or self.bind_ip):
            return None
        parts = [client.user_agent if self.bind_user_agent else ""]
        if self.bind_ip:
            try:
                ip = ipaddress.ip_address(client.ip)
                prefix = 24 if ip.version == 4 else 64
                parts.append(str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)))
            except ValueError:
                parts.append(client.ip)
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _forget(self, key: str) -> None:
        """Delete a session found dead; a store failure here changes nothing for the caller."""
        try:
            self.store.delete(key)
        except SessionStoreUnavailable:
            pass

    def _unavailable(self, exc: SessionStoreUnavailable, client: ClientInfo) -> Session:
        if self.on_unavailable == "fail_closed":
            raise exc
        log.warning("session store unavailable, serving a new unsaved session: %s", exc)
        session = self.new(client)
        session.transient = True
        return session
