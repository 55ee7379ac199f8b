"""RabbitMQ-specific behaviour: interop with plain pika, construction, declarations, the
confirm window, replay details. The shared behaviour is in the conformance suite."""

from __future__ import annotations

import base64
import datetime
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

import polybus
from polybus import CapabilityError, ConfigurationError, Delivery, Message
from polybus.adapters import rabbitmq
from polybus.adapters.base import OutRecord
from polybus.adapters.rabbitmq import pika_hooks, publisher, wire
from polybus.cloudevents import CloudEvents, attributes
from polybus.testing import servers
from polybus.testing.conformance import drain
from polybus.testing.plugin import require_server, with_options
from polybus.testing.proxy import TcpProxy

DEADLINE = 20.0
GROUPS = ("g", "h", "billing.v2")  # every group a test here may make; cleanup deletes them


@pytest.fixture(scope="module")
def url() -> str:
    require_server("rabbitmq", servers.rabbitmq_unavailable())
    return servers.rabbitmq_url()


@pytest.fixture
def admin(url: str) -> Iterator[Callable[[], Any]]:
    """A factory of plain pika channels (a broker error closes a channel; take a new one)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    yield conn.channel
    conn.close()


@pytest.fixture
def topic(url: str) -> Iterator[str]:
    """A fresh topic; its exchanges and queues are deleted afterwards (the broker is shared)."""
    name = f"rmqtest-{uuid.uuid4().hex[:10]}"
    yield name
    servers.rabbitmq_delete_topic(name, GROUPS)


@pytest.fixture
def connect(url: str) -> Iterator[Callable[..., polybus.Bus]]:
    buses: list[polybus.Bus] = []

    def factory(**options: object) -> polybus.Bus:
        bus = polybus.connect(with_options(url, **options))
        buses.append(bus)
        return bus

    yield factory
    for bus in reversed(buses):
        bus.close()


def basic_get(admin: Callable[[], Any], queue: str) -> tuple[Any, Any, bytes]:
    ch = admin()
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        method, properties, body = ch.basic_get(queue, auto_ack=True)
        if method is not None:
            return method, properties, body
        time.sleep(0.02)
    raise AssertionError(f"nothing arrived in {queue!r}")


# -- interoperability with plain pika ---------------------------------------------------------


def test_plain_pika_reads_what_polybus_publishes(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    receipt = bus.publish(
        topic, {"order": 7}, key="customer-1", headers={"source": "shop"}, correlation_id="c-1"
    )
    method, properties, body = basic_get(admin, rabbitmq.queue_name(topic, "g"))
    assert json.loads(body) == {"order": 7}
    assert properties.content_type == "application/json"
    assert properties.message_id == receipt.offset
    assert properties.correlation_id == "c-1"
    assert properties.delivery_mode == 2
    assert properties.headers["source"] == "shop"
    assert abs(int(properties.headers["polybus-timestamp"]) / 1000 - time.time()) < 60
    assert method.routing_key == "customer-1"
    assert method.exchange == topic


def test_polybus_reads_what_plain_pika_publishes(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    ch = admin()
    ch.basic_publish(
        topic,
        "order-7",
        b'{"x": 1}',
        pika.BasicProperties(
            content_type="application/json",
            headers={"source": "legacy", "n": 42, "blob": b"\x00\xff", "nested": {"a": 1}},
            timestamp=1_700_000_000,
        ),
    )
    ch.basic_publish(topic, "", b"bare")  # no properties at all
    with bus.subscribe(topic, "g") as sub:
        first, bare = drain(sub, 2)
    assert first.message.value == {"x": 1}
    assert first.message.key == "order-7"
    assert first.message.headers["source"] == "legacy"
    assert first.message.headers["n"] == "42"
    assert first.message.headers["nested"] == "{'a': 1}"
    assert first.message.timestamp == 1_700_000_000
    assert first.attempt == 1
    assert bare.message.value == b"bare"
    assert bare.message.key is None
    assert bare.message.content_type is None
    assert bare.message.id  # a default, never empty
    assert abs(bare.message.timestamp - time.time()) < 60
    assert first.message.id != bare.message.id


def test_the_cloudevents_sdk_reads_through_plain_pika_what_polybus_publishes(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    ce_rabbitmq = pytest.importorskip("cloudevents.core.bindings.rabbitmq")
    bus = connect()
    bus.use(CloudEvents(source="/billing", type="com.acme.invoice.created"))
    bus.declare(topic, groups=["g"])
    sent = Message({"invoice": 42}, key="invoice-42")
    bus.publish(topic, sent)
    _, properties, body = basic_get(admin, rabbitmq.queue_name(topic, "g"))
    assert properties.headers["ce-id"] == sent.id  # in the headers table, as the binding says
    event = ce_rabbitmq.from_binary_event(
        ce_rabbitmq.RabbitMQMessage(properties.headers, properties.content_type, body)
    )
    assert (event.get_id(), event.get_source()) == (sent.id, "/billing")
    assert (event.get_type(), event.get_subject()) == ("com.acme.invoice.created", "invoice-42")
    assert event.get_datacontenttype() == "application/json"  # the content_type property
    assert event.get_data() == {"invoice": 42}


def test_polybus_reads_a_cloudevent_plain_pika_publishes(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    ce_rabbitmq = pytest.importorskip("cloudevents.core.bindings.rabbitmq")
    from cloudevents.core.v1.event import CloudEvent

    bus = connect()
    bus.declare(topic, groups=["g"])
    sent = datetime.datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=datetime.UTC)
    event = CloudEvent(
        {"type": "order.placed", "source": "/shop", "time": sent, "datacontenttype": "text/plain"},
        "order 7",
    )
    amqp = ce_rabbitmq.to_binary_event(event)
    ch = admin()
    ch.basic_publish(
        topic,
        "",
        amqp.body,
        pika.BasicProperties(content_type=amqp.content_type, headers=amqp.headers),
    )
    with bus.subscribe(topic, "g") as sub:
        (d,) = drain(sub, 1)
    assert (d.message.id, d.message.timestamp) == (event.get_id(), sent.timestamp())
    assert (d.value, d.message.content_type) == ("order 7", "text/plain")
    assert attributes(d)["source"] == "/shop"


def test_deliveries_cut_from_the_stream_match_what_pika_decodes(
    connect: Callable[..., polybus.Bus],
    topic: str,
    admin: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g", "h"])  # both groups get every message
    bus.publish_many(
        topic,
        [
            Message({"a": 1}, key="k1", headers={"h": "v"}, correlation_id="c"),
            Message(b"", key=b"\xff"),
            b"m" * 100_000,  # spans many reads: waited for whole
            b"b" * 300_000,  # several body frames, in pieces: left to pika
        ],
    )
    admin().basic_publish(
        topic,
        "plain",
        b"p",
        pika.BasicProperties(
            message_id="plain-1",
            timestamp=1_700_000_000,
            content_encoding="gzip",
            priority=3,
            reply_to="r",
            expiration="60000",
            type="t",
            app_id="a",
            headers={
                "n": 42,
                "t": True,
                "blob": b"\x00\xff",
                "when": datetime.datetime(2024, 1, 2, 3, 4, 5),
                "nested": {"a": [1, "x"]},
                "polybus-key": "a2V5",
            },
        ),
    )
    through_pika = 0
    via_pika = pika_hooks._via_pika

    def counting(sink: Any) -> Callable[..., None]:
        deliver = via_pika(sink)

        def count(*args: Any) -> None:
            nonlocal through_pika
            through_pika += 1
            deliver(*args)

        return count

    monkeypatch.setattr(pika_hooks, "_via_pika", counting)

    def read(group: str) -> list[tuple[Any, ...]]:
        with bus.subscribe(topic, group) as sub:
            records = [d.record for d in drain(sub, 5)]
        return [
            (r.offset, r.payload, r.key, r.headers, r.timestamp_ms, r.delivery_count)
            for r in records
        ]

    cut = read("g")
    assert through_pika == 1  # only the big one in pieces
    monkeypatch.setattr(pika_hooks, "_cut_deliveries", lambda buf, sinks: 0)
    assert read("h") == cut
    assert through_pika == 6
    assert [r[1] for r in cut] == [b'{"a":1}', b"", b"m" * 100_000, b"b" * 300_000, b"p"]
    plain = cut[4]
    assert plain[0] == "plain-1"
    assert plain[2] == b"key"  # the key header wins over the routing key
    assert plain[4] == 1_700_000_000_000
    assert dict(plain[3]) == {
        "polybus-id": "plain-1",
        "n": "42",
        "t": "true",
        "blob": "\x00\udcff",
        "when": "2024-01-02T03:04:05+00:00",
        "nested": "{'a': [1, 'x']}",
    }


def test_deliveries_pika_decodes_keep_the_brokers_integer_headers(
    connect: Callable[..., polybus.Bus], topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every delivery left to pika, a new group is still filled from the history and a
    seek still reads stream offsets: pika decodes x-stream-offset into an int type of its own,
    which must stay an int."""
    monkeypatch.setattr(pika_hooks, "_cut_deliveries", lambda buf, sinks: 0)
    bus = connect()
    bus.declare(topic)
    bus.publish_many(topic, list(range(3)))
    with bus.subscribe(topic, "g", start="earliest") as sub:  # copies the history into g
        assert [d.message.value for d in drain(sub, 3)] == list(range(3))
        sub.seek(0, timestamp=0.0)
        replayed = drain(sub, 3)
    assert [d.message.value for d in replayed] == list(range(3))
    assert all(isinstance(d.offset, int) for d in replayed)  # stream offsets


def test_deliveries_are_cut_only_when_whole() -> None:
    """Split a stream of frames at every byte: each delivery comes out once, whole, in order,
    and every other frame is left to pika."""

    def deliver(channel: int, tag: int, routing_key: str, body: bytes) -> bytes:
        _, content = wire._content(OutRecord(body, headers=(("polybus-id", f"m{tag}"),)))
        method = pika.spec.Basic.Deliver(f"ctag{channel}", tag, tag % 2 == 0, "ex", routing_key)
        head = wire._HEADER_FRAME.pack(2, channel, len(content) + 12, 60, 0, len(body))
        bodies = [
            pika.frame.Body(channel, body[i : i + 100]).marshal() for i in range(0, len(body), 100)
        ]
        return (
            pika.frame.Method(channel, method).marshal()
            + head
            + content
            + b"\xce"
            + b"".join(bodies)
        )

    stream = b"".join(
        [
            deliver(1, 1, "k", b""),
            pika.frame.Heartbeat().marshal(),
            deliver(1, 2, "", b"x" * 10),
            deliver(2, 1, "ünï", b"y" * 250),  # three body frames
            deliver(3, 1, "other", b"z"),  # no sink: pika's
            deliver(1, 3, "", b"w" * 5),
        ]
    )
    got: list[tuple[Any, ...]] = []

    def sink(channel: int) -> Callable[..., None]:
        def take(tag: int, redelivered: bool, key: bytes, data: bytes, p: int, body: bytes) -> None:
            properties = pika.BasicProperties()
            properties.decode(data, p)
            got.append((channel, tag, redelivered, key, properties.message_id, body))

        return take

    sinks = {b"ctag1": sink(1), b"ctag2": sink(2)}
    for cut in range(len(stream) + 1):
        got.clear()
        for_pika = []
        buf = b""
        for chunk in (stream[:cut], stream[cut:]):
            buf += chunk
            while buf:  # as _Connection._on_data_available does
                used = wire._cut_deliveries(buf, sinks)
                if used == wire._WAIT:
                    break
                if not used:
                    used, frame = pika.frame.decode_frame(buf)
                    if frame is None:
                        break
                    for_pika.append(frame.NAME)
                buf = buf[used:]
        assert got == [
            (1, 1, False, b"k", "m1", b""),
            (1, 2, True, b"", "m2", b"x" * 10),
            (2, 1, False, "ünï".encode(), "m1", b"y" * 250),
            (1, 3, False, b"", "m3", b"w" * 5),
        ], cut
        assert for_pika == ["Heartbeat", "METHOD", "Header", "Body"], cut


def test_keys_that_are_not_routing_keys_round_trip(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    keys: list[str | bytes] = [b"\xff\x00binary", "k" * 300, b"", "ünï"]
    bus.publish_many(topic, [Message(i, key=k) for i, k in enumerate(keys)])
    with bus.subscribe(topic, "g") as sub:
        got = {d.message.value: d.message.key for d in drain(sub, len(keys))}
    assert got == dict(enumerate(keys))


# -- construction --------------------------------------------------------------------------


def test_connect_takes_pika_parameters(
    url: str, topic: str, connect: Callable[..., polybus.Bus]
) -> None:
    params = pika.URLParameters(url)
    for target in (
        params,
        pika.ConnectionParameters(
            params.host, params.port, params.virtual_host, params.credentials
        ),
    ):
        bus = polybus.connect(target)
        try:
            assert isinstance(bus.backend, rabbitmq.RabbitMQBackend)
            bus.declare(topic, groups=["g"])
            bus.publish(topic, "hello")
            with bus.subscribe(topic, "g") as sub:
                assert [d.message.value for d in drain(sub, 1)] == ["hello"]
        finally:
            bus.close()
    assert params.connection_attempts == pika.ConnectionParameters.DEFAULT_CONNECTION_ATTEMPTS


def test_a_pika_connection_is_refused_with_a_hint(url: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        with pytest.raises(ConfigurationError, match="ConnectionParameters"):
            polybus.connect(conn)
    finally:
        conn.close()


def test_url_options_are_checked(url: str) -> None:
    with pytest.raises(ConfigurationError, match="reconnect_timeout") as err:
        polybus.connect(with_options(url, colour="blue"))
    assert "colour" in str(err.value)
    assert "heartbeat" in str(err.value)  # pika's own options are known too
    with pytest.raises(ConfigurationError, match="queue_type"):
        polybus.connect(with_options(url, queue_type="lazy"))
    with pytest.raises(ConfigurationError, match="prefetch"):
        polybus.connect(with_options(url, prefetch="many"))


def test_refused_credentials_are_a_configuration_error(url: str) -> None:
    bad = url.replace("guest:guest@", "guest:wrong-password@")
    if bad == url:
        pytest.skip("the broker URL has no guest:guest credentials to spoil")
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match="refused") as err:
        polybus.connect(bad)
    assert "wrong-password" not in str(err.value)
    assert time.monotonic() - started < 10


# -- declarations --------------------------------------------------------------------------


def test_a_queue_declared_with_other_arguments_is_named(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    queue = rabbitmq.queue_name(topic, "g")
    admin().queue_declare(queue, durable=True, arguments={"x-queue-type": "classic"})
    bus = connect()  # quorum by default
    with pytest.raises(ConfigurationError, match="x-queue-type") as err:
        bus.declare(topic, groups=["g"])
    assert "quorum" in str(err.value)
    assert "classic" in str(err.value)
    with pytest.raises(ConfigurationError, match="x-queue-type"):
        bus.subscribe(topic, "g")
    with connect(queue_type="classic").subscribe(topic, "g") as sub:  # declared the same way
        assert sub.fetch(1, timeout=0) == []


def test_an_exchange_of_another_type_is_named(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    admin().exchange_declare(topic, "direct", durable=True)
    with pytest.raises(ConfigurationError, match="type"):
        connect().declare(topic)


def test_partition_count_is_recorded_and_compared(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    bus = connect()
    bus.declare(topic)  # a new topic gets the bus default
    with pytest.raises(ConfigurationError, match=r"partitions=4.*partitions=2"):
        bus.declare(topic, partitions=2)
    bus.declare(topic, partitions=4)
    # a plain client may redeclare the topic exchange as it is
    admin().exchange_declare(topic, "fanout", durable=True)


def test_retention_maps_to_the_history_stream(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic, retention=3600, retention_bytes=10_000_000)
    bus.declare(topic)  # unspecified: as it exists
    bus.declare(topic, retention=3600, retention_bytes=10_000_000)
    with pytest.raises(ConfigurationError, match="x-max-age"):
        bus.declare(topic, retention=7200, retention_bytes=10_000_000)
    with pytest.raises(CapabilityError, match="compact"):
        bus.declare(topic, compact=True)


def test_a_new_group_is_filled_from_the_history_once_while_others_declare_it(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    """Four processes' worth of buses declare the same new group at once, with a publisher
    running: the history arrives once each and in order, nothing published is lost."""
    old = [f"old-{i}" for i in range(2500)]  # more than one copy transaction
    connect().publish_many(topic, old)
    live = [f"live-{i}" for i in range(300)]
    buses = [connect() for _ in range(4)]
    start = threading.Barrier(len(buses) + 1)

    def declare(bus: polybus.Bus) -> None:
        start.wait()
        bus.declare(topic, groups=["g"])

    def publish() -> None:
        start.wait()
        for value in live:
            buses[0].publish(topic, value)

    threads = [threading.Thread(target=declare, args=(b,)) for b in buses]
    threads.append(threading.Thread(target=publish))
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    with connect().subscribe(topic, "g") as sub:
        got = [d.message.value for d in drain(sub, len(old) + len(live))]
        got += [d.message.value for d in sub.fetch(1000, timeout=0.3)]  # duplicates, if any
    assert [v for v in got if v.startswith("old")] == old
    assert set(live) <= set(got)


def test_a_fill_cut_short_is_done_again(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    """A process that died while filling a new group's queue left its flag; the next
    declaration fills the queue again (at-least-once), and clears the flag."""
    bus = connect()
    bus.publish_many(topic, list(range(10)))
    queue = rabbitmq.queue_name(topic, "g")
    flag = rabbitmq.filling_flag_name(queue)
    channel = admin()
    channel.exchange_declare(flag, "fanout", durable=True)
    channel.queue_declare(queue, durable=True, arguments=rabbitmq.queue_arguments())
    bus.declare(topic, groups=["g"])
    with bus.subscribe(topic, "g") as sub:
        assert [d.message.value for d in drain(sub, 10)] == list(range(10))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="NOT_FOUND"):
        admin().exchange_declare(flag, passive=True)


def test_a_new_group_starting_at_the_latest_gets_no_history(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.publish(topic, "old")
    with bus.subscribe(topic, "g", start="latest") as sub:
        bus.publish(topic, "new")
        assert [d.message.value for d in drain(sub, 1)] == ["new"]
        assert sub.fetch(10, timeout=0.3) == []


def test_without_history_there_is_no_seek_and_no_retention(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect(history="false")
    assert polybus.Capability.SEEK not in bus.capabilities
    assert polybus.Capability.RETENTION not in bus.capabilities
    with pytest.raises(CapabilityError):
        bus.declare(topic, retention=60)
    bus.declare(topic, groups=["g"])
    with bus.subscribe(topic, "g") as sub, pytest.raises(CapabilityError):
        sub.seek(0, offset=0)


# -- publishing ------------------------------------------------------------------------------


def test_publishing_from_many_threads_loses_nothing(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    sent: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for b in range(20):
                batch = [Message({"t": n, "b": b, "i": i}) for i in range(10)]
                bus.publish_many(topic, batch) if b % 2 else [bus.publish(topic, m) for m in batch]
                with lock:
                    sent.extend(m.id for m in batch)
        except BaseException as exc:  # reported below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE * 3)
    assert not errors
    with connect().subscribe(topic, "g") as sub:
        got = [d.message.id for d in drain(sub, len(sent))]
    assert len(sent) == 8 * 20 * 10
    assert sorted(got) == sorted(sent)


def test_publishing_keeps_a_window_of_unconfirmed_messages(
    connect: Callable[..., polybus.Bus], topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = 0
    peak = 0
    flush, confirmed = publisher._FrameWriter.flush, publisher._Publisher._confirmed

    def counting_flush(self: Any) -> None:
        nonlocal writes
        writes += bool(self._frames)
        flush(self)

    def watching_confirmed(self: Any, channel: Any, frame: Any) -> None:
        nonlocal peak
        peak = max(peak, len(self._inflight))
        confirmed(self, channel, frame)

    monkeypatch.setattr(publisher._FrameWriter, "flush", counting_flush)
    monkeypatch.setattr(publisher._Publisher, "_confirmed", watching_confirmed)
    bus = connect(confirm_window=500)
    bus.declare(topic, groups=["g"])
    count = 3000
    bus.publish_many(topic, [b"x" * 100] * count)
    assert peak == 500  # the window filled: the broker had 500 messages to confirm at once
    assert writes < count / 10  # many messages per socket write and per round trip
    bus.publish_many(topic, [b"y"])  # a small batch after a big one
    assert peak == 500


def test_an_oversized_message_is_refused_before_sending(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic)
    bus.backend._publisher.max_message = 1000  # type: ignore[attr-defined]
    with pytest.raises(polybus.MessageTooLarge, match="1000"):
        bus.publish_many(topic, [b"ok", b"x" * 1001])
    bus.publish(topic, b"ok")


# -- consuming -------------------------------------------------------------------------------


def test_acks_from_other_threads_and_coalesced(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect(prefetch=500)
    bus.declare(topic, groups=["g"])
    bus.publish_many(topic, list(range(300)))
    with bus.subscribe(topic, "g") as sub:
        got = drain(sub, 300, ack=False)
        assert sorted(d.message.value for d in got) == list(range(300))
        # settle out of order from several threads: some acks, one drop, one requeue
        workers = [
            threading.Thread(target=lambda part=got[i::4]: [d.ack() for d in part])
            for i in range(1, 4)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        head = got[0::4]
        for d in head[2:]:
            d.ack()
        head[0].nack(requeue=False)
        head[1].nack(requeue=True)
        again = drain(sub, 1)
        assert [(d.message.value, d.attempt) for d in again] == [(head[1].message.value, 2)]
    with connect().subscribe(topic, "g") as sub:
        assert sub.fetch(10, timeout=0.5) == []


def test_classic_queues_count_redeliveries_too(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect(queue_type="classic")
    bus.declare(topic, groups=["g"])
    bus.publish(topic, "again")
    with bus.subscribe(topic, "g") as sub:
        (first,) = drain(sub, 1, ack=False)
        first.nack()
        (second,) = drain(sub, 1)
    assert (first.attempt, second.attempt) == (1, 2)


def test_seek_to_a_replayed_offset_and_back_to_the_queue(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    bus.publish_many(topic, list(range(6)))
    with bus.subscribe(topic, "g") as sub:
        assert [d.message.value for d in drain(sub, 6)] == list(range(6))
        sub.seek(0, timestamp=0.0)  # the whole history
        replayed = drain(sub, 6)
        assert [d.message.value for d in replayed] == list(range(6))
        assert all(isinstance(d.offset, int) for d in replayed)  # stream offsets
        sub.seek(0, offset=replayed[4].offset)
        assert [d.message.value for d in drain(sub, 2)] == [4, 5]
        bus.publish(topic, 6)  # after the replay, the group queue again
        assert [d.message.value for d in drain(sub, 1)] == [6]
        assert sub.fetch(10, timeout=0.3) == []
        with pytest.raises(ConfigurationError, match="partition"):
            sub.seek(1, offset=0)


def test_replayed_records_settle_locally(connect: Callable[..., polybus.Bus], topic: str) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    bus.publish_many(topic, ["a", "b"])
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 2)
        sub.seek(0, offset=first[0].offset)  # a message id: found in the history
        a, b = drain(sub, 2, ack=False)
        a.nack()  # redelivered within the replay
        b.ack()
        assert [(d.message.value, d.attempt) for d in drain(sub, 1)] == [("a", 2)]
        assert sub.fetch(10, timeout=0.3) == []


def test_seek_to_an_unknown_id_says_so(connect: Callable[..., polybus.Bus], topic: str) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    bus.publish(topic, "x")
    with bus.subscribe(topic, "g") as sub:
        drain(sub, 1)
        sub.seek(0, offset=Message("never published").id)
        with pytest.raises(ConfigurationError, match="not in the history"):
            drain(sub, 1)
        bus.publish(topic, "y")
        assert [d.message.value for d in drain(sub, 1)] == ["y"]


def test_an_ephemeral_subscriber_may_start_from_the_history(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic)
    bus.publish_many(topic, ["old-1", "old-2"])
    with bus.subscribe(topic, start="earliest") as sub:
        bus.publish(topic, "new")
        assert [d.message.value for d in drain(sub, 3)] == ["old-1", "old-2", "new"]
        assert sub.fetch(10, timeout=0.3) == []


def test_close_returns_unacked_messages_to_the_group(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect(prefetch=5)
    bus.declare(topic, groups=["g"])
    bus.publish_many(topic, list(range(20)))
    sub = bus.subscribe(topic, "g")
    drain(sub, 3)
    sub.close()
    with pytest.raises(polybus.ClosedError):
        sub.fetch(1, timeout=0)
    with connect().subscribe(topic, "g") as again:
        assert [d.message.value for d in drain(again, 17)] == list(range(3, 20))


def test_a_deleted_group_queue_is_declared_again(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    with bus.subscribe(topic, "g") as sub:
        bus.publish(topic, "before")
        assert [d.message.value for d in drain(sub, 1)] == ["before"]
        admin().queue_delete(rabbitmq.queue_name(topic, "g"))
        end = time.monotonic() + DEADLINE
        got: list[Delivery] = []
        while not got and time.monotonic() < end:  # lost until the queue is back
            bus.publish(topic, "after")
            got = sub.fetch(1, timeout=0.2)
        assert got, "the subscription never consumed again"
        assert got[0].message.value == "after"


@pytest.fixture
def proxied_url(url: str) -> Iterator[tuple[str, TcpProxy]]:
    parts = urlsplit(url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        userinfo, at, _ = parts.netloc.rpartition("@")
        yield urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{proxy.port}")), proxy


def test_what_was_declared_is_declared_again_after_a_reconnect(
    proxied_url: tuple[str, TcpProxy], topic: str, admin: Callable[[], Any]
) -> None:
    url, proxy = proxied_url
    with polybus.connect(with_options(url, reconnect_timeout=15)) as bus:
        bus.declare(topic, partitions=3, groups=["g"])
        proxy.block()
        ch = admin()  # the broker forgets the topic while the bus is away
        ch.queue_delete(rabbitmq.queue_name(topic, "g"))
        ch.queue_delete(rabbitmq.history_queue_name(topic))
        ch.exchange_delete(topic)
        ch.exchange_delete(rabbitmq.partitions_exchange_name(topic))
        proxy.unblock()
        end = time.monotonic() + DEADLINE
        while True:
            try:
                bus.publish(topic, "back")
                break
            except polybus.ConnectionLost:
                assert time.monotonic() < end, "publishing never recovered"
        with bus.subscribe(topic, "g") as sub:
            assert [d.message.value for d in drain(sub, 1)] == ["back"]
        with pytest.raises(ConfigurationError, match="partitions=3"):
            bus.declare(topic, partitions=2)


def test_a_replay_resumes_after_a_connection_cut(
    proxied_url: tuple[str, TcpProxy], topic: str
) -> None:
    url, proxy = proxied_url
    with polybus.connect(with_options(url, reconnect_timeout=15, prefetch=10)) as bus:
        bus.declare(topic, groups=["g"])
        bus.publish_many(topic, list(range(100)))
        with bus.subscribe(topic, "g") as sub:
            drain(sub, 100)
            sub.seek(0, timestamp=0.0)
            first = drain(sub, 30)
            proxy.cut()
            rest: list[Delivery] = []
            end = time.monotonic() + DEADLINE
            while len(rest) < 70 and time.monotonic() < end:
                try:
                    rest.extend(drain(sub, 70 - len(rest)))
                except polybus.ConnectionLost:
                    continue
            values = [d.message.value for d in first + rest]
            assert sorted(set(values)) == list(range(100))  # at least once, nothing lost
            assert sub.fetch(10, timeout=0.3) == []  # and then back to the (empty) queue


def test_publishing_to_a_vanished_topic_or_into_nowhere_fails_clearly(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    bus = connect()
    bus.declare(topic)
    admin().queue_unbind(rabbitmq.history_queue_name(topic), topic, rabbitmq.BINDING_KEY)
    with pytest.raises(polybus.PolybusError, match="unroutable"):
        bus.publish(topic, "nowhere")
    admin().exchange_delete(topic)
    with pytest.raises(polybus.TopicNotFound, match=topic):
        bus.publish(topic, "gone")
    bus.declare(topic)  # the next declaration repairs it
    bus.publish(topic, "fine")


def test_an_ephemeral_subscriber_catches_up_after_a_connection_cut(
    proxied_url: tuple[str, TcpProxy], topic: str, connect: Callable[..., polybus.Bus]
) -> None:
    url, proxy = proxied_url
    publisher = connect()
    publisher.declare(topic)
    with polybus.connect(with_options(url, reconnect_timeout=15)) as bus:
        sub = bus.subscribe(topic)
        publisher.publish_many(topic, list(range(10)))
        seen = [d.message.value for d in drain(sub, 3)]
        unacked = drain(sub, 2, ack=False)  # fetched, never settled: must come again
        proxy.block()
        link = bus.backend._consumer_link  # type: ignore[attr-defined]
        end = time.monotonic() + DEADLINE
        while link.opened.is_set():  # wait until the subscriber's queue is gone
            assert time.monotonic() < end
            time.sleep(0.01)
        publisher.publish_many(topic, list(range(10, 20)))  # while the subscriber is away
        proxy.unblock()
        end = time.monotonic() + DEADLINE
        again: list[int] = []
        while len(set(seen + again)) < 20 and time.monotonic() < end:
            try:
                batch = sub.fetch(20, timeout=0.2)
            except polybus.ConnectionLost:
                continue
            for d in batch:
                d.ack()
                again.append(d.message.value)
        assert sorted(set(seen + again)) == list(range(20))
        assert {d.message.value for d in unacked} <= set(again)
        assert proxy.connections > 2  # it did reconnect
        sub.close()


@pytest.mark.parametrize(
    ("record", "routing_key", "expected"),
    [
        (OutRecord(b"x"), "", {}),
        (OutRecord(b"", key=b"\xff"), "", {"headers": {"polybus-key": "/w=="}}),
        (OutRecord(b"", key=b""), "", {"headers": {"polybus-key": ""}}),
        (
            OutRecord(b"", key=b"k" * 256),
            "",
            {"headers": {"polybus-key": base64.b64encode(b"k" * 256).decode()}},
        ),
        (
            OutRecord(b"v", key="ünï".encode(), timestamp_ms=1_700_000_000_999),
            "ünï",
            {"timestamp": 1_700_000_000},
        ),
        (
            OutRecord(
                b"{}",
                headers=(
                    ("polybus-id", "01a1ff9f-46c7-7690-8d11-3796a9b009bd"),
                    ("content-type", "application/json"),
                    ("polybus-correlation-id", "c"),
                    ("polybus-causation-id", "d"),
                    ("ünï", "cødé\udcff"),
                ),
            ),
            "",
            {
                "message_id": "01a1ff9f-46c7-7690-8d11-3796a9b009bd",
                "content_type": "application/json",
                "correlation_id": "c",
                "headers": {"polybus-causation-id": "d", "ünï": b"c\xc3\xb8d\xc3\xa9\xff"},
            },
        ),
        (
            OutRecord(b"long id", headers=(("polybus-id", "i" * 300),)),
            "",
            {"headers": {"polybus-id": "i" * 300}},
        ),
    ],
)
def test_content_properties_as_pika_reads_them(
    record: OutRecord, routing_key: str, expected: dict[str, Any]
) -> None:
    key, content = wire._content(record)
    properties = pika.BasicProperties()
    properties.decode(content)
    assert key == routing_key
    assert {k: v for k, v in vars(properties).items() if v is not None} == {
        "delivery_mode": 2,
        **expected,
    }


def test_a_header_name_too_long_for_amqp_is_refused(
    connect: Callable[..., polybus.Bus], topic: str
) -> None:
    bus = connect()
    bus.declare(topic)
    with pytest.raises(ConfigurationError, match="255 bytes"):
        bus.publish(topic, b"x", headers={"h" * 256: "v"})
    bus.publish(topic, b"x", headers={"h" * 255: "v" * 1000})


def test_publishing_without_the_frame_writer_shortcut(
    connect: Callable[..., polybus.Bus], topic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    init = publisher._FrameWriter.__init__

    def without_emit(self: Any, channel: Any, mandatory: bool) -> None:
        init(self, channel, mandatory)
        self._emit = None  # as if pika lacked _adapter_emit_data

    monkeypatch.setattr(publisher._FrameWriter, "__init__", without_emit)
    bus = connect()
    bus.declare(topic, groups=["g"])
    sent = [Message(i, key=f"k{i}", headers={"h": str(i)}) for i in range(50)]
    bus.publish_many(topic, sent)
    with bus.subscribe(topic, "g") as sub:
        got = drain(sub, 50)
    assert [(d.message.value, d.message.key, d.message.headers) for d in got] == [
        (m.value, m.key, m.headers) for m in sent
    ]


def test_queue_names_are_predictable(
    connect: Callable[..., polybus.Bus], topic: str, admin: Callable[[], Any]
) -> None:
    bus = connect()
    bus.declare(topic, groups=["billing.v2"])
    assert rabbitmq.queue_name(topic, "billing.v2") == f"{topic}/billing.v2"
    assert rabbitmq.history_queue_name(topic) == f"{topic}.history"
    ch = admin()
    ch.queue_declare(f"{topic}/billing.v2", passive=True)
    ch.queue_declare(f"{topic}.history", passive=True)
    ch.exchange_declare(topic, passive=True)
    bus.publish(topic, "to the group")
    with bus.subscribe(topic, "billing.v2") as sub:
        assert [d.message.value for d in drain(sub, 1)] == ["to the group"]


def test_existence_probes_do_not_log_warnings_but_other_clients_closes_still_do(
    connect: Callable[..., polybus.Bus],
    topic: str,
    admin: Callable[[], Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pika")
    bus = connect()
    bus.declare(topic, groups=["g"])  # probes the exchange and the queue: both missing
    bus.publish(topic, b"x")
    assert [r.getMessage() for r in caplog.records if "(404)" in r.getMessage()] == []
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        admin().queue_declare(f"{topic}-nowhere", passive=True)  # a plain pika client's 404
    assert any("(404)" in r.getMessage() for r in caplog.records)
