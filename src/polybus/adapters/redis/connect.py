"""Opening a Redis backend: from a ``redis://`` or ``rediss://`` URL, or around a client.

It parses the URL's options (this adapter's and redis-py's own), builds the redis-py client
and hands it to :class:`~.backend.RedisBackend`; nothing here runs once the bus is open.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry

from ...errors import ConfigurationError, redact_url
from .._support import connect_timeout, ensure_reachable
from .backend import RedisBackend
from .errors import map_error

T = TypeVar("T")

_OPTIONS = {"prefix", "reconnect_timeout", "maxlen", "cluster", "connect_timeout"}
#: redis-py's URL options that it passes through as strings rather than parsing
_CLIENT_STRING_OPTIONS = {
    "client_name",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_cert_reqs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
}
_CLIENT_OPTIONS = set(URL_QUERY_ARGUMENT_PARSERS) | _CLIENT_STRING_OPTIONS


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, not {value!r}")


def _number(name: str, value: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {value!r}") from None


def from_url(url: str) -> RedisBackend:
    """Connect to the Redis a ``redis://`` or ``rediss://`` URL names (lazily: no I/O here)."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            ours[name] = value
        elif name in _CLIENT_OPTIONS:
            theirs.append((name, value))
        else:
            raise ConfigurationError(
                f"unknown option {name!r} in {redact_url(url)!r}; known: "
                f"{', '.join(sorted(_OPTIONS | _CLIENT_OPTIONS))}"
            )
    client_url = urlunsplit(parts._replace(query=urlencode(theirs)))
    if parts.scheme in ("redis", "rediss"):
        timeout = connect_timeout(ours.get("connect_timeout"))
        ensure_reachable("Redis", [(parts.hostname or "localhost", parts.port or 6379)], timeout)
    # No retries inside redis-py: this adapter retries until its own reconnect deadline.
    kwargs: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}
    try:
        client: redis.Redis | redis.cluster.RedisCluster
        if _flag("cluster", ours.get("cluster", "false")):
            client = redis.cluster.RedisCluster.from_url(client_url, **kwargs)
        else:
            client = redis.Redis.from_url(client_url, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad Redis URL {redact_url(url)!r}: {exc}") from exc
    except Exception as exc:
        raise map_error(exc) from exc
    maxlen = ours.get("maxlen")
    return RedisBackend(
        client,
        prefix=ours.get("prefix", "polybus"),
        reconnect_timeout=_number("reconnect_timeout", ours.get("reconnect_timeout", "30"), float),
        maxlen=None if maxlen is None else _number("maxlen", maxlen, int),
        owns_client=True,
    )


def from_client(client: object, **options: Any) -> RedisBackend:
    """Wrap a ``redis.Redis`` or ``redis.cluster.RedisCluster``; closing the bus leaves it open.

    ``options`` are :class:`RedisBackend`'s keyword arguments (``prefix``, ...).
    """
    if not isinstance(client, redis.Redis | redis.cluster.RedisCluster):
        raise ConfigurationError(
            f"cannot use a {type(client).__module__}.{type(client).__qualname__}: pass a "
            "synchronous redis.Redis or redis.cluster.RedisCluster"
        )
    return RedisBackend(client, **options)
