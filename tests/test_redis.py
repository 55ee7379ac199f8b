"""Redis-specific behaviour: interop with plain redis-py, key layout, claims, retention."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import polybus
from polybus import CapabilityError, ConfigurationError, ConnectionLost, Message, TopicNotFound
from polybus.cloudevents import CloudEvents, attributes
from polybus.testing import servers
from polybus.testing.plugin import require_server, with_options

redis = pytest.importorskip("redis")
from redis.cluster import RedisCluster, key_slot  # noqa: E402

from polybus.adapters import redis as adapter  # noqa: E402

DEADLINE = 20.0


def wait_for(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def url() -> str:
    require_server("redis", servers.redis_unavailable())
    return servers.redis_url()


@pytest.fixture
def prefix(url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"polybus-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def raw(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    yield client
    client.close()


@pytest.fixture
def connect(url: str, prefix: str) -> Iterator[Callable[..., polybus.Bus]]:
    buses: list[polybus.Bus] = []

    def factory(**options: object) -> polybus.Bus:
        bus = polybus.connect(with_options(url, prefix=prefix, **options))
        buses.append(bus)
        return bus

    yield factory
    for bus in reversed(buses):
        bus.close()


def stream(prefix: str, topic: str, partition: int = 0) -> str:
    return adapter.stream_key(topic, partition, prefix=prefix)


def test_plain_client_reads_value_key_and_headers(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect()
    bus.declare("orders", partitions=1)
    raw.xgroup_create(stream(prefix, "orders"), "plain", "0", mkstream=True)
    receipt = bus.publish("orders", {"n": 1}, key="c-1", headers={"source": "shop"})
    [(entry_id, fields)] = raw.xrange(stream(prefix, "orders"))
    assert entry_id.decode() == receipt.offset
    assert json.loads(fields[b"value"]) == {"n": 1}
    assert fields[b"key"] == b"c-1"
    assert fields[b"h:source"] == b"shop"
    assert fields[b"h:content-type"] == b"application/json"
    assert b"h:polybus-id" in fields
    [[_, [(read_id, read_fields)]]] = raw.xreadgroup("plain", "c", {stream(prefix, "orders"): ">"})
    assert read_id == entry_id
    assert read_fields == fields


def test_plain_entries_arrive_with_defaults(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect()
    bus.declare("plain", partitions=1, groups=["g"])
    no_layout = raw.xadd(stream(prefix, "plain"), {"order": "1", "bin": b"\xff"})
    raw.xadd(stream(prefix, "plain"), {"value": "hello", "trace": "t-1"})
    with bus.subscribe("plain", "g") as sub:
        got = []
        end = time.monotonic() + DEADLINE
        while len(got) < 2 and time.monotonic() < end:
            got += sub.fetch(10, timeout=0.2)
        for d in got:
            d.ack()
    first, second = (d.message for d in got)
    assert first.value == {"order": "1", "bin": "\\xff"}
    assert first.content_type == "application/json"
    assert first.id == f"plain/0/{no_layout.decode()}"
    assert first.key is None
    assert abs(first.timestamp - int(no_layout.split(b"-")[0]) / 1000) < 0.001
    assert second.value == b"hello"
    assert second.headers == {"trace": "t-1"}


def test_the_cloudevents_sdk_reads_through_a_plain_client_what_polybus_publishes(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    ce_kafka = pytest.importorskip("cloudevents.core.bindings.kafka")
    bus = connect()
    bus.use(CloudEvents(source="/billing", type="com.acme.invoice.created"))
    bus.declare("invoices", partitions=1)
    sent = Message({"invoice": 42}, key="invoice-42")
    bus.publish("invoices", sent)
    [(_, fields)] = raw.xrange(stream(prefix, "invoices"))
    assert fields[b"h:ce_id"] == sent.id.encode()
    headers = {f.decode()[2:]: v for f, v in fields.items() if f.startswith(b"h:")}
    # no Redis binding exists: the Kafka one's names, read by its reader
    event = ce_kafka.from_binary_event(
        ce_kafka.KafkaMessage(headers, fields[b"key"], fields[b"value"])
    )
    assert (event.get_id(), event.get_source()) == (sent.id, "/billing")
    assert (event.get_type(), event.get_subject()) == ("com.acme.invoice.created", "invoice-42")
    assert event.get_data() == {"invoice": 42}


def test_polybus_reads_a_cloudevent_a_plain_client_writes_as_fields(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect()
    bus.declare("orders", partitions=1, groups=["g"])
    fields = {
        "value": '{"o": 7}',
        "content-type": "application/json",
        "ce_specversion": "1.0",
        "ce_id": "order-7-placed",
        "ce_source": "/shop",
        "ce_type": "order.placed",
        "ce_time": "2026-03-04T05:06:07.891Z",
    }
    raw.xadd(stream(prefix, "orders"), fields)
    with bus.subscribe("orders", "g") as sub:
        [d] = sub.fetch(10, timeout=DEADLINE)
        d.ack()
    assert (d.message.id, d.value) == ("order-7-placed", {"o": 7})
    assert d.message.timestamp == 1772600767.891
    assert attributes(d)["type"] == "order.placed"


def test_connect_takes_a_client_and_leaves_it_open(url: str, raw: redis.Redis) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)  # decoding must not matter
    topic = f"objects-{uuid.uuid4().hex[:8]}"  # under the default prefix: deleted below
    try:
        bus = polybus.connect(client)
        assert isinstance(bus.backend, adapter.RedisBackend)
        bus.declare(topic, partitions=2, groups=["g"])
        bus.publish(topic, b"\x00\xff", key=b"k")
        with bus.subscribe(topic, "g") as sub:
            got: list[polybus.Delivery] = []
            wait_for(lambda: got.extend(sub.fetch(1, timeout=0.2)) or got, "the message")
            got[0].ack()
        assert got[0].message.value == b"\x00\xff"
        assert got[0].message.key == b"k"
        bus.close()
        assert client.ping()
    finally:
        client.close()
        keys = list(raw.scan_iter(match=f"polybus:{{{topic}}}:*"))
        if keys:
            raw.delete(*keys)


def test_every_key_of_a_topic_shares_one_cluster_slot(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect()
    bus.declare("slots", partitions=8, groups=["g"])
    bus.publish_many("slots", [polybus.Message(i, key=str(i)) for i in range(32)])
    bus.publish("slots", "later", delay=60)
    keys = [k.decode() for k in raw.scan_iter(match=f"{prefix}:*")]
    assert {k.rsplit(":", 1)[1] for k in keys} == {"meta", "delayed"} | {f"p{i}" for i in range(8)}
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_dead_members_records_are_claimed_after_the_visibility_timeout(
    connect: Callable[..., polybus.Bus],
) -> None:
    bus = connect()
    bus.declare("work", partitions=1, groups=["g"])
    bus.publish_many("work", ["a", "b", "c"])
    dead = connect().subscribe("work", "g", session_timeout=0.3)
    held = []
    wait_for(lambda: held.extend(dead.fetch(3, timeout=0.1)) or len(held) == 3, "the first read")
    # `dead` stops fetching and acking, as a crashed process would
    live = connect().subscribe("work", "g", session_timeout=0.3)
    claimed = []
    wait_for(lambda: claimed.extend(live.fetch(10, timeout=0.1)) or len(claimed) >= 3, "claims")
    assert [d.message.value for d in claimed] == ["a", "b", "c"]
    assert [d.attempt for d in claimed] == [2, 2, 2]
    for d in claimed:
        d.ack()
    assert live.lag() == {0: 0}


def test_records_read_ahead_go_back_to_the_group_on_close(
    connect: Callable[..., polybus.Bus],
) -> None:
    bus = connect()
    bus.declare("ahead", partitions=1, groups=["g"])
    bus.publish_many("ahead", list(range(20)))
    with bus.subscribe("ahead", "g") as first:
        batch: list[polybus.Delivery] = []
        wait_for(lambda: batch.extend(first.fetch(5 - len(batch), 0.2)) or len(batch) == 5, "5")
        for d in batch:
            d.ack()  # a full batch: the next one was asked for already
    with connect().subscribe("ahead", "g") as second:
        rest: list[polybus.Delivery] = []
        wait_for(lambda: rest.extend(second.fetch(20, 0.2)) or len(rest) >= 15, "the rest")
        assert [d.message.value for d in rest] == list(range(5, 20))
        assert second.fetch(10, timeout=0.2) == []


def test_retention_trims_by_minid(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect()
    bus.declare("short", partitions=1, retention=0.05)
    bus.publish_many("short", [f"old-{i}" for i in range(500)])
    published = time.time()
    wait_for(lambda: time.time() > published + 0.1, "the old entries to expire")
    receipt = bus.publish("short", "new")
    minid = int(receipt.offset.split("-")[0]) - 50
    entries = raw.xrange(stream(prefix, "short"))
    expired = [e for e, _ in entries if int(e.split(b"-")[0]) < minid]
    # approximate trimming (~) drops whole stream nodes: at most one node of old entries stays
    assert len(expired) < 100
    assert entries[-1][1][b"value"] == b"new"


def test_maxlen_option_caps_streams_and_is_part_of_the_declaration(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect(maxlen=100)
    bus.declare("capped", partitions=1)
    bus.publish_many("capped", list(range(2000)))
    assert raw.xlen(stream(prefix, "capped")) < 300
    with pytest.raises(ConfigurationError, match="maxlen"):
        connect(maxlen=10).declare("capped")


def test_what_redis_cannot_do_is_refused(connect: Callable[..., polybus.Bus]) -> None:
    bus = connect()
    with pytest.raises(CapabilityError, match="bytes"):
        bus.declare("t", retention_bytes=1 << 20)
    with pytest.raises(CapabilityError, match="compact"):
        bus.declare("t", compact=True)
    assert polybus.Capability.KEY_ORDER not in bus.capabilities
    assert polybus.Capability.COMPACTION not in bus.capabilities


def test_retention_mismatch_is_named(connect: Callable[..., polybus.Bus]) -> None:
    connect().declare("r", retention=60)
    with pytest.raises(ConfigurationError, match="retention_ms 60000, not 30000"):
        connect().declare("r", retention=30)
    connect().declare("r")  # no retention given: as it exists


def test_bad_urls_are_named(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option 'colour'.*known:.*prefix"):
        polybus.connect(with_options(url, colour="blue"))
    with pytest.raises(ConfigurationError, match="reconnect_timeout"):
        polybus.connect(with_options(url, reconnect_timeout="soon"))
    with pytest.raises(ConfigurationError, match="synchronous"):
        adapter.from_client(object())


def test_ephemeral_groups_vanish_and_stale_ones_are_reaped(
    connect: Callable[..., polybus.Bus], prefix: str, raw: redis.Redis
) -> None:
    bus = connect()
    bus.declare("news", partitions=2)
    key = stream(prefix, "news", 1)
    with bus.subscribe("news") as sub:
        [group] = raw.xinfo_groups(key)
        assert group["name"].startswith(b"~ephemeral:")
        assert sub.fetch(1, timeout=0) == []
    assert raw.xinfo_groups(key) == []
    # a crashed process's group: its consumer idles past the limit in its name (1 ms)
    live = bus.subscribe("news")
    raw.xgroup_create(key, "~ephemeral:1:deadbeef", "$")
    raw.xgroup_createconsumer(key, "~ephemeral:1:deadbeef", "gone")
    wait_for(lambda: raw.xinfo_consumers(key, "~ephemeral:1:deadbeef")[0]["idle"] > 1, "idling")
    connect().declare("news")
    names = [g["name"] for g in raw.xinfo_groups(key)]
    assert b"~ephemeral:1:deadbeef" not in names
    assert len(names) == 1  # the live subscriber's group stays
    live.close()


def test_undeclared_topic_and_closed_objects(url: str, prefix: str) -> None:
    backend = adapter.from_url(with_options(url, prefix=prefix))
    with pytest.raises(TopicNotFound, match="declare it first"):
        backend.publish("missing", [adapter.OutRecord(b"x")])
    backend.close()
    backend.close()
    with pytest.raises(polybus.ClosedError):
        backend.declare_topic("t", adapter.TopicSpec())


def test_error_mapping_names_the_problem() -> None:
    assert isinstance(adapter.map_error(redis.ResponseError("NOGROUP No such key")), TopicNotFound)
    wrongtype = adapter.map_error(redis.ResponseError("WRONGTYPE Operation against a key"))
    assert isinstance(wrongtype, ConfigurationError)
    assert isinstance(adapter.map_error(redis.AuthenticationError("bad")), ConfigurationError)
    assert isinstance(adapter.map_error(redis.exceptions.BusyLoadingError("x")), ConnectionLost)
    assert isinstance(adapter.map_error(redis.ResponseError("READONLY replica")), ConnectionLost)
    assert isinstance(adapter.map_error(OSError("reset")), ConnectionLost)


# -- Cluster: a one-node cluster of our own, when redis-server is installed ----------------


def start_cluster_node(binary: str, directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server in cluster mode on a free port; retries if another process took it."""
    for _ in range(5):
        port = servers.free_port()
        log = directory / f"redis-{port}.log"
        options = {
            "port": str(port),
            "bind": "127.0.0.1",
            "cluster-enabled": "yes",
            "cluster-config-file": f"nodes-{port}.conf",
            "dir": str(directory),
            "save": "",
            "appendonly": "no",
            "logfile": str(log),
        }
        proc = subprocess.Popen([binary, *(a for k, v in options.items() for a in (f"--{k}", v))])
        end = time.monotonic() + DEADLINE
        while proc.poll() is None and time.monotonic() < end:
            if servers.reachable("127.0.0.1", port, 0.2):
                return proc, port
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    pytest.fail(f"redis-server did not start: {log.read_text() if log.exists() else ''}")


@pytest.fixture
def cluster(url: str, tmp_path: Path) -> Iterator[RedisCluster]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: no Cluster test")
    proc, port = start_cluster_node(binary, tmp_path)
    try:
        node = redis.Redis(port=port)
        node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        wait_for(lambda: node.cluster("info")["cluster_state"] == "ok", "the cluster to be ok")
        node.close()
        client = RedisCluster(host="127.0.0.1", port=port)
        yield client
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_cluster_client_works(cluster: RedisCluster) -> None:
    bus = polybus.connect(cluster)
    bus.declare("c", partitions=4, groups=["g"])
    bus.publish_many("c", [polybus.Message(i, key=f"k{i}") for i in range(40)])
    bus.publish("c", "delayed", delay=0.05)
    got = []
    with bus.subscribe("c", "g") as sub:
        end = time.monotonic() + DEADLINE
        while len(got) < 41 and time.monotonic() < end:
            for d in sub.fetch(100, timeout=0.2):
                got.append(d.message.value)
                d.ack()
        assert sub.lag() == dict.fromkeys(range(4), 0)
    assert sorted(got, key=str) == sorted([*range(40), "delayed"], key=str)
    bus.close()
    assert cluster.ping()  # the client stays usable
    port = cluster.get_default_node().port
    with polybus.connect(f"redis://127.0.0.1:{port}/0?cluster=true") as by_url:
        by_url.publish("c", "by url")
        with by_url.subscribe("c", "g") as sub:
            wait_for(lambda: [d.message.value for d in sub.fetch(1, 0.2)] == ["by url"], "it")
