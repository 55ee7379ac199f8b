"""polybus against its peers: the same messages through each library, side by side, in one run.

Method. For each backend, every library publishes ``--count`` 100-byte messages
to a topic or queue of its own (fresh each time) with the same durability, then
consumes and acks all of them; publish and consume are timed apart, in messages
per second. A run is ``--rounds`` rounds; each round runs every library once, in
an order rotated by one per round, so none is always first or last on a shared,
noisy machine. Each library's cell is the median and the range (min-max) over
the rounds; ``polybus ÷`` is polybus's msg/s over the library's in the same
round, median and range over the rounds. The backend's raw client runs in the
same rounds (the code of ``overhead.py``), so the targets are read off one table:

* Kafka: polybus at least 1 / 1.3 of the raw client's msg/s (at most 1.3 times its
  time) and ahead of both FastStream brokers, publish and consume each;
* Redis and RabbitMQ: polybus ahead of the raw client and of every peer.

A median that misses is marked ✗; the run still exits 0. A case that fails is
reported, the others go on, and the run exits 1. A broker that cannot be
reached is named, with how to start it, and its backend skipped.

Consume time runs from the first message a consumer gets to the last ack it
sends (a broker's group join, a worker's start and stop are not counted).
Publishing is in chunks of ``CHUNK`` (1000) where a library has a batch call,
each chunk confirmed before the next; the others publish one message at a time,
as they document. Every consumer reads each message's payload. polybus and the
raw clients send 100 random bytes; the peers 100 ASCII bytes, as dramatiq's
arguments are JSON and FastStream's Redis batch subscriber turns a batch into
JSON (bytes that are not UTF-8 make it fail). Each library adds its own envelope.
The FastStream brokers are made with ``logger=None``, its documented switch for
its per-message log lines.

Per backend, the libraries and how each is driven (each in the fastest way its
documentation gives, with the same durability):

Redis (one server for all, so its persistence settings apply to all alike)

* polybus: ``publish_many`` per chunk; ``Subscriber.fetch(1000)``, one
  ``Subscriber.ack`` per batch and a final ``commit()``.
* redis-py (raw): ``XADD`` pipelined per chunk; ``XREADGROUP COUNT 1000`` and
  ``XACK`` per batch.
* kombu (Redis transport): ``Producer.publish`` through the default exchange (a
  named exchange costs a lookup of its bindings per message) inside
  ``Producer.batch`` (one pipeline per chunk); a ``Consumer`` with
  ``on_message``, prefetch 1000, ``message.ack()`` per message (the transport
  has no multiple ack).
* dramatiq (``RedisBroker``): ``actor.send`` per message (dramatiq has no batch
  enqueue); an in-process ``Worker`` with its defaults (8 threads, prefetch
  16); consume ends when ``broker.join`` finds no message left unacked.
* FastStream (``RedisBroker``, a stream): ``publish(stream=...)`` into one
  non-transactional pipeline per chunk (its pipelining; ``publish_batch`` takes
  lists only); a ``StreamSub`` batch subscriber in a consumer group,
  ``max_records=1000``, each batch acked by ``msg.ack()`` (one ``XACK``;
  ``AckPolicy.MANUAL``, so the ack is inside the timed part).

RabbitMQ (persistent messages, durable quorum queues, publisher confirms)

* polybus: its default topology (a durable exchange bound to the group's quorum
  queue and to the topic's history stream, so each message is stored twice),
  confirms with a window of 1000; prefetch 1000, one ack per batch.
* pika (raw): the same topology, confirms and acks as polybus.
* kombu (py-amqp): the ``confirm_publish`` transport option (each publish waits
  for its confirm: kombu keeps no window of them), ``delivery_mode=2``, the
  default exchange to a quorum queue; prefetch 1000, ``ack(multiple=True)``
  every 100 messages.
* dramatiq (``RabbitmqBroker(confirm_delivery=True)``): persistent messages, each
  send confirmed. Not matched: dramatiq declares its queues itself, as classic
  durable queues with no option for the type, so its messages are persisted
  and confirmed like the others' but kept in a classic queue, not a quorum
  queue. Worker defaults as on Redis; consume ends when the actor has run for
  the last message (the worker sends its ack right after, unobserved).
* FastStream (``RabbitBroker``, confirms on by default): ``publish(persist=True)``
  to a quorum queue, a chunk's publishes awaited together (``asyncio.gather``)
  so up to 1000 confirms are outstanding; a subscriber with prefetch 1000,
  ``msg.ack()`` per message (``AckPolicy.MANUAL``).

Kafka (one partition; idempotent producers with ``acks=all``; consumers in a
group committing offsets)

* polybus: ``publish_many`` per chunk; fetch, ack per batch, final ``commit()``.
* confluent-kafka (raw): ``produce`` and ``flush()`` per chunk; ``consume(1000)``
  and an asynchronous commit per batch.
* FastStream ``KafkaBroker`` (aiokafka) and ``faststream.confluent.KafkaBroker``,
  each with ``acks="all", enable_idempotence=True`` and otherwise its defaults:
  ``publish_batch`` per chunk (aiokafka's ``max_batch_size`` raised to 1 MiB, as
  ``publish_batch`` sends one aiokafka batch and a chunk must fit); a batch
  subscriber, ``max_records=1000``, each batch committed by ``msg.ack()``
  (``AckPolicy.MANUAL``).

Servers come from ``polybus.testing.servers`` (POLYBUS_*_URL /
POLYBUS_KAFKA_BOOTSTRAP, local ports, or a Kafka broker started for the run).
The peers are in the ``bench`` dependency group; ``make bench`` runs this.

    python benchmarks/peers.py [--count 20000] [--rounds 3]
        [--backends kafka,rabbitmq,redis] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import dramatiq
import kombu
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker as DramatiqRedisBroker
from faststream import AckPolicy, Context
from faststream import confluent as faststream_confluent
from faststream import kafka as faststream_kafka
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from faststream.redis import RedisBroker, StreamSub

from overhead import (
    PAYLOAD,
    Start,
    Timing,
    bus_consume,
    bus_publish,
    kafka_config,
    kafka_raw_consume,
    kafka_raw_publish,
    kafka_setup,
    now,
    rabbit_raw_consume,
    rabbit_raw_publish,
    rabbit_setup,
    redis_raw_consume,
    redis_raw_publish,
    redis_setup,
    since,
)
from polybus.testing import servers

CHUNK = 1000  # messages per batch call, and a consumer's batch or prefetch
DEADLINE = 120.0  # seconds a consumer may take before its case fails
TEXT = PAYLOAD.hex()[: len(PAYLOAD)]  # what the peers send: 100 ASCII bytes (see above)
BODY = TEXT.encode()
GROUP = "g"
KAFKA_RAW_LIMIT = 1.3  # polybus's time at most this many times the raw client's
QUORUM = {"x-queue-type": "quorum"}

#: FastStream's message object (for a manual ack), as its own ``*Message`` annotations get it
Message = Annotated[Any, Context("message")]


def fresh(library: str) -> str:
    return f"peers-{library.split()[0]}-{uuid.uuid4().hex[:8]}"


class Counter:
    """A callback-driven consumer's progress: when its first message came and its last
    ack went (callbacks may run on several threads)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.acked = 0
        self.started: Start | None = None
        self.elapsed: Timing | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def received(self) -> None:
        if self.started is None:
            self.started = now()

    def ack(self, n: int) -> None:
        with self._lock:
            self.acked += n
            if self.acked >= self.count and self.started and not self.done.is_set():
                self.elapsed = since(self.started)
                self.done.set()

    def result(self, library: str) -> Timing:
        if not self.done.wait(DEADLINE) or self.elapsed is None:
            raise RuntimeError(f"{library} consumed only {self.acked} of {self.count}")
        return self.elapsed


# -- Cleanup (shared servers stay tidy) -------------------------------------------


def redis_delete(pattern: str) -> None:
    import redis

    with redis.Redis.from_url(servers.redis_url()) as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


def rabbit_delete(queues: list[str]) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(servers.rabbitmq_url()))
    try:
        ch = conn.channel()
        for queue in queues:
            ch.queue_delete(queue)
    finally:
        conn.close()


def kafka_delete(topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    # kept until the futures are done; quiet about the events it leaves unread on closing
    admin = AdminClient({**kafka_config(), "log_level": 5})
    for future in admin.delete_topics([topic]).values():
        future.result()


# -- kombu ------------------------------------------------------------------------


@dataclass
class Kombu:
    """kombu on one transport: its connection's options and how it acks."""

    url: Callable[[], str]
    transport_options: dict[str, Any]
    queue_arguments: dict[str, Any]
    ack_every: int  # messages per ack: >1 acks with multiple=True

    def queue(self, name: str) -> kombu.Queue:
        """A durable queue, published to through the default exchange (on Redis a named
        exchange costs kombu a lookup of its bindings per message)."""
        return kombu.Queue(name, durable=True, queue_arguments=self.queue_arguments)

    def connection(self) -> kombu.Connection:
        return kombu.Connection(self.url(), transport_options=self.transport_options)

    def publish(self, name: str, count: int) -> Timing:
        with self.connection() as conn:
            self.queue(name)(conn.default_channel).declare()
            producer = conn.Producer()
            started = now()
            for start in range(0, count, CHUNK):
                with producer.batch(CHUNK):
                    for _ in range(min(CHUNK, count - start)):
                        producer.publish(BODY, routing_key=name, delivery_mode=2)
            return since(started)

    def consume(self, name: str, count: int) -> Timing:
        counter = Counter(count)
        unacked = 0

        def on_message(message: kombu.Message) -> None:
            nonlocal unacked
            counter.received()
            message.body  # read each message, as every consumer here does  # noqa: B018
            unacked += 1
            if unacked == self.ack_every or counter.acked + unacked == count:
                message.ack(multiple=self.ack_every > 1)
                counter.ack(unacked)
                unacked = 0

        with (
            self.connection() as conn,
            conn.Consumer(self.queue(name), on_message=on_message, prefetch_count=CHUNK),
        ):
            while not counter.done.is_set():
                try:
                    conn.drain_events(timeout=DEADLINE)
                except TimeoutError:
                    break
        return counter.result("kombu")

    def cleanup(self, name: str) -> None:
        if self.url().startswith("redis"):
            redis_delete(f"*{name}*")
        else:
            rabbit_delete([name])


# -- dramatiq -----------------------------------------------------------------------

ACTOR = "peers_count"


def dramatiq_actor(broker: dramatiq.Broker, name: str, fn: Callable[[str], None]) -> dramatiq.Actor:
    return dramatiq.actor(fn, broker=broker, queue_name=name, actor_name=ACTOR)


@dataclass
class Dramatiq:
    """dramatiq on one broker; ``join``: wait (Redis) until the broker has every ack."""

    broker: Callable[[], dramatiq.Broker]
    join: bool

    def publish(self, name: str, count: int) -> Timing:
        broker = self.broker()
        actor = dramatiq_actor(broker, name, lambda text: None)
        try:
            started = now()
            for _ in range(count):
                actor.send(TEXT)
            return since(started)
        finally:
            broker.close()

    def consume(self, name: str, count: int) -> Timing:
        broker = self.broker()
        counter = Counter(count)

        def count_one(text: str) -> None:
            counter.received()
            counter.ack(1)  # the worker acks once this returns

        dramatiq_actor(broker, name, count_one)
        worker = dramatiq.Worker(broker)
        worker.start()
        try:
            elapsed = counter.result("dramatiq")
            if self.join:
                broker.join(name, interval=5)
                assert counter.started is not None
                elapsed = since(counter.started)
            return elapsed
        finally:
            worker.stop()
            broker.close()


def dramatiq_redis() -> dramatiq.Broker:
    return DramatiqRedisBroker(url=servers.redis_url())


def dramatiq_rabbitmq() -> dramatiq.Broker:
    return RabbitmqBroker(url=servers.rabbitmq_url(), confirm_delivery=True)


# -- FastStream -----------------------------------------------------------------------


def serve(broker: Any, counter: Counter) -> Timing:
    """Run ``broker`` (its subscriber registered) until ``counter`` has every ack."""

    async def run() -> None:
        async with broker:
            await broker.start()
            await asyncio.to_thread(counter.done.wait, DEADLINE)

    asyncio.run(run())
    return counter.result("FastStream")


def faststream_kafka_broker(module: Any) -> Any:
    options: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "logger": None}
    if module is faststream_kafka:  # aiokafka: a batch call is one batch, so a chunk must fit
        options["max_batch_size"] = 1 << 20
    return module.KafkaBroker(servers.kafka_bootstrap(), **options)


def faststream_kafka_publish(module: Any, name: str, count: int) -> Timing:
    broker = faststream_kafka_broker(module)

    async def publish() -> Timing:
        async with broker:
            started = now()
            for start in range(0, count, CHUNK):
                await broker.publish_batch(*[BODY] * min(CHUNK, count - start), topic=name)
            return since(started)

    return asyncio.run(publish())


def faststream_kafka_consume(module: Any, name: str, count: int) -> Timing:
    broker = faststream_kafka_broker(module)
    counter = Counter(count)

    @broker.subscriber(
        name,
        group_id=GROUP,
        auto_offset_reset="earliest",
        batch=True,
        max_records=CHUNK,
        ack_policy=AckPolicy.MANUAL,
    )
    async def handle(body: list[bytes], msg: Message) -> None:
        counter.received()
        await msg.ack()
        counter.ack(len(body))

    return serve(broker, counter)


def faststream_redis_publish(name: str, count: int) -> Timing:
    async def publish() -> Timing:
        async with RedisBroker(servers.redis_url(), logger=None) as broker:
            client = await broker.connect()
            started = now()
            for start in range(0, count, CHUNK):
                async with client.pipeline(transaction=False) as pipe:
                    for _ in range(min(CHUNK, count - start)):
                        await broker.publish(BODY, stream=name, pipeline=pipe)
                    await pipe.execute()
            return since(started)

    return asyncio.run(publish())


def faststream_redis_consume(name: str, count: int) -> Timing:
    broker = RedisBroker(servers.redis_url(), logger=None)
    counter = Counter(count)
    stream = StreamSub(name, group=GROUP, consumer="c", batch=True, max_records=CHUNK)

    @broker.subscriber(stream=stream, ack_policy=AckPolicy.MANUAL)
    async def handle(body: list[bytes], msg: Message) -> None:
        counter.received()
        await msg.ack()
        counter.ack(len(body))

    return serve(broker, counter)


def redis_group(name: str) -> None:
    """The stream and its group, made before publishing, as polybus's ``declare`` does."""
    import redis

    with redis.Redis.from_url(servers.redis_url()) as client:
        client.xgroup_create(name, GROUP, id="0", mkstream=True)


def quorum_queue(name: str) -> RabbitQueue:
    return RabbitQueue(name, queue_type=QueueType.QUORUM)


def faststream_rabbit_publish(name: str, count: int) -> Timing:
    queue = quorum_queue(name)

    async def publish() -> Timing:
        async with RabbitBroker(servers.rabbitmq_url(), logger=None) as broker:
            await broker.declare_queue(queue)
            started = now()
            for start in range(0, count, CHUNK):
                await asyncio.gather(
                    *(
                        broker.publish(BODY, queue=queue, persist=True)
                        for _ in range(min(CHUNK, count - start))
                    )
                )
            return since(started)

    return asyncio.run(publish())


def faststream_rabbit_consume(name: str, count: int) -> Timing:
    broker = RabbitBroker(servers.rabbitmq_url(), logger=None)
    counter = Counter(count)

    @broker.subscriber(
        quorum_queue(name), channel=Channel(prefetch_count=CHUNK), ack_policy=AckPolicy.MANUAL
    )
    async def handle(body: bytes, msg: Message) -> None:
        counter.received()
        await msg.ack()
        counter.ack(1)

    return serve(broker, counter)


# -- The cases ------------------------------------------------------------------------


def nothing(name: str) -> None:
    pass


@dataclass
class Library:
    """One library on one backend: publish and consume ``count`` messages on ``name``."""

    name: str
    publish: Callable[[str, int], Timing]
    consume: Callable[[str, int], Timing]
    setup: Callable[[str], None] = nothing
    cleanup: Callable[[str], None] = nothing
    floor: float = 1.0  #: the target: polybus's msg/s at least this times this library's


@dataclass
class Backend:
    name: str
    unavailable: Callable[[], str | None]
    libraries: list[Library]  #: polybus first
    start: str = "`make services` starts it"


def polybus_library(url: Callable[[], str], cleanup: Callable[[str], None]) -> Library:
    return Library(
        "polybus",
        lambda name, count: bus_publish(url(), name, count, CHUNK),
        lambda name, count: bus_consume(url(), name, count),
        cleanup=cleanup,
    )


def redis_backend() -> Backend:
    kombu_redis = Kombu(servers.redis_url, {}, {}, ack_every=1)
    dramatiq_on_redis = Dramatiq(dramatiq_redis, join=True)
    return Backend(
        "redis",
        servers.redis_unavailable,
        [
            polybus_library(servers.redis_url, servers.redis_delete_topic),
            Library(
                "redis-py",
                lambda name, count: redis_raw_publish(name, count, CHUNK),
                redis_raw_consume,
                redis_setup,
                servers.redis_delete_topic,
            ),
            Library(
                "kombu", kombu_redis.publish, kombu_redis.consume, nothing, kombu_redis.cleanup
            ),
            Library(
                "dramatiq",
                dramatiq_on_redis.publish,
                dramatiq_on_redis.consume,
                cleanup=lambda name: redis_delete(f"dramatiq:*{name}*"),
            ),
            Library(
                "FastStream",
                faststream_redis_publish,
                faststream_redis_consume,
                redis_group,
                redis_delete,
            ),
        ],
    )


def rabbitmq_backend() -> Backend:
    kombu_amqp = Kombu(servers.rabbitmq_url, {"confirm_publish": True}, QUORUM, ack_every=100)
    dramatiq_on_rabbitmq = Dramatiq(dramatiq_rabbitmq, join=False)
    return Backend(
        "rabbitmq",
        servers.rabbitmq_unavailable,
        [
            polybus_library(
                servers.rabbitmq_url, lambda name: servers.rabbitmq_delete_topic(name, (GROUP,))
            ),
            Library(
                "pika",
                lambda name, count: rabbit_raw_publish(name, count, CHUNK),
                rabbit_raw_consume,
                rabbit_setup,
                lambda name: servers.rabbitmq_delete_topic(name, (GROUP,)),
            ),
            Library("kombu", kombu_amqp.publish, kombu_amqp.consume, nothing, kombu_amqp.cleanup),
            Library(
                "dramatiq",
                dramatiq_on_rabbitmq.publish,
                dramatiq_on_rabbitmq.consume,
                cleanup=lambda name: rabbit_delete([name, f"{name}.DQ", f"{name}.XQ"]),
            ),
            Library(
                "FastStream",
                faststream_rabbit_publish,
                faststream_rabbit_consume,
                cleanup=lambda name: rabbit_delete([name]),
            ),
        ],
    )


def kafka_backend() -> Backend:
    def faststream(label: str, module: Any) -> Library:
        return Library(
            f"FastStream ({label})",
            lambda name, count: faststream_kafka_publish(module, name, count),
            lambda name, count: faststream_kafka_consume(module, name, count),
            kafka_setup,
            kafka_delete,
        )

    return Backend(
        "kafka",
        servers.kafka_unavailable,
        [
            polybus_library(lambda: f"kafka://{servers.kafka_bootstrap()}", kafka_delete),
            Library(
                "confluent-kafka",
                lambda name, count: kafka_raw_publish(name, count, CHUNK),
                kafka_raw_consume,
                kafka_setup,
                kafka_delete,
                floor=1 / KAFKA_RAW_LIMIT,
            ),
            faststream("aiokafka", faststream_kafka),
            faststream("confluent", faststream_confluent),
        ],
        "`make kafka` runs one on 127.0.0.1:9092 (then POLYBUS_KAFKA_BOOTSTRAP=127.0.0.1:9092)",
    )


BACKENDS = {"kafka": kafka_backend, "rabbitmq": rabbitmq_backend, "redis": redis_backend}

# -- Running and reporting ----------------------------------------------------------

#: per library, per phase ("publish", "consume"): msg/s per round (None where it failed)
Rates = dict[str, dict[str, list[float | None]]]


def run_case(library: Library, count: int) -> tuple[float, float]:
    name = fresh(library.name)
    library.setup(name)
    try:
        publish = library.publish(name, count)
        consume = library.consume(name, count)
    finally:
        library.cleanup(name)
    return count / publish.wall, count / consume.wall


def measure(backend: Backend, count: int, rounds: int) -> tuple[Rates, bool]:
    libraries = backend.libraries
    rates: Rates = {lib.name: {"publish": [], "consume": []} for lib in libraries}
    failed = False
    for r in range(rounds):
        shift = r % len(libraries)
        for library in libraries[shift:] + libraries[:shift]:
            print(f"  {backend.name} round {r + 1}: {library.name}", file=sys.stderr)
            publish: float | None = None
            consume: float | None = None
            try:
                publish, consume = run_case(library, count)
            except Exception as exc:  # report the case and go on with the others
                failed = True
                print(f"{backend.name} {library.name}: FAILED {exc!r}", file=sys.stderr)
            rates[library.name]["publish"].append(publish)
            rates[library.name]["consume"].append(consume)
    return rates, failed


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(ours: list[float | None], theirs: list[float | None]) -> list[float]:
    """polybus's msg/s over the library's, per round where both ran."""
    return [a / b for a, b in zip(ours, theirs, strict=True) if a is not None and b is not None]


def summary(backend: Backend, rates: Rates) -> dict[str, Any]:
    ours = rates["polybus"]
    rows: dict[str, Any] = {}
    for library in backend.libraries:
        row: dict[str, Any] = {"floor": library.floor}
        for phase in ("publish", "consume"):
            done = [v for v in rates[library.name][phase] if v is not None]
            row[phase] = {"rounds": rates[library.name][phase]}
            if done:
                row[phase]["msg_s"] = spread(done)
            if library.name != "polybus" and (
                both := ratios(ours[phase], rates[library.name][phase])
            ):
                row[phase]["polybus_ratio"] = spread(both)
        rows[library.name] = row
    return rows


def cell(values: dict[str, float] | None, fmt: str) -> str:
    if values is None:
        return "failed"
    return f"{values['median']:{fmt}} ({values['min']:{fmt}}-{values['max']:{fmt}})"


def ratio_cell(row: dict[str, Any], phase: str) -> str:
    if "polybus_ratio" not in row[phase]:
        return ""
    ratio = row[phase]["polybus_ratio"]
    return cell(ratio, ".2f") + ("  " if ratio["median"] >= row["floor"] else " ✗")


def print_table(backend: Backend, rows: dict[str, Any], count: int, rounds: int) -> None:
    print(
        f"\n{backend.name}: {count:,} messages of {len(PAYLOAD)} bytes, {rounds} rounds; "
        "msg/s: median (min-max); polybus ÷: polybus's msg/s over the library's, per round"
    )
    print(
        f"{'':22}{'publish msg/s':>30}  {'polybus ÷':>22}  {'consume msg/s':>30}  {'polybus ÷':>22}"
    )
    for name, row in rows.items():
        print(
            f"{name:22}{cell(row['publish'].get('msg_s'), ',.0f'):>30}  "
            f"{ratio_cell(row, 'publish'):>22}  "
            f"{cell(row['consume'].get('msg_s'), ',.0f'):>30}  {ratio_cell(row, 'consume'):>22}"
        )
    others = "".join(
        f", {lib.name} ≥ {lib.floor:.2f}" for lib in backend.libraries[1:] if lib.floor != 1
    )
    print(f"target: polybus ÷ ≥ 1.00{others}, publish and consume (✗: the median misses)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    if unknown := set(args.backends.split(",")) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    results: dict[str, Any] = {"count": args.count, "rounds": args.rounds, "backends": {}}
    failed = False
    for name in args.backends.split(","):
        backend = BACKENDS[name]()
        reason = backend.unavailable()
        if reason:
            print(f"{name}: skipped ({reason}; {backend.start})", file=sys.stderr)
            continue
        rates, backend_failed = measure(backend, args.count, args.rounds)
        failed |= backend_failed
        rows = summary(backend, rates)
        results["backends"][name] = rows
        print_table(backend, rows, args.count, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
