"""Session load + save through the SessionManager on every store, by hand on raw Redis and Kafka.

One request's worth of session work, repeated: ``manager.load(id, client)``,
change one key, ``manager.save(session)`` (a compare-and-set write, every
time). The raw baseline is the same work done by hand with redis-py: ``GET``,
``json.loads``, change the key, ``json.dumps``, ``SET ... PX`` (no version
check, no index, no timeouts checked). The session holds a user id and about
200 bytes of data.

The machine is shared, so the variants of one store (raw Redis, the manager
with each codec, the engine's floor) run in turns: each round runs every
variant for ``--count`` operations, in an order that rotates from round to
round, so that all of them see the same load. Figures are the median of the
rounds with the range beside it; the Redis and Kafka ratios are taken per round. ``cpu``
is this process's CPU time per operation, which other processes disturb less
than wall time.

    python benchmarks/sessions.py [--stores memory,native,redis,kafka,rabbitmq]
        [--codecs json,msgpack] [--count 5000] [--rounds 7] [--breakdown]

Targets: Redis through the manager <= 1.3x the raw Redis time per operation;
the native store >= 50k load+save per second in one process (JSON). The native
store appends one record per save, so the engine's own single append of a
record that size is run beside it as its floor; ``--breakdown`` also runs the
store's load + save without the manager, the codec's encode + decode alone, and the
engine's append as the store makes it: under the write lock, a record of the store's size
and key, on the store's 16 MiB segments, so that its compaction is counted too.
About every 35,000 saves the native store's 16 MiB segment rolls, and the
engine compacts the log in a background thread (0.1-0.3 s here, a pass over
the keys), which takes its share of this process's CPU from the rounds it
overlaps.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from polybus.sessions import ClientInfo, SessionManager
from polybus.sessions.base import CODECS, SessionRecord
from polybus.testing import servers

CLIENT = ClientInfo("Mozilla/5.0 (X11; Linux x86_64; rv:140.0) Gecko/20100101 Firefox/140.0", "")
DATA: dict[str, Any] = {
    "cart": [{"sku": "B-1042", "qty": 1}, {"sku": "K-77", "qty": 3}],
    "prefs": {"theme": "dark", "lang": "en-GB", "tz": "Europe/London"},
    "csrf": uuid.uuid4().hex,
    "n": 0,
}


@dataclass
class Result:
    ops: float  # operations per second
    p50_us: float
    p99_us: float
    cpu_us: float  # this process's CPU time per operation (all threads)


@dataclass
class Variant:
    """One way of doing the operation: ``op(i)`` does operation ``i``."""

    name: str
    op: Callable[[int], None]
    close: Callable[[], None] = lambda: None
    results: list[Result] = field(default_factory=list)


def run(op: Callable[[int], None], start: int, count: int) -> Result:
    latencies = [0.0] * count
    perf = time.perf_counter
    cpu = time.process_time()
    started = perf()
    for i in range(count):
        t = perf()
        op(start + i)
        latencies[i] = perf() - t
    elapsed = perf() - started
    cpu = time.process_time() - cpu
    latencies.sort()
    p99 = latencies[min(count - 1, int(count * 0.99))]
    return Result(count / elapsed, statistics.median(latencies) * 1e6, p99 * 1e6, cpu / count * 1e6)


def through_manager(name: str, url: str) -> Variant:
    manager = SessionManager(url)
    session = manager.load(None, CLIENT)
    session.update(DATA)
    session = manager.login(session, "bench-user")
    sid = session.id
    last = [0]

    def op(i: int) -> None:
        s = manager.load(sid, CLIENT)
        s["n"] = i
        manager.save(s)
        last[0] = i

    def close() -> None:
        assert manager.load(sid, CLIENT)["n"] == last[0], "a save was lost"
        manager.logout(session)
        manager.close()

    return Variant(name, op, close)


def store_alone(name: str, url: str) -> Variant:
    """The store's load + save of one session, without the manager around them."""
    from polybus.sessions import open_store

    store = open_store(url)
    manager = SessionManager(store)
    session = manager.login(manager.load(None, CLIENT), "bench-user")
    stored = manager.store.load(session.record().id)
    assert stored is not None
    record = stored._replace(data=dict(DATA))
    version = [stored.version]

    def op(i: int) -> None:
        current = store.load(record.id)
        assert current is not None
        version[0] += 1
        store.save(record._replace(version=version[0]))

    return Variant(name, op, store.close)


def codec_alone(codec: str) -> Variant:
    """Encode + decode of the session's record: the codec's share of a load + save."""
    c = CODECS[codec]
    now = time.time()
    record = SessionRecord(
        "ab12." + "0" * 64, "bench-user", 1, now, now, now + 1800, CLIENT, None, dict(DATA)
    )

    def op(i: int) -> None:
        c.decode(c.encode(record))

    return Variant(f"{codec} encode + decode alone", op)


def engine_append(path: str) -> Variant:
    """The native store's floor: one append of a session-sized record per operation."""
    from polybus.log import Log

    log = Log(path)
    partition = log.create_topic("floor", 1, compact=True).partitions[0]
    value = json.dumps({"user": "bench-user", **DATA}).encode()
    key = b"k" * 48

    def op(i: int) -> None:
        partition.append(value, key=key)

    return Variant("engine append alone", op, log.close)


def engine_cas(path: str) -> Variant:
    """The engine's part of every native save, as the store does it: under the partition's
    write lock (``exclusive``), one ``append_encoded`` of a session record with its key, on
    a compacted topic with the store's segment size (so compaction runs after each roll,
    in a background thread, as it does for the store); no view, codec or version check."""
    from polybus.log import Log, encode_one
    from polybus.sessions.base import store_key
    from polybus.sessions.stores.native import _SEGMENT_BYTES

    log = Log(path)
    p = log.create_topic("cas", 1, segment_bytes=_SEGMENT_BYTES, compact=True).partitions[0]
    now = time.time()
    key = store_key(uuid.uuid4().hex)
    payload = CODECS["json"].encode(
        SessionRecord(key, "bench-user", 1, now, now, now + 1800, CLIENT, None, dict(DATA))
    )
    key_bytes = key.encode()

    def op(i: int) -> None:
        with p.exclusive() as end:
            p.append_encoded(encode_one(end, payload, key_bytes, None, time.time_ns() // 10**6, 0))

    return Variant("engine append as the store", op, log.close)


def raw_redis() -> Variant:
    import redis

    client = redis.Redis.from_url(servers.redis_url())
    key = f"bench-raw:{uuid.uuid4().hex}"
    client.set(key, json.dumps({"user": "bench-user", **DATA}), px=1_800_000)

    def op(i: int) -> None:
        data = json.loads(client.get(key))  # type: ignore[arg-type]
        data["n"] = i
        client.set(key, json.dumps(data), px=1_800_000)

    def close() -> None:
        client.delete(key)
        client.close()

    return Variant("raw GET/SET JSON", op, close)


def raw_kafka() -> Variant:
    """The Kafka store's work by hand with confluent-kafka: the session read from a local
    dict (the store's view) and saved, as JSON, to a compacted topic with ``produce`` and
    ``flush`` (an idempotent ``acks=all`` producer with ``linger.ms=0``, as the store's)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    bootstrap = servers.kafka_bootstrap()
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = NewTopic(topic, 1, config={"cleanup.policy": "compact"})
    admin.create_topics([new])[topic].result()
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 0}
    )
    key = uuid.uuid4().hex
    view = {key: json.dumps({"user": "bench-user", **DATA})}

    def op(i: int) -> None:
        data = json.loads(view[key])
        data["n"] = i
        value = json.dumps(data)
        producer.produce(topic, value, key)
        producer.flush()
        view[key] = value

    def close() -> None:
        producer.flush()
        admin.delete_topics([topic])

    return Variant("raw produce+flush JSON", op, close)


def _range(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stores", default="memory,native,redis,kafka,rabbitmq")
    parser.add_argument("--codecs", default="json,msgpack")
    parser.add_argument("--count", type=int, default=5000, help="operations per variant per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--breakdown", action="store_true", help="also the store and codec alone")
    args = parser.parse_args()
    stores, codecs = args.stores.split(","), args.codecs.split(",")
    tmp = tempfile.mkdtemp(prefix="bench-sessions-")
    topic = f"bench-sessions-{uuid.uuid4().hex[:8]}"
    # (codec, a name for the variant's own log directory) -> URL
    urls: dict[str, Callable[[str, str], str]] = {
        "memory": lambda codec, _: f"memory://?codec={codec}",
        "native": lambda codec, name: f"native://{tmp}/{name}?codec={codec}",
        "redis": lambda codec, _: f"{servers.redis_url()}?prefix=bench-{topic}&codec={codec}",
        "kafka": lambda codec, _: (
            f"kafka://{servers.kafka_bootstrap()}?topic={topic}-{codec}&codec={codec}"
        ),
        "rabbitmq": lambda codec, _: (
            f"{servers.rabbitmq_url()}?topic={topic}-{codec}&codec={codec}"
        ),
    }
    unavailable: dict[str, Callable[[], str | None]] = {
        "redis": servers.redis_unavailable,
        "kafka": servers.kafka_unavailable,
        "rabbitmq": servers.rabbitmq_unavailable,
    }
    # the network stores that wait for a broker on every save run fewer operations
    divisor = {"kafka": 40, "rabbitmq": 10}
    report: list[tuple[str, Variant]] = []
    ratios: dict[str, list[tuple[float, float]]] = {}  # codec -> per round (mean, p50) ratios
    try:
        for store in stores:
            why = unavailable.get(store, lambda: None)()
            if why:
                print(f"{store}: skipped ({why})")
                continue
            variants: list[Variant] = []
            if store == "redis":
                variants.append(raw_redis())
            if store == "kafka":
                variants.append(raw_kafka())
            if store == "native":
                variants.append(engine_append(f"{tmp}/floor"))
                if args.breakdown:
                    variants.append(engine_cas(f"{tmp}/cas"))
            for codec in codecs:
                url = urls[store]
                variants.append(through_manager(f"manager, {codec}", url(codec, codec)))
                if args.breakdown and store in ("memory", "native", "redis"):
                    variants.append(store_alone(f"store alone, {codec}", url(codec, f"s{codec}")))
            if args.breakdown and store == "memory":
                variants.extend(codec_alone(codec) for codec in codecs)
            count = max(1, args.count // divisor.get(store, 1))
            print(f"{store}: {len(variants)} variants in turns, {count} operations each")
            try:
                for v in variants:
                    run(v.op, 0, min(200, count))  # warm up
                for r in range(args.rounds):
                    shift = r % len(variants)
                    for v in variants[shift:] + variants[:shift]:
                        v.results.append(run(v.op, (r + 1) * count, count))
                    line = "  ".join(f"{v.name} {v.results[-1].ops:,.0f}/s" for v in variants)
                    print(f"  round {r + 1}: {line}", flush=True)
            finally:
                for v in variants:
                    v.close()
            report.extend((store, v) for v in variants)
            if store in ("redis", "kafka"):
                raw = variants[0]
                for v in variants[1:]:
                    if v.name.startswith("manager, "):
                        ratios[f"{store}, {v.name} / {raw.name}"] = [
                            (a.ops / b.ops, b.p50_us / a.p50_us)
                            for a, b in zip(raw.results, v.results, strict=True)
                        ]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if "rabbitmq" in stores and not servers.rabbitmq_unavailable():
            for codec in codecs:
                servers.rabbitmq_delete_topic(f"{topic}-{codec}", ())
    print(f"\nload + save, median [min-max] of {args.rounds} rounds:")
    print(f"{'store':9}{'variant':32}{'ops/s':>26} {'p50 us':>24} {'p99 us':>27} {'cpu us':>7}")
    for store, v in report:
        res = v.results
        print(
            f"{store:9}{v.name:32}{_range([x.ops for x in res], ',.0f'):>26} "
            f"{_range([x.p50_us for x in res], '.1f'):>24} "
            f"{_range([x.p99_us for x in res], '.1f'):>27} "
            f"{statistics.median(x.cpu_us for x in res):>7.1f}"
        )
    native = {v.name: v for store, v in report if store == "native"}
    if "engine append alone" in native:
        floor = statistics.median(x.ops for x in native["engine append alone"].results)
        cas = native.get("engine append as the store")
        for name, v in native.items():
            if name.startswith("manager, "):
                ops = statistics.median(x.ops for x in v.results)
                print(
                    f"\nnative, {name}: {ops:,.0f} load+save/s = {ops / 50_000:.2f}x the target "
                    f"(>= 50k/s); the engine's single append alone, every save's floor: "
                    f"{floor:,.0f}/s ({ops / floor:.2f}x of it)"
                )
                if cas is not None:
                    mine = statistics.median(x.cpu_us for x in v.results)
                    engine = statistics.median(x.cpu_us for x in cas.results)
                    print(
                        f"  CPU a load+save {mine:.1f} us, of which the engine's append as the "
                        f"store makes it {engine:.1f} us ({engine / mine:.0%})"
                    )
    for name, per_round in ratios.items():
        target = " (target <= 1.3)" if name.startswith("redis") else ""
        print(
            f"\n{name}, time per operation, per round: "
            f"{_range([m for m, _ in per_round], '.2f')} mean, "
            f"{_range([p for _, p in per_round], '.2f')} p50{target}"
        )


if __name__ == "__main__":
    main()
