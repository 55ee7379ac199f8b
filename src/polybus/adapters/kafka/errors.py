"""How confluent-kafka (librdkafka) failures become polybus errors.

The Kafka error codes grouped by what they mean to a caller (connection lost,
too large, not found, fenced, configuration, unsupported, ...), used by every
other module of the adapter; :func:`map_error`, which every boundary raises
through; and the retry of a request that failed only because a partition's
leader was moving. The codes with a leading underscore are librdkafka's
documented local error codes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import KafkaError, KafkaException

from ...errors import (
    CapabilityError,
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    EncodeError,
    FencedError,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
)
from .._support.backoff import Backoff
from .._support.errors import mapped_errors

_E = KafkaError
_CONNECTION = frozenset(
    {
        _E._TRANSPORT,
        _E._ALL_BROKERS_DOWN,
        _E._MSG_TIMED_OUT,
        _E._TIMED_OUT,
        _E._TIMED_OUT_QUEUE,
        _E._RESOLVE,
        _E._DESTROY,
        _E._DESTROY_BROKER,
        _E._QUEUE_FULL,
        _E._PURGE_QUEUE,
        _E._PURGE_INFLIGHT,
        _E._WAIT_COORD,
        _E._UNKNOWN_BROKER,
        _E._NODE_UPDATE,
        _E.REQUEST_TIMED_OUT,
        _E.NETWORK_EXCEPTION,
        _E.BROKER_NOT_AVAILABLE,
        _E.LEADER_NOT_AVAILABLE,
        _E.NOT_LEADER_FOR_PARTITION,
        _E.NOT_ENOUGH_REPLICAS,
        _E.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        _E.COORDINATOR_NOT_AVAILABLE,
        _E.COORDINATOR_LOAD_IN_PROGRESS,
        _E.NOT_COORDINATOR,
        _E.KAFKA_STORAGE_ERROR,
    }
)
_TOO_LARGE = frozenset({_E.MSG_SIZE_TOO_LARGE, _E.RECORD_LIST_TOO_LARGE, _E.INVALID_MSG_SIZE})
_NOT_FOUND = frozenset(
    {_E.UNKNOWN_TOPIC_OR_PART, _E._UNKNOWN_TOPIC, _E._UNKNOWN_PARTITION, _E.UNKNOWN_TOPIC_ID}
)
_FENCED = frozenset(
    {
        _E._FENCED,
        _E._ASSIGNMENT_LOST,
        _E._MAX_POLL_EXCEEDED,
        _E.PRODUCER_FENCED,
        _E.INVALID_PRODUCER_EPOCH,
        _E.TRANSACTION_COORDINATOR_FENCED,
        _E.FENCED_INSTANCE_ID,
        _E.FENCED_MEMBER_EPOCH,
        _E.STALE_MEMBER_EPOCH,
        _E.ILLEGAL_GENERATION,
        _E.UNKNOWN_MEMBER_ID,
        _E.REBALANCE_IN_PROGRESS,
    }
)
_CONFIG = frozenset(
    {
        _E._INVALID_ARG,
        _E._INVALID_TYPE,
        _E._SSL,
        _E._AUTHENTICATION,
        _E._UNKNOWN_PROTOCOL,
        _E.INVALID_CONFIG,
        _E.INVALID_PARTITIONS,
        _E.INVALID_REPLICATION_FACTOR,
        _E.INVALID_REPLICA_ASSIGNMENT,
        _E.INVALID_REQUIRED_ACKS,
        _E.INVALID_SESSION_TIMEOUT,
        _E.INVALID_GROUP_ID,
        _E.INVALID_TRANSACTION_TIMEOUT,
        _E.INCONSISTENT_GROUP_PROTOCOL,
        _E.TOPIC_EXCEPTION,
        _E.POLICY_VIOLATION,
        _E.UNSUPPORTED_COMPRESSION_TYPE,
        _E.UNSUPPORTED_SASL_MECHANISM,
        _E.ILLEGAL_SASL_STATE,
        _E.SASL_AUTHENTICATION_FAILED,
        _E.TOPIC_AUTHORIZATION_FAILED,
        _E.GROUP_AUTHORIZATION_FAILED,
        _E.CLUSTER_AUTHORIZATION_FAILED,
        _E.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        _E.TOPIC_ALREADY_EXISTS,
    }
)
_UNSUPPORTED = frozenset(
    {
        _E._NOT_IMPLEMENTED,
        _E._UNSUPPORTED_FEATURE,
        _E.UNSUPPORTED_VERSION,
        _E.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        _E.SECURITY_DISABLED,
        _E.TOPIC_DELETION_DISABLED,
    }
)
#: errors after which an idempotent producer's id is useless; a new producer recovers
_SESSION_LOST = frozenset(
    {
        _E._FATAL,
        _E.PRODUCER_FENCED,
        _E.INVALID_PRODUCER_EPOCH,
        _E.OUT_OF_ORDER_SEQUENCE_NUMBER,
        _E.UNKNOWN_PRODUCER_ID,
        _E.INVALID_PRODUCER_ID_MAPPING,
    }
)
#: a newer producer with the same transactional.id took over: aborting is pointless
_PRODUCER_FENCED = frozenset({_E._FENCED, _E.PRODUCER_FENCED})
#: how librdkafka reports, in a transaction, a group coordinator whose broker died
#: ("Failed to commit offsets to transaction on broker (none)"): abort, then retry
_COORDINATOR_GONE = frozenset({_E._STATE})
_ENCODE = frozenset({_E._KEY_SERIALIZATION, _E._VALUE_SERIALIZATION})
_DECODE = frozenset({_E._KEY_DESERIALIZATION, _E._VALUE_DESERIALIZATION, _E._BAD_MSG})


_T = TypeVar("_T")

#: errors of a request sent before the client learnt a partition's current leader
_LEADER_MOVING = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    }
)


def _while_leaders_move(call: Callable[[], _T], timeout: float) -> _T:
    """``call()``, asked again every 0.1 s for up to ``timeout`` s while it fails for
    want of a partition's leader. Right after a topic is made, or while a leader moves,
    a broker can answer NOT_LEADER_FOR_PARTITION until its metadata catches up."""
    deadline = time.monotonic() + timeout
    backoff = Backoff(first=0.1, cap=0.1, jitter=False)
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is None or err.code() not in _LEADER_MOVING or time.monotonic() > deadline:
                raise
        backoff.sleep(deadline)


def _kafka_error(exc: BaseException) -> KafkaError | None:
    args = getattr(exc, "args", ())
    return args[0] if args and isinstance(args[0], KafkaError) else None


def map_error(exc: BaseException) -> PolybusError:
    """The polybus error for a confluent-kafka (or librdkafka) failure; never raises.

    Transport problems and timeouts become ConnectionLost; the rest follow the
    Kafka error code, and an exception without one maps by its class.
    """
    if isinstance(exc, PolybusError):
        return exc
    err = _kafka_error(exc)
    if err is None:
        return _map_class(exc)
    code = err.code()
    text = f"Kafka {err.name()}: {err.str()}"
    if code in _CONNECTION:
        return ConnectionLost(f"{text} (the broker is unreachable or too slow; retry)")
    if code in _TOO_LARGE:
        return MessageTooLarge(
            f"{text}: raise message.max.bytes (client) and max.message.bytes (topic) or send less"
        )
    if code in _NOT_FOUND:
        return TopicNotFound(f"{text}: declare the topic first")
    if code in _FENCED:
        return FencedError(
            f"{text}: this member no longer owns the partition; its unacked records go to the "
            "new owner"
        )
    if code in _CONFIG:
        return ConfigurationError(f"{text}: check the Kafka URL options and client config")
    if code in _UNSUPPORTED:
        return CapabilityError(f"{text}: the broker does not support this")
    if code in _ENCODE:
        return EncodeError(text)
    if code in _DECODE:
        return DecodeError(text)
    if err.retriable():
        return ConnectionLost(f"{text} (transient; retry)")
    if err.fatal():
        return PolybusError(f"{text} (fatal: this client cannot be used any more)")
    return PolybusError(text)


def _map_class(exc: BaseException) -> PolybusError:
    """Map an exception that carries no KafkaError (or was built without one)."""
    text = f"{type(exc).__name__}: {exc}"
    names = [cls.__name__ for cls in type(exc).__mro__]  # by name: some live in optional modules
    if any(n.endswith("DeserializationError") or n == "ConsumeError" for n in names):
        return DecodeError(text)
    if any(n.endswith("SerializationError") or n == "ProduceError" for n in names):
        return EncodeError(text)
    if isinstance(exc, TimeoutError | ConnectionError | BufferError):
        return ConnectionLost(f"{text} (the broker did not answer in time; retry)")
    if "ConcurrentModificationException" in names:
        return PolybusError(f"{text}: one Kafka consumer was used from several threads at once")
    if "SchemaRegistryError" in names:
        status = getattr(exc, "http_status_code", None)
        if isinstance(status, int) and (status >= 500 or status < 0):
            return ConnectionLost(f"schema registry unavailable: {text}")
        return ConfigurationError(f"schema registry refused the request: {text}")
    if isinstance(exc, TypeError | ValueError):
        return ConfigurationError(text)
    return PolybusError(text)


#: ``with kafka_errors():`` around a call into confluent-kafka maps what it raises
kafka_errors = mapped_errors(map_error, KafkaException)
