"""redis-py and socket exceptions as polybus errors, and which of them a retry may outlast.

:func:`map_error` is applied at every boundary of the adapter (``raise map_error(exc) from
exc``); ``_retryable`` decides whether the backend's and the subscriptions' retry loops
keep trying until ``reconnect_timeout``.
"""

from __future__ import annotations

import redis.exceptions as rx

from ...errors import (
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
)

#: error replies of passing server states that redis-py leaves as plain ResponseError
_TRANSIENT = ("BUSY ", "LOADING ", "READONLY ", "MASTERDOWN ", "CLUSTERDOWN ", "TRYAGAIN ")


def _retryable(exc: BaseException) -> bool:
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
    if _retryable(exc) or isinstance(exc, rx.InvalidResponse):
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
