"""One app instance: a small WSGI app that logs users in and says who they are.

``--strategy`` picks where the session lives:

* ``sticky``: in this process's memory; only routing brings a user back here;
* ``store``: in a session store every instance shares (the ``--url`` backend:
  central on Redis and native, replicated to every instance on Kafka and RabbitMQ);
* ``tokens``: nowhere; the cookie is a signed token, and logging out everywhere
  revokes through a topic every instance follows.

Every instance is also an edge for the gateway pattern: ``POST /orders``
publishes an order carrying the user's context, signed, for the services behind it.
"""

from __future__ import annotations

import argparse
import socketserver
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import polybus
from polybus import Message
from polybus.sessions import (
    CookieSettings,
    HMACKey,
    InvalidToken,
    Keyring,
    SessionManager,
    SharedRevocations,
    Tokens,
    UserContext,
    WSGISessionMiddleware,
    session_of,
)

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
COOKIE = CookieSettings(name="session", secure=False)  # plain HTTP on 127.0.0.1 only


class ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def answer(start: Callable[..., Any], status: str, text: str, *cookies: str) -> list[bytes]:
    headers = [("Content-Type", "text/plain"), *(("Set-Cookie", c) for c in cookies)]
    start(status, headers)
    return [text.encode()]


@dataclass(frozen=True)
class Strategy:
    """Where a strategy keeps who the user is: all the routes need of it."""

    login: Callable[[dict[str, Any], str], list[str]]  #: (environ, user) -> cookies to set
    user: Callable[[dict[str, Any]], str | None]  #: who the request's cookie says, if valid
    logout_everywhere: Callable[[str], object]


def in_sessions(manager: SessionManager) -> Strategy:
    """A server-side session behind the middleware's cookie."""

    def login(environ: dict[str, Any], user: str) -> list[str]:
        session_of(environ).login(user)  # the middleware sets the cookie
        return []

    return Strategy(login, lambda environ: session_of(environ).user_id, manager.logout_everywhere)


def in_tokens(tokens: Tokens) -> Strategy:
    """A signed token as the cookie; nothing kept on the server but revocations."""

    def login(environ: dict[str, Any], user: str) -> list[str]:
        return [f"token={tokens.issue(user)}; HttpOnly; Path=/"]

    def user(environ: dict[str, Any]) -> str | None:
        cookie = SimpleCookie(environ.get("HTTP_COOKIE", ""))
        try:
            return str(tokens.verify(cookie["token"].value if "token" in cookie else "")["sub"])
        except InvalidToken:
            return None

    return Strategy(login, user, tokens.revoke_subject)


def routes(
    name: str, strategy: Strategy, context: UserContext, bus: polybus.Bus, orders: str
) -> App:
    def app(environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        path, method = environ["PATH_INFO"], environ["REQUEST_METHOD"]
        if path == "/health":
            return answer(start, "200 OK", name)
        if path == "/login" and method == "POST":
            user = environ["QUERY_STRING"].removeprefix("user=")
            return answer(start, "200 OK", name, *strategy.login(environ, user))
        user = strategy.user(environ)
        if user is None:
            return answer(start, "401 Unauthorized", name)
        if path == "/me":
            return answer(start, "200 OK", f"{user} {name}")
        if path == "/logout-everywhere" and method == "POST":
            strategy.logout_everywhere(user)
            return answer(start, "200 OK", name)
        if path == "/orders" and method == "POST":
            bus.publish(orders, context.attach(Message({"sku": "book"}), user))
            return answer(start, "202 Accepted", name)
        return answer(start, "404 Not Found", name)

    return app


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for option in ("name", "strategy", "url", "namespace", "secret"):
        parser.add_argument(f"--{option}", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    secret = bytes.fromhex(args.secret)
    bus = polybus.connect(args.url)
    # the edge signs each order's user context; the services behind it verify it
    edge = Tokens(Keyring(HMACKey("edge", secret)), issuer="edge", audience="services", ttl=60)
    context = UserContext(edge)
    orders = f"{args.namespace}.orders"
    if args.strategy == "tokens":
        revocations = SharedRevocations(bus, topic=f"{args.namespace}.revocations", poll=0.02)
        revocations.start()
        keys = Keyring(HMACKey("login", secret))
        tokens = Tokens(keys, issuer="app", audience="app", revocations=revocations)
        app = routes(args.name, in_tokens(tokens), context, bus, orders)
    else:
        store = f"memory://{args.name}" if args.strategy == "sticky" else store_url(args.url)
        manager = SessionManager(store)
        app = WSGISessionMiddleware(
            routes(args.name, in_sessions(manager), context, bus, orders),
            manager=manager,
            keys=HMACKey("cookie", secret),
            cookie=COOKIE,
        )
    server = make_server("127.0.0.1", args.port, app, ThreadingServer, QuietHandler)
    server.serve_forever(poll_interval=0.05)


def store_url(url: str) -> str:
    """The session store on the same backend as the bus (native: a directory beside it)."""
    return f"{url.rstrip('/')}/sessions" if url.startswith("native:") else url


if __name__ == "__main__":
    main(sys.argv[1:])
