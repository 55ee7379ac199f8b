"""The conformance suite: what every backend must do the same way.

Import these tests into a test module (``from polybus.testing.conformance
import *``) with the fixtures of :mod:`polybus.testing.plugin` registered.
A backend that lacks a capability skips the tests that need it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import pytest

import polybus
from polybus import (
    Capability,
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    Delivery,
    Message,
    Subscriber,
)
from polybus.testing.plugin import Proxied

__all__ = [
    "test_closed_objects_raise",
    "test_competing_consumers_share_without_loss_or_duplication",
    "test_consumer_resumes_after_connection_cut",
    "test_declare_is_idempotent_and_names_a_mismatch",
    "test_declaring_one_new_topic_from_several_buses_at_once",
    "test_delay_holds_back_one_message_without_blocking_others",
    "test_durable_group_resumes_where_it_left_off",
    "test_empty_fetch_returns_within_timeout",
    "test_ephemeral_subscriber_sees_only_new_messages_and_vanishes",
    "test_every_group_gets_every_message",
    "test_lag_counts_uncommitted_messages",
    "test_nack_redelivers_and_drop_does_not",
    "test_per_key_order",
    "test_publish_fails_clearly_past_the_reconnect_deadline",
    "test_publish_survives_connection_cuts",
    "test_round_trip_keeps_value_key_headers_and_envelope",
    "test_seek_replays",
    "test_stats_show_end_offsets_and_each_groups_lag",
    "test_tombstones_arrive_without_a_value_or_are_refused",
    "test_topic_and_group_names_follow_one_rule",
]

Connect = Callable[[], polybus.Bus]
DEADLINE = 20.0  # seconds any single wait may take before the test fails


def drain(
    sub: Subscriber, count: int, *, ack: bool = True, deadline: float = DEADLINE
) -> list[Delivery]:
    """Fetch until ``count`` deliveries arrived (acking them) or the deadline passes."""
    out: list[Delivery] = []
    end = time.monotonic() + deadline
    while len(out) < count and time.monotonic() < end:
        batch = sub.fetch(count - len(out), timeout=0.2)
        if ack:
            for d in batch:
                d.ack()
        out.extend(batch)
    return out


def publish_retrying(bus: polybus.Bus, topic: str, messages: list[Any]) -> None:
    """Publish ``messages``, retrying after ConnectionLost (at-least-once) until DEADLINE."""
    end = time.monotonic() + DEADLINE
    while True:
        try:
            bus.publish_many(topic, messages)
            return
        except ConnectionLost:
            assert time.monotonic() < end, "publishing never recovered"


def require(bus: polybus.Bus, capability: Capability) -> None:
    if capability not in bus.capabilities:
        pytest.skip(f"backend lacks {capability.name}")


def test_round_trip_keeps_value_key_headers_and_envelope(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    sent = [
        Message({"order": 1, "items": ["a", "b"]}, key="customer-1", headers={"source": "shop"}),
        Message(b"\x00\xffraw", key=b"\x01bin"),
        Message("text ünïcode", correlation_id="corr-1", causation_id="cause-1"),
        Message([1, 2.5, None], content_type="application/msgpack"),
    ]
    receipts = bus.publish_many(topic, sent)
    assert len(receipts) == len(sent)
    assert all(r.topic == topic for r in receipts)
    with bus.subscribe(topic, "g") as sub:
        got = {d.message.id: d for d in drain(sub, len(sent))}
    assert set(got) == {m.id for m in sent}
    for m in sent:
        d = got[m.id]
        assert d.value == m.value  # decoded from the record, before the message is built
        assert d.message.value == m.value
        assert d.message.key == m.key
        assert d.message.headers == m.headers
        assert d.message.correlation_id == m.correlation_id
        assert d.message.causation_id == m.causation_id
        assert abs(d.message.timestamp - m.timestamp) < 0.002
        assert d.topic == topic
        assert d.group == "g"
        assert d.attempt == 1
        assert d.record is d  # one object from the backend's batch to the handler
    assert got[sent[1].id].payload == b"\x00\xffraw"


@pytest.mark.parametrize("bad", ["bad topic/name*", "", ".hidden", "x" * 201, "café"])
def test_topic_and_group_names_follow_one_rule(connect: Connect, topic: str, bad: str) -> None:
    """The same names are refused on every backend, so code moved between them works."""
    bus = connect()
    with pytest.raises(ConfigurationError, match="invalid topic name"):
        bus.declare(bad)
    with pytest.raises(ConfigurationError, match="invalid topic name"):
        bus.publish(bad, "x")
    with pytest.raises(ConfigurationError, match="invalid group name"):
        bus.declare(topic, groups=[bad])
    with pytest.raises(ConfigurationError, match="invalid group name"):
        bus.subscribe(topic, bad)


def test_tombstones_arrive_without_a_value_or_are_refused(connect: Connect, topic: str) -> None:
    """A tombstone (a key without a value) reaches consumers in order, with value None, on
    a backend with compacted topics; elsewhere it is refused and nothing is stored."""
    bus = connect()
    bus.declare(topic, groups=["g"])
    if Capability.COMPACTION not in bus.capabilities:
        with pytest.raises(CapabilityError, match="tombstone"):
            bus.tombstone(topic, "k")
        bus.publish(topic, "after", key="k")
        with bus.subscribe(topic, "g") as sub:
            assert [d.value for d in drain(sub, 1)] == ["after"]
            assert sub.fetch(10, timeout=0.3) == []
        return
    bus.publish(topic, {"v": 1}, key="k")
    receipt = bus.tombstone(topic, "k", headers={"why": "deleted"})
    assert receipt.topic == topic
    bus.publish(topic, {"v": 2}, key="k")
    with bus.subscribe(topic, "g") as sub:
        got = drain(sub, 3)
    assert [d.value for d in got] == [{"v": 1}, None, {"v": 2}]
    tombstone = got[1].message
    assert (tombstone.key, tombstone.value, tombstone.payload) == ("k", None, None)
    assert tombstone.headers == {"why": "deleted"}
    with pytest.raises(ConfigurationError, match="key"):
        bus.tombstone(topic, None)  # type: ignore[arg-type]


def test_per_key_order(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=4, groups=["g"])
    keys = [f"k{i}" for i in range(7)]
    for n in range(30):
        bus.publish_many(topic, [Message({"n": n}, key=k) for k in keys])
    with bus.subscribe(topic, "g") as sub:
        got = drain(sub, 30 * len(keys))
    seen: dict[str, list[int]] = defaultdict(list)
    for d in got:
        assert isinstance(d.message.key, str)
        seen[d.message.key].append(d.message.value["n"])
    assert seen == {k: list(range(30)) for k in keys}


def test_competing_consumers_share_without_loss_or_duplication(
    connect: Connect, topic: str
) -> None:
    publisher = connect()
    publisher.declare(topic, partitions=4, groups=["workers"])
    subs = [connect().subscribe(topic, "workers", session_timeout=2.0) for _ in range(3)]
    got: dict[int, list[int]] = {i: [] for i in range(len(subs))}
    sent = 0
    end = time.monotonic() + DEADLINE
    # keep publishing until every member has had work: the group may still be rebalancing
    while time.monotonic() < end and (sent < 300 or not all(got.values())):
        publisher.publish_many(topic, [Message(sent + i, key=f"k{sent + i}") for i in range(10)])
        sent += 10
        for i, sub in enumerate(subs):
            for d in sub.fetch(50, timeout=0.02):
                got[i].append(d.message.value)
                d.ack()
    while sum(map(len, got.values())) < sent and time.monotonic() < end:
        for i, sub in enumerate(subs):
            for d in sub.fetch(100, timeout=0.05):
                got[i].append(d.message.value)
                d.ack()
    everything = [v for values in got.values() for v in values]
    duplicates = [v for v, c in Counter(everything).items() if c > 1]
    assert not duplicates, f"delivered more than once: {duplicates[:10]}"
    assert sorted(everything) == list(range(sent)), "messages were lost"
    assert all(got.values()), f"a member got no work: { {i: len(v) for i, v in got.items()} }"


def test_every_group_gets_every_message(connect: Connect, topic: str) -> None:
    bus = connect()
    groups = ["billing", "shipping", "email"]
    bus.declare(topic, partitions=2, groups=groups)
    bus.publish_many(topic, [Message(i, key=str(i)) for i in range(50)])
    for group in groups:
        with connect().subscribe(topic, group) as sub:
            values = sorted(d.message.value for d in drain(sub, 50))
        assert values == list(range(50)), group


def test_durable_group_resumes_where_it_left_off(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    bus.publish_many(topic, list(range(10)))
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 4)
        sub.fetch(1, timeout=0.0)  # fetched but neither acked nor nacked: must come back
    assert [d.message.value for d in first] == [0, 1, 2, 3]
    bus.publish_many(topic, list(range(10, 15)))
    with connect().subscribe(topic, "g") as sub:
        rest = drain(sub, 11)
        assert sub.fetch(10, timeout=0.3) == []
    assert [d.message.value for d in rest] == list(range(4, 15))


def test_ephemeral_subscriber_sees_only_new_messages_and_vanishes(
    connect: Connect, topic: str
) -> None:
    bus = connect()
    bus.declare(topic, partitions=2)
    bus.publish(topic, "before")
    with bus.subscribe(topic) as sub:
        assert sub.group is None
        bus.publish_many(topic, ["after-1", "after-2"])
        assert sorted(d.message.value for d in drain(sub, 2)) == ["after-1", "after-2"]
    with connect().subscribe(topic) as again:
        bus.publish(topic, "later")
        got = drain(again, 1)
        assert [d.message.value for d in got] == ["later"]
        assert again.fetch(10, timeout=0.2) == []


def test_nack_redelivers_and_drop_does_not(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    bus.publish_many(topic, ["retry-me", "drop-me", "fine"])
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 3, ack=False)
        by_value = {d.message.value: d for d in first}
        by_value["retry-me"].nack()
        by_value["drop-me"].nack(requeue=False)
        by_value["fine"].ack()
        again = drain(sub, 1)
        assert [(d.message.value, d.attempt) for d in again] == [("retry-me", 2)]
        assert again[0].message.id == by_value["retry-me"].message.id
        assert sub.fetch(10, timeout=0.3) == []
    bus.publish(topic, "marker")
    with bus.subscribe(topic, "g") as sub:  # the redelivery's ack counted: it does not return
        assert [d.message.value for d in drain(sub, 1)] == ["marker"]


def test_seek_replays(connect: Connect, topic: str) -> None:
    bus = connect()
    require(bus, Capability.SEEK)
    bus.declare(topic, partitions=1, groups=["g"])
    bus.publish_many(topic, list(range(5)))
    time.sleep(0.005)  # timestamps are in ms: make "after" strictly later than "before"
    middle = time.time()
    time.sleep(0.005)
    bus.publish_many(topic, list(range(5, 10)))
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 10)
        assert [d.message.value for d in first] == list(range(10))
        sub.seek(0, offset=first[3].offset)
        assert [d.message.value for d in drain(sub, 7)] == list(range(3, 10))
        if Capability.SEEK_TIME in bus.capabilities:
            sub.seek(0, timestamp=middle)
            assert [d.message.value for d in drain(sub, 5)] == list(range(5, 10))


def test_delay_holds_back_one_message_without_blocking_others(connect: Connect, topic: str) -> None:
    bus = connect()
    require(bus, Capability.DELAY)
    bus.declare(topic, partitions=1, groups=["g"])
    sent_at = time.time()
    bus.publish(topic, "later", delay=0.5)
    bus.publish(topic, "now")
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 1)
        assert [d.message.value for d in first] == ["now"]
        second = drain(sub, 1)
        assert [d.message.value for d in second] == ["later"]
        assert time.time() - sent_at >= 0.5


def test_lag_counts_uncommitted_messages(connect: Connect, topic: str) -> None:
    bus = connect()
    require(bus, Capability.LAG)
    bus.declare(topic, partitions=1, groups=["g"])
    bus.publish_many(topic, list(range(8)))
    sub = bus.subscribe(topic, "g")
    assert sub.lag() == {0: 8}
    drain(sub, 5)
    sub.close()
    with bus.subscribe(topic, "g") as again:
        assert again.lag() == {0: 3}


def test_stats_show_end_offsets_and_each_groups_lag(connect: Connect, topic: str) -> None:
    """``Bus.stats`` reads, without joining a group, how many messages a topic got (where
    the backend keeps count: None, never a made-up 0, where it does not) and how many
    each durable group has not acked; a bus that used neither finds them by name."""
    bus = connect()
    bus.declare(topic, partitions=2, groups=["g", "idle"])
    bus.publish_many(topic, list(range(10)))
    with bus.subscribe(topic, "g") as sub:
        assert len(drain(sub, 4)) == 4
    # closing committed the 4 acks and handed back what was prefetched; a broker may
    # show the commit a moment later, so ask until it does
    observer = connect()
    expected = {"g": 6, "idle": 10}
    end = time.monotonic() + DEADLINE
    while True:
        stats = observer.stats([topic], ["g", "idle"])
        found = stats.topics[topic]
        lags = {name: group.total_lag for name, group in found.groups.items()}
        if lags == expected or time.monotonic() > end:
            break
        time.sleep(0.1)
    assert lags == expected
    assert all(len(group.lag) == len(found.partitions) for group in found.groups.values())
    assert found.end_offset in (10, None)
    if found.end_offset is None:  # unknown is unknown everywhere, not a partial sum
        assert {p.end_offset for p in found.partitions} == {None}
    listed = bus.stats().topics[topic]  # unnamed: every topic it can list, or it used
    assert set(listed.groups) == {"g", "idle"}
    assert listed.end_offset == found.end_offset
    assert observer.stats([f"{topic}-missing"]).topics == {}


def test_empty_fetch_returns_within_timeout(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, groups=["g"])
    with bus.subscribe(topic, "g") as sub:
        started = time.monotonic()
        assert sub.fetch(10, timeout=0.3) == []
        elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 2.0


def test_closed_objects_raise(connect: Connect, topic: str) -> None:
    bus = connect()
    sub = bus.subscribe(topic, "g")
    sub.close()
    sub.close()  # idempotent
    with pytest.raises(ClosedError, match="closed"):
        sub.fetch(1, timeout=0)
    bus.close()
    bus.close()
    with pytest.raises(ClosedError, match="closed"):
        bus.publish(topic, "x")
    with pytest.raises(ClosedError, match="closed"):
        bus.subscribe(topic, "g")


def test_declare_is_idempotent_and_names_a_mismatch(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=2, groups=["g"])
    bus.declare(topic, partitions=2, groups=["g"])
    bus.declare(topic, groups=["g", "h"])  # partitions=None: as the topic exists
    with pytest.raises(ConfigurationError, match="partitions") as err:
        connect().declare(topic, partitions=3)
    assert "2" in str(err.value)
    assert "3" in str(err.value)
    bus.publish(topic, "still works")
    with bus.subscribe(topic, "g") as sub:
        assert [d.message.value for d in drain(sub, 1)] == ["still works"]


def test_declaring_one_new_topic_from_several_buses_at_once(connect: Connect, topic: str) -> None:
    """Services starting together each declare the topic and group they use: every one
    succeeds, and the group gets what was published meanwhile, once."""
    buses = [connect() for _ in range(4)]
    start = threading.Barrier(len(buses))
    errors: list[BaseException] = []

    def declare(bus: polybus.Bus) -> None:
        start.wait()
        try:
            bus.declare(topic, partitions=2, groups=["g"])
            bus.publish(topic, "declared")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(bus,)) for bus in buses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
    assert errors == []
    with buses[0].subscribe(topic, "g") as sub:
        assert [d.message.value for d in drain(sub, 4)] == ["declared"] * 4
        assert sub.fetch(10, timeout=0.3) == []


def _publish_through_cuts(
    bus: polybus.Bus, topic: str, batches: int, cut: Callable[[], None]
) -> set[str]:
    """Publish ``batches`` batches of 10, calling ``cut()`` after some; retry a batch that
    raised ConnectionLost. Returns the ids the bus acknowledged."""
    acked: set[str] = set()
    for b in range(batches):
        batch = [Message({"batch": b, "i": i}, key=f"k{i}") for i in range(10)]
        publish_retrying(bus, topic, batch)
        acked.update(m.id for m in batch)
        if b in (3, 9, 10):
            cut()
    return acked


def test_publish_survives_connection_cuts(proxied: Proxied, topic: str) -> None:
    bus = proxied.connect(reconnect_timeout=15)
    bus.declare(topic, partitions=2, groups=["g"])
    acked = _publish_through_cuts(bus, topic, 15, proxied.proxy.cut)
    assert proxied.proxy.connections > 1, "the cuts did not force a reconnect"
    with bus.subscribe(topic, "g") as sub:
        seen: set[str] = set()
        end = time.monotonic() + DEADLINE
        while not acked <= seen and time.monotonic() < end:
            seen.update(d.message.id for d in drain(sub, len(acked), deadline=1.0))
    lost = acked - seen
    assert not lost, f"{len(lost)} acknowledged messages were lost"


def test_consumer_resumes_after_connection_cut(proxied: Proxied, topic: str) -> None:
    bus = proxied.connect(reconnect_timeout=15)
    bus.declare(topic, partitions=2, groups=["g"])
    bus.publish_many(topic, [Message(i, key=f"k{i}") for i in range(100)])
    seen: Counter[int] = Counter()
    with bus.subscribe(topic, "g", session_timeout=6.0) as sub:
        for d in drain(sub, 30):
            seen[d.message.value] += 1
        proxied.proxy.cut()
        end = time.monotonic() + 2 * DEADLINE
        while len(seen) < 100 and time.monotonic() < end:
            try:
                batch = sub.fetch(100, timeout=0.5)
            except ConnectionLost:
                continue  # allowed while the broker is unreachable; the next fetch retries
            for d in batch:
                seen[d.message.value] += 1
                d.ack()
    assert sorted(seen) == list(range(100)), f"lost: {sorted(set(range(100)) - set(seen))[:10]}"
    assert proxied.proxy.connections > 1


def test_publish_fails_clearly_past_the_reconnect_deadline(proxied: Proxied, topic: str) -> None:
    bus = proxied.connect(reconnect_timeout=2)
    bus.declare(topic, partitions=1, groups=["g"])
    bus.publish(topic, "before")
    proxied.proxy.block()
    started = time.monotonic()
    with pytest.raises(ConnectionLost):
        bus.publish(topic, "while down")
    assert time.monotonic() - started < 2 + 10, "publish hung past its reconnect deadline"
    proxied.proxy.unblock()
    publish_retrying(bus, topic, ["after"])
    with bus.subscribe(topic, "g") as sub:
        values: list[str] = []
        while "after" not in values and len(values) < 3:
            batch = drain(sub, 1)
            assert batch, f"'after' never arrived; got {values}"
            values.extend(d.message.value for d in batch)
    # a publish that raised ConnectionLost may or may not have been stored
    assert values in (["before", "after"], ["before", "while down", "after"])
