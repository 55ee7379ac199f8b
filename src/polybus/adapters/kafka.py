# Over 800 lines until the adapter becomes a package (errors, producer, subscription,
# transactions, backend): the subscription's ack tracking, rebalance callbacks and
# transactional producer share per-partition private state, which needs an interface first.
"""Apache Kafka as a backend, on confluent-kafka (librdkafka): ``kafka://host:port[,host:port]``.

URL options: ``connect_timeout=<seconds>`` (default 2: how long opening a bus waits
for any bootstrap broker to accept a connection before raising BrokerUnreachable),
``reconnect_timeout=<seconds>`` (default 30: how long a publish
waits for the broker before raising ConnectionLost, and how long a
subscription tolerates an unreachable cluster before its fetch raises it) and
``replication_factor=<n>`` for topics this adapter creates (default: the
broker's ``default.replication.factor``). librdkafka properties go to every
client unchanged: any option with a dot in its name, plus ``acks``, ``debug``,
``partitioner`` and ``retries``, e.g.
``kafka://b1:9092?security.protocol=SSL&linger.ms=20``. A user and password
in the URL become ``sasl.username``/``sasl.password`` (with SASL_SSL and
PLAIN unless the URL says otherwise).

How the polybus model maps onto Kafka:

- a topic is a Kafka topic. A key picks its partition by the Java client's
  murmur2 hash, so polybus, librdkafka's ``murmur2_random`` and JVM producers
  agree on where a key goes; keyless records go to one partition per run of
  1024, the next run to the next partition (a producer passed to
  :func:`from_client` partitions as it was configured to);
- a durable group is a Kafka consumer group with auto-commit off. Acks are
  tracked per partition and the contiguous settled prefix is committed from
  ``fetch`` (at most every 0.2 s), on revocation and on close — never past an
  unsettled record. A revoked partition's unacked records go to its next
  owner; acks that arrive for them later are ignored. Declaring a group
  commits the start of every partition it has no position on (as the native
  engine does), so it keeps what is published before a member subscribes;
- ``nack(requeue=True)`` hands the record back to the same member on a later
  fetch with ``attempt + 1``; ``nack(requeue=False)`` settles it;
- an ephemeral subscriber joins no group: it reads every partition from the
  end offsets looked up before ``subscribe`` returned, commits nothing and
  leaves no trace. Partitions added to the topic later are not read;
- seek by offset or time moves one partition and forgets its unsettled
  records; lag is the high watermark minus the group's committed offset;
- no per-message delay (no DELAY): a pattern emulates it above this layer;
- subscribers read with ``isolation.level=read_committed``: records of open or
  aborted transactions are not delivered.

Transactions (``Capability.TRANSACTIONS``, consume → produce exactly once)
are Kafka transactions with the consumed offsets in them (EOS v2, KIP-447):

- each subscription that begins one gets a transactional producer of its own
  (``transactional.id`` ``polybus-<group>-<random>``, so the config may not set
  one), registered with ``init_transactions`` on its first transaction;
- ``publish`` and ``ack`` only stage: the records and acks wait in the
  transaction object, so ``abort()`` (or an exception in the ``with`` block)
  sends nothing and hands the acked records back to this member with
  ``attempt + 1``;
- ``commit()`` first checks that every acked record's partition is still this
  member's (else FencedError, nothing sent); then ``begin_transaction``,
  produce the staged records, ``send_offsets_to_transaction`` with the
  contiguous settled prefix of each acked partition, staged acks counted as
  settled, and ``consumer_group_metadata()`` (the broker refuses the offsets
  of a member whose group generation has passed: zombies are fenced), then
  ``commit_transaction``. Only then do the staged acks count as settled.
  Acks above an unsettled record wait for it, as plain acks do: should the
  partition move first, those records are processed again;
- a failed commit is aborted with ``abort_transaction`` and its acked records
  delivered again: FencedError when the generation passed or a newer producer
  took over, ConnectionLost when Kafka did not answer within the transaction
  timeout (the reconnect timeout + 5 s, ``transaction.timeout.ms``); if even
  the abort fails the outcome is unknown (its inputs may then be processed
  twice) and the next transaction's new producer, with the same id, fences
  the old one and aborts what it left open;
- before a transaction sends offsets, a synchronous commit waits out any
  plain asynchronous one still on its way, which could otherwise land after
  the transaction's and move the committed offsets back;
- a member that dies during ``commit()`` leaves an open transaction: readers
  of its output partitions wait until the broker aborts it after
  ``transaction.timeout.ms``, and the group's next member starts at the
  offsets committed before it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from itertools import repeat
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from ..errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    EncodeError,
    FencedError,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
    redact_url,
)
from ._support import connect_timeout, ensure_reachable
from .base import Capability, InRecord, OutRecord, Receipt, Start, Subscription, TopicSpec


def _librdkafka_chooses(key: bytes, partition_count: int) -> int:
    return -1  # RD_KAFKA_PARTITION_UA: the producer's partitioner picks


try:  # the partitioner's own hash; confluent-kafka exposes it since late 2025
    from confluent_kafka import murmur2
except ImportError:  # older clients: every record gets its own delivery callback
    murmur2 = _librdkafka_chooses

__all__ = ["KafkaBackend", "KafkaSubscription", "from_client", "from_url", "map_error"]

log = logging.getLogger("polybus.kafka")

_OPTIONS = ("connect_timeout", "reconnect_timeout", "replication_factor")
_UNDOTTED = ("acks", "debug", "partitioner", "retries")  #: librdkafka properties without a dot
#: consumer settings every subscribe() chooses itself; a config that sets them is refused
_OWNED = (
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "session.timeout.ms",
)
_COMMIT_INTERVAL = 0.2  # seconds between commits of acked prefixes from fetch()
_DELIVERY_GRACE = 5.0  # seconds past message.timeout.ms a delivery report may take to arrive
_MAX_CONSUME = 100_000  # records per consume() call
_METADATA_TTL = 30.0  # seconds a topic's partition count is reused before a new lookup
_new_tuple = tuple.__new__  # builds NamedTuples without their Python-level __new__


# -- errors -------------------------------------------------------------------

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


def _flag(value: object) -> bool:
    return str(value).lower() in ("true", "1", "yes", "on")


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
    while True:
        try:
            return call()
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is None or err.code() not in _LEADER_MOVING or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _bounded(call: Callable[[], object], seconds: float, name: str) -> threading.Event | None:
    """Run ``call`` in a daemon thread, as librdkafka can block past its own timeouts, and
    wait up to ``seconds``. None when it returned (what it raised is raised here); else
    the event it sets when it finally does."""
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # raised in the caller's thread below
            failure.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=name, daemon=True).start()
    if not done.wait(seconds):
        return done
    if failure:
        raise failure[0]
    return None


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


# -- construction -------------------------------------------------------------


def from_url(url: str) -> KafkaBackend:
    """A backend for ``kafka://host:port[,host:port][?options]``; see the module docstring."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise ConfigurationError(
            f"{redact_url(url)!r} names no broker: use kafka://host:9092[,host2:9092]"
        )
    if parts.path not in ("", "/"):
        raise ConfigurationError(
            f"{redact_url(url)!r}: a Kafka URL has no path; put options after '?'"
        )
    config: dict[str, Any] = {"bootstrap.servers": hosts}
    if parts.username is not None:
        config["sasl.username"] = unquote(parts.username)
        config["sasl.password"] = unquote(parts.password or "")
        config["security.protocol"] = "SASL_SSL"
        config["sasl.mechanism"] = "PLAIN"
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if "." in name or name in _UNDOTTED:
            config[name] = value
        elif name in _OPTIONS:
            options[name] = value
        else:
            raise ConfigurationError(
                f"unknown option {name!r} in {redact_url(url)!r}; known: "
                f"{', '.join(_OPTIONS)}, or a "
                f"librdkafka property: {', '.join(_UNDOTTED)} or one with a dot (linger.ms=5)"
            )
    try:
        reconnect_timeout = float(options.get("reconnect_timeout", "30"))
        replication_factor = int(options.get("replication_factor", "-1"))
    except ValueError as exc:
        raise ConfigurationError(
            f"bad option value in {redact_url(url)!r}: reconnect_timeout is seconds, "
            f"replication_factor an integer ({exc})"
        ) from None
    addresses = []
    for address in hosts.split(","):
        host, colon, port = address.strip().rpartition(":")
        try:
            addresses.append((host.strip("[]"), int(port)) if colon else (port, 9092))
        except ValueError:
            raise ConfigurationError(
                f"bad broker address {address!r} in {redact_url(url)!r}: use host:port"
            ) from None
    ensure_reachable("Kafka broker", addresses, connect_timeout(options.get("connect_timeout")))
    return KafkaBackend(
        config, reconnect_timeout=reconnect_timeout, replication_factor=replication_factor
    )


def from_client(
    client: object,
    *,
    config: Mapping[str, Any] | None = None,
    reconnect_timeout: float = 30.0,
    replication_factor: int = -1,
) -> KafkaBackend:
    """Wrap an existing ``confluent_kafka.Producer`` or a librdkafka config mapping.

    A Producer is used for every publish (with the durability it was built
    with) and is not closed by the backend. A Producer does not reveal its
    configuration, so consumers and the admin client find the brokers from
    its cluster metadata; pass ``config`` with anything else they need
    (security settings). A mapping is the same as ``KafkaBackend(mapping)``.
    """
    if isinstance(client, Mapping):
        merged = {**client, **(config or {})}
        return KafkaBackend(
            merged, reconnect_timeout=reconnect_timeout, replication_factor=replication_factor
        )
    if not isinstance(client, Producer):
        raise ConfigurationError(
            f"cannot wrap a {type(client).__name__}: pass a confluent_kafka.Producer or a "
            "librdkafka config dict"
        )
    merged = dict(config or {})
    if "bootstrap.servers" not in merged:
        try:
            brokers = client.list_topics(timeout=reconnect_timeout).brokers.values()
        except KafkaException as exc:
            raise map_error(exc) from exc
        merged["bootstrap.servers"] = ",".join(f"{b.host}:{b.port}" for b in brokers)
    return KafkaBackend(
        merged,
        reconnect_timeout=reconnect_timeout,
        replication_factor=replication_factor,
        producer=client,
    )


# -- publishing ---------------------------------------------------------------


def _encoded_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """Header values as bytes, keeping undecodable bytes a consumer received intact."""
    return [(k, v.encode("utf-8", "surrogateescape")) for k, v in headers]


class KafkaBackend:
    """A :class:`~polybus.adapters.base.Backend` on a Kafka cluster.

    Thread-safe: any number of threads may publish, declare and subscribe at
    once. Each subscription is its own consumer and follows the Subscription
    rules (one thread fetches; acks may come from others).

    ``config`` is a librdkafka configuration (it must name
    ``bootstrap.servers``) passed unchanged to the producer, consumers and
    admin client, over polybus' defaults: an idempotent producer with
    ``acks=all`` and the murmur2 partitioner, and ``message.timeout.ms`` set
    from ``reconnect_timeout``. Group settings (``group.id``, offset
    commit and reset, ``session.timeout.ms``) are chosen by each
    ``subscribe`` and refused here. ``producer`` replaces the backend's own
    producer (it is not closed by :meth:`close`).
    """

    capabilities = (
        Capability.DURABLE_GROUPS
        | Capability.EPHEMERAL_GROUPS
        | Capability.KEY_ORDER
        | Capability.SEEK
        | Capability.SEEK_TIME
        | Capability.LAG
        | Capability.COMPACTION
        | Capability.RETENTION
        | Capability.MULTI_PROCESS
        | Capability.TRANSACTIONS
    )

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        reconnect_timeout: float = 30.0,
        replication_factor: int = -1,
        producer: Producer | None = None,
    ) -> None:
        if not config.get("bootstrap.servers"):
            raise ConfigurationError("the Kafka config must name bootstrap.servers")
        owned = sorted(set(config) & set(_OWNED))
        if owned:
            raise ConfigurationError(
                f"{', '.join(owned)} cannot be set in the Kafka config: each subscribe() "
                "chooses its group, start position and session timeout"
            )
        if "transactional.id" in config:
            raise ConfigurationError(
                "transactional.id cannot be set in the Kafka config: Bus.transaction() gives "
                "each subscription a transactional producer of its own"
            )
        if not reconnect_timeout > 0:
            raise ConfigurationError(f"reconnect_timeout must be > 0 s, got {reconnect_timeout}")
        if replication_factor == 0 or replication_factor < -1:
            raise ConfigurationError(
                f"replication_factor must be >= 1, or -1 for the broker default; "
                f"got {replication_factor}"
            )
        self.config: dict[str, Any] = {"client.id": "polybus", "logger": log, **config}
        self.reconnect_timeout = reconnect_timeout
        self.replication_factor = replication_factor
        self._own_producer = producer is None
        self._producer_lock = threading.Lock()
        self._ordered_reports = (
            murmur2 is not _librdkafka_chooses
            and producer is None
            and _flag(self.config.get("enable.idempotence", True))
            and self.config.get("partitioner", "murmur2_random") == "murmur2_random"
        )
        self._partition_counts: dict[str, tuple[int, float]] = {}  #: topic -> (count, until)
        self._keyless_turn = itertools.count()
        self._poll_lock = threading.Lock()  # one thread serves delivery reports at a time
        self._polled = threading.Condition()  # notified after each serving of reports
        self._servings = 0  # how many servings ended: a waiter that saw one end goes on
        self._failed_producer: Producer | None = None  #: set by a fatal error
        if producer is None:
            timeout_ms = int(self.config.get("message.timeout.ms", reconnect_timeout * 1000))
            wait = timeout_ms / 1000 if timeout_ms > 0 else reconnect_timeout  # 0: no limit
            self._delivery_timeout = wait + _DELIVERY_GRACE
            self._producer = self._new_producer()
        else:
            self._delivery_timeout = reconnect_timeout + _DELIVERY_GRACE
            self._producer = producer
        self._admin: AdminClient | None = None
        self._session_bounds: tuple[int, int] | None = None
        self._subscriptions: set[KafkaSubscription] = set()
        self._lock = threading.Lock()
        self._closed = False

    def _new_producer(self) -> Producer:
        producer: Producer | None = None

        def on_error(err: KafkaError) -> None:
            if err.fatal():
                log.error("Kafka producer failed: %s; publishing continues on a new one", err)
                self._failed_producer = producer
            else:
                log.debug("Kafka producer: %s", err)

        config = {
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",  # the Java client's: keys land where JVM apps put them
            "message.timeout.ms": int(self.reconnect_timeout * 1000),
            **self.config,
            "error_cb": on_error,
        }
        try:
            producer = Producer(config)
        except KafkaException as exc:
            raise map_error(exc) from exc
        return producer

    def _transactional_config(
        self, transactional_id: str, on_failed_delivery: Callable[[KafkaError, Any], None]
    ) -> dict[str, Any]:
        """The config of a subscription's transactional producer: the backend's, with
        what transactions need, and a transaction timeout a little past the delivery
        timeout (how long a commit may take; a dead member's open transaction is
        aborted by the broker after it)."""
        config: dict[str, Any] = {
            "partitioner": "murmur2_random",
            "message.timeout.ms": int(self.reconnect_timeout * 1000),
            **self.config,
            "enable.idempotence": True,
            "acks": "all",
            "transactional.id": transactional_id,
            "delivery.report.only.error": True,  # failures only: no Python call per record
            "on_delivery": on_failed_delivery,
        }
        message_ms = int(config["message.timeout.ms"])
        if message_ms > 0:
            config.setdefault("transaction.timeout.ms", message_ms + int(_DELIVERY_GRACE * 1000))
        else:  # no delivery limit: librdkafka derives it from the transaction timeout
            del config["message.timeout.ms"]
        return config

    def transaction(self, subscription: Subscription) -> KafkaTransaction:
        """Begin a transaction whose acks settle records ``subscription`` fetched.

        The subscription's transactional producer is made (and registered with
        the broker) on its first transaction, blocking up to the reconnect
        timeout. Raises ConfigurationError for a group-less subscription or one
        of another bus, CapabilityError when the broker has no transactions,
        ConnectionLost.
        """
        self._check()
        if not isinstance(subscription, KafkaSubscription) or subscription._backend is not self:
            raise ConfigurationError("a Kafka transaction needs a subscription of the same bus")
        subscription._start_transactions()
        return KafkaTransaction(subscription)

    def _replace_producer(self, old: Producer) -> None:
        """Publish on a new producer from now on (ours only); ``old`` fails what it holds."""
        with self._producer_lock:
            if self._producer is not old:
                return  # another thread did it
            self._producer = self._new_producer()
        old.purge()  # its waiting publishers get their delivery reports (failed) now

    def _client_config(self, **extra: Any) -> dict[str, Any]:
        return {**self.config, **extra}

    def _admin_client(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                try:
                    self._admin = AdminClient(self._client_config())
                except KafkaException as exc:
                    raise map_error(exc) from exc
            return self._admin

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("bus is closed; connect again")

    def _wait(self, future: Future[Any]) -> Any:
        try:
            return future.result(timeout=self.reconnect_timeout + _DELIVERY_GRACE)
        except Exception as exc:
            raise map_error(exc) from exc

    # -- topics ---------------------------------------------------------------

    def declare_topic(self, topic: str, spec: TopicSpec) -> None:
        """Create ``topic`` if missing, and position each of ``spec.groups`` that has no
        committed offsets at its start; idempotent.

        Raises ConfigurationError naming what differs when the topic exists
        with another partition count, retention or cleanup policy.
        """
        self._check()
        partitions = spec.partitions or spec.default_partitions
        config: dict[str, str] = {}
        if spec.retention_ms is not None:
            config["retention.ms"] = str(spec.retention_ms)
        if spec.retention_bytes is not None:
            config["retention.bytes"] = str(spec.retention_bytes)  # per partition, as natively
        if spec.compact:
            config["cleanup.policy"] = "compact,delete" if config else "compact"
        admin = self._admin_client()
        new = NewTopic(topic, partitions, self.replication_factor, config=config)
        timeout = self.reconnect_timeout
        future = admin.create_topics([new], request_timeout=timeout, operation_timeout=timeout)
        created = True
        try:
            future[topic].result(timeout=timeout + _DELIVERY_GRACE)
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is None or err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise map_error(exc) from exc
            created = False
        except Exception as exc:
            raise map_error(exc) from exc
        if created:
            self._await_leaders(topic, partitions)
        else:
            partitions = self._check_existing(topic, spec, config)
        self._partition_counts[topic] = (partitions, time.monotonic() + _METADATA_TTL)
        for group in spec.groups:
            self._declare_group(topic, partitions, group, fresh_topic=created)

    def _await_leaders(self, topic: str, partitions: int | None = None) -> int:
        """``topic``'s partition count once every partition has a leader the metadata
        names (``partitions``: the count it was just created with). A broker
        acknowledges CreateTopics before its metadata shows the topic, so a subscriber,
        or another process declaring it, that looks too early finds no topic.
        TopicNotFound if it does not show within the reconnect timeout."""
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            try:
                metadata = self._admin_client().list_topics(topic, timeout=self.reconnect_timeout)
            except KafkaException as exc:
                raise map_error(exc) from exc
            found = metadata.topics.get(topic)
            if (
                found is not None
                and found.error is None
                and found.partitions
                and (partitions is None or len(found.partitions) == partitions)
                and all(p.leader >= 0 for p in found.partitions.values())
            ):
                return len(found.partitions)
            if time.monotonic() >= deadline:
                error = found.error if found is not None else "no metadata"
                raise TopicNotFound(f"Kafka topic {topic!r} is not available: {error}")
            time.sleep(0.05)

    def _check_existing(self, topic: str, spec: TopicSpec, wanted: dict[str, str]) -> int:
        """Compare an existing topic with ``spec``; return its partition count."""
        count = self._await_leaders(topic)  # it may have been created a moment ago
        if spec.partitions is not None and spec.partitions != count:
            raise ConfigurationError(
                f"Kafka topic {topic!r} exists with {count} partitions, declared with "
                f"{spec.partitions} partitions; Kafka cannot remove partitions and adding "
                "some would move keys, so declare it with partitions={count} or None"
            )
        if wanted:
            resource = ConfigResource(ResourceType.TOPIC, topic)
            found = self._wait(self._admin_client().describe_configs([resource])[resource])
            differ = []
            for name, value in wanted.items():
                have = found.get(name)
                have_value = None if have is None else have.value
                if name == "cleanup.policy":
                    same = "compact" in (have_value or "")
                else:
                    same = have_value == value
                if not same:
                    differ.append(f"{name}={have_value} (declared {value})")
            if differ:
                raise ConfigurationError(
                    f"Kafka topic {topic!r} exists with other settings: {', '.join(differ)}; "
                    "change them with kafka-configs or declare what exists"
                )
        return count

    def _declare_group(self, topic: str, partitions: int, group: str, *, fresh_topic: bool) -> None:
        """Position ``group`` at the start of every partition it has no commit on (as the
        native engine does), so it keeps every message even before a member subscribes."""
        admin = self._admin_client()
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        request = [ConsumerGroupTopicPartitions(group, tps)]
        committed = self._wait(admin.list_consumer_group_offsets(request)[group])
        missing = [tp.partition for tp in committed.topic_partitions if tp.offset < 0]
        if not missing:
            return
        ends = dict.fromkeys(missing, 0) if fresh_topic else self._earliest_offsets(topic, missing)
        offsets = [TopicPartition(topic, p, o) for p, o in ends.items()]
        future = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, offsets)])
        try:
            self._wait(future[group])
        except PolybusError as exc:
            # A live member has the group: it already reads from its own position.
            log.debug("group %r of %r keeps its position: %s", group, topic, exc)

    def _earliest_offsets(self, topic: str, partitions: list[int]) -> dict[int, int]:
        specs = {TopicPartition(topic, p): OffsetSpec.earliest() for p in partitions}  # type: ignore[no-untyped-call]
        timeout = self.reconnect_timeout

        def ask() -> dict[int, int]:
            futures = self._admin_client().list_offsets(specs, request_timeout=timeout)
            return {tp.partition: f.result(timeout).offset for tp, f in futures.items()}

        try:
            return _while_leaders_move(ask, timeout)
        except Exception as exc:
            raise map_error(exc) from exc

    # -- publishing -------------------------------------------------------------

    def _serve(self, producer: Producer, timeout: float) -> None:
        """Send what is queued now and serve delivery reports (anyone's) for up to
        ``timeout`` s, or wait while another thread does.

        ``flush`` rather than ``poll``: it sends at once instead of waiting out
        ``linger.ms``, which a caller waiting for its reports gains nothing from.
        On Apache Kafka here (2 runs each): sequential ``publish`` went from 129-160
        to 4,087-4,822 msg/s, batches of 1000 from 77-91 k to 271-278 k msg/s, and
        8 threads publishing one at a time from 1.2 k msg/s (p50 6.4 ms, p99 13 ms)
        to 5.5-5.7 k msg/s (p50 1.3 ms, p99 3.6-4.7 ms). One thread at
        a time serves, so reports reach their callbacks in the order librdkafka
        emitted them (the partitioned path relies on it).
        """
        seen = self._servings
        if self._poll_lock.acquire(blocking=False):
            try:
                producer.flush(timeout)
            except KafkaException as exc:  # raised by a callback
                raise map_error(exc) from exc
            except RuntimeError as exc:  # closed by another thread
                raise ClosedError("bus is closed; connect again") from exc
            finally:
                self._poll_lock.release()
            with self._polled:
                self._servings += 1
                self._polled.notify_all()
        else:
            with self._polled:
                if self._servings == seen:  # else it ended before this thread could wait
                    self._polled.wait(timeout)

    def _partition_count_for_publish(self, producer: Producer, topic: str) -> int:
        now = time.monotonic()
        known = self._partition_counts.get(topic)
        if known is not None and known[1] > now:
            return known[0]
        try:
            metadata = producer.list_topics(topic, timeout=self.reconnect_timeout).topics.get(topic)
        except KafkaException as exc:
            raise map_error(exc) from exc
        if metadata is not None and metadata.error is not None:
            raise map_error(KafkaException(metadata.error))
        count = 0 if metadata is None else len(metadata.partitions)
        if not count:
            raise TopicNotFound(f"Kafka has no partitions of topic {topic!r}; declare it first")
        self._partition_counts[topic] = (count, now + _METADATA_TTL)
        return count

    def publish(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        """Publish ``records`` in order; return their receipts once the broker stored all.

        Waits only for these records' delivery reports, at most about
        ``message.timeout.ms`` (the reconnect timeout). Raises ConnectionLost
        when the cluster stayed unreachable that long, MessageTooLarge,
        TopicNotFound, or CapabilityError for a delayed record. When it
        raises, any of the records may or may not have been stored.
        """
        self._check()
        producer = self._producer
        if producer is self._failed_producer:
            self._replace_producer(producer)
            producer = self._producer
        n = len(records)
        if not n:
            return []
        # Two ways to tie delivery reports back to records. With our idempotent producer
        # the broker takes a partition's batches only in sequence, so that partition's
        # reports arrive in produce order: we pick partitions ourselves (the murmur2 hash
        # the partitioner uses; keyless records in runs of 1024 per partition) and share
        # one callback. Any other producer gives each record its own callback.
        ordered = self._ordered_reports
        count = self._partition_count_for_publish(producer, topic) if ordered else 0
        base = next(self._keyless_turn) * 1024
        offsets: list[list[int]] = [[] for _ in range(count)]
        chosen: list[int] = []
        choose = chosen.append
        failures: list[KafkaError] = []
        reports: list[Any] = [] if ordered else [None] * n
        setitem = reports.__setitem__
        scan = 0

        stored = [o.append for o in offsets]

        def on_delivery(err: KafkaError | None, msg: Any) -> None:  # one call per record
            if err is None:
                stored[msg.partition()](msg.offset())
            else:
                failures.append(err)

        def missing() -> int:
            nonlocal scan
            if ordered:
                return n - len(failures) - sum(map(len, offsets))
            try:
                scan = reports.index(None, scan)
            except ValueError:
                return 0
            return n - scan

        produce = producer.produce
        deadline = 0.0
        partition = -1
        callback: Any = on_delivery
        for i, r in enumerate(records):
            if r.not_before_ms:
                raise CapabilityError("Kafka cannot delay delivery (no DELAY capability)")
            key = r.key
            if ordered:
                partition = ((base + i) >> 10) % count if key is None else murmur2(key, count)
                choose(partition)
            else:
                callback = lambda _err, msg, i=i: setitem(i, msg)  # noqa: E731
            headers: Any = list(r.headers) if r.headers else None
            while True:
                try:
                    # positional: keyword parsing costs more than the rest of the call
                    produce(topic, r.value, key, partition, callback, None, r.timestamp_ms, headers)
                    break
                except BufferError:
                    # The local queue is full: serve reports to make room, but not forever.
                    now = time.monotonic()
                    deadline = deadline or now + self._delivery_timeout
                    if now > deadline:
                        raise ConnectionLost(
                            f"Kafka producer queue stayed full for {self._delivery_timeout:.0f}"
                            " s: the cluster is unreachable or too slow"
                        ) from None
                    self._serve(producer, 0.1)
                except UnicodeEncodeError:
                    headers = _encoded_headers(r.headers)
                except KafkaException as exc:
                    raise map_error(exc) from exc
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"cannot publish to Kafka: {exc}") from exc
                except RuntimeError as exc:  # closed by another thread
                    raise ClosedError("bus is closed; connect again") from exc
        self._await(producer, missing)
        if not ordered:
            failures = [msg.error() for msg in reports if msg.error() is not None]
        if failures:
            raise self._failed(producer, topic, failures[0])
        if not ordered:
            return [Receipt(topic, msg.partition(), msg.offset()) for msg in reports]
        # Receipts built in C: Receipt's own __new__ is a Python call per record.
        if count == 1:
            in_order: Iterable[int] = offsets[0]
        else:
            in_order = map(next, map([iter(o) for o in offsets].__getitem__, chosen))
        receipts = map(_new_tuple, repeat(Receipt), zip(repeat(topic), chosen, in_order))
        return cast(list[Receipt], list(receipts))

    def _failed(self, producer: Producer, topic: str, err: KafkaError) -> PolybusError:
        """The error to raise for a failed delivery, recovering the producer if needed."""
        code = err.code()
        if code in (KafkaError._UNKNOWN_PARTITION, KafkaError.UNKNOWN_TOPIC_OR_PART):
            self._partition_counts.pop(topic, None)  # look the partitions up again
        if self._own_producer and (err.fatal() or code in _SESSION_LOST):
            # Not a fencing of the application: our producer id is no longer accepted
            # (e.g. after an epoch bump the broker refused). A new producer gets a new id.
            self._replace_producer(producer)
            return ConnectionLost(
                f"Kafka {err.name()}: {err.str()}; the producer was replaced, retry "
                "(the records may or may not have been stored)"
            )
        return map_error(KafkaException(err))

    def _await(self, producer: Producer, missing: Callable[[], int]) -> None:
        deadline = time.monotonic() + self._delivery_timeout
        while left := missing():
            if time.monotonic() > deadline:
                raise ConnectionLost(
                    f"Kafka did not confirm {left} record(s) within "
                    f"{self._delivery_timeout:.0f} s; they may still be stored"
                )
            self._serve(producer, 0.1)

    # -- subscribing ------------------------------------------------------------

    def _session_ms(self, session_timeout: float) -> int:
        """``session_timeout`` in ms, moved into the range the brokers accept."""
        if self._session_bounds is None:
            self._session_bounds = self._read_session_bounds()
        low, high = self._session_bounds
        return min(max(round(session_timeout * 1000), low), high)

    def _read_session_bounds(self) -> tuple[int, int]:
        bounds = {"group.min.session.timeout.ms": 1, "group.max.session.timeout.ms": 3_600_000}
        try:
            admin = self._admin_client()
            broker = next(iter(admin.list_topics(timeout=self.reconnect_timeout).brokers))
            resource = ConfigResource(ResourceType.BROKER, str(broker))
            found = self._wait(admin.describe_configs([resource])[resource])
            for name in bounds:
                entry = found.get(name)
                if entry is not None and entry.value and entry.value.isdigit():
                    bounds[name] = int(entry.value)
        except (PolybusError, KafkaException, StopIteration) as exc:
            log.debug("cannot read the brokers' session timeout range: %s", exc)
        return bounds["group.min.session.timeout.ms"], bounds["group.max.session.timeout.ms"]

    def subscribe(
        self, topic: str, group: str | None, *, start: Start, session_timeout: float
    ) -> KafkaSubscription:
        """Join consumer group ``group``, or read every partition without a group
        (``group=None``) from the position ``start`` names at the time of this call."""
        self._check()
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', not {start!r}")
        config = {
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": start,
            "isolation.level": "read_committed",  # librdkafka's default, said out loud
            **self.config,
        }
        if group is not None:
            session_ms = self._session_ms(session_timeout)
            config["group.id"] = group
            config["session.timeout.ms"] = session_ms
            config.setdefault("heartbeat.interval.ms", max(100, min(1000, session_ms // 3)))
            if session_ms > int(config.get("max.poll.interval.ms", 300_000)):
                config["max.poll.interval.ms"] = session_ms
        else:
            # librdkafka wants a group id even for assign(); this one never joins or commits.
            config["group.id"] = f"polybus-ephemeral-{uuid.uuid4().hex}"
        sub = KafkaSubscription(self, topic, group, config, start)
        with self._lock:
            if self._closed:
                sub.close()
                raise ClosedError("bus is closed; connect again")
            self._subscriptions.add(sub)
        return sub

    def _forget(self, sub: KafkaSubscription) -> None:
        with self._lock:
            self._subscriptions.discard(sub)

    def close(self) -> None:
        """Close every subscription and the backend's own producer; idempotent.

        Records whose publish is still waiting are given up (those publishes
        raise ConnectionLost).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close()
        if self._own_producer:
            try:
                self._producer.purge()  # publishes still waiting fail now, not at a timeout
                self._producer.flush(0)
                close = getattr(self._producer, "close", None)  # confluent-kafka >= 2.13
                if close is not None:
                    close()
            except (KafkaException, RuntimeError) as exc:
                log.debug("closing the Kafka producer: %s", exc)


# -- consuming ----------------------------------------------------------------


class _Partition:
    """Acknowledgement tracking for one partition this member reads.

    A new object replaces it on every (re)assignment and seek; records carry
    the object they were fetched under, so acks of records from an earlier
    ownership are recognised (``live`` is False) and ignored.
    """

    __slots__ = ("committed", "live", "next", "number", "pending", "settled", "skip_before_ms")

    def __init__(self, number: int, *, next: int | None = None, committed: int = -1) -> None:
        self.number = number
        self.pending: deque[int] = deque()  #: offsets fetched and not yet below the commit point
        self.settled: set[int] = set()  #: offsets in ``pending`` acked or dropped
        self.next = next  #: offset after the last one fetched (updated by commit_point)
        self.committed = committed  #: what this member last committed, -1 if unknown
        self.live = True
        self.skip_before_ms = 0  #: an ephemeral reader's start time, until a newer record

    def commit_point(self) -> int | None:
        """Offset everything before which is settled (called under the subscription lock)."""
        pending, settled = self.pending, self.settled
        if pending:
            self.next = pending[-1] + 1
            if len(settled) >= len(pending) and settled.issuperset(pending):
                settled.difference_update(pending)  # the usual case, in C: all were settled
                pending.clear()
            else:
                while pending and pending[0] in settled:
                    settled.discard(pending.popleft())
        return pending[0] if pending else self.next

    def point_with(self, staged: set[int]) -> int | None:
        """The commit point were ``staged`` settled as well; changes nothing but trims."""
        self.commit_point()
        settled = self.settled
        for offset in self.pending:
            if offset not in settled and offset not in staged:
                return offset
        return self.next


def _ignore(offset: object) -> None:
    """Stands in for settling a record whose partition is no longer this member's."""


def _str_headers(headers: list[tuple[str, bytes | None]]) -> tuple[tuple[str, str], ...]:
    return tuple(
        [(k, "" if v is None else v.decode("utf-8", "surrogateescape")) for k, v in headers]
    )


class KafkaSubscription:
    """A consumer group member (or a group-less reader) of one topic.

    One thread fetches (and seeks); ``ack``/``nack`` may come from any
    thread. Acks of records whose partition was revoked or sought since are
    ignored: those records are redelivered to the partition's owner.
    """

    def __init__(
        self,
        backend: KafkaBackend,
        topic: str,
        group: str | None,
        config: dict[str, Any],
        start: Start,
    ) -> None:
        self._backend = backend
        self._topic = topic
        self._group = group
        self._reconnect_timeout = backend.reconnect_timeout
        self._lock = threading.Lock()
        self._partitions: dict[int, _Partition] = {}
        self._requeued: deque[InRecord] = deque()
        self._requeue_turn = True  #: with max_records=1, whether a requeued record goes next
        self._next_commit = 0.0
        self._down_since: float | None = None
        self._failure: KafkaError | None = None  #: fatal: every fetch raises it
        self._error: PolybusError | None = None  #: raised once by the next fetch
        self._joined = False  #: holds an assignment (a join is in flight while False)
        self._session_timeout = int(config.get("session.timeout.ms", 0)) / 1000
        self._closed = False
        self._commit_lock = threading.Lock()  #: one commit at a time, transactional or not
        self._sent_async = False  #: an asynchronous commit was sent since the last check
        self._transactional: Producer | None = None  #: made for the first transaction
        self._transactional_id = f"polybus-{group}-{uuid.uuid4().hex}"
        self._transaction_timeout = 0.0  #: seconds, set with the transactional producer
        self._failed_deliveries: list[KafkaError] = []  #: of the transaction committing
        config = {**config, "error_cb": self._on_error}
        if group is not None:
            config["on_commit"] = self._on_commit
        try:
            self._consumer = Consumer(config)
        except KafkaException as exc:
            raise map_error(exc) from exc
        try:
            if group is None:
                self._assign_all(start)
            else:
                self._consumer.subscribe(
                    [topic],
                    on_assign=self._on_assign,
                    on_revoke=self._on_revoke,
                    on_lost=self._on_lost,
                )
        except BaseException as exc:
            self._consumer.close()
            if isinstance(exc, KafkaException):
                raise map_error(exc) from exc
            raise

    @property
    def group(self) -> str | None:
        return self._group

    # -- assignment -------------------------------------------------------------

    def _assign_all(self, start: Start) -> None:
        """Read every partition from its current end (or beginning), resolved now so that
        whatever is published after subscribe() returns is seen."""
        consumer, topic, timeout = self._consumer, self._topic, self._reconnect_timeout
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise TopicNotFound(f"Kafka topic {topic!r} is not available")
        numbers = sorted(metadata.partitions)
        if start == "earliest":
            tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in numbers]
            self._partitions = {p: _Partition(p) for p in numbers}
            consumer.assign(tps)
            return
        now_ms = int(time.time() * 1000)
        by_time = _while_leaders_move(
            lambda: consumer.offsets_for_times(
                [TopicPartition(topic, p, now_ms) for p in numbers], timeout=timeout
            ),
            timeout,
        )
        tps = []
        for tp in by_time:
            state = _Partition(tp.partition)
            if tp.offset < 0:  # nothing at or after now: start at the end
                tp.offset = self._watermarks(tp)[1]
            else:
                # A broker answer to trust only as far as the records' timestamps agree:
                # skip older records until the first one stamped at or after now.
                state.skip_before_ms = now_ms
            state.next = tp.offset
            self._partitions[tp.partition] = state
            tps.append(TopicPartition(topic, tp.partition, tp.offset))
        consumer.assign(tps)

    def _watermarks(self, tp: TopicPartition) -> tuple[int, int]:
        """The low and high watermark of ``tp``, as its leader reports them."""
        timeout = self._reconnect_timeout
        return _while_leaders_move(
            lambda: self._consumer.get_watermark_offsets(tp, timeout), timeout
        )

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = True
        with self._lock:
            for tp in partitions:
                old = self._partitions.get(tp.partition)
                if old is not None:
                    old.live = False
                self._partitions[tp.partition] = _Partition(tp.partition)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Commit what was acked before the partitions move on, then forget their records.
        self._joined = False
        self._commit([tp.partition for tp in partitions], asynchronous=False)
        self._drop(partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._joined = False
        self._drop(partitions)  # already someone else's: committing would be refused

    def _drop(self, partitions: list[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                state = self._partitions.pop(tp.partition, None)
                if state is not None:
                    state.live = False
            if self._requeued:
                self._requeued = deque(r for r in self._requeued if cast(_Partition, r.handle).live)

    # -- commits ----------------------------------------------------------------

    def _commit(
        self, partitions: Sequence[int] | None, *, asynchronous: bool, strict: bool = False
    ) -> None:
        """Commit the settled prefix of ``partitions`` (all owned ones for None) if it moved.

        A group-less reader commits nothing but still trims its tracking here. A
        failed commit is logged and retried later, or raised when ``strict``.
        """
        with self._commit_lock:
            offsets = []
            with self._lock:
                states = self._partitions
                for number in states if partitions is None else partitions:
                    state = states.get(number)
                    if state is None:
                        continue
                    point = state.commit_point()
                    if self._group is not None and point is not None and point != state.committed:
                        state.committed = point
                        offsets.append(TopicPartition(self._topic, number, point))
            if not offsets:
                return
            try:
                if asynchronous:
                    self._sent_async = True
                    self._consumer.commit(offsets=offsets, asynchronous=True)
                else:
                    self._consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                # Not committed: the records are delivered again (at-least-once).
                log.info("Kafka commit for group %r failed: %s", self._group, exc)
                self._forget_commits(offsets)
                if strict:
                    raise map_error(exc) from exc

    def _on_commit(self, err: KafkaError | None, partitions: list[TopicPartition]) -> None:
        failed = partitions if err is not None else [tp for tp in partitions if tp.error]
        if failed:
            log.info("Kafka commit for group %r failed: %s", self._group, err or failed)
            self._forget_commits(failed)

    def _forget_commits(self, offsets: list[TopicPartition]) -> None:
        with self._lock:
            for tp in offsets:
                state = self._partitions.get(tp.partition)
                if state is not None and state.committed == tp.offset:
                    state.committed = -1  # try again next time

    # -- transactions -----------------------------------------------------------------

    def _start_transactions(self) -> None:
        """Make and register this subscription's transactional producer, once."""
        self._check()
        if self._group is None:
            raise ConfigurationError(
                f"a transaction commits a group's offsets: subscribe to {self._topic!r} with a "
                "group to use one"
            )
        with self._commit_lock:
            self._transactional_producer()

    def _transactional_producer(self) -> Producer:
        """The transactional producer, made if missing (under the commit lock)."""
        if self._transactional is not None:
            return self._transactional
        config = self._backend._transactional_config(
            self._transactional_id, self._on_failed_delivery
        )
        self._transaction_timeout = int(config.get("transaction.timeout.ms", 60_000)) / 1000
        try:
            producer = Producer(config)
            # A new producer with this id also aborts what an earlier one left open.
            producer.init_transactions(self._reconnect_timeout)
        except KafkaException as exc:
            raise map_error(exc) from exc
        self._transactional = producer
        return producer

    def _await_plain_commits(self) -> None:
        """Make sure no plain asynchronous commit is still on its way, before a transaction
        sends offsets: landing after the transaction's, it would move them back.

        A synchronous commit (of what is committed already) queued behind them returns
        once the broker applied them, as it handles one connection's requests in order.
        Raises ConnectionLost if that takes longer than the transaction timeout.
        """
        if not self._sent_async:
            return
        with self._lock:
            offsets = [
                TopicPartition(self._topic, p, state.committed)
                for p, state in self._partitions.items()
                if state.committed >= 0
            ]

        def commit() -> None:  # bounded: librdkafka waits for a coordinator for ever
            try:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            except (KafkaException, RuntimeError) as exc:  # they failed, or were applied
                log.info("Kafka commit for group %r failed: %s", self._group, exc)

        wait = self._transaction_timeout
        if offsets and _bounded(commit, wait, "polybus-kafka-commit") is not None:
            raise ConnectionLost(
                f"Kafka did not confirm group {self._group!r}'s earlier commits within "
                f"{self._transaction_timeout:.0f} s; the transaction was not sent"
            )
        self._sent_async = False

    def _on_failed_delivery(self, err: KafkaError, msg: Any) -> None:
        self._failed_deliveries.append(err)

    def _commit_transaction(
        self, outputs: Sequence[tuple[str, Sequence[OutRecord]]], acks: Sequence[InRecord]
    ) -> None:
        """Produce ``outputs`` and commit the settled prefix, counting ``acks``, in one
        Kafka transaction; on any failure the acked records are given back."""
        with self._commit_lock:
            try:
                self._check()
                planned = self._planned_offsets(acks)
                if outputs or planned:
                    self._run_transaction(outputs, planned)
            except BaseException:
                self._give_back(acks)
                raise
            with self._lock:
                for r in acks:
                    state: _Partition = r.handle  # type: ignore[assignment]
                    if state.live:
                        state.settled.add(r.offset)  # type: ignore[arg-type]
                for state, point in planned:
                    state.committed = point

    def _planned_offsets(self, acks: Sequence[InRecord]) -> list[tuple[_Partition, int]]:
        """The partitions whose commit point ``acks`` move, with the new point; raises
        FencedError if one of them is no longer this member's."""
        staged: dict[_Partition, set[int]] = {}
        for r in acks:
            staged.setdefault(r.handle, set()).add(r.offset)  # type: ignore[arg-type]
        planned = []
        with self._lock:
            lost = sorted(state.number for state in staged if not state.live)
            if lost:
                raise FencedError(
                    f"partition(s) {lost} of {self._topic!r} moved to another member of group "
                    f"{self._group!r} while the transaction was open; nothing was committed "
                    "and their records go to the new owner"
                )
            for state, offsets in staged.items():
                point = state.point_with(offsets)
                if point is not None and point != state.committed:
                    planned.append((state, point))
        return planned

    def _run_transaction(
        self,
        outputs: Sequence[tuple[str, Sequence[OutRecord]]],
        planned: Sequence[tuple[_Partition, int]],
    ) -> None:
        producer = self._transactional_producer()  # a new one after a failure dropped it
        if planned:
            self._await_plain_commits()
        self._failed_deliveries.clear()
        try:
            # Bounded waits, not librdkafka's "remaining transaction time": a broker that
            # never answers must not hang commit(); a producer left mid-call is replaced.
            timeout = self._transaction_timeout
            producer.begin_transaction()
            for topic, records in outputs:
                self._produce_all(producer, topic, records)
            if planned:
                offsets = [TopicPartition(self._topic, s.number, point) for s, point in planned]
                self._send_offsets(producer, offsets, timeout)
            producer.commit_transaction(timeout)
        except KafkaException as exc:
            raise self._transaction_failed(producer, exc) from exc
        except BaseException:
            if producer is self._transactional:  # not one dropped mid-call
                self._abort(producer)
            raise

    def _send_offsets(
        self, producer: Producer, offsets: list[TopicPartition], timeout: float
    ) -> None:
        """``send_offsets_to_transaction``, in a thread and bounded: librdkafka (up to
        2.16 at least, issues 5456 and 5511) can wait for ever, past its own timeout, for
        a group coordinator whose broker died. Then the producer is dropped, so its
        transaction is never committed, and ConnectionLost is raised."""
        metadata = self._consumer.consumer_group_metadata()
        stuck = _bounded(
            lambda: producer.send_offsets_to_transaction(offsets, metadata, timeout),
            timeout + _DELIVERY_GRACE,
            "polybus-kafka-send-offsets",
        )
        if stuck is not None:
            self._drop_transactional(idle=stuck)
            raise ConnectionLost(
                f"Kafka did not take group {self._group!r}'s offsets into the transaction "
                f"within {timeout:.0f} s (its group coordinator is unreachable); nothing "
                "of it is committed (the next transaction, or the broker at its timeout, "
                "aborts it) and its acked records are delivered again; retry it"
            )

    def _produce_all(self, producer: Producer, topic: str, records: Sequence[OutRecord]) -> None:
        produce = producer.produce
        deadline = 0.0
        for r in records:
            headers: Any = list(r.headers) if r.headers else None
            while True:
                try:
                    produce(topic, r.value, r.key, -1, None, None, r.timestamp_ms, headers)
                    break
                except BufferError:  # more records than the local queue holds: send some
                    now = time.monotonic()
                    deadline = deadline or now + self._backend._delivery_timeout
                    if now > deadline:
                        raise ConnectionLost(
                            "Kafka producer queue stayed full: the cluster is unreachable or "
                            "too slow"
                        ) from None
                    producer.poll(0.1)
                except UnicodeEncodeError:
                    headers = _encoded_headers(r.headers)
                except (TypeError, ValueError) as exc:
                    raise ConfigurationError(f"cannot publish to Kafka: {exc}") from exc

    def _transaction_failed(self, producer: Producer, exc: KafkaException) -> PolybusError:
        """Abort what can still be aborted; the error to raise for a failed transaction."""
        err = _kafka_error(exc) or KafkaError(KafkaError._FAIL, str(exc))
        if self._failed_deliveries and err.txn_requires_abort():
            err = self._failed_deliveries[0]  # the record's own error says more
        log.info("a Kafka transaction of group %r failed: %s", self._group, err)
        if err.fatal() or err.code() in _PRODUCER_FENCED:
            self._drop_transactional()  # done for: the next transaction makes a new one
            aborted = False
        else:
            aborted = self._abort(producer)
        text = f"Kafka {err.name()}: {err.str()}"
        if err.code() in _FENCED:
            return FencedError(
                f"{text}: the group moved on (the inputs' partitions belong to a newer "
                "generation) or a newer producer took over; nothing was committed"
            )
        if err.code() in _CONNECTION or err.code() in _COORDINATOR_GONE or err.retriable():
            if aborted:
                return ConnectionLost(
                    f"{text}: the transaction was aborted and its acked records are delivered "
                    "again; retry it"
                )
            return ConnectionLost(
                f"{text}: the transaction's outcome is unknown (it could not be aborted); its "
                "acked records are delivered again, so they are processed twice if it committed"
            )
        return map_error(KafkaException(err))

    def _abort(self, producer: Producer) -> bool:
        """Abort the open Kafka transaction; False (and the producer dropped) if that fails."""
        try:
            producer.abort_transaction(self._transaction_timeout)
            return True
        except (KafkaException, RuntimeError) as exc:
            log.info("aborting a Kafka transaction of group %r failed: %s", self._group, exc)
            self._drop_transactional()
            return False

    def _drop_transactional(self, idle: threading.Event | None = None) -> None:
        """Close the transactional producer; the next transaction makes a new one (with the
        same id, which fences this one and aborts what it left open). ``idle``, if given,
        is set once no call of ours is inside the producer: it is closed only then."""
        producer, self._transactional = self._transactional, None
        if producer is None:
            return

        def close() -> None:  # holds the last reference: librdkafka's destroy runs here too
            if idle is not None:
                idle.wait()
            try:
                producer.purge()
                producer.flush(0)
                close = getattr(producer, "close", None)  # confluent-kafka >= 2.13
                if close is not None:
                    close()
            except (KafkaException, RuntimeError) as exc:
                log.debug("closing a Kafka transactional producer: %s", exc)

        # In the background: a producer whose transaction is stuck on the broker can
        # take a transaction timeout or more to let go.
        threading.Thread(target=close, name="polybus-kafka-txn-close", daemon=True).start()

    def _give_back(self, acks: Sequence[InRecord]) -> None:
        """Deliver a failed or aborted transaction's acked records again (attempt + 1);
        those of partitions this member lost go to their new owner."""
        with self._lock:
            for r in acks:
                if cast(_Partition, r.handle).live:
                    r.attempt += 1
                    self._requeued.append(r)

    # -- errors -------------------------------------------------------------------

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            if self._down_since is None:
                self._down_since = time.monotonic()
        elif err.fatal():
            self._failure = err
        log.debug("Kafka consumer of %r: %s", self._topic, err)

    def _check_connection(self, timeout: float) -> None:
        """Raise ConnectionLost once no broker answered for ``reconnect_timeout``.

        librdkafka reports when every broker connection is down but not when
        one is back, so past the deadline a metadata request asks.
        """
        since = self._down_since
        if since is None or time.monotonic() - since < self._reconnect_timeout:
            return
        try:
            self._consumer.list_topics(self._topic, timeout=min(1.0, max(timeout, 0.2)))
        except KafkaException as exc:
            raise ConnectionLost(
                f"no Kafka broker answered for {time.monotonic() - since:.0f} s "
                f"(reconnect_timeout={self._reconnect_timeout:g}); still retrying: {exc}"
            ) from exc
        self._down_since = None

    # -- the Subscription protocol ---------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedError(f"subscription to {self._topic!r} is closed; subscribe again")

    def fetch(self, max_records: int, timeout: float) -> list[InRecord]:
        self._check()
        if self._failure is not None:
            raise map_error(KafkaException(self._failure))
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        now = time.monotonic()
        if now >= self._next_commit:
            self._next_commit = now + _COMMIT_INTERVAL
            self._commit(None, asynchronous=True)
        out: list[InRecord] = []
        if self._requeued:
            # Leave consume() room (every other call when max_records is 1): only it serves
            # rebalances, and a member whose given-back records keep failing, because the
            # coordinator forgot it, must still get to rejoin.
            take = max_records - 1 if max_records > 1 else int(self._requeue_turn)
            self._requeue_turn = not self._requeue_turn
            with self._lock:
                requeued = self._requeued
                while requeued and len(out) < take:
                    out.append(requeued.popleft())
        room = min(max_records - len(out), _MAX_CONSUME)
        if room <= 0:
            return out
        try:
            # consume(n, t) waits until n records came or t passed: take what is there,
            # else wait for one record only, then take whatever came with it.
            consume = self._consumer.consume
            messages: list[Any] = consume(room, 0.0)
            if not messages and not out and timeout > 0:
                messages = consume(1, timeout)
                if messages and room > 1:
                    messages += consume(room - 1, 0.0)
        except KafkaException as exc:
            raise map_error(exc) from exc
        except RuntimeError as exc:  # the consumer was closed by another thread
            raise ClosedError(f"subscription to {self._topic!r} is closed") from exc
        if out:  # a rebalance in consume() may have revoked these
            out = [r for r in out if cast(_Partition, r.handle).live]
        if not messages:
            self._check_connection(timeout)
            return out
        self._down_since = None
        topic = self._topic
        states = self._partitions
        append = out.append
        record = InRecord
        last = -1
        state: _Partition | None = None
        track: Callable[[Any], None] = out.append  # placeholder: set with ``state`` below
        skip_before = 0
        with self._lock:
            for m in messages:
                if m.error() is not None:
                    self._on_message_error(m.error())
                    continue
                p = m.partition()
                if p != last:  # records come in runs per partition
                    last, state = p, states.get(p)
                    if state is not None:
                        track = state.pending.append
                        skip_before = state.skip_before_ms
                if state is None:
                    continue  # fetched before its partition was revoked
                ts = m.timestamp()[1]
                if ts < 0:  # TIMESTAMP_NOT_AVAILABLE
                    ts = 0
                if skip_before:
                    if ts < skip_before:
                        continue
                    skip_before = state.skip_before_ms = 0
                headers = m.headers()
                if headers:
                    try:
                        if len(headers) == 2:  # the envelope of bytes: no comprehension needed
                            (k0, v0), (k1, v1) = headers
                            headers = ((k0, v0.decode()), (k1, v1.decode()))
                        else:
                            headers = tuple([(k, v.decode()) for k, v in headers])
                    except (UnicodeDecodeError, AttributeError):  # not UTF-8, or no value
                        headers = _str_headers(headers)
                else:
                    headers = ()
                offset = m.offset()
                track(offset)
                append(record(topic, p, offset, m.value(), m.key(), headers, ts, 1, state))
        return out

    def _on_message_error(self, err: KafkaError) -> None:
        code = err.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            self._failure = err
        elif code in _NOT_FOUND or code in _CONFIG:
            self._error = map_error(KafkaException(err))  # raised by the next fetch
        else:
            log.debug("Kafka consumer of %r: %s", self._topic, err)  # librdkafka retries these

    def commit(self) -> None:
        self._check()
        self._commit(None, asynchronous=False, strict=True)

    def ack(self, records: Sequence[InRecord]) -> None:
        last: _Partition | None = None
        settle: Callable[[Any], None] = _ignore
        with self._lock:
            for r in records:
                state: _Partition = r.handle  # type: ignore[assignment]
                if state is not last:  # records come in runs per partition
                    last = state
                    settle = state.settled.add if state.live else _ignore
                settle(r.offset)

    def nack(self, records: Sequence[InRecord], *, requeue: bool) -> None:
        with self._lock:
            for r in records:
                state = cast(_Partition, r.handle)
                if not state.live:
                    continue
                if requeue:
                    r.attempt += 1
                    self._requeued.append(r)
                else:
                    state.settled.add(cast(int, r.offset))

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp_ms: int | None = None
    ) -> None:
        self._check()
        if (offset is None) == (timestamp_ms is None):
            raise ConfigurationError("seek needs exactly one of offset= or timestamp_ms=")
        if offset is not None and (isinstance(offset, str) or offset < 0):
            raise ConfigurationError(f"Kafka offsets are integers >= 0, got {offset!r}")
        with self._lock:
            old = self._partitions.get(partition)
        if old is None:
            raise ConfigurationError(
                f"partition {partition} of {self._topic!r} is not assigned to this member "
                f"(assigned: {sorted(self._partitions)}); seek after it is assigned"
            )
        target = TopicPartition(self._topic, partition, OFFSET_END)
        try:
            if offset is None:
                found = self._consumer.offsets_for_times(
                    [TopicPartition(self._topic, partition, cast(int, timestamp_ms))],
                    timeout=self._reconnect_timeout,
                )[0]
                if found.error is not None:
                    raise KafkaException(found.error)
                if found.offset >= 0:
                    target.offset = found.offset
            else:
                target.offset = offset
            self._consumer.seek(target)
        except KafkaException as exc:
            raise map_error(exc) from exc
        known = target.offset if target.offset >= 0 else None
        with self._lock:
            old.live = False
            self._partitions[partition] = _Partition(partition, next=known, committed=old.committed)
            self._requeued = deque(r for r in self._requeued if cast(_Partition, r.handle).live)

    def lag(self) -> dict[int, int]:
        """Records not yet committed by the group, per partition of the topic (for a
        group-less reader: not yet read, per partition)."""
        self._check()
        consumer, topic, timeout = self._consumer, self._topic, self._reconnect_timeout
        try:
            if self._group is None:
                positions = {}
                with self._lock:
                    for p, state in self._partitions.items():
                        state.commit_point()  # brings ``next`` up to date
                        positions[p] = state.next
                lags = {}
                for p, position in positions.items():
                    low, high = self._watermarks(TopicPartition(topic, p))
                    lags[p] = max(0, high - (low if position is None else position))
                return lags
            metadata = consumer.list_topics(topic, timeout=timeout).topics[topic]
            tps = [TopicPartition(topic, p) for p in sorted(metadata.partitions)]
            lags = {}
            for tp in consumer.committed(tps, timeout=timeout):
                low, high = self._watermarks(tp)
                lags[tp.partition] = max(0, high - (tp.offset if tp.offset >= 0 else low))
            return lags
        except KafkaException as exc:
            raise map_error(exc) from exc

    def _finish_join(self) -> None:
        """Wait (at most a session timeout) for a join in flight to complete.

        Leaving mid-join would queue the LeaveGroup behind the blocked
        JoinGroup; brokers then keep a member that never syncs, and some
        (Tansu) stall the whole group on it. Records fetched meanwhile are not
        delivered, so they stay uncommitted.
        """
        deadline = time.monotonic() + self._session_timeout
        while self._group is not None and not self._joined and time.monotonic() < deadline:
            self._consumer.poll(0.1)  # a record fetched meanwhile is not delivered

    def close(self) -> None:
        """Commit what was acked and leave the group; idempotent.

        Blocks while a rebalance completes, at most about a session timeout
        plus the reconnect timeout: with no broker reachable, librdkafka would
        wait for it indefinitely, so the consumer then finishes closing in
        the background and its unacked records go to the next owner.
        """
        if self._closed:
            return
        self._closed = True
        try:
            reachable = self._reachable()
            if reachable:
                self._finish_join()
            closer = threading.Thread(
                target=self._shutdown, args=(reachable,), name="polybus-kafka-close", daemon=True
            )
            closer.start()
            closer.join(self._session_timeout + self._reconnect_timeout)
            if closer.is_alive():
                log.warning(
                    "the Kafka consumer of %r did not close within %.0f s (no broker answers); "
                    "it finishes in the background",
                    self._topic,
                    self._session_timeout + self._reconnect_timeout,
                )
        finally:
            with self._lock:
                for state in self._partitions.values():
                    state.live = False
                self._partitions = {}
                self._requeued.clear()
            self._drop_transactional()  # not under the commit lock: a stuck commit may hold it
            self._backend._forget(self)

    def _reachable(self) -> bool:
        """Whether a broker answers (asked only after librdkafka reported all down)."""
        if self._down_since is None:
            return True
        try:
            self._consumer.list_topics(self._topic, timeout=1.0)
        except KafkaException:
            return False
        self._down_since = None
        return True

    def _shutdown(self, reachable: bool) -> None:
        try:
            if reachable:  # a synchronous commit would wait for a broker indefinitely
                self._commit(None, asynchronous=False)
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.info("closing the Kafka consumer of %r: %s", self._topic, exc)


class KafkaTransaction:
    """A :class:`~polybus.adapters.base.Transaction` of one Kafka subscription.

    Records and acks are staged here; :meth:`commit` runs the Kafka
    transaction from begin to end (see the module docstring), so an abort
    never reaches the broker. Used from one thread.
    """

    def __init__(self, subscription: KafkaSubscription) -> None:
        self._sub = subscription
        self._outputs: list[tuple[str, Sequence[OutRecord]]] = []
        self._acks: list[InRecord] = []
        self._spent = False

    def _check(self) -> None:
        if self._spent:
            raise ClosedError("this transaction was committed or aborted; begin a new one")

    def publish(self, topic: str, records: Sequence[OutRecord]) -> None:
        self._check()
        if any(r.not_before_ms for r in records):
            raise CapabilityError("Kafka cannot delay delivery (no DELAY capability)")
        self._outputs.append((topic, records))

    def ack(self, records: Sequence[InRecord]) -> None:
        self._check()
        for r in records:
            if not isinstance(r.handle, _Partition) or r.topic != self._sub._topic:
                raise ConfigurationError(
                    "a transaction can ack only records its own subscription fetched"
                )
        self._acks.extend(records)

    def commit(self) -> None:
        self._check()
        self._spent = True
        self._sub._commit_transaction(self._outputs, self._acks)

    def abort(self) -> None:
        if not self._spent:
            self._spent = True
            self._sub._give_back(self._acks)
