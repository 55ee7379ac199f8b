"""What polybus costs on top of each raw client: the same work both ways, in one run.

For every backend: publish N 100-byte messages with the same durability, then
consume and ack all of them, once through the raw client and once through
``polybus.connect(url)``, side by side. The ratio is polybus time / raw time
(target ≤ 1.15, publish and consume each).

Same durability, per backend:

* Kafka (confluent-kafka): idempotent producer, ``acks=all``; N produced in
  chunks of ``--chunk``, each chunk waited for (raw: ``flush()``; polybus:
  ``publish_many``). The raw records carry headers of the same size as
  polybus's envelope (an id and a timestamp, made before the clock starts),
  so the broker and librdkafka store and read the same bytes either way and
  making the envelope counts as polybus's cost. Consume: a consumer group,
  ``consume()`` in batches, each record's value and headers read, every
  message acked (raw: ``commit(asynchronous=True)`` after each batch). Both
  consumers use ``fetch.queue.backoff.ms=10``, as polybus's do: with
  librdkafka's default (1 s), a consumer that drains the 100k records fetched
  ahead sooner than that waits out the rest of the second, so either side's
  time depended on whether the stall happened in its run (raw: 169 k or
  475 k msg/s on the same machine).
* RabbitMQ (pika): persistent messages to a durable exchange bound to the
  group's queue and to the topic's history stream (the topology polybus
  declares by default, so the broker does the same work), publisher confirms with a window
  of 1000 outstanding (raw: ``SelectConnection``, the pika way to keep a
  window), each chunk confirmed before the next; raw messages carry an id, a
  timestamp and a header, as polybus's do. Consume: prefetch 1000, manual acks
  (raw: ``basic_ack`` with ``multiple=True`` every 100 messages).
* Redis (redis-py): ``XADD`` pipelined per chunk; consume ``XREADGROUP``
  ``COUNT 1000`` and ``XACK`` per batch.
* polybus: plain values published with ``publish_many`` (each gets the
  envelope: a UUIDv7 id and a timestamp); every message read (``d.value``:
  the payload decoded by its content type), each batch acked with one
  ``Subscriber.ack(batch)`` call, as the raw consumers commit per batch, and a
  final blocking ``commit()``, as the raw consumers end with a synchronous commit.
* native: the engine's own API (``Topic.append_batch`` / ``Consumer.poll`` +
  ``ack``) against the Bus on ``native://``.

Kafka also gets a sequential case: ``--sequential`` messages (default 2000)
published one at a time, each waited for (polybus: ``bus.publish`` in a loop;
raw: ``produce`` then ``flush`` per message, same producer settings and
headers as above), after one unmeasured message each way so the connection
is up. It is what a request handler that publishes one event sees; the
target is at least 1,000 msg/s.

Consume time runs from the first message received to the last ack
committed, so group joins and leaves (seconds on some brokers) are not
counted on either side. Besides wall time, each side's process CPU time per
message is shown (the client library's threads included, the broker's not):
it is what polybus adds, and varies much less than the wall time, which
follows the broker. Every case uses a fresh topic and group. Servers come from
``polybus.testing.servers`` (POLYBUS_*_URL / POLYBUS_KAFKA_BOOTSTRAP, local
ports, or a Tansu broker started for the run).

    python benchmarks/overhead.py [--count 200000] [--repeat 1]
        [--backends kafka,rabbitmq,redis,native] [--sequential 2000]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import polybus
from polybus.testing import servers

PAYLOAD = os.urandom(100)
DEADLINE = 300.0


def _name(kind: str) -> str:
    return f"bench-{kind}-{uuid.uuid4().hex[:8]}"


class Timing(NamedTuple):
    wall: float  #: seconds
    cpu: float  #: process CPU seconds, the client library's threads included


Start = tuple[float, float]


def now() -> Start:
    return time.perf_counter(), time.process_time()


def since(start: Start) -> Timing:
    return Timing(time.perf_counter() - start[0], time.process_time() - start[1])


@dataclass
class Case:
    """One backend: how to publish and consume N messages raw, and its polybus URL."""

    name: str
    url: Callable[[], str]
    unavailable: Callable[[], str | None]
    raw_publish: Callable[[str, int, int], Timing]  # (topic, count, chunk)
    raw_consume: Callable[[str, int], Timing]  # (topic, count)
    setup_raw: Callable[[str], None] = lambda topic: None
    raw_sequential: Callable[[str, int], Timing] | None = None  # (topic, count)


# -- polybus (the same code for every backend) --------------------------------


def bus_publish(url: str, topic: str, count: int, chunk: int) -> Timing:
    with polybus.connect(url) as bus:
        bus.declare(topic, partitions=1, groups=["g"])
        started = now()
        for start in range(0, count, chunk):
            bus.publish_many(topic, [PAYLOAD] * min(chunk, count - start))
        return since(started)


def bus_sequential(url: str, topic: str, count: int) -> Timing:
    with polybus.connect(url) as bus:
        bus.declare(topic, partitions=1)
        bus.publish(topic, PAYLOAD)  # the connection up before the clock starts
        started = now()
        for _ in range(count):
            bus.publish(topic, PAYLOAD)
        return since(started)


def bus_consume(url: str, topic: str, count: int) -> Timing:
    with polybus.connect(url) as bus, bus.subscribe(topic, "g") as sub:
        got = 0
        started: Start | None = None
        end = time.monotonic() + DEADLINE
        while got < count:
            if time.monotonic() > end:
                raise RuntimeError(f"polybus consumed only {got} of {count}")
            batch = sub.fetch(1000, timeout=1.0)
            if batch and not started:
                started = now()
            for d in batch:
                d.value  # read each message, as the raw consumers do  # noqa: B018
            sub.ack(batch)  # one ack per batch, as the raw consumers commit
            got += len(batch)
        sub.commit()  # the acks durable: part of the work (leaving the group is not)
        assert started is not None
        return since(started)


# -- Kafka ----------------------------------------------------------------------


def kafka_config() -> dict[str, object]:
    return {"bootstrap.servers": servers.kafka_bootstrap()}


def kafka_setup(topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient(kafka_config())
    for future in admin.create_topics([NewTopic(topic, 1)]).values():
        future.result()


def kafka_headers(count: int) -> list[list[tuple[str, str | bytes | None]]]:
    """Headers the size of polybus's envelope (an id and a millisecond timestamp)."""
    stamp = str(int(time.time() * 1000))
    return [[("polybus-id", str(uuid.uuid4())), ("polybus-timestamp", stamp)] for _ in range(count)]


class RawProducer(NamedTuple):
    producer: Any  #: confluent_kafka.Producer: idempotent, acks=all
    on_delivery: Callable[[object, object], None]  #: records each failed delivery
    failures: list[object]

    def check(self) -> None:
        if self.failures:
            raise RuntimeError(f"raw Kafka deliveries failed: {self.failures[:3]}")


def raw_producer() -> RawProducer:
    from confluent_kafka import Producer

    failures: list[object] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(err)

    config = {**kafka_config(), "enable.idempotence": True, "acks": "all"}
    return RawProducer(Producer(config), on_delivery, failures)


def kafka_raw_publish(topic: str, count: int, chunk: int) -> Timing:
    producer, on_delivery, _ = raw = raw_producer()
    headers = kafka_headers(count)
    started = now()
    for start in range(0, count, chunk):
        for i in range(start, min(start + chunk, count)):
            while True:
                try:
                    producer.produce(topic, PAYLOAD, on_delivery=on_delivery, headers=headers[i])
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush()
    elapsed = since(started)
    raw.check()
    return elapsed


def kafka_raw_sequential(topic: str, count: int) -> Timing:
    producer, on_delivery, _ = raw = raw_producer()
    headers = kafka_headers(count)
    producer.produce(topic, PAYLOAD, on_delivery=on_delivery)  # the connection up first
    producer.flush()
    started = now()
    for i in range(count):
        producer.produce(topic, PAYLOAD, on_delivery=on_delivery, headers=headers[i])
        producer.flush()
    elapsed = since(started)
    raw.check()
    return elapsed


def kafka_raw_consume(topic: str, count: int) -> Timing:
    from confluent_kafka import Consumer, KafkaError, KafkaException

    consumer = Consumer(
        {
            **kafka_config(),
            "group.id": _name("raw"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.queue.backoff.ms": 10,  # as polybus's consumers (see the docstring)
        }
    )
    consumer.subscribe([topic])
    got, started = 0, None
    end = time.monotonic() + DEADLINE
    while got < count and time.monotonic() < end:
        # read each record, as any consumer does (polybus decodes value and headers)
        batch = [
            (m.value(), m.headers()) for m in consumer.consume(1000, timeout=1.0) if not m.error()
        ]
        if batch and not started:
            started = now()
        if batch:
            got += len(batch)
            consumer.commit(asynchronous=True)
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:  # the last asynchronous commit already took everything
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            raise
    if got < count or started is None:
        raise RuntimeError(f"raw Kafka consumed only {got} of {count}")
    elapsed = since(started)
    consumer.close()
    return elapsed


# -- RabbitMQ -------------------------------------------------------------------


def rabbit_queue(topic: str) -> str:
    from polybus.adapters import rabbitmq

    return rabbitmq.queue_name(topic, "g")


def rabbit_setup(topic: str) -> None:
    import pika

    from polybus.adapters import rabbitmq

    conn = pika.BlockingConnection(pika.URLParameters(servers.rabbitmq_url()))
    ch = conn.channel()
    ch.exchange_declare(topic, rabbitmq.EXCHANGE_TYPE, durable=True)
    ch.queue_declare(rabbit_queue(topic), durable=True, arguments=rabbitmq.queue_arguments())
    ch.queue_bind(rabbit_queue(topic), topic, routing_key=rabbitmq.BINDING_KEY)
    # the same broker work as polybus's default topology: a history stream for replay
    history = rabbitmq.history_queue_name(topic)
    ch.queue_declare(
        history,
        durable=True,
        arguments={"x-queue-type": "stream", "x-max-age": f"{rabbitmq.DEFAULT_HISTORY_AGE_S}s"},
    )
    ch.queue_bind(history, topic, routing_key=rabbitmq.BINDING_KEY)
    conn.close()


def rabbit_raw_publish(topic: str, count: int, chunk: int, window: int = 1000) -> Timing:
    import pika

    # The same bytes on the wire as polybus sends: an id, a timestamp and one header,
    # built before the clock starts.
    stamp = str(int(time.time() * 1000))
    props = [
        pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=str(uuid.uuid4()),
            timestamp=int(stamp) // 1000,
            headers={"polybus-timestamp": stamp},
        )
        for _ in range(count)
    ]
    sent = confirmed = 0
    nacked: list[int] = []
    started = now()
    elapsed: Timing | None = None

    def publish_more(ch: pika.channel.Channel) -> None:
        nonlocal sent
        # as publish_many does per chunk: the next chunk starts once this one is confirmed
        limit = min(count, confirmed - confirmed % chunk + chunk)
        while sent - confirmed < window and sent < limit:
            ch.basic_publish(topic, rabbitmq_routing_key(), PAYLOAD, props[sent])
            sent += 1

    def on_channel(ch: pika.channel.Channel) -> None:
        def on_confirm(frame: pika.frame.Method) -> None:
            nonlocal confirmed, elapsed
            method = frame.method
            if isinstance(method, pika.spec.Basic.Nack):
                nacked.append(method.delivery_tag)
            confirmed = method.delivery_tag if method.multiple else confirmed + 1
            if confirmed >= count:
                elapsed = since(started)
                conn.close()
            else:
                publish_more(ch)

        def on_select(_frame: object) -> None:
            nonlocal started
            started = now()
            publish_more(ch)

        ch.confirm_delivery(ack_nack_callback=on_confirm, callback=on_select)

    conn = pika.SelectConnection(
        pika.URLParameters(servers.rabbitmq_url()),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, reason: c.ioloop.stop(),
    )
    conn.ioloop.start()
    if nacked or confirmed < count or elapsed is None:
        raise RuntimeError(f"raw RabbitMQ: {confirmed} of {count} confirmed, nacks {nacked[:3]}")
    return elapsed


def rabbitmq_routing_key() -> str:
    from polybus.adapters import rabbitmq

    return rabbitmq.BINDING_KEY


def rabbit_raw_consume(topic: str, count: int) -> Timing:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(servers.rabbitmq_url()))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1000)
    got, started, last_tag = 0, now(), 0
    for method, _props, _body in ch.consume(rabbit_queue(topic), inactivity_timeout=10):
        if method is None:
            break
        if not got:
            started = now()
        got += 1
        last_tag = method.delivery_tag
        if got % 100 == 0 or got == count:
            ch.basic_ack(last_tag, multiple=True)
        if got == count:
            break
    elapsed = since(started)
    ch.cancel()
    conn.close()
    if got < count:
        raise RuntimeError(f"raw RabbitMQ consumed only {got} of {count}")
    return elapsed


# -- Redis ----------------------------------------------------------------------


def redis_stream(topic: str) -> str:
    from polybus.adapters import redis as adapter

    return adapter.stream_key(topic, 0)


def redis_setup(topic: str) -> None:
    import redis

    client = redis.Redis.from_url(servers.redis_url())
    client.xgroup_create(redis_stream(topic), "g", id="0", mkstream=True)
    client.close()


def redis_raw_publish(topic: str, count: int, chunk: int) -> Timing:
    import redis

    client = redis.Redis.from_url(servers.redis_url())
    stream = redis_stream(topic)
    started = now()
    for start in range(0, count, chunk):
        pipe = client.pipeline(transaction=False)
        for _ in range(min(chunk, count - start)):
            pipe.xadd(stream, {"value": PAYLOAD})
        pipe.execute()
    elapsed = since(started)
    client.close()
    return elapsed


def redis_raw_consume(topic: str, count: int) -> Timing:
    import redis

    client = redis.Redis.from_url(servers.redis_url())
    stream = redis_stream(topic)
    got, started = 0, now()
    while got < count:
        reply = client.xreadgroup("g", "raw", {stream: ">"}, count=1000, block=1000)
        if not reply:
            raise RuntimeError(f"raw Redis consumed only {got} of {count}")
        if not got:
            started = now()
        ids = [entry_id for entry_id, _fields in reply[0][1]]
        client.xack(stream, "g", *ids)
        got += len(ids)
    elapsed = since(started)
    client.close()
    return elapsed


# -- native ---------------------------------------------------------------------


@functools.cache
def native_dir() -> str:
    """The engine's files for this run, made on first use: importing this module makes none."""
    return tempfile.mkdtemp(prefix="polybus-overhead-")


def native_raw_publish(topic: str, count: int, chunk: int) -> Timing:
    from polybus.log import Log

    with Log(os.path.join(native_dir(), "raw")) as log:
        append_batch = log.create_topic(topic, 1).partitions[0].append_batch
        log.create_group(topic, "g")
        started = now()
        for start in range(0, count, chunk):
            append_batch([PAYLOAD] * min(chunk, count - start))
        return since(started)


def native_raw_consume(topic: str, count: int) -> Timing:
    from polybus.log import Log

    with Log(os.path.join(native_dir(), "raw")) as log:
        consumer = log.consumer(topic, "g")
        got, started = 0, now()
        while got < count:
            records = consumer.poll(max_records=1000, timeout=1.0)
            if not records:
                raise RuntimeError(f"raw native consumed only {got} of {count}")
            consumer.ack(records)
            got += len(records)
        consumer.commit()
        elapsed = since(started)
        consumer.close()
        return elapsed


CASES = [
    Case(
        "native",
        lambda: f"native://{native_dir()}/bus",
        lambda: None,
        native_raw_publish,
        native_raw_consume,
    ),
    Case(
        "kafka",
        lambda: f"kafka://{servers.kafka_bootstrap()}",
        servers.kafka_unavailable,
        kafka_raw_publish,
        kafka_raw_consume,
        kafka_setup,
        kafka_raw_sequential,
    ),
    Case(
        "rabbitmq",
        servers.rabbitmq_url,
        servers.rabbitmq_unavailable,
        rabbit_raw_publish,
        rabbit_raw_consume,
        rabbit_setup,
    ),
    Case(
        "redis",
        servers.redis_url,
        servers.redis_unavailable,
        redis_raw_publish,
        redis_raw_consume,
        redis_setup,
    ),
]

TARGET = 1.15
SEQUENTIAL_TARGET = 1000  # msg/s, polybus publishing one message at a time


def run(case: Case, count: int, chunk: int) -> tuple[Timing, Timing, Timing, Timing]:
    raw_topic, bus_topic = _name("raw"), _name("bus")
    case.setup_raw(raw_topic)
    raw_pub = case.raw_publish(raw_topic, count, chunk)
    bus_pub = bus_publish(case.url(), bus_topic, count, chunk)
    raw_con = case.raw_consume(raw_topic, count)
    bus_con = bus_consume(case.url(), bus_topic, count)
    for topic in (raw_topic, bus_topic):
        if case.name == "redis":
            servers.redis_delete_topic(topic)
        elif case.name == "rabbitmq":
            servers.rabbitmq_delete_topic(topic, ("g",))
    return raw_pub, bus_pub, raw_con, bus_con


def run_sequential(case: Case, count: int) -> tuple[Timing, Timing]:
    assert case.raw_sequential is not None
    raw_topic, bus_topic = _name("raw-seq"), _name("bus-seq")
    case.setup_raw(raw_topic)
    return case.raw_sequential(raw_topic, count), bus_sequential(case.url(), bus_topic, count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per backend, one row each")
    parser.add_argument("--backends", default=",".join(c.name for c in CASES))
    parser.add_argument(
        "--sequential", type=int, default=2000, help="messages published one at a time (0: none)"
    )
    args = parser.parse_args()
    wanted = args.backends.split(",")
    rows = []
    sequential_rows = []
    failed = False
    for case in CASES:
        if case.name not in wanted:
            continue
        reason = case.unavailable()
        if reason:
            print(f"{case.name}: skipped ({reason})", file=sys.stderr)
            continue
        for _ in range(args.repeat):
            try:
                rows.append((case.name, *run(case, args.count, args.chunk)))
                if case.raw_sequential is not None and args.sequential > 0:
                    sequential_rows.append((case.name, *run_sequential(case, args.sequential)))
            except Exception as exc:  # report the case and go on with the others
                failed = True
                print(f"{case.name}: FAILED {exc!r}", file=sys.stderr)
    n = args.count
    print(
        f"\n{n} messages of {len(PAYLOAD)} bytes; msg/s; ratio = polybus time / raw time; "
        "cpu = process CPU µs per message, raw / polybus"
    )
    print(
        f"{'backend':10} {'raw pub':>10} {'polybus':>10} {'ratio':>6}  {'cpu':>11}   "
        f"{'raw cons':>10} {'polybus':>10} {'ratio':>6}  {'cpu':>11}"
    )
    for name, raw_pub, bus_pub, raw_con, bus_con in rows:
        pub_ratio, con_ratio = bus_pub.wall / raw_pub.wall, bus_con.wall / raw_con.wall
        pub_flag = "  " if pub_ratio <= TARGET else " ✗"
        con_flag = "  " if con_ratio <= TARGET else " ✗"
        pub_cpu = f"{raw_pub.cpu / n * 1e6:.1f} / {bus_pub.cpu / n * 1e6:.1f}"
        con_cpu = f"{raw_con.cpu / n * 1e6:.1f} / {bus_con.cpu / n * 1e6:.1f}"
        print(
            f"{name:10} {n / raw_pub.wall:10,.0f} {n / bus_pub.wall:10,.0f} "
            f"{pub_ratio:6.2f}{pub_flag}{pub_cpu:>11}   "
            f"{n / raw_con.wall:10,.0f} {n / bus_con.wall:10,.0f} "
            f"{con_ratio:6.2f}{con_flag}{con_cpu:>11}"
        )
    print(f"target: ratio ≤ {TARGET} (✗ marks a miss)")
    if sequential_rows:
        m = args.sequential
        print(
            f"\nsequential publish: {m} messages, each waited for before the next; msg/s; "
            "ratio = polybus time / raw time; cpu = process CPU µs per message, raw / polybus"
        )
        print(f"{'backend':10} {'raw':>10} {'polybus':>10}   {'ratio':>6}  {'cpu':>11}")
        for name, raw_seq, bus_seq in sequential_rows:
            flag = "  " if m / bus_seq.wall >= SEQUENTIAL_TARGET else " ✗"
            cpu = f"{raw_seq.cpu / m * 1e6:.0f} / {bus_seq.cpu / m * 1e6:.0f}"
            print(
                f"{name:10} {m / raw_seq.wall:10,.0f} {m / bus_seq.wall:10,.0f}{flag} "
                f"{bus_seq.wall / raw_seq.wall:6.2f}  {cpu:>11}"
            )
        print(f"target: polybus ≥ {SEQUENTIAL_TARGET:,} msg/s (✗ marks a miss)")
    shutil.rmtree(native_dir(), ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
