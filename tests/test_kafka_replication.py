"""Losing a node of a three-node Apache Kafka cluster (replication factor 3,
``min.insync.replicas=2``, ``acks=all``): a partition's leader is killed with SIGKILL in
the middle of a stream of publishes; a transaction's output leader, or its group's
coordinator, in the middle of a consume → produce transaction.

Nothing acknowledged may be lost, nothing may be stored or committed twice, and readers
go on once a new leader takes over. Each test counts lost and duplicated records.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

pytest.importorskip("confluent_kafka")

import polybus
from polybus import ConnectionLost, FencedError
from polybus.testing import apache_kafka
from polybus.testing.conformance import drain
from polybus.testing.plugin import require_server

DEADLINE = 60.0  # failover: the dead node is fenced after 3 s, then leaders move


@pytest.fixture
def cluster() -> Iterator[apache_kafka.KafkaCluster]:
    require_server("Apache Kafka", apache_kafka.unavailable())
    with apache_kafka.KafkaCluster(3) as cluster:
        yield cluster


@pytest.fixture
def topic() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


def lost_and_duplicated(sent: list[int], seen: list[int]) -> tuple[set[int], list[int]]:
    """Which of ``sent`` never showed up in ``seen``, and which showed up more than once."""
    counts = Counter(seen)
    return set(sent) - set(counts), sorted(v for v, n in counts.items() if n > 1)


def read_all(bus: polybus.Bus, topic: str, until: set[int]) -> list[int]:
    """Every committed record of ``topic`` from its start, read until ``until`` are in
    and one more quiet fetch found nothing (so duplicates after them are counted too)."""
    with bus.subscribe(topic, start="earliest") as reader:
        seen: list[int] = []
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            batch = [d.message.value for d in reader.fetch(500, timeout=1.0)]
            seen.extend(batch)
            if not batch and until <= set(seen):
                break
        return seen


def test_no_acknowledged_publish_is_lost_when_the_leader_dies(
    cluster: apache_kafka.KafkaCluster, topic: str
) -> None:
    bus = polybus.connect(f"kafka://{cluster.bootstrap}")
    bus.declare(topic, partitions=1)
    live = bus.subscribe(topic)  # reads through the failover, as a service would
    acked: list[int] = []
    stop = threading.Event()

    def publish_stream() -> None:
        start = 0
        while not stop.is_set():
            batch = list(range(start, start + 20))
            start += 20
            try:
                bus.publish_many(topic, batch)
            except ConnectionLost:
                continue  # not acknowledged: may be stored or not, but at most once
            acked.extend(batch)

    publisher = threading.Thread(target=publish_stream)
    publisher.start()
    received: list[int] = []
    leader = cluster.leader(topic)
    acked_at_kill = None
    end = time.monotonic() + DEADLINE
    try:
        while time.monotonic() < end:
            received.extend(d.message.value for d in live.fetch(500, timeout=0.2))
            if acked_at_kill is None and len(acked) >= 1000:
                acked_at_kill = len(acked)
                cluster.kill(leader)
            if acked_at_kill is not None and len(acked) >= acked_at_kill + 1000:
                break  # publishing went on under the new leader
    finally:
        stop.set()
        publisher.join(DEADLINE)
    assert acked_at_kill is not None, f"only {len(acked)} publishes were acknowledged"
    assert len(acked) >= acked_at_kill + 1000, "publishing did not resume after the leader died"
    assert cluster.leader(topic) != leader
    received.extend(d.message.value for d in drain(live, len(set(acked) - set(received))))
    lost, duplicated = lost_and_duplicated(acked, received)
    assert (len(lost), duplicated) == (0, []), f"the live reader lost {sorted(lost)[:10]}"
    lost, duplicated = lost_and_duplicated(acked, read_all(bus, topic, set(acked)))
    assert (len(lost), duplicated) == (0, []), f"the log lost {sorted(lost)[:10]}"
    bus.close()


@pytest.mark.parametrize("victim", ["output leader", "group coordinator"])
def test_a_transaction_open_when_a_node_dies_commits_once_or_not_at_all(
    cluster: apache_kafka.KafkaCluster, topic: str, victim: str
) -> None:
    out, group, count = f"{topic}-out", f"g-{topic}", 600
    # A transaction stuck on a dead node gives up after reconnect_timeout + 5 s.
    bus = polybus.connect(f"kafka://{cluster.bootstrap}?reconnect_timeout=10")
    bus.declare(topic, partitions=1, groups=[group])
    bus.declare(out, partitions=1)
    bus.publish_many(topic, list(range(count)))
    sub = bus.subscribe(topic, group, session_timeout=6.0)
    transactions = failed = 0
    killed = None
    outputs = set()
    end = time.monotonic() + DEADLINE
    while len(outputs) < count and time.monotonic() < end:
        batch = sub.fetch(50, timeout=0.5)
        if not batch:
            continue
        try:
            with bus.transaction(sub) as tx:
                for d in batch:
                    tx.publish(out, d.message.value)
                    tx.ack(d)
                if killed is None and transactions == 4:  # outputs staged, nothing committed
                    killed = (
                        cluster.leader(out)
                        if victim == "output leader"
                        else cluster.coordinator(group)
                    )
                    cluster.kill(killed)
            transactions += 1
            outputs.update(d.message.value for d in batch)
        except (ConnectionLost, FencedError):
            failed += 1  # aborted: its inputs come again
    assert killed is not None, f"only {transactions} transactions committed"
    assert len(outputs) == count, f"{len(outputs)} of {count} processed, {failed} aborted"
    lost, duplicated = lost_and_duplicated(list(range(count)), read_all(bus, out, outputs))
    assert (len(lost), duplicated) == (0, []), f"lost {sorted(lost)[:10]}, {failed} aborted"
    assert sub.lag() == {0: 0}, "the inputs' offsets were not all committed"
    sub.close()
    bus.close()
