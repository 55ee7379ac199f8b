"""One session store per backend, opened by URL: :func:`open_store`.

==========================================  ==============================================
``memory://`` / ``memory://name``           this process only (``name`` shares one table)
``native:///path``                          the native engine's compacted log; survives
                                            restarts, shared by the processes of one host
``redis://host:port/db``, ``rediss://``     one key per session and a per-user index in
``redis+sentinel://h:p[,h:p]/service``      one Cluster slot; ``?cluster=true`` for Cluster
``kafka://host:port[,host:port]``           a compacted topic and a local view per instance
``amqp://`` / ``amqps://``                  every instance keeps all sessions in memory and
                                            applies the changes RabbitMQ broadcasts
==========================================  ==============================================

Every URL takes ``codec=json|msgpack`` (default json); the store modules
document their own options.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlencode

from ...adapters._support import Options
from ...bus import connect
from ...errors import ConfigurationError, PolybusError
from ...registry import opener
from ..base import CODECS, SessionStore, SessionStoreUnavailable

T = TypeVar("T")

__all__ = ["open_store"]


def bus_store_from_url(
    url: str,
    make: Callable[..., T],
    options: Mapping[str, type[str] | type[float]],
    defaults: Mapping[str, str],
    unavailable: Callable[[BaseException], SessionStoreUnavailable],
    **given: Any,
) -> T:
    """A store on a Bus of its own: ``make(bus, owns_bus=True, **options)``.

    The URL's query options named in ``options`` (name -> str, or float for
    seconds) go to the store, the others to the bus, with ``defaults`` for bus
    options the URL does not set. A broker that cannot be reached raises
    ``unavailable(error)``.
    """
    parsed = Options(url, ours=options, passes=lambda name: True)  # the bus checks the rest
    ours = {
        name: parsed.text(name, "") if kind is str else parsed.seconds(name, 1.0)
        for name, kind in options.items()
        if parsed.given(name)
    }
    theirs = parsed.passed
    set_ = {k for k, _ in theirs}
    theirs += [(k, v) for k, v in defaults.items() if k not in set_]
    try:
        bus = connect(parsed.parts._replace(query=urlencode(theirs)).geturl())
    except PolybusError as exc:
        if isinstance(exc, ValueError):  # a bad URL or option, not a broker that is down
            raise
        raise unavailable(exc) from exc
    try:
        return make(bus, owns_bus=True, **{**ours, **given})
    except BaseException:
        bus.close()
        raise


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ConfigurationError(
            f"unknown session codec {codec!r}: use one of {', '.join(sorted(CODECS))}"
        )
    return codec


def open_store(target: str | SessionStore | Any, **options: Any) -> SessionStore:
    """Open the session store a URL names, or wrap a client object.

    ``target`` may be a URL (see the module docstring), a store (returned as
    is), a ``redis.Redis`` or ``redis.cluster.RedisCluster`` client, or a
    :class:`polybus.Bus` on the native, Kafka or RabbitMQ backend. Keyword
    options go to the store's constructor (``codec="msgpack"``, ...).

    Raises ConfigurationError for a malformed URL or unknown option, and
    BackendUnavailable for an unknown scheme or a missing client library.
    """
    if not isinstance(target, str):
        if all(hasattr(target, m) for m in ("load", "save", "delete", "user_sessions")):
            store: SessionStore = target
            return store
        return _from_object(target, options)
    opened: SessionStore = opener("sessions", target)(target, **options)
    return opened


def _from_object(target: Any, options: dict[str, Any]) -> SessionStore:
    library = type(target).__module__.partition(".")[0]
    if library == "redis":
        redis_store: SessionStore = importlib.import_module(
            "polybus.sessions.stores.redis"
        ).RedisStore(target, **options)
        return redis_store
    backend = getattr(target, "backend", None)  # a polybus.Bus
    if backend is not None:
        module_path = type(backend).__module__.split(".")  # polybus.adapters.<kind>[.module]
        kind = module_path[2] if module_path[:2] == ["polybus", "adapters"] else None
        if kind == "redis":  # the bus's own client: sessions keep their own keys
            return _from_object(backend.client, options)
        if kind in ("native", "kafka", "rabbitmq"):
            module = importlib.import_module(f"polybus.sessions.stores.{kind}")
            store: SessionStore = module.from_bus(target, **options)
            return store
    raise ConfigurationError(
        f"cannot open a session store on a {type(target).__name__}: pass a URL, a store, "
        "a redis client or a polybus.Bus"
    )
