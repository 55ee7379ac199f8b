"""The session middleware in real frameworks: Starlette (ASGI) and Flask (WSGI).

Every test runs on both, through the frameworks' own test clients. A small
browser model keeps the cookie as a browser would, so each test can also play
the attacker by sending cookies of its own. Test names carry the OWASP ASVS
5.0 requirement they cover (V3.3 cookie setup, V7 session management).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from polybus.errors import ConfigurationError
from polybus.sessions import (
    SessionManager,
    SessionRecord,
    SessionStore,
    new_session_id,
    open_store,
    store_key,
)
from polybus.sessions.middleware import (
    MAX_COOKIE_SIZE,
    CookieSettings,
    CookieSigner,
    SessionMiddleware,
    WSGISessionMiddleware,
    session_of,
)
from polybus.sessions.tokens import Ed25519Key, HMACKey, Keyring
from polybus.testing import servers

COOKIE = "__Host-session"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """A real memory store that counts the calls the middleware makes."""

    linearizable = True

    def __init__(self) -> None:
        self.inner: SessionStore = open_store(f"memory://{uuid.uuid4().hex}")
        self.loads = self.saves = 0

    def load(self, session_id: str) -> SessionRecord | None:
        self.loads += 1
        return self.inner.load(session_id)

    def save(self, record: SessionRecord) -> None:
        self.saves += 1
        self.inner.save(record)

    def delete(self, session_id: str) -> bool:
        return self.inner.delete(session_id)

    def user_tag(self, user_id: str) -> str | None:
        return self.inner.user_tag(user_id)

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        return self.inner.user_sessions(user_id)

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        return self.inner.delete_user(user_id, keep=keep)

    def close(self) -> None:
        self.inner.close()

    def reset(self) -> None:
        self.loads = self.saves = 0


@dataclass
class Reply:
    status: int
    body: Any
    set_cookies: list[str]


def view(session: Any) -> dict[str, Any]:
    return {"user": session.user_id, "count": session.get("count"), "new": session.is_new}


# -- the same small app in both frameworks ------------------------------------------


def starlette_app(middleware_options: dict[str, Any]) -> Callable[..., Reply]:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    async def nothing(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def whoami(request: Request) -> JSONResponse:
        session = session_of(request.scope)
        await session.aload()  # off the event loop
        return JSONResponse(view(session))

    def incr(request: Request) -> JSONResponse:  # a sync endpoint: runs in a thread
        request.session["count"] = (request.session.get("count") or 0) + 1
        return JSONResponse(view(request.session))

    async def login(request: Request) -> JSONResponse:
        session = session_of(request.scope)
        await session.aload()
        session.login(request.path_params["user"])
        return JSONResponse(view(session))

    async def rotate(request: Request) -> JSONResponse:
        session_of(request.scope).rotate()
        return JSONResponse(view(request.session))

    async def logout(request: Request) -> JSONResponse:
        if request.query_params.get("load"):
            await session_of(request.scope).aload()
        session_of(request.scope).logout()
        return JSONResponse({"user": None})

    async def boom(request: Request) -> JSONResponse:
        request.session["count"] = 999
        raise RuntimeError("handler failed")

    app = Starlette(
        routes=[
            Route("/nothing", nothing),
            Route("/whoami", whoami),
            Route("/incr", incr, methods=["POST"]),
            Route("/login/{user}", login, methods=["POST"]),
            Route("/rotate", rotate, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
        ],
        middleware=[Middleware(SessionMiddleware, **middleware_options)],
    )
    client = TestClient(app, base_url="https://testserver", raise_server_exceptions=False)

    def call(method: str, path: str, headers: dict[str, str]) -> Reply:
        raw = {k: v.encode("latin-1") for k, v in headers.items()}  # as a browser sends them
        response = client.request(method, path, headers=raw)
        client.cookies.clear()  # the Browser below keeps cookies, not the client
        body = (
            response.json()
            if response.headers.get("content-type") == "application/json"
            else response.text
        )
        return Reply(response.status_code, body, response.headers.get_list("set-cookie"))

    return call


def flask_app(middleware_options: dict[str, Any]) -> Callable[..., Reply]:
    import flask

    app = flask.Flask(__name__)
    app.config["PROPAGATE_EXCEPTIONS"] = False

    def session() -> Any:
        return session_of(flask.request.environ)

    @app.get("/nothing")
    def nothing() -> str:
        return "ok"

    @app.get("/whoami")
    def whoami() -> Any:
        return flask.jsonify(view(session()))

    @app.post("/incr")
    def incr() -> Any:
        session()["count"] = (session().get("count") or 0) + 1
        return flask.jsonify(view(session()))

    @app.post("/login/<user>")
    def login(user: str) -> Any:
        session().login(user)
        return flask.jsonify(view(session()))

    @app.post("/rotate")
    def rotate() -> Any:
        session().rotate()
        return flask.jsonify(view(session()))

    @app.post("/logout")
    def logout() -> Any:
        if flask.request.args.get("load"):
            session().load()
        session().logout()
        return flask.jsonify({"user": None})

    @app.post("/boom")
    def boom() -> Any:
        session()["count"] = 999
        raise RuntimeError("handler failed")

    app.wsgi_app = WSGISessionMiddleware(app.wsgi_app, **middleware_options)  # type: ignore[method-assign]
    client = app.test_client(use_cookies=False)

    def call(method: str, path: str, headers: dict[str, str]) -> Reply:
        response = client.open(path, method=method, headers=headers, base_url="https://localhost")
        body = response.get_json() if response.is_json else response.get_data(as_text=True)
        return Reply(response.status_code, body, response.headers.getlist("Set-Cookie"))

    return call


@dataclass
class Site:
    """One application behind the middleware, and what it runs on."""

    call: Callable[..., Reply]
    manager: SessionManager
    store: CountingStore
    keys: Keyring
    clock: Clock

    def browser(self) -> Browser:
        return Browser(self)


@dataclass
class Browser:
    """Keeps the session cookie the way a browser does with Set-Cookie."""

    site: Site
    cookie: str | None = None  # the session cookie's value
    last: Reply | None = field(default=None, repr=False)

    def send(self, method: str, path: str, *, cookie_header: str | None = None) -> Reply:
        header = cookie_header
        if header is None and self.cookie is not None:
            header = f"{COOKIE}={self.cookie}"
        reply = self.site.call(method, path, {"Cookie": header} if header else {})
        for set_cookie in reply.set_cookies:
            name, _, rest = set_cookie.partition("=")
            value = rest.split(";", 1)[0]
            if name == COOKIE:
                self.cookie = None if "Max-Age=0" in set_cookie else value
        self.last = reply
        return reply

    def get(self, path: str, **kw: Any) -> Reply:
        return self.send("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Reply:
        return self.send("POST", path, **kw)


@pytest.fixture(params=["starlette", "flask"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    clock = Clock()
    store = CountingStore()
    manager = SessionManager(
        store, idle_timeout=60, absolute_timeout=300, touch_interval=10, clock=clock
    )
    keys = Keyring(HMACKey.generate("cookie-1"))
    make = starlette_app if request.param == "starlette" else flask_app
    yield Site(make({"manager": manager, "keys": keys}), manager, store, keys, clock)
    manager.close()
    store.close()


def logged_in(site: Site, user: str = "alice") -> Browser:
    browser = site.browser()
    browser.post(f"/login/{user}")
    assert browser.cookie is not None
    return browser


def parse_set_cookie(header: str) -> tuple[str, str, dict[str, str]]:
    first, *attributes = [part.strip() for part in header.split(";")]
    name, _, value = first.partition("=")
    attrs = {}
    for attribute in attributes:
        key, _, val = attribute.partition("=")
        attrs[key.lower()] = val
    return name, value, attrs


# -- cookie attributes (V3.3) ----------------------------------------------------------


def test_v3_3_session_cookie_is_host_prefixed_secure_httponly_lax_path_root(site: Site) -> None:
    browser = site.browser()
    reply = browser.post("/login/alice")
    assert reply.status == 200
    assert len(reply.set_cookies) == 1
    name, value, attrs = parse_set_cookie(reply.set_cookies[0])
    assert name == "__Host-session"  # V3.3.1 and V3.3.3: the __Host- prefix
    assert "secure" in attrs  # V3.3.1
    assert attrs.get("samesite") == "Lax"  # V3.3.2
    assert "httponly" in attrs  # V3.3.4
    assert attrs.get("path") == "/"
    assert "domain" not in attrs
    assert "max-age" not in attrs  # a browser-session cookie
    assert "expires" not in attrs
    assert len(name) + 1 + len(value) < MAX_COOKIE_SIZE  # V3.3.5


def test_v3_3_cookie_settings_refuse_unsafe_combinations() -> None:
    with pytest.raises(ConfigurationError, match="secure=True"):
        CookieSettings(secure=False)
    with pytest.raises(ConfigurationError, match="path='/'"):
        CookieSettings(path="/app")
    with pytest.raises(ConfigurationError, match="SameSite=None"):
        CookieSettings(name="session", secure=False, same_site="none")
    with pytest.raises(ConfigurationError, match="__Secure-"):
        CookieSettings(name="__Secure-s", secure=False)
    with pytest.raises(ConfigurationError, match="HTTP token"):
        CookieSettings(name="bad name;")
    with pytest.raises(ConfigurationError, match="same_site"):
        CookieSettings(same_site="loose")  # type: ignore[arg-type]
    plain = CookieSettings(name="dev-session", secure=False, same_site="strict", max_age=600)
    assert plain.set("v") == "dev-session=v; Max-Age=600; Path=/; HttpOnly; SameSite=Strict"
    with pytest.raises(ConfigurationError, match="HMACKey"):
        CookieSigner(Keyring(Ed25519Key.generate("e")))


# -- lazy loading, saving only changes -------------------------------------------------


def test_an_untouched_session_costs_no_store_call_and_sets_no_cookie(site: Site) -> None:
    browser = logged_in(site)
    site.store.reset()
    reply = browser.get("/nothing")
    assert (reply.status, reply.set_cookies) == (200, [])
    assert (site.store.loads, site.store.saves) == (0, 0)
    reply = site.browser().get("/nothing")  # no cookie at all
    assert (reply.set_cookies, site.store.loads) == ([], 0)


def test_reading_loads_once_and_writes_nothing(site: Site) -> None:
    browser = logged_in(site)
    site.store.reset()
    reply = browser.get("/whoami")
    assert reply.body == {"user": "alice", "count": None, "new": False}
    assert reply.set_cookies == []
    assert (site.store.loads, site.store.saves) == (1, 0)


def test_a_change_is_saved_once_under_the_same_cookie(site: Site) -> None:
    browser = logged_in(site)
    cookie = browser.cookie
    site.store.reset()
    assert browser.post("/incr").body["count"] == 1
    assert (site.store.saves, browser.last and browser.last.set_cookies) == (1, [])
    assert browser.cookie == cookie
    assert browser.get("/whoami").body["count"] == 1


def test_an_anonymous_session_without_data_sets_no_cookie(site: Site) -> None:
    browser = site.browser()
    assert browser.get("/whoami").body == {"user": None, "count": None, "new": True}
    assert browser.cookie is None
    assert site.store.saves == 0


def test_a_failed_request_saves_nothing(site: Site) -> None:
    browser = logged_in(site)
    browser.post("/incr")
    reply = browser.post("/boom")
    assert reply.status == 500
    assert reply.set_cookies == []
    assert browser.get("/whoami").body["count"] == 1


# -- ids: generation, rotation, fixation (V7.2) ---------------------------------------


def test_v7_2_4_login_issues_a_new_id_and_the_old_one_dies(site: Site) -> None:
    browser = site.browser()
    browser.post("/incr")  # an anonymous session with data: it has a cookie
    anonymous = browser.cookie
    assert anonymous is not None
    reply = browser.post("/login/alice")
    assert browser.cookie not in (None, anonymous)
    assert reply.body["user"] == "alice"
    assert browser.get("/whoami").body == {"user": "alice", "count": 1, "new": False}
    replay = site.browser()
    replay.cookie = anonymous
    assert replay.get("/whoami").body == {"user": None, "count": None, "new": True}
    assert replay.cookie is None  # and the dead cookie is cleared


def test_v7_2_4_session_fixation_with_a_planted_cookie_gains_the_attacker_nothing(
    site: Site,
) -> None:
    attacker = site.browser()
    attacker.post("/incr")  # a genuine anonymous session of the attacker's
    victim = site.browser()
    victim.cookie = attacker.cookie  # planted in the victim's browser
    victim.post("/login/victim")
    assert victim.cookie != attacker.cookie
    assert attacker.get("/whoami").body["user"] is None  # the attacker is not logged in
    assert victim.get("/whoami").body["user"] == "victim"


def test_v7_2_3_an_invented_or_foreign_signed_id_is_never_adopted(site: Site) -> None:
    invented = "A" * 43
    foreign = CookieSigner(HMACKey.generate("attacker")).sign(invented)  # another key
    for value in (invented, f"{invented}.{'B' * 43}", foreign):
        browser = site.browser()
        site.store.reset()
        reply = browser.post("/incr", cookie_header=f"{COOKIE}={value}")
        assert reply.status == 200
        assert site.store.loads == 0  # refused before the store is asked
        assert browser.cookie is not None
        assert invented not in browser.cookie  # a fresh id, not the presented one


def test_v7_2_rotation_keeps_user_and_data_under_a_new_id(site: Site) -> None:
    browser = logged_in(site)
    browser.post("/incr")
    before = browser.cookie
    browser.post("/rotate")
    assert browser.cookie not in (None, before)
    assert browser.get("/whoami").body == {"user": "alice", "count": 1, "new": False}
    old = site.browser()
    old.cookie = before
    assert old.get("/whoami").body["new"] is True


def test_cookie_keys_rotate_like_token_keys(site: Site) -> None:
    browser = logged_in(site)
    site.keys.rotate(HMACKey.generate("cookie-2"))
    assert browser.get("/whoami").body["user"] == "alice"  # the old key still verifies
    browser.post("/rotate")  # the next cookie is signed with the new key
    site.keys.retire("cookie-1")
    assert browser.get("/whoami").body["user"] == "alice"
    stale = logged_in(site)
    site.keys.rotate(HMACKey.generate("cookie-3"))
    site.keys.retire("cookie-2")
    assert stale.get("/whoami").body["user"] is None


# -- timeouts (V7.3) and termination (V7.4) -------------------------------------------


def test_v7_3_1_idle_timeout_ends_the_session(site: Site) -> None:
    browser = logged_in(site)
    site.clock.now += 59
    assert browser.get("/whoami").body["user"] == "alice"
    site.clock.now += 61  # 61 s after the last request
    assert browser.get("/whoami").body["user"] is None
    assert browser.cookie is None


def test_v7_3_2_absolute_timeout_ends_an_active_session(site: Site) -> None:
    browser = logged_in(site)
    for _ in range(5):
        site.clock.now += 55
        assert browser.post("/incr").body["user"] == "alice"  # activity moves the idle deadline
    site.clock.now += 30  # 305 s after login
    assert browser.get("/whoami").body["user"] is None


@pytest.mark.parametrize("path", ["/logout", "/logout?load=1"], ids=["unloaded", "loaded"])
def test_v7_4_1_logout_ends_the_session_on_the_server(site: Site, path: str) -> None:
    browser = logged_in(site)
    kept = browser.cookie
    reply = browser.post(path)
    assert any("Max-Age=0" in c for c in reply.set_cookies)
    assert browser.cookie is None
    replay = site.browser()
    replay.cookie = kept  # the cookie copied before the logout
    assert replay.get("/whoami").body == {"user": None, "count": None, "new": True}
    assert site.manager.sessions_of("alice") == []


def test_v7_4_2_logout_everywhere_ends_every_browser_of_the_user(site: Site) -> None:
    laptop, phone, other = logged_in(site), logged_in(site), logged_in(site, "bob")
    assert len(site.manager.sessions_of("alice")) == 2
    site.manager.logout_everywhere("alice")
    assert laptop.get("/whoami").body["user"] is None
    assert phone.get("/whoami").body["user"] is None
    assert other.get("/whoami").body["user"] == "bob"


# -- tampered, oversized and malformed cookies ----------------------------------------


def test_v7_2_1_tampered_cookies_are_refused_cleared_and_never_an_error_page(site: Site) -> None:
    browser = logged_in(site)
    good = browser.cookie
    assert good is not None
    other = logged_in(site, "bob").cookie
    assert other is not None
    session_id = good.rsplit(".", 1)[0]
    variants = [
        good[:-1] + ("A" if good[-1] != "A" else "B"),  # MAC changed
        ("B" if good[0] != "B" else "C") + good[1:],  # id changed
        f"{session_id}.{other.rsplit('.', 1)[1]}",  # another session's MAC
        session_id,  # MAC removed
        good[:-10],  # truncated
    ]
    for value in variants:
        site.store.reset()
        reply = site.browser().get("/whoami", cookie_header=f"{COOKIE}={value}")
        assert reply.status == 200
        assert reply.body == {"user": None, "count": None, "new": True}
        assert site.store.loads == 0
        assert any("Max-Age=0" in c for c in reply.set_cookies)
    assert browser.get("/whoami").body["user"] == "alice"


@pytest.mark.parametrize(
    "header",
    [
        f"{COOKIE}=",
        f"{COOKIE}",
        f"{COOKIE}==",
        f"{COOKIE}=" + "A" * (MAX_COOKIE_SIZE + 10),  # oversized
        f"{COOKIE}=" + "é" * 50,
        f'{COOKIE}="unterminated',
        f"{COOKIE}=a.b.c.d.e",
        ";;;=;=" * 100,
        "; ".join(f"c{i}=v{i}" for i in range(300)),  # many other cookies, none ours
    ],
    ids=["empty", "no-value", "equals", "oversized", "latin1", "quote", "dots", "junk", "many"],
)
def test_v7_2_1_malformed_and_oversized_cookies_get_an_anonymous_session(
    site: Site, header: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="polybus.sessions"):
        reply = site.browser().get("/whoami", cookie_header=header)
    assert reply.status == 200
    assert reply.body == {"user": None, "count": None, "new": True}
    assert site.store.loads == 0
    if header.startswith(f"{COOKIE}=") and len(header) > len(COOKIE) + 1:  # a value was sent
        assert any(c.startswith(f"{COOKIE}=") and "Max-Age=0" in c for c in reply.set_cookies)
        assert "session cookie refused" in caplog.text


def test_a_valid_cookie_next_to_a_bad_duplicate_still_works(site: Site) -> None:
    browser = logged_in(site)
    header = f"{COOKIE}=forged.value; other=1; {COOKIE}={browser.cookie}"
    assert site.browser().get("/whoami", cookie_header=header).body["user"] == "alice"


@pytest.fixture(params=["starlette", "flask"])
def down_site(request: pytest.FixtureRequest) -> Iterator[tuple[Callable[..., Reply], Keyring]]:
    """The app on a Redis store nothing listens for: the client library's own errors."""
    manager = SessionManager(f"redis://127.0.0.1:{servers.free_port()}/0")
    keys = Keyring(HMACKey.generate("cookie-1"))
    make = starlette_app if request.param == "starlette" else flask_app
    yield make({"manager": manager, "keys": keys}), keys
    manager.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/whoami"), ("POST", "/logout")],
    ids=["read-in-the-handler", "read-when-the-response-starts"],
)
def test_a_store_that_is_down_gets_a_503_never_an_error_page(
    down_site: tuple[Callable[..., Reply], Keyring], method: str, path: str
) -> None:
    """Fail closed (the default): 503 with Retry-After, whether the store failed while the
    handler read the session or at the end of the request; the cookie stays as it is."""
    call, keys = down_site
    cookie = f"{COOKIE}={CookieSigner(keys).sign(new_session_id())}"
    reply = call(method, path, {"Cookie": cookie})
    assert reply.status == 503
    assert "session store cannot be reached" in reply.body
    assert reply.set_cookies == []


@pytest.mark.parametrize("make", [starlette_app, flask_app], ids=["starlette", "flask"])
@pytest.mark.parametrize(("method", "path"), [("GET", "/whoami"), ("POST", "/incr")])
def test_fail_open_serves_anonymously_and_keeps_the_cookie_for_later(
    make: Callable[[dict[str, Any]], Callable[..., Reply]], method: str, path: str
) -> None:
    """With the store down, fail_open serves the request as anonymous; the user's cookie
    must survive it, so the session is theirs again once the store is back."""
    keys = Keyring(HMACKey.generate("cookie-1"))
    dead = f"redis://127.0.0.1:{servers.free_port()}/0"
    with SessionManager(dead, on_unavailable="fail_open") as manager:
        call = make({"manager": manager, "keys": keys})
        cookie = f"{COOKIE}={CookieSigner(keys).sign(new_session_id())}"
        reply = call(method, path, {"Cookie": cookie})
    assert reply.status == 200
    assert reply.body["user"] is None
    assert reply.set_cookies == []


def test_session_of_names_a_missing_middleware() -> None:
    with pytest.raises(ConfigurationError, match="middleware"):
        session_of({"type": "http"})


def test_the_cookie_value_is_the_signed_id_and_nothing_else(site: Site) -> None:
    browser = logged_in(site)
    assert browser.cookie is not None
    session_id = CookieSigner(site.keys).unsign(browser.cookie)
    assert session_id is not None
    assert site.store.inner.load(session_id) is None  # the store holds no cookie value
    record = site.store.inner.load(store_key(session_id))
    assert record is not None
    assert record.user_id == "alice"
    assert "alice" not in json.dumps(browser.cookie)


def test_a_websocket_sees_the_session_of_its_handshake() -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket

    async def who(websocket: WebSocket) -> None:
        await websocket.accept()
        session = await session_of(websocket.scope).aload()
        await websocket.send_json({"user": session.user_id})
        await websocket.close()

    manager = SessionManager(f"memory://{uuid.uuid4().hex}")
    keys = Keyring(HMACKey.generate("k"))
    session = manager.login(manager.new(), "alice")
    app = Starlette(
        routes=[WebSocketRoute("/ws", who)],
        middleware=[Middleware(SessionMiddleware, manager=manager, keys=keys)],
    )
    cookie = f"{COOKIE}={CookieSigner(keys).sign(session.id)}"
    with (
        TestClient(app, base_url="https://testserver") as client,
        client.websocket_connect("/ws", headers={"Cookie": cookie}) as ws,
    ):
        assert ws.receive_json() == {"user": "alice"}
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        assert ws.receive_json() == {"user": None}
    manager.close()
