"""Opening a Redis backend: from a ``redis://`` or ``rediss://`` URL, or around a client.

It parses the URL's options (this adapter's and redis-py's own), builds the redis-py client
and hands it to :class:`~.backend.RedisBackend`; nothing here runs once the bus is open.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...errors import ConfigurationError
from .._support.redis import client_options, open_client
from .backend import RedisBackend

_OPTIONS = {"prefix", "reconnect_timeout", "maxlen"}


def from_url(url: str) -> RedisBackend:
    """Connect to the Redis a ``redis://``, ``rediss://`` or ``redis+sentinel://`` URL
    names, once it accepts a connection (BrokerUnreachable otherwise)."""
    options = client_options(url, _OPTIONS)
    # read before connecting: a bad option is said at once
    prefix = options.text("prefix", "polybus")
    reconnect_timeout = options.seconds("reconnect_timeout", 30.0)
    maxlen = options.optional_number("maxlen", int, minimum=1)
    # No retries inside redis-py: this adapter retries until its own reconnect deadline.
    client = open_client(options, retry=Retry(NoBackoff(), 0))
    return RedisBackend(
        client, prefix=prefix, reconnect_timeout=reconnect_timeout, maxlen=maxlen, owns_client=True
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
