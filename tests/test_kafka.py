"""Kafka adapter specifics: interop with plain confluent-kafka clients, construction from a
client or URL options, rebalance safety, reconnects, transactions and error mapping.

Runs against the broker ``polybus.testing.servers`` finds or starts: Apache Kafka where
Java is, Tansu elsewhere.
Run as a script, this module is the child process of the transaction crash test.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

confluent_kafka = pytest.importorskip("confluent_kafka")

from confluent_kafka import KafkaError, KafkaException, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType  # noqa: E402

import polybus  # noqa: E402
from polybus import (  # noqa: E402
    ConfigurationError,
    ConnectionLost,
    Delivery,
    FencedError,
    Message,
    MessageTooLarge,
)
from polybus.adapters.kafka import (  # noqa: E402
    KafkaBackend,
    KafkaSubscription,
    from_client,
    from_url,
    map_error,
)
from polybus.cloudevents import CloudEvents, attributes  # noqa: E402
from polybus.testing import servers  # noqa: E402
from polybus.testing.conformance import drain, publish_retrying  # noqa: E402
from polybus.testing.plugin import proxied_kafka, require_server  # noqa: E402
from polybus.testing.proxy import TcpProxy  # noqa: E402

DEADLINE = 20.0
SESSION = 2.0  # short group sessions: Tansu completes a join in about half a session
#: why transaction tests that need a broker-side abort cannot pass against Tansu
TANSU_ABORTS = (
    "Tansu shows the records of aborted transactions to read_committed consumers "
    "(SERVICES.md) and never aborts a dead producer's open transaction, so its readers wait "
    "for ever"
)


@pytest.fixture(scope="module")
def bootstrap() -> str:
    require_server("kafka", servers.kafka_unavailable())
    return servers.kafka_bootstrap()


@pytest.fixture
def connect(bootstrap: str) -> Iterator[Callable[..., polybus.Bus]]:
    buses: list[polybus.Bus] = []

    def factory(query: str = "") -> polybus.Bus:
        bus = polybus.connect(f"kafka://{bootstrap}{query}")
        buses.append(bus)
        return bus

    yield factory
    for bus in reversed(buses):
        bus.close()


@pytest.fixture
def topic() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def needs_broker_aborts(bootstrap: str, request: pytest.FixtureRequest) -> None:
    """Expect the test to fail on Tansu, strictly: if Tansu ever aborts, it must be noticed."""
    if servers.kafka_is_tansu():
        request.applymarker(pytest.mark.xfail(reason=TANSU_ABORTS, strict=True))


def read_plain(
    bootstrap: str,
    topic: str,
    partitions: int,
    count: int,
    *,
    until: Callable[[list[Any]], bool] | None = None,
    deadline: float = DEADLINE,
) -> list[Any]:
    """Read ``count`` records (or until ``until(records)``) from the start of every
    partition with a plain Consumer, ``read_committed`` as librdkafka's default is."""
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"plain-{uuid.uuid4().hex}"}
    )
    done = until or (lambda records: len(records) >= count)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        out: list[Any] = []
        end = time.monotonic() + deadline
        while not done(out) and time.monotonic() < end:
            out.extend(m for m in consumer.consume(max(count, 100), 0.2) if m.error() is None)
        return out
    finally:
        consumer.close()


def read_whole_log(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every record in ``topic``, each partition read up to the high watermark it had
    when called; fails naming the partitions a slow broker left unread."""
    consumer = confluent_kafka.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"plain-{uuid.uuid4().hex}"}
    )
    try:
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), DEADLINE)[1]
            for p in range(partitions)
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        read = dict.fromkeys(ends, 0)
        out: list[Any] = []
        end = time.monotonic() + DEADLINE
        while any(read[p] < ends[p] for p in ends):
            assert time.monotonic() < end, f"read {read} of the high watermarks {ends}"
            for m in consumer.consume(1000, 0.2):
                if m.error() is None and m.offset() < ends[m.partition()]:
                    out.append(m)
                    read[m.partition()] = m.offset() + 1
        return out
    finally:
        consumer.close()


def committed_offset(bootstrap: str, group: str, topic: str) -> int:
    """Partition 0's committed offset for ``group``, as a plain client reads it (waiting
    for any open transaction's offsets to be settled, on brokers that track them)."""
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, 0)], timeout=2 * DEADLINE)
        return int(tp.offset)
    finally:
        consumer.close()


# -- interoperability with plain clients -------------------------------------------------


def test_plain_consumer_reads_body_key_and_headers(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    bus = connect()
    bus.declare(topic, partitions=1)
    sent = Message({"n": 1}, key="customer-7", headers={"source": "shop", "ü": "é"})
    receipt = bus.publish(topic, sent)
    (record,) = read_plain(bootstrap, topic, 1, 1)
    assert record.offset() == receipt.offset
    assert record.key() == b"customer-7"
    assert record.value() == b'{"n":1}'
    headers = {k: v.decode() for k, v in record.headers()}
    assert headers["polybus-id"] == sent.id
    assert headers["content-type"] == "application/json"
    assert headers["source"] == "shop"
    assert headers["ü"] == "é"
    assert record.timestamp()[1] == int(sent.timestamp * 1000)


def test_the_cloudevents_sdk_reads_through_a_plain_consumer_what_polybus_publishes(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    ce_kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
    bus = connect()
    bus.use(CloudEvents(source="/billing", type="com.acme.invoice.created"))
    bus.declare(topic, partitions=1)
    sent = Message({"invoice": 42}, key="invoice-42")
    bus.publish(topic, sent)
    (record,) = read_plain(bootstrap, topic, 1, 1)
    event = ce_kafka.from_binary_event(
        ce_kafka.KafkaMessage(dict(record.headers()), record.key(), record.value())
    )
    assert (event.get_id(), event.get_source()) == (sent.id, "/billing")
    assert (event.get_type(), event.get_subject()) == ("com.acme.invoice.created", "invoice-42")
    assert event.get_extension("partitionkey") == "invoice-42"  # the key, by the binding
    assert event.get_data() == {"invoice": 42}


def test_polybus_reads_a_cloudevent_a_plain_producer_publishes(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    ce_kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
    from cloudevents.core.v1.event import CloudEvent

    bus = connect()
    bus.declare(topic, partitions=1)
    sent = datetime.datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=datetime.UTC)
    event = CloudEvent(
        {
            "type": "order.placed",
            "source": "/shop",
            "time": sent,
            "datacontenttype": "application/json",
            "partitionkey": "o-7",
        },
        {"o": 7},
    )
    message = ce_kafka.to_binary_event(event)
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, message.value, key=message.key, headers=list(message.headers.items()))
    assert producer.flush(DEADLINE) == 0
    with bus.subscribe(topic, start="earliest") as sub:
        (d,) = drain(sub, 1)
    assert (d.message.id, d.message.key) == (event.get_id(), "o-7")
    assert d.message.timestamp == sent.timestamp()
    assert (d.value, attributes(d)["type"]) == ({"o": 7}, "order.placed")


@pytest.mark.parametrize("partitions", [1, 3])
def test_a_batch_of_bytes_goes_out_as_records_would(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str, partitions: int
) -> None:
    # publish_many hands plain bytes over as columns (no OutRecord each): the records
    # stored and the receipts must be what the records would have given
    bus = connect()
    bus.declare(topic, partitions=partitions)
    values = [f"v{i}".encode() for i in range(2500)]
    receipts = bus.publish_many(topic, values)
    records = read_plain(bootstrap, topic, partitions, len(values))
    stored = {(r.partition(), r.offset()): r for r in records}
    assert len(stored) == len(values)
    ids = set()
    for value, receipt in zip(values, receipts, strict=True):
        record = stored[(receipt.partition, receipt.offset)]
        assert (record.value(), record.key()) == (value, None)
        (id_name, message_id), (stamp_name, stamp) = record.headers()
        assert (id_name, stamp_name) == ("polybus-id", "polybus-timestamp")
        assert int(stamp) == record.timestamp()[1]
        ids.add(message_id)
    assert len(ids) == len(values)
    assert len({r.partition for r in receipts}) == partitions


def test_plain_producer_messages_arrive_with_defaults(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    bus = connect()
    bus.declare(topic, partitions=1)
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    stamp = int(time.time() * 1000) - 5000
    producer.produce(topic, b"bare", key=b"k1", timestamp=stamp)
    producer.produce(
        topic, b"with headers", headers=[("trace", b"abc"), ("raw", b"\xff\x00"), ("nil", None)]
    )
    producer.produce(topic, None, key=b"tombstone")
    assert producer.flush(DEADLINE) == 0
    with bus.subscribe(topic, start="earliest") as sub:
        got = drain(sub, 3)
    assert (got[0].timestamp_ms, got[0].headers, got[0].header("x")) == (stamp, (), None)
    bare, with_headers, tombstone = (d.message for d in got)
    assert (bare.value, bare.key, bare.headers) == (b"bare", "k1", {})
    assert bare.timestamp == stamp / 1000
    assert bare.id == f"{topic}/0/{got[0].offset}"
    assert abs(bare.timestamp - time.time()) < 60
    assert with_headers.headers["trace"] == "abc"
    assert with_headers.headers["nil"] == ""
    raw = with_headers.headers["raw"]
    assert raw.encode("utf-8", "surrogateescape") == b"\xff\x00"
    assert (tombstone.value, tombstone.key) == (None, "tombstone")  # a null value
    # what came in undecodable goes back out byte for byte
    bus.publish(topic, Message(b"again", headers={"raw": raw}))
    records = read_plain(bootstrap, topic, 1, 4)
    assert dict(records[3].headers())["raw"] == b"\xff\x00"


def test_a_header_read_alone_matches_the_decoded_headers(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    # Fetched headers are decoded only when all are asked for: a lookup before and
    # after that must answer the same, for the values decoding has to take care of.
    bus = connect()
    bus.declare(topic, partitions=1)
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    headers = [("a", b"1"), ("raw", b"\xff\x00"), ("nil", None), ("é", "ü".encode()), ("a", b"2")]
    producer.produce(topic, b"v", headers=headers)
    assert producer.flush(DEADLINE) == 0
    with bus.subscribe(topic, start="earliest") as sub:
        (d,) = drain(sub, 1)
    names = ["a", "raw", "nil", "é", "absent", "content-type"]
    alone = [d.header(name) for name in names]
    assert alone == ["2", "\udcff\x00", "", "ü", None, None]
    assert d.record.headers == (
        ("a", "1"),
        ("raw", "\udcff\x00"),
        ("nil", ""),
        ("é", "ü"),
        ("a", "2"),
    )
    assert [d.header(name) for name in names] == alone


def test_a_consumer_ahead_of_its_fetch_queue_does_not_stall(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    # Once queued.min.messages are fetched ahead, librdkafka waits fetch.queue.backoff.ms
    # (1 s by default) before fetching more, however soon the queue drains. Small
    # thresholds make every fetch cross it: 40 batches of 10 records, a fetch taking
    # one or two, would take 20 s or more with the default (10 ms here: under 1 s).
    bus = connect("?queued.min.messages=5&max.partition.fetch.bytes=2048")
    bus.declare(topic, partitions=1)
    for _ in range(40):
        bus.publish_many(topic, [b"x" * 100] * 10)  # a batch each: each publish flushes
    with bus.subscribe(topic, start="earliest") as sub:
        assert len(drain(sub, 1)) == 1  # the group joined: that wait is not the point
        started = time.monotonic()
        assert len(drain(sub, 399, deadline=10)) == 399
        assert time.monotonic() - started < 5.0


# -- construction ---------------------------------------------------------------------


def test_an_existing_producer_is_wrapped(bootstrap: str, topic: str) -> None:
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 1})
    with polybus.connect(from_client(producer)) as bus:
        assert isinstance(bus.backend, KafkaBackend)
        receipts = bus.publish_many(topic, ["a", "b", "c"])
        assert [r.topic for r in receipts] == [topic] * 3
        with bus.subscribe(topic, start="earliest") as sub:
            assert sorted(d.message.value for d in drain(sub, 3)) == ["a", "b", "c"]
    producer.produce(topic, b"still mine")  # the bus did not close the application's producer
    assert producer.flush(DEADLINE) == 0


def test_connect_accepts_a_producer(bootstrap: str) -> None:
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap})
    with polybus.connect(producer) as bus:
        assert isinstance(bus.backend, KafkaBackend)


def test_url_options_pass_through_to_librdkafka(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect("?message.max.bytes=2000&client.id=billing&reconnect_timeout=5")
    backend = bus.backend
    assert isinstance(backend, KafkaBackend)
    assert backend.config["client.id"] == "billing"
    assert backend.reconnect_timeout == 5
    bus.publish(topic, b"x" * 1000)
    with pytest.raises(MessageTooLarge, match="MSG_SIZE_TOO_LARGE"):
        bus.publish(topic, b"x" * 5000)  # refused by the client's own limit


def test_bad_configuration_is_named(bootstrap: str) -> None:
    with pytest.raises(ConfigurationError, match="reconnect_timeout, replication_factor"):
        from_url(f"kafka://{bootstrap}?linger=5")
    with pytest.raises(ConfigurationError, match=r"no\.such\.property"):
        from_url(f"kafka://{bootstrap}?no.such.property=1")
    with pytest.raises(ConfigurationError, match=r"group\.id"):
        KafkaBackend({"bootstrap.servers": bootstrap, "group.id": "mine"})
    with pytest.raises(ConfigurationError, match=r"bootstrap\.servers"):
        KafkaBackend({})


def test_declared_group_keeps_messages_from_before_it_subscribes(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.publish(topic, "before the group")
    bus.declare(topic, groups=["audit"])  # positioned at the start, as natively
    bus.publish(topic, "after declare")
    with bus.subscribe(topic, "audit", start="latest", session_timeout=SESSION) as sub:
        got = sorted(d.message.value for d in drain(sub, 2))
        assert got == ["after declare", "before the group"]
        assert sub.fetch(10, timeout=0.3) == []
    bus.declare(topic, groups=["audit"])  # a group with commits keeps its position
    bus.publish(topic, "third")
    with bus.subscribe(topic, "audit", session_timeout=SESSION) as sub:
        assert [d.message.value for d in drain(sub, 1)] == ["third"]


def test_topic_settings_are_created_and_compared(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    bus = connect()
    bus.declare(topic, partitions=3, retention=3600, compact=True)
    bus.declare(topic, partitions=3, retention=3600, compact=True)
    resource = ConfigResource(ResourceType.TOPIC, topic)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = admin.describe_configs([resource])[resource].result(DEADLINE)
    assert "compact" in config["cleanup.policy"].value
    assert config["retention.ms"].value == "3600000"
    with pytest.raises(ConfigurationError, match=r"retention\.ms=3600000 \(declared 60000\)"):
        connect().declare(topic, retention=60)


# -- publishing -------------------------------------------------------------------------


def test_publish_returns_once_stored_without_waiting_out_linger(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    # A publish waits for its own record's acknowledgement only: the adapter sends what
    # is queued at once instead of letting librdkafka hold it for linger.ms.
    bus = connect("?linger.ms=2000")
    bus.declare(topic, partitions=1)
    bus.publish(topic, b"connect")
    started = time.monotonic()
    receipts = [bus.publish(topic, b"one") for _ in range(3)]
    assert time.monotonic() - started < 1.5  # each would take 2 s if it waited
    assert [r.offset for r in receipts] == [1, 2, 3]


@pytest.mark.parametrize(
    "query",
    ["", "?partitioner=consistent_random"],  # polybus picks partitions / librdkafka does
    ids=["own-partitioning", "librdkafka-partitioning"],
)
def test_concurrent_publishers_get_their_own_receipts(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str, query: str
) -> None:
    bus = connect(query)
    bus.declare(topic, partitions=3)
    receipts: dict[str, tuple[int, int | str]] = {}
    errors: list[BaseException] = []

    def publisher(n: int) -> None:
        try:
            for b in range(20):
                size = 2500 if (n, b) == (0, 0) else 1 + b % 7  # one batch spans keyless runs
                keyed = b % 2 == 0
                batch = [
                    Message(f"{n}-{b}-{i}", key=f"k{i}" if keyed and i % 3 else None)
                    for i in range(size)
                ]
                for m, r in zip(batch, bus.publish_many(topic, batch), strict=True):
                    receipts[m.id] = (r.partition, r.offset)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    log = read_whole_log(bootstrap, topic, 3)
    stored = {dict(m.headers())["polybus-id"].decode(): (m.partition(), m.offset()) for m in log}
    assert len(log) == len(stored), "a record was stored twice"
    at = {(m.partition(), m.offset()): dict(m.headers())["polybus-id"].decode() for m in log}
    unread = {i: (r, at.get(r)) for i, r in receipts.items() if i not in stored}
    assert not unread, (
        f"receipts (partition, offset) of records not read back, and what is there: {unread}"
    )
    assert stored.keys() == receipts.keys(), "the log holds records nobody was given receipts for"
    assert stored == receipts


@pytest.fixture
def outage(bootstrap: str) -> Iterator[tuple[str, TcpProxy]]:
    """The suite's broker reached only through a proxy: (bootstrap, proxy)."""
    with proxied_kafka() as (url, proxy):
        yield url.removeprefix("kafka://"), proxy


def test_publish_and_fetch_survive_a_broker_outage(outage: tuple[str, TcpProxy]) -> None:
    address, proxy = outage
    with polybus.connect(f"kafka://{address}?reconnect_timeout=1") as bus:
        topic = f"k-{uuid.uuid4().hex[:12]}"
        bus.declare(topic, partitions=1)
        sub = bus.subscribe(topic)
        bus.publish(topic, "before")
        assert [d.message.value for d in drain(sub, 1)] == ["before"]
        proxy.block()
        with pytest.raises(ConnectionLost):
            bus.publish(topic, "while down")
        end = time.monotonic() + DEADLINE
        with pytest.raises(ConnectionLost, match="reconnect_timeout=1"):  # noqa: PT012
            while time.monotonic() < end:
                assert sub.fetch(10, timeout=0.2) == []
        proxy.unblock()
        publish_retrying(bus, topic, ["after"])
        end = time.monotonic() + DEADLINE
        got: list[str] = []
        while "after" not in got and time.monotonic() < end:
            try:
                got.extend(d.message.value for d in sub.fetch(10, timeout=0.2))
            except ConnectionLost:
                continue  # raised until the consumer notices the broker is back
        assert got in (["after"], ["while down", "after"])


def test_close_returns_while_the_broker_is_down(outage: tuple[str, TcpProxy]) -> None:
    address, proxy = outage
    bus = polybus.connect(f"kafka://{address}?reconnect_timeout=1")
    topic = f"k-{uuid.uuid4().hex[:12]}"
    bus.declare(topic, partitions=1, groups=["g"])
    bus.publish_many(topic, list(range(5)))
    sub = bus.subscribe(topic, "g", session_timeout=SESSION)
    assert len(drain(sub, 5)) == 5
    proxy.block()  # the final commit cannot reach the broker: librdkafka would wait forever
    started = time.monotonic()
    bus.close()
    assert time.monotonic() - started < SESSION + 1 + 3  # session + reconnect timeout + slack


def test_keys_land_where_the_java_partitioner_puts_them(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    bus = connect()
    bus.declare(topic, partitions=5)
    keys = [f"user-{i}" for i in range(50)]
    receipts = bus.publish_many(topic, [Message(i, key=k) for i, k in enumerate(keys)])
    producer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"}
    )
    plain: dict[str, int] = {}
    for k in keys:
        producer.produce(
            topic, b"", k, on_delivery=lambda _e, m, k=k: plain.update({k: m.partition()})
        )
    assert producer.flush(DEADLINE) == 0
    assert {k: r.partition for k, r in zip(keys, receipts, strict=True)} == plain


# -- groups -----------------------------------------------------------------------------


def test_rebalance_hands_unacked_records_to_the_new_member(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    # Kafka group ids are global: a name of its own keeps other tests' members out
    group = f"workers-{topic}"
    bus = connect()
    bus.declare(topic, partitions=2, groups=[group])
    bus.publish_many(topic, [Message(i, key=f"k{i}") for i in range(40)])
    a = bus.subscribe(topic, group, session_timeout=SESSION)
    held = drain(a, 40, ack=False)
    assert len(held) == 40
    by_partition: dict[int, list[Delivery]] = {0: [], 1: []}
    for d in held:
        by_partition[d.partition].append(d)
    for deliveries in by_partition.values():
        for d in deliveries[:3]:
            d.ack()  # acked before the rebalance: must never be delivered again

    b = connect().subscribe(topic, group, session_timeout=SESSION)
    to_b: list[Delivery] = []
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        a.fetch(100, timeout=0.05)  # A keeps polling so it takes part in the rebalance
        to_b.extend(b.fetch(100, timeout=0.05))
        if to_b and len(to_b) >= len(by_partition[to_b[0].partition]) - 3:
            break
    moved = {d.partition for d in to_b}
    assert len(moved) == 1, f"B should own one partition, got records from {moved}"
    (p,) = moved
    assert [d.message.value for d in to_b] == [d.message.value for d in by_partition[p][3:]]
    assert all(d.attempt == 1 for d in to_b)

    for d in by_partition[p][3:]:
        d.ack()  # too late: the partition is B's now
    a.close()  # commits every acked prefix A still owns
    plain = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (committed,) = plain.committed([TopicPartition(topic, p)], timeout=DEADLINE)
    finally:
        plain.close()
    assert committed.offset == by_partition[p][3].offset, "A's late acks were committed"
    b.close()


# -- transactions -----------------------------------------------------------------------


class Interposed:
    """Stands in for a transactional producer, running a hook before one of its calls."""

    def __init__(self, producer: Any, **hooks: Callable[[], None]) -> None:
        self._producer = producer
        self._hooks = hooks

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._producer, name)
        hook = self._hooks.get(name)
        if hook is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            hook()
            return attr(*args, **kwargs)

        return call


def test_transactions_need_a_group_and_choose_their_own_id(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    with pytest.raises(ConfigurationError, match=r"transactional\.id"):
        from_url(f"kafka://{bootstrap}?transactional.id=mine")
    bus = connect()
    bus.declare(topic)
    with bus.subscribe(topic) as sub, pytest.raises(ConfigurationError, match="with a group"):
        bus.transaction(sub)


def test_a_transaction_commits_the_settled_prefix_when_it_commits(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    group = f"g-{topic}"  # Kafka group ids are global
    bus = connect()
    bus.declare(topic, partitions=1, groups=[group])
    bus.publish_many(topic, ["a", "b", "c"])
    sub = bus.subscribe(topic, group, session_timeout=SESSION)
    a, b, c = drain(sub, 3, ack=False)
    tx = bus.transaction(sub)
    tx.ack(a)
    sub.commit()
    assert committed_offset(bootstrap, group, topic) == 0, "a staged ack was committed"
    tx.commit()
    assert committed_offset(bootstrap, group, topic) == 1
    with bus.transaction(sub) as tx:
        tx.ack(c)  # above b, which is not settled: the prefix stays
    assert committed_offset(bootstrap, group, topic) == 1
    b.ack()
    sub.commit()
    assert committed_offset(bootstrap, group, topic) == 3
    assert sub.fetch(10, timeout=0.3) == [], "a committed record was delivered again"
    sub.close()


def kill_in_commit(bootstrap: str, topic: str, group: str, report: str) -> None:
    """The crash test's child: consume five inputs, stage an output and the ack of each,
    and SIGKILL itself in ``commit()`` once the outputs and the offsets are with the
    broker, just before ``commit_transaction``."""
    bus = polybus.connect(f"kafka://{bootstrap}?reconnect_timeout=2")
    sub = bus.subscribe(topic, group, session_timeout=SESSION)
    inputs = drain(sub, 5, ack=False)
    assert len(inputs) == 5, f"the child got {len(inputs)} inputs"
    kafka_sub = sub._sub
    assert isinstance(kafka_sub, KafkaSubscription)
    with bus.transaction(sub) as tx:
        for d in inputs:
            tx.publish(f"{topic}-out", f"out of {d.message.value}")
            tx.ack(d)
        producer = kafka_sub._transactional

        def die() -> None:
            producer.flush()
            Path(report).write_text("in commit\n")
            os.kill(os.getpid(), signal.SIGKILL)

        kafka_sub._transactional = Interposed(producer, commit_transaction=die)


@pytest.mark.usefixtures("needs_broker_aborts")
def test_a_member_killed_in_commit_leaves_no_outputs_and_no_offsets(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str, tmp_path: Path
) -> None:
    group, out = f"g-{topic}", f"{topic}-out"
    bus = connect()
    bus.declare(topic, partitions=1, groups=[group])
    bus.declare(out, partitions=1)
    inputs = [f"in-{i}" for i in range(5)]
    bus.publish_many(topic, inputs)
    report = tmp_path / "report"
    child = subprocess.run(
        [sys.executable, __file__, bootstrap, topic, group, str(report)],
        capture_output=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    assert report.read_text() == "in commit\n"
    assert read_plain(bootstrap, out, 1, 1, deadline=0.5) == [], "an output is visible"
    assert committed_offset(bootstrap, group, topic) == 0, "the inputs' offsets were committed"
    with bus.subscribe(topic, group, session_timeout=SESSION) as again:
        assert sorted(d.message.value for d in drain(again, 5, deadline=2 * DEADLINE)) == inputs
    # Readers get past the dead transaction once the broker aborted it, and skip its outputs.
    bus.publish(out, "after the crash")
    records = read_plain(
        bootstrap,
        out,
        1,
        1,
        until=lambda got: any(m.value() == b"after the crash" for m in got),
        deadline=2 * DEADLINE,
    )
    assert [m.value() for m in records] == [b"after the crash"]


@pytest.mark.usefixtures("needs_broker_aborts")
def test_a_producer_fenced_in_commit_publishes_nothing_and_redelivers(
    connect: Callable[..., polybus.Bus], bootstrap: str, topic: str
) -> None:
    group, out = f"g-{topic}", f"{topic}-out"
    bus = connect("?reconnect_timeout=2")
    bus.declare(topic, partitions=1, groups=[group])
    bus.declare(out, partitions=1)
    bus.publish_many(topic, ["a", "b", "c"])
    sub = bus.subscribe(topic, group, session_timeout=SESSION)
    first = drain(sub, 3, ack=False)
    tx = bus.transaction(sub)
    for d in first:
        tx.publish(out, f"fenced {d.message.value}")
        tx.ack(d)
    kafka_sub = sub._sub
    assert isinstance(kafka_sub, KafkaSubscription)
    producer = kafka_sub._transactional
    newer = confluent_kafka.Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": kafka_sub._transactional_id}
    )

    def fence() -> None:
        producer.flush()  # the outputs are in the log, in the open transaction
        newer.init_transactions(DEADLINE)  # aborts it and fences its producer

    kafka_sub._transactional = Interposed(producer, send_offsets_to_transaction=fence)
    with pytest.raises(FencedError):
        tx.commit()
    again = drain(sub, 3, ack=False)
    assert [(d.message.value, d.attempt) for d in again] == [("a", 2), ("b", 2), ("c", 2)]
    with bus.transaction(sub) as tx:  # on a new producer, which fences the newer one
        for d in again:
            tx.publish(out, d.message.value.upper())
            tx.ack(d)
    assert committed_offset(bootstrap, group, topic) == 3
    sub.close()
    outputs = [m.value() for m in read_plain(bootstrap, out, 1, 3)]
    # read_committed: the aborted outputs, stored before these, are skipped
    assert outputs == [b"A", b"B", b"C"]
    assert len(read_plain(bootstrap, out, 1, 4, deadline=1.0)) == 3


# -- error mapping ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (KafkaError._TRANSPORT, polybus.ConnectionLost),
        (KafkaError.REQUEST_TIMED_OUT, polybus.ConnectionLost),
        (KafkaError.MSG_SIZE_TOO_LARGE, polybus.MessageTooLarge),
        (KafkaError.UNKNOWN_TOPIC_OR_PART, polybus.TopicNotFound),
        (KafkaError.ILLEGAL_GENERATION, polybus.FencedError),
        (KafkaError.PRODUCER_FENCED, polybus.FencedError),
        (KafkaError._INVALID_ARG, polybus.ConfigurationError),
        (KafkaError.SASL_AUTHENTICATION_FAILED, polybus.ConfigurationError),
        (KafkaError.UNSUPPORTED_VERSION, polybus.CapabilityError),
        (KafkaError._VALUE_DESERIALIZATION, polybus.DecodeError),
    ],
)
def test_error_codes_map_to_polybus_errors(code: int, error: type[Exception]) -> None:
    mapped = map_error(KafkaException(KafkaError(code, "boom")))
    assert type(mapped) is error
    assert "boom" in str(mapped)


if __name__ == "__main__":
    kill_in_commit(*sys.argv[1:])


def test_each_client_gets_only_the_properties_it_reads(
    bootstrap: str, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="polybus.kafka")
    # linger.ms only a producer reads, fetch.wait.max.ms only a consumer
    with polybus.connect(f"kafka://{bootstrap}?linger.ms=1&fetch.wait.max.ms=10") as bus:
        bus.declare(topic, groups=["g"])
        bus.publish(topic, b"x")
        with bus.subscribe(topic, "g") as sub:
            assert [d.value for d in drain(sub, 1)] == [b"x"]
    warnings = [r.getMessage() for r in caplog.records if "CONFWARN" in r.getMessage()]
    assert warnings == []
