"""URL scheme → what opens it, for buses, session stores and inboxes: one registry.

Each entry names its opener as ``"module:function"`` and is imported on first
use, so a client library nobody's URL needs stays uninstalled. A package adds a
scheme of its own with an entry point, in the group :data:`ENTRY_POINT_GROUPS`
names for the kind, whose name is the scheme::

    # the pyproject.toml of a package shipping polybus-nats
    [project.entry-points."polybus.backends"]
    nats = "polybus_nats:from_url"

or, in a program, with :func:`register`. A bus opener takes the URL and
returns a :class:`~polybus.adapters.base.Backend`; a session store opener
takes the URL and the store's keyword options; an inbox opener takes the URL.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Literal, NamedTuple, cast
from urllib.parse import urlsplit

from .adapters.base import Backend
from .errors import BackendUnavailable, ConfigurationError, redact_url

__all__ = ["ENTRY_POINT_GROUPS", "Kind", "open_backend", "opener", "register", "schemes"]

Kind = Literal["bus", "sessions", "inbox"]

#: the entry point group third-party packages register each kind of opener in
ENTRY_POINT_GROUPS: dict[Kind, str] = {
    "bus": "polybus.backends",
    "sessions": "polybus.session_stores",
    "inbox": "polybus.inboxes",
}

#: what a URL of each kind looks like, for the message about one without a scheme
_EXAMPLES: dict[Kind, str] = {
    "bus": "'native:///var/lib/app/bus', 'memory://', 'kafka://localhost:9092', "
    "'amqp://localhost', 'redis://localhost'",
    "sessions": "'memory://', 'native:///var/lib/app/sessions', 'redis://localhost:6379/0', "
    "'kafka://localhost:9092', 'amqp://guest:guest@localhost'",
    "inbox": "'memory://', 'native:///var/lib/app/inbox', 'redis://localhost:6379/0'",
}


class _Entry(NamedTuple):
    target: str | Callable[..., Any]  #: the opener, or its "module:function" path
    client: str | None = None  #: the third-party module it needs
    extra: str | None = None  #: the pip extra that installs it


_KAFKA = ("confluent_kafka", "kafka")
_PIKA = ("pika", "rabbitmq")
_REDIS = ("redis", "redis")
_STORES = "polybus.sessions.stores"

_entries: dict[Kind, dict[str, _Entry]] = {
    "bus": {
        "memory": _Entry("polybus.adapters.native:from_url"),
        "native": _Entry("polybus.adapters.native:from_url"),
        "kafka": _Entry("polybus.adapters.kafka:from_url", *_KAFKA),
        "amqp": _Entry("polybus.adapters.rabbitmq:from_url", *_PIKA),
        "amqps": _Entry("polybus.adapters.rabbitmq:from_url", *_PIKA),
        "redis": _Entry("polybus.adapters.redis:from_url", *_REDIS),
        "rediss": _Entry("polybus.adapters.redis:from_url", *_REDIS),
        "redis+sentinel": _Entry("polybus.adapters.redis:from_url", *_REDIS),
    },
    "sessions": {
        "memory": _Entry(f"{_STORES}.memory:from_url"),
        "native": _Entry(f"{_STORES}.native:from_url"),
        "redis": _Entry(f"{_STORES}.redis:from_url", *_REDIS),
        "rediss": _Entry(f"{_STORES}.redis:from_url", *_REDIS),
        "redis+sentinel": _Entry(f"{_STORES}.redis:from_url", *_REDIS),
        "kafka": _Entry(f"{_STORES}.kafka:from_url", *_KAFKA),
        "amqp": _Entry(f"{_STORES}.rabbitmq:from_url", *_PIKA),
        "amqps": _Entry(f"{_STORES}.rabbitmq:from_url", *_PIKA),
    },
    "inbox": {
        "memory": _Entry("polybus.patterns.inbox:MemoryInbox.from_url"),
        "native": _Entry("polybus.patterns.inbox:NativeInbox"),
        "redis": _Entry("polybus.patterns.inbox:RedisInbox", *_REDIS),
        "rediss": _Entry("polybus.patterns.inbox:RedisInbox", *_REDIS),
        "redis+sentinel": _Entry("polybus.patterns.inbox:RedisInbox", *_REDIS),
    },
}
_loaded_entry_points: set[Kind] = set()
_lock = threading.Lock()

#: client library (top-level module) -> the adapter whose ``from_client`` wraps its objects
CLIENTS = {
    "confluent_kafka": "polybus.adapters.kafka",
    "pika": "polybus.adapters.rabbitmq",
    "redis": "polybus.adapters.redis",
}


def register(
    kind: Kind, scheme: str, target: str | Callable[..., Any], *, client: str | None = None
) -> None:
    """Open URLs of ``scheme`` for ``kind`` with ``target`` (a callable, or its
    ``"module:function"`` path, imported on first use); ``client`` names a module it
    needs, so a missing one is reported as a missing install. Replaces an entry."""
    if kind not in _entries:
        raise ConfigurationError(f"unknown kind {kind!r}: use one of {', '.join(_entries)}")
    if not callable(target) and ":" not in target:
        raise ConfigurationError(f"register {scheme!r} with a callable or 'module:function'")
    with _lock:
        _entries[kind][scheme.lower()] = _Entry(target, client)


def schemes(kind: Kind) -> list[str]:
    """Every scheme ``kind`` knows, its entry points included."""
    return sorted(_table(kind))


def _table(kind: Kind) -> dict[str, _Entry]:
    with _lock:
        if kind not in _loaded_entry_points:
            _loaded_entry_points.add(kind)
            for point in entry_points(group=ENTRY_POINT_GROUPS[kind]):
                _entries[kind].setdefault(point.name.lower(), _Entry(point.value))
        return _entries[kind]


def opener(kind: Kind, url: str) -> Callable[..., Any]:
    """What opens ``url`` as a ``kind``.

    Raises ConfigurationError for a string that is no URL, and BackendUnavailable
    for a scheme nobody registered or whose client library is not installed,
    naming what to install. The URL is shown without its secrets.
    """
    if "://" not in url:
        raise ConfigurationError(
            f"bad {_NOUN[kind]} URL {redact_url(url)!r}: expected scheme://..., e.g. "
            f"{_EXAMPLES[kind]}"
        )
    scheme = urlsplit(url).scheme.lower()
    entry = _table(kind).get(scheme)
    if entry is None:
        raise BackendUnavailable(
            f"unknown URL scheme {scheme!r} for a {_NOUN[kind]} in {redact_url(url)!r}; known "
            f"schemes: {', '.join(schemes(kind))} (a package adds one with an entry point "
            f"in {ENTRY_POINT_GROUPS[kind]!r})"
        )
    if entry.client is not None:
        try:
            importlib.import_module(entry.client)
        except ImportError as exc:
            install = f"polybus[{entry.extra}]" if entry.extra else entry.client
            raise BackendUnavailable(
                f"the {scheme}:// {_NOUN[kind]} needs {entry.client!r}: pip install '{install}'"
            ) from exc
    if callable(entry.target):
        return entry.target
    module_name, _, path = entry.target.partition(":")
    found: Any = importlib.import_module(module_name)
    for name in path.split("."):
        found = getattr(found, name)
    return cast(Callable[..., Any], found)


_NOUN: dict[Kind, str] = {"bus": "bus", "sessions": "session store", "inbox": "inbox"}


def open_backend(target: object) -> Backend:
    """Open the backend a URL names, or wrap a client object or an adapter instance.

    A client object is what its library's own constructor returned, e.g.
    ``redis.Redis(...)``, ``pika.ConnectionParameters(...)`` or a
    confluent-kafka config dict wrapped by the Kafka adapter's ``from_client``.
    Raises ConfigurationError for a malformed URL or an object no adapter
    knows, and BackendUnavailable for an unknown scheme or a missing client
    library, naming what to install.
    """
    if isinstance(target, str):
        backend: Backend = opener("bus", target)(target)
        return backend
    if all(hasattr(target, a) for a in ("capabilities", "declare_topic", "publish", "subscribe")):
        return cast(Backend, target)
    library = type(target).__module__.partition(".")[0]
    # confluent-kafka's C extension names its classes' module "cimpl"
    adapter = CLIENTS.get("confluent_kafka" if library == "cimpl" else library)
    if adapter is None:
        raise ConfigurationError(
            f"cannot connect to a {type(target).__name__}: pass a URL, a Backend, or a "
            f"client object of {', '.join(sorted(CLIENTS))}"
        )
    wrapped: Backend = importlib.import_module(adapter).from_client(target)
    return wrapped
