"""URL scheme → backend, imported lazily so unused client libraries stay optional."""

from __future__ import annotations

import importlib
from typing import NamedTuple
from urllib.parse import urlsplit

from .adapters.base import Backend
from .errors import BackendUnavailable, ConfigurationError, redact_url

__all__ = ["SCHEMES", "open_backend"]


class _Entry(NamedTuple):
    module: str
    client: str | None  #: the third-party module the adapter needs
    extra: str | None  #: the pip extra that installs it


SCHEMES: dict[str, _Entry] = {
    "memory": _Entry("polybus.adapters.native", None, None),
    "native": _Entry("polybus.adapters.native", None, None),
    "kafka": _Entry("polybus.adapters.kafka", "confluent_kafka", "kafka"),
    "amqp": _Entry("polybus.adapters.rabbitmq", "pika", "rabbitmq"),
    "amqps": _Entry("polybus.adapters.rabbitmq", "pika", "rabbitmq"),
    "redis": _Entry("polybus.adapters.redis", "redis", "redis"),
    "rediss": _Entry("polybus.adapters.redis", "redis", "redis"),
}


#: client library (top-level module) -> the adapter whose ``from_client`` wraps its objects
CLIENTS = {
    "confluent_kafka": "polybus.adapters.kafka",
    "pika": "polybus.adapters.rabbitmq",
    "redis": "polybus.adapters.redis",
}


def open_backend(target: object) -> Backend:
    """Open the backend a URL names, or wrap a client object or an adapter instance.

    A client object is what its library's own constructor returned, e.g.
    ``redis.Redis(...)``, ``pika.ConnectionParameters(...)`` or a
    confluent-kafka config dict wrapped by the Kafka adapter's ``from_client``.
    Raises ConfigurationError for a malformed URL or an object no adapter
    knows, and BackendUnavailable for an unknown scheme or a missing client
    library, naming what to install.
    """
    if not isinstance(target, str):
        if all(
            hasattr(target, a) for a in ("capabilities", "declare_topic", "publish", "subscribe")
        ):
            return target  # type: ignore[return-value]  # already a Backend
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
    url = target
    if "://" not in url:
        raise ConfigurationError(
            f"bad bus URL {redact_url(url)!r}: expected scheme://..., e.g. "
            "'native:///var/lib/app/bus', "
            "'memory://', 'kafka://localhost:9092', 'amqp://localhost', 'redis://localhost'"
        )
    scheme = urlsplit(url).scheme.lower()
    entry = SCHEMES.get(scheme)
    if entry is None:
        raise BackendUnavailable(
            f"unknown URL scheme {scheme!r} in {redact_url(url)!r}; known schemes: "
            f"{', '.join(sorted(SCHEMES))}"
        )
    if entry.client is not None:
        try:
            importlib.import_module(entry.client)
        except ImportError as exc:
            raise BackendUnavailable(
                f"the {scheme}:// backend needs {entry.client!r}: "
                f"pip install 'polybus[{entry.extra}]'"
            ) from exc
    try:
        module = importlib.import_module(entry.module)
    except ModuleNotFoundError as exc:
        if exc.name != entry.module:
            raise
        raise BackendUnavailable(
            f"the {scheme}:// adapter is not part of this polybus release yet; "
            "use 'native://' or 'memory://'"
        ) from exc
    backend: Backend = module.from_url(url)
    return backend
