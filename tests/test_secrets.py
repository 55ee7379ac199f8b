"""Secrets in URLs never reach an error message or a log line.

Every way a URL or DSN with a password can be refused is tried here: an unknown
option, a bad option value, a malformed address, a broker that is not there,
and a wrong password, for buses, session stores and inboxes on every scheme.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import polybus
from polybus import ConfigurationError
from polybus.errors import redact_url
from polybus.patterns.inbox import NativeInbox, RedisInbox, SqlInbox
from polybus.sessions.stores import open_store
from polybus.testing import servers
from polybus.testing.plugin import require_server

SECRET = "s3cr3t-Pa55"
NOWHERE = "127.0.0.1:1"  # refused at once
QUICK = "connect_timeout=0.2&reconnect_timeout=0.5"

#: (scheme with credentials, a reachable address when the server runs or None)
NETWORK = {
    "kafka": f"kafka://user:{SECRET}@",
    "amqp": f"amqp://user:{SECRET}@",
    "redis": f"redis://:{SECRET}@",
    "redis+sentinel": f"redis+sentinel://:{SECRET}@",
}


def bad_urls(scheme: str) -> dict[str, str]:
    base = NETWORK[scheme]
    return {
        "unknown option": f"{base}{NOWHERE}/?no_such_option=1&{QUICK}",
        "bad option value": f"{base}{NOWHERE}/?reconnect_timeout=soon&connect_timeout=0.2",
        "bad port": f"{base}127.0.0.1:notaport/?{QUICK}",
        "nobody listening": f"{base}{NOWHERE}/?{QUICK}",
        "secret option": f"{base}{NOWHERE}/?{QUICK}&sasl.password={SECRET}&token={SECRET}",
    }


OPENERS: dict[str, Callable[[str], Any]] = {
    "bus": polybus.connect,
    "session store": open_store,
}


def cases() -> list[Any]:
    out = []
    for scheme in NETWORK:
        for what, url in bad_urls(scheme).items():
            for opener in OPENERS:
                if scheme == "redis+sentinel" and opener == "bus":
                    continue  # buses do not take Sentinel URLs yet
                out.append(pytest.param(opener, url, id=f"{opener}-{scheme}-{what}"))
    for what, url in bad_urls("redis").items():
        out.append(pytest.param("redis inbox", url, id=f"redis inbox-{what}"))
    out.append(pytest.param("bus", f"nosuch://user:{SECRET}@host/", id="bus-unknown scheme"))
    out.append(pytest.param("bus", f"user:{SECRET}@host", id="bus-no scheme"))
    out.append(
        pytest.param("session store", f"nosuch://u:{SECRET}@h/", id="session store-unknown scheme")
    )
    out.append(pytest.param("native inbox", f"kafka://u:{SECRET}@h/", id="native inbox-not native"))
    return out


def open_with(opener: str, url: str) -> Any:
    if opener == "redis inbox":
        return RedisInbox(url)
    if opener == "native inbox":
        return NativeInbox(url)
    return OPENERS[opener](url)


def refusal(opener: str, url: str) -> BaseException | None:
    try:
        opened = open_with(opener, url)
    except Exception as exc:  # any refusal is checked below
        return exc
    # opened lazily: the secret must not leak from the first use either
    try:
        if opener == "bus":
            opened.publish("t", b"x")
        elif opener == "session store":
            opened.load("some-session")
        else:
            opened.close()
    except Exception as exc:
        return exc
    finally:
        close = getattr(opened, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # already refused above
                pass
    return None


@pytest.mark.parametrize(("opener", "url"), cases())
def test_a_refused_url_never_shows_its_secrets(
    opener: str, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    exc = refusal(opener, url)
    assert exc is not None, f"{url} was accepted"
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    # what a user sees: the error polybus raised, as printed and as repr'd
    shown = [str(chain[0]), repr(chain[0])]
    assert all(SECRET not in text for text in shown), shown
    assert isinstance(chain[0], polybus.PolybusError), repr(chain[0])
    logged = [record.getMessage() for record in caplog.records]
    assert all(SECRET not in line for line in logged), logged


def test_a_wrong_password_is_refused_without_showing_it() -> None:
    if servers.redis_unavailable() is not None:
        pytest.skip("needs Redis: make services")
    address = servers.redis_url().split("//", 1)[1].rpartition("@")[2]
    url = f"redis://nobody:{SECRET}@{address}?reconnect_timeout=0.5"
    with pytest.raises(polybus.PolybusError) as refused, polybus.connect(url) as bus:
        bus.publish("t", b"x")
    assert SECRET not in str(refused.value)
    assert SECRET not in repr(refused.value)


@pytest.mark.parametrize(
    ("open_", "url", "names"),
    [
        (polybus.connect, f"kafka://user:{SECRET}@127.0.0.1:9092?x=1", "'x'"),
        (
            polybus.connect,
            f"kafka://user:{SECRET}@127.0.0.1:9092?reconnect_timeout=soon",
            "seconds",
        ),
        (polybus.connect, f"kafka://127.0.0.1:9092?sasl.password={SECRET}&x=1", "'x'"),
        (polybus.connect, f"kafka://user:{SECRET}@127.0.0.1:9092/path", "no path"),
        (polybus.connect, f"redis://:{SECRET}@127.0.0.1:6379/0?x=1", "'x'"),
        (polybus.connect, f"amqp://guest:{SECRET}@127.0.0.1/%2F?x=1", "'x'"),
        (polybus.connect, f"nope://user:{SECRET}@host", "scheme"),
        (polybus.open_sessions, f"redis://:{SECRET}@127.0.0.1:port", "bad Redis URL"),
        (polybus.open_sessions, f"redis+sentinel://:{SECRET}@h:port/mymaster", "Sentinel"),
        (polybus.open_sessions, f"redis+sentinel://:{SECRET}@h:26379", "no Sentinel service"),
        (polybus.open_sessions, f"kafka://user:{SECRET}@127.0.0.1:9092?x=1", "'x'"),
        (polybus.open_sessions, f"amqp://guest:{SECRET}@127.0.0.1?x=1", "'x'"),
        (RedisInbox, f"redis://:{SECRET}@127.0.0.1:port", "bad Redis URL"),
    ],
)
def test_errors_show_urls_without_their_secrets(
    open_: Callable[[str], object], url: str, names: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        open_(url)
    assert names in str(raised.value)
    assert SECRET not in str(raised.value)
    assert "***" in str(raised.value) or "@" not in url


def test_redact_url_keeps_all_but_the_secrets() -> None:
    assert redact_url("amqp://guest:pw@host:5672/%2F?heartbeat=5&token=t") == (
        "amqp://guest:***@host:5672/%2F?heartbeat=5&token=***"
    )
    assert redact_url("redis://:pw@a,b/0") == "redis://:***@a,b/0"
    assert redact_url("kafka://h:9092?ssl.key.password=p&linger.ms=5") == (
        "kafka://h:9092?ssl.key.password=***&linger.ms=5"
    )
    assert redact_url("native:///var/lib/bus") == "native:///var/lib/bus"


@pytest.mark.parametrize(
    "url",
    [
        f"kafka://u:{SECRET}@127.0.0.1:1,127.0.0.1:2?connect_timeout=0.2",
        f"redis://:{SECRET}@127.0.0.1:1,127.0.0.1:2/0?cluster=true&connect_timeout=0.2",
    ],
)
def test_a_url_naming_several_hosts_is_tried_not_refused(url: str) -> None:
    with pytest.raises(polybus.BrokerUnreachable) as refused:
        polybus.connect(url)
    assert "127.0.0.1:2" in str(refused.value)  # every host was tried
    assert SECRET not in str(refused.value)


def test_a_database_refusing_the_password_does_not_show_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    psycopg = pytest.importorskip("psycopg")
    require_server("postgres", servers.postgres_unavailable())
    parts = urlsplit(servers.postgres_url())
    host = parts.netloc.rpartition("@")[2]
    dsn = urlunsplit(parts._replace(netloc=f"{parts.username or 'polybus'}:{SECRET}@{host}"))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(polybus.PolybusError) as refused:  # noqa: PT012  # opens at once
        inbox = SqlInbox(lambda: psycopg.connect(dsn, connect_timeout=5))
        inbox.process("g", "message-1", lambda: None)
    assert SECRET not in str(refused.value)
    assert SECRET not in repr(refused.value)
    assert all(SECRET not in record.getMessage() for record in caplog.records)
