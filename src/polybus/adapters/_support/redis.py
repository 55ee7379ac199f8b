"""One way to open a redis-py client from a URL, and redis-py's errors as polybus errors.

The Redis backend, the Redis session store and the Redis inbox all open their
client here, so each takes the same URLs: ``redis://`` and ``rediss://`` (a
server; ``?cluster=true`` for a Cluster) and ``redis+sentinel://host:26379[,host2]/service[/db]``
(the master a Sentinel group names), with redis-py's own URL options passed through.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any, cast
from urllib.parse import unquote

import redis
import redis.cluster
import redis.exceptions as rx
import redis.sentinel
from redis.connection import URL_QUERY_ARGUMENT_PARSERS

from ...errors import (
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
)
from .connect import ensure_reachable
from .errors import mapped_errors
from .options import Options

__all__ = [
    "SCHEMES",
    "Client",
    "client_options",
    "map_error",
    "open_client",
    "redis_errors",
    "retryable",
]

Client = redis.Redis | redis.cluster.RedisCluster
SCHEMES = ("redis", "rediss", "redis+sentinel")

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
#: the URL options redis-py itself understands
CLIENT_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | _CLIENT_STRING_OPTIONS
#: this module's own: ``cluster`` and ``connect_timeout``
OPTIONS = frozenset({"cluster", "connect_timeout"})


def client_options(url: str, ours: Collection[str]) -> Options:
    """``url``'s options: ``ours`` plus this module's own, redis-py's passed through."""
    what = "Redis Sentinel" if url.startswith("redis+sentinel:") else "Redis"
    options = Options(url, ours={*ours, *OPTIONS}, passes=CLIENT_OPTIONS, what=what)
    if options.parts.scheme not in SCHEMES:
        raise options.error(f"not a Redis URL: use one of {', '.join(s + '://' for s in SCHEMES)}")
    return options


def open_client(options: Options, *, check: bool = True, **settings: Any) -> Client:
    """A client for the server, Cluster or Sentinel-managed master ``options`` names.

    With ``check``, first wait until its address accepts a connection (raising
    BrokerUnreachable after the URL's ``connect_timeout``); without, connect on
    first use. ``settings`` go to redis-py (``retry``, timeouts).
    """
    parts = options.parts
    timeout, cluster = options.connect_timeout(), options.flag("cluster", False)
    sentinel = parts.scheme == "redis+sentinel"
    addresses = options.addresses(26379 if sentinel else 6379)
    if check:
        ensure_reachable("Sentinel" if sentinel else "Redis", addresses, timeout)
    try:
        if sentinel:
            return _sentinel_master(options, addresses, settings)
        if cluster:
            return redis.cluster.RedisCluster.from_url(options.passed_url(), **settings)
        return redis.Redis.from_url(options.passed_url(), **settings)
    except (ValueError, TypeError) as exc:
        raise options.error(str(exc)) from None
    except Exception as exc:  # a Cluster client asks for the slots at once
        raise map_error(exc) from exc


def _sentinel_master(
    options: Options, sentinels: list[tuple[str, int]], settings: dict[str, Any]
) -> redis.Redis:
    path = [p for p in options.parts.path.split("/") if p]
    if not path:
        raise options.error(
            "names no Sentinel service: use redis+sentinel://host:26379/mymaster[/db]"
        )
    try:
        db = int(path[1]) if len(path) > 1 else 0
    except ValueError:
        raise options.error(f"the database must be a number, not {path[1]!r}") from None
    parsers = cast(dict[str, Callable[[str], Any]], URL_QUERY_ARGUMENT_PARSERS)
    for name, value in options.passed:  # typed as redis-py types its own URLs' options
        parse = parsers.get(name)
        settings[name] = parse(value) if parse is not None else value
    password = unquote(options.parts.password) if options.parts.password else None
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        sentinels, sentinel_kwargs={"socket_timeout": settings.get("socket_timeout", 2.0)}
    )
    master = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        path[0], db=db, password=password, **settings
    )
    return cast(redis.Redis, master)


#: error replies of passing server states that redis-py leaves as plain ResponseError
_TRANSIENT = ("BUSY ", "LOADING ", "READONLY ", "MASTERDOWN ", "CLUSTERDOWN ", "TRYAGAIN ")


def retryable(exc: BaseException) -> bool:
    """True for a lost connection or a server state that passes (failover, loading, resharding)."""
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return False
    if isinstance(
        exc,
        rx.ConnectionError  # BusyLoadingError (LOADING) included
        | rx.TimeoutError
        | rx.ClusterError  # CLUSTERDOWN, MASTERDOWN
        | rx.SlotNotCoveredError
        | rx.AskError  # MOVED and ASK: the slot moves to another node
        | rx.TryAgainError
        | rx.ReadOnlyError  # a failover made our node a replica
        | OSError,
    ):
        return True
    return isinstance(exc, rx.ResponseError) and str(exc).startswith(_TRANSIENT)


def map_error(exc: BaseException) -> PolybusError:
    """The polybus error for a redis-py (or socket) exception; total over every class."""
    if isinstance(exc, PolybusError):
        return exc
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return ConfigurationError(f"Redis refused the credentials or an ACL denies it: {text}")
    if isinstance(exc, rx.AuthenticationWrongNumberOfArgsError):
        return ConfigurationError(f"Redis AUTH failed, check username and password: {text}")
    if retryable(exc) or isinstance(exc, rx.InvalidResponse):
        return ConnectionLost(f"Redis connection failed ({name}): {text}")
    if isinstance(exc, rx.OutOfMemoryError):
        return PolybusError(f"Redis is out of memory (maxmemory): {text}")
    if isinstance(exc, rx.ResponseError):
        if text.startswith("WRONGTYPE"):
            return ConfigurationError(f"a Redis key of this topic holds another type: {text}")
        if text.startswith("NOGROUP"):
            return TopicNotFound(f"the topic's stream or consumer group does not exist: {text}")
        if text.startswith("BUSYGROUP"):
            return ConfigurationError(f"the consumer group exists already: {text}")
        if "max" in text and ("bulk" in text or "size" in text):
            return MessageTooLarge(f"Redis refused a too large argument: {text}")
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return ConfigurationError(f"Redis needs credentials: {text}")
        return PolybusError(f"Redis replied with an error ({name}): {text}")
    if isinstance(exc, rx.DataError):
        return ConfigurationError(f"invalid data for a Redis command: {text}")
    if name in ("InvalidTokenSchemaErr", "IncorrectPolicyType"):
        return ConfigurationError(f"bad Redis client configuration ({name}): {text}")
    if name in (
        "RequestTokenErr",
        "TokenRenewalErr",
        "ExternalAuthProviderError",
        "NoValidDatabaseException",
        "UnhealthyDatabaseException",
        "TemporaryUnavailableException",
        "InitialHealthCheckFailedError",
        "HttpError",
    ):
        return ConnectionLost(f"Redis is unreachable ({name}): {text}")
    return PolybusError(f"Redis client error ({type(exc).__module__}.{name}): {text}")


#: ``with redis_errors():`` around a call into redis-py maps what it raises
redis_errors = mapped_errors(map_error, rx.RedisError, OSError)
