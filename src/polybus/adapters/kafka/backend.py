"""``KafkaBackend``: the :class:`~polybus.adapters.base.Backend` on a Kafka cluster.

Its configuration, topics and group positions (through the admin client),
subscribing, beginning transactions and closing. Publishing is in
:mod:`.producer`, whose ``_Publisher`` this class inherits; a subscription's
transactions are in :mod:`.transactions`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from typing import Any

from confluent_kafka import (
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

from ...errors import ClosedError, ConfigurationError, PolybusError, TopicNotFound
from .._support.options import parse_flag
from ..base import BusStats, Capability, Start, Subscription, TopicSpec
from .errors import _kafka_error, _while_leaders_move, kafka_errors, map_error
from .producer import _DELIVERY_GRACE, _METADATA_TTL, _librdkafka_chooses, _Publisher, murmur2
from .scopes import CONSUMER_ONLY, PRODUCER_ONLY, without
from .stats import read_stats
from .subscription import KafkaSubscription
from .transactions import KafkaTransaction

log = logging.getLogger("polybus.kafka")

#: consumer settings every subscribe() chooses itself; a config that sets them is refused
_OWNED = (
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "session.timeout.ms",
)


def _flag(value: object) -> bool:
    """A librdkafka boolean property, given as a bool or a string."""
    return parse_flag(str(value)) is True


class KafkaBackend(_Publisher):
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

    wire_protocol = "kafka"
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
            **without(self.config, CONSUMER_ONLY),
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

    def _client_config(self, **extra: Any) -> dict[str, Any]:
        """The config of an admin client (it reads no producer or consumer property)."""
        return {**without(self.config, CONSUMER_ONLY, PRODUCER_ONLY), **extra}

    def _admin_client(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                with kafka_errors():
                    self._admin = AdminClient(self._client_config())
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
        self._introduce(topic)

    def _introduce(self, topic: str) -> None:
        """Have the producer look ``topic`` up now, so the first publish to it finds the
        partition leaders known and connected.

        A new producer drops its bootstrap connection once it learns the brokers, and
        librdkafka opens the next one no sooner than reconnect.backoff.ms / 2 (50 ms)
        after the first: without this, a bus's first publish right after connect and
        declare waited out the rest (its first 1000 records here: 10-27 ms instead of
        3.6-8 ms; the raw client's, made 60 ms before, 4-8 ms). Best effort: publish
        looks the topic up itself if this fails.
        """
        try:
            self._producer.list_topics(topic, timeout=min(self.reconnect_timeout, 5.0))
        except (KafkaException, RuntimeError) as exc:
            log.debug("the producer could not look up %r yet: %s", topic, exc)

    def _await_leaders(self, topic: str, partitions: int | None = None) -> int:
        """``topic``'s partition count once every partition has a leader the metadata
        names (``partitions``: the count it was just created with). A broker
        acknowledges CreateTopics before its metadata shows the topic, so a subscriber,
        or another process declaring it, that looks too early finds no topic.
        TopicNotFound if it does not show within the reconnect timeout."""
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            with kafka_errors():
                metadata = self._admin_client().list_topics(topic, timeout=self.reconnect_timeout)
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

    def stats(
        self, topics: Collection[str] | None, groups: Collection[str] | None, *, timeout: float
    ) -> BusStats:
        """Watermarks and committed offsets through the admin client (:mod:`.stats`)."""
        self._check()
        return read_stats(self._admin_client(), topics, groups, timeout)

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
            # Once queued.min.messages (100k) are fetched ahead, librdkafka waits this long
            # before it checks again (default 1 s): a consumer that drains them sooner
            # stalls for the rest. 10 ms: 200k records consumed at 139-178 k -> 314-352 k
            # msg/s here (same CPU a message); the fetcher wakes 100 times a second while
            # it is that far ahead.
            "fetch.queue.backoff.ms": 10,
            **without(self.config, PRODUCER_ONLY),
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
