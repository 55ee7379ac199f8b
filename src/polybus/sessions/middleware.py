"""ASGI and WSGI middleware: a server-side session for every request, behind a signed cookie.

Starlette / FastAPI::

    from starlette.middleware import Middleware
    manager = SessionManager("redis://localhost:6379/0")
    keys = Keyring(HMACKey("2025-01", secret))              # from your secret store
    app = Starlette(routes=..., middleware=[Middleware(SessionMiddleware,
                                                       manager=manager, keys=keys)])
    # in an endpoint:  request.session["cart"] = [...]; request.session.login("user-42")

Flask (any WSGI app)::

    app.wsgi_app = WSGISessionMiddleware(app.wsgi_app, manager=manager, keys=keys)
    # in a view:  session = session_of(flask.request.environ)

The session (a :class:`LazySession`, a mutable mapping) is read from the store
on first use only; a request that never touches it costs no store call. It is
saved when the response starts, and only if it changed (or its idle deadline
is due to move); responses with a 5xx status save nothing. ``login``,
``rotate`` and ``logout`` take effect then too, before the response leaves:
the old id is dead by the time the client sees the new one.

The cookie is ``__Host-session`` by default: ``Secure``, ``HttpOnly``,
``SameSite=Lax``, ``Path=/``, no ``Domain``, no ``Max-Age`` (it ends with the
browser; the server's idle and absolute timeouts end the session itself). Its
value is the session id and an HMAC-SHA-256 of it under the :class:`Keyring`'s
HMAC keys (the signing key signs, every key verifies: rotation works as for
tokens). A cookie that is malformed, oversized, unsigned or signed with an
unknown key is refused before any store call, logged, and cleared in the
response; the request continues with a new anonymous session, never an error
page.

When the store is down and the manager fails closed (its default), the
request gets ``503 Service Unavailable`` with ``Retry-After``, never a 500
from a client library: whether the store failed while the application read
the session or when the response started. The cookie is left as it is.

``__Host-`` cookies need ``Secure``, which browsers accept over HTTPS; Chromium
(checked with 156) also accepts them from ``http://localhost`` and
``http://127.0.0.1``, other browsers and versions may not. For plain-HTTP
development elsewhere, pass ``CookieSettings(name="session", secure=False)``;
never in production.

In ``async`` endpoints, ``await request.session.aload()`` first keeps the store
read off the event loop (a first access from the loop blocks it otherwise); the
save at response time always runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigurationError
from .base import ClientInfo, Session, SessionStoreUnavailable
from .manager import SessionManager, handle_of
from .tokens import HMACKey, Keyring, b64encode

__all__ = [
    "CookieSettings",
    "CookieSigner",
    "LazySession",
    "SessionMiddleware",
    "WSGISessionMiddleware",
    "session_of",
]

log = logging.getLogger("polybus.sessions")

#: the largest cookie value accepted (RFC 6265 §6.1 asks browsers for at least 4096
#: bytes per cookie, name included; ASVS 5.0 V3.3.5)
MAX_COOKIE_SIZE = 4096
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 7230 token
_DOMAIN = b"polybus-session-cookie\x00"  # keeps cookie MACs apart from token signatures


@dataclass(frozen=True, slots=True)
class CookieSettings:
    """How the session cookie is named and flagged; the defaults are the safe ones.

    Raises ConfigurationError for combinations browsers refuse or that defeat
    the cookie's protection (``__Host-`` without ``Secure`` or with another
    path, ``SameSite=None`` without ``Secure``).
    """

    name: str = "__Host-session"
    secure: bool = True
    http_only: bool = True
    same_site: Literal["lax", "strict", "none"] = "lax"
    path: str = "/"
    max_age: int | None = None  #: seconds; None: a browser-session cookie

    def __post_init__(self) -> None:
        if not _COOKIE_NAME.fullmatch(self.name):
            raise ConfigurationError(f"cookie name {self.name!r} is not an HTTP token")
        if self.same_site not in ("lax", "strict", "none"):
            raise ConfigurationError(
                f"same_site must be lax, strict or none, not {self.same_site!r}"
            )
        if self.name.startswith("__Host-") and (not self.secure or self.path != "/"):
            raise ConfigurationError(
                "a __Host- cookie needs secure=True and path='/'; for plain-HTTP development "
                "use another name, e.g. CookieSettings(name='session', secure=False)"
            )
        if self.name.startswith("__Secure-") and not self.secure:
            raise ConfigurationError("a __Secure- cookie needs secure=True")
        if self.same_site == "none" and not self.secure:
            raise ConfigurationError("SameSite=None needs secure=True (browsers refuse it)")
        if not self.path.startswith("/") or ";" in self.path:
            raise ConfigurationError(f"cookie path {self.path!r} must start with '/'")
        if self.max_age is not None and self.max_age <= 0:
            raise ConfigurationError("max_age must be positive (or None)")

    def _attributes(self) -> str:
        parts = [f"Path={self.path}"]
        if self.secure:
            parts.append("Secure")
        if self.http_only:
            parts.append("HttpOnly")
        parts.append(f"SameSite={self.same_site.capitalize()}")
        return "; ".join(parts)

    def set(self, value: str) -> str:
        """The Set-Cookie value that stores ``value``."""
        age = "" if self.max_age is None else f"; Max-Age={self.max_age}"
        return f"{self.name}={value}{age}; {self._attributes()}"

    def clear(self) -> str:
        """The Set-Cookie value that removes the cookie."""
        return (
            f"{self.name}=; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; {self._attributes()}"
        )


class CookieSigner:
    """Signs session ids for cookies with a keyring's HMAC keys; thread-safe."""

    def __init__(self, keys: Keyring | HMACKey) -> None:
        self.keys = keys if isinstance(keys, Keyring) else Keyring(keys)
        if not any(isinstance(k, HMACKey) for k in self.keys):
            raise ConfigurationError("cookie signing needs an HMACKey in the keyring")

    def _hmac_keys(self) -> list[HMACKey]:
        signing = self.keys.signing
        others = [k for k in self.keys if isinstance(k, HMACKey) and k is not signing]
        return [signing, *others] if isinstance(signing, HMACKey) else others

    def sign(self, value: str) -> str:
        """``value`` with its MAC appended (``value.mac``)."""
        key = self._hmac_keys()[0]
        return f"{value}.{b64encode(key._mac(_DOMAIN + value.encode()))}"

    def unsign(self, signed: str) -> str | None:
        """The value, if ``signed`` carries a valid MAC under any held key; else None."""
        value, dot, mac = signed.rpartition(".")
        if not dot or not value or len(mac) != 43:
            return None
        try:
            data = _DOMAIN + value.encode("ascii")
        except UnicodeEncodeError:
            return None
        for key in self._hmac_keys():
            if hmac.compare_digest(b64encode(key._mac(data)), mac):
                return value
        return None


class LazySession(MutableMapping[str, Any]):
    """This request's session: a mutable mapping read from the store on first use.

    ``login``, ``rotate`` and ``logout`` are carried out when the response
    starts, so they never block the handler; until then the mapping keeps
    working on the data. Reading or writing data loads the session (blocking
    on the store; see :meth:`aload`), and raises SessionStoreUnavailable when
    the store is down under the manager's ``fail_closed`` policy. Not
    thread-safe: one request uses it.
    """

    def __init__(self, manager: SessionManager, session_id: str | None, client: ClientInfo) -> None:
        self._manager = manager
        self._cookie_id = session_id  #: the verified id the request presented
        self._client = client
        self._session: Session | None = None
        self._actions: list[tuple[str, str | None]] = []  # logins and rotations to carry out
        self._ended: Session | None = None  # the loaded session a logout() ended
        self._ended_id: str | None = None  # the id a logout() ended before it was loaded
        self.rejected: str | None = None  #: why the request's cookie was refused, if it was
        #: the store's failure when loading the session failed (the middleware answers 503)
        self.unavailable: SessionStoreUnavailable | None = None

    # loading

    @property
    def loaded(self) -> bool:
        return self._session is not None

    @property
    def touched(self) -> bool:
        """Whether the end of the request has anything to do (store or cookie)."""
        return self._session is not None or bool(self._actions) or self.rejected is not None

    def load(self) -> Session:
        """The session, read from the store now if not yet (blocks on the store).

        Raises SessionStoreUnavailable (the middleware answers 503 for it).
        """
        if self._session is None:
            try:
                self._session = self._manager.load(self._cookie_id, self._client)
            except SessionStoreUnavailable as exc:
                self.unavailable = exc
                raise
        return self._session

    async def aload(self) -> Session:
        """:meth:`load` in a worker thread, for ``async`` endpoints."""
        if self._session is None:
            await asyncio.to_thread(self.load)
        return self.load()

    # what the application changes

    @property
    def user_id(self) -> str | None:
        """The logged-in user (including a login of this request), or None."""
        for action, argument in reversed(self._actions):
            if action == "login":
                return argument
        return self.load().user_id

    @property
    def is_new(self) -> bool:
        """True when the request brought no live session."""
        return self.load().is_new

    @property
    def handle(self) -> str:
        """A non-secret name of the session, safe to log (the id is a credential)."""
        return handle_of(self.load().id)

    def login(self, user_id: str) -> None:
        """Authenticate the session as ``user_id``: it gets a new id, the old one dies
        (ASVS 7.2.4; no session fixation)."""
        if not isinstance(user_id, str) or not user_id:
            raise ConfigurationError(f"user_id must be a non-empty str, not {user_id!r}")
        self._actions.append(("login", user_id))

    def rotate(self) -> None:
        """Give the session a new id (call on a privilege change); the old id dies."""
        self._actions.append(("rotate", None))

    def logout(self) -> None:
        """End the session in the store (ASVS 7.4.1); what the request writes afterwards
        goes to a new anonymous session."""
        if self._session is None:
            self._ended_id = self._cookie_id
        elif not self._session.is_new and self._ended is None:
            self._ended = self._session
        self._actions.clear()  # a login or rotation of the ended session is moot
        self._session = self._manager.new(self._client)

    # the mapping

    def __getitem__(self, key: str) -> Any:
        return self.load()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.load()[key] = value

    def __delitem__(self, key: str) -> None:
        del self.load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.load())

    def __len__(self) -> int:
        return len(self.load())

    def __contains__(self, key: object) -> bool:
        return key in self.load()

    def get(self, key: str, default: Any = None) -> Any:
        return self.load().get(key, default)

    def mark_changed(self, key: str) -> None:
        """Declare that the value of ``key`` was mutated in place."""
        self.load().mark_changed(key)

    def __repr__(self) -> str:
        state = repr(self._session) if self._session is not None else "not loaded"
        return f"LazySession({state})"

    # the end of the request

    def _finish(self, cookie: CookieSettings, signer: CookieSigner) -> list[str]:
        """Carry out the actions, save, and return the Set-Cookie values (blocks)."""
        manager = self._manager
        if self._ended_id is not None:
            manager.logout(manager.load(self._ended_id, self._client))
        if self._ended is not None:
            manager.logout(self._ended)
        if self._session is None and not self._actions:  # untouched: no store call at all
            return [cookie.clear()] if self.rejected else []
        session = self.load()
        for action, argument in self._actions:
            if action == "login":
                assert argument is not None
                session = manager.login(session, argument, client=self._client)
            else:
                session = manager.rotate(session)
        self._actions.clear()
        self._session = session
        if session.transient:  # served while the store is down: the cookie is for later
            return []
        if manager.save(session):
            if session.id != self._cookie_id or cookie.max_age is not None:
                return [cookie.set(signer.sign(session.id))]
            return []
        if self._cookie_id or self.rejected:
            return [cookie.clear()]
        return []


class _Sessions:
    """What both middlewares share: reading the cookie and finishing the request."""

    def __init__(
        self,
        manager: SessionManager,
        keys: Keyring | HMACKey,
        cookie: CookieSettings | None,
    ) -> None:
        self.manager = manager
        self.signer = CookieSigner(keys)
        self.cookie = cookie or CookieSettings()

    def begin(self, cookie_headers: Iterable[str], client: ClientInfo) -> LazySession:
        session_id, rejected = self._read(cookie_headers)
        lazy = LazySession(self.manager, session_id, client)
        if rejected:
            lazy.rejected = rejected
            log.warning("session cookie refused (%s); starting an anonymous session", rejected)
        return lazy

    def _read(self, cookie_headers: Iterable[str]) -> tuple[str | None, str | None]:
        rejected = None
        name = self.cookie.name
        for header in cookie_headers:
            for part in header.split(";"):
                key, eq, value = part.strip().partition("=")
                if key != name or not eq:
                    continue
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if len(value) + len(name) + 1 > MAX_COOKIE_SIZE:
                    rejected = f"oversized: {len(value)} bytes"
                    continue
                session_id = self.signer.unsign(value)
                if session_id is not None:
                    return session_id, None
                rejected = "bad signature or malformed value"
        return None, rejected

    def finish(self, lazy: LazySession, status: int) -> list[str]:
        if status >= 500:  # the request failed: keep the session as it was
            return []
        return lazy._finish(self.cookie, self.signer)


def session_of(scope_or_environ: MutableMapping[str, Any]) -> LazySession:
    """The request's session from an ASGI scope or a WSGI environ.

    Raises ConfigurationError when no session middleware ran for the request.
    """
    for key in ("session", "polybus.session"):
        session = scope_or_environ.get(key)
        if isinstance(session, LazySession):
            return session
    raise ConfigurationError("no polybus session here: is the session middleware installed?")


ASGIApp = Callable[..., Any]


class SessionMiddleware:
    """ASGI middleware: ``scope["session"]`` (Starlette's ``request.session``) is the
    request's :class:`LazySession`; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        manager: SessionManager,
        keys: Keyring | HMACKey,
        cookie: CookieSettings | None = None,
    ) -> None:
        self.app = app
        self._sessions = _Sessions(manager, keys, cookie)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"cookie"]
        user_agent = next(
            (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"user-agent"), ""
        )
        client = scope.get("client")
        lazy = self._sessions.begin(headers, ClientInfo(user_agent, client[0] if client else ""))
        scope["session"] = lazy
        if scope["type"] == "websocket":  # no response headers to set a cookie in
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_cookie(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                if lazy.unavailable is not None and int(message["status"]) == 500:
                    raise lazy.unavailable  # the application answered it with a plain 500
                if lazy.touched:
                    cookies = await asyncio.to_thread(
                        self._sessions.finish, lazy, int(message["status"])
                    )
                    if cookies:
                        extra = [(b"set-cookie", c.encode("latin-1")) for c in cookies]
                        message = {**message, "headers": [*message.get("headers", ()), *extra]}
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_with_cookie)
        except SessionStoreUnavailable as exc:
            if started:
                raise
            headers = _unavailable_headers(exc)
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
                }
            )
            await send({"type": "http.response.body", "body": _UNAVAILABLE_BODY})


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WSGISessionMiddleware:
    """WSGI middleware: ``environ["polybus.session"]`` (or :func:`session_of`) is the
    request's :class:`LazySession`; see the module docstring."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        manager: SessionManager,
        keys: Keyring | HMACKey,
        cookie: CookieSettings | None = None,
    ) -> None:
        self.app = app
        self._sessions = _Sessions(manager, keys, cookie)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        cookie = environ.get("HTTP_COOKIE", "")
        client = ClientInfo(environ.get("HTTP_USER_AGENT", ""), environ.get("REMOTE_ADDR", ""))
        lazy = self._sessions.begin([cookie] if cookie else [], client)
        environ["polybus.session"] = lazy
        finished = replaced = started = False

        def start_with_cookie(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            nonlocal finished, replaced, started
            if not finished:
                finished = True
                code = int(status.split(" ", 1)[0])
                if lazy.unavailable is not None and code == 500:
                    # the application answered the store's failure with a plain 500
                    replaced = True
                    status, headers = _UNAVAILABLE, _unavailable_headers(lazy.unavailable)
                else:
                    headers = [
                        *headers,
                        *(("Set-Cookie", c) for c in self._sessions.finish(lazy, code)),
                    ]
            started = True
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, start_with_cookie)
        except SessionStoreUnavailable as exc:
            if started:
                raise
            start_response(_UNAVAILABLE, _unavailable_headers(exc))
            return [_UNAVAILABLE_BODY]
        if not replaced:
            return body
        close = getattr(body, "close", None)
        if close is not None:
            close()
        return [_UNAVAILABLE_BODY]


_UNAVAILABLE = "503 Service Unavailable"
_UNAVAILABLE_BODY = b"503 Service Unavailable: the session store cannot be reached; try again\n"


def _unavailable_headers(exc: SessionStoreUnavailable) -> list[tuple[str, str]]:
    """Log the store's failure; the headers of the 503 that answers it."""
    log.warning("session store unavailable, answering 503: %s", exc)
    return [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(_UNAVAILABLE_BODY))),
        ("Retry-After", "1"),
    ]
