"""The conformance suite for transactions: consume → process → produce, exactly once.

Import these tests into a test module (``from polybus.testing.transactions
import *``) with the fixtures of :mod:`polybus.testing.plugin` registered.
Backends without ``Capability.TRANSACTIONS`` skip them, except the test that
they refuse a transaction. Only the Bus API is used.

Each test reads a second topic, ``<topic>-out``, for the transaction's outputs,
through durable group ``h`` declared before anything is published, so that it
would see every output stored.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

import polybus
from polybus import Capability, CapabilityError, ClosedError, Delivery, FencedError, Message
from polybus.testing.conformance import DEADLINE, drain, require

__all__ = [
    "test_abort_drops_outputs_and_redelivers_inputs",
    "test_backend_without_transactions_refuses_one",
    "test_commit_publishes_outputs_and_commits_inputs",
    "test_exception_in_transaction_block_aborts",
    "test_fenced_member_commit_raises_and_takes_no_effect",
]

Connect = Callable[[], polybus.Bus]
#: how long a topic that must stay empty is watched
QUIET = 0.5


def _outputs(connect: Connect, topic: str, count: int) -> list[Delivery]:
    """Every output in ``topic`` (``count`` expected), checking nothing more arrives."""
    with connect().subscribe(topic, "h") as reader:
        got = drain(reader, count)
        extra = reader.fetch(100, timeout=QUIET)
    assert not extra, f"unexpected outputs: {[d.message.value for d in extra]}"
    return got


def _declare(bus: polybus.Bus, topic: str, partitions: int, out_partitions: int) -> str:
    require(bus, Capability.TRANSACTIONS)
    out = f"{topic}-out"
    bus.declare(topic, partitions=partitions, groups=["g"])
    bus.declare(out, partitions=out_partitions, groups=["h"])
    return out


def test_backend_without_transactions_refuses_one(connect: Connect, topic: str) -> None:
    bus = connect()
    if Capability.TRANSACTIONS in bus.capabilities:
        pytest.skip("backend has TRANSACTIONS")
    with bus.subscribe(topic, "g") as sub, pytest.raises(CapabilityError, match="TRANSACTIONS"):
        bus.transaction(sub)


def test_commit_publishes_outputs_and_commits_inputs(connect: Connect, topic: str) -> None:
    """Outputs in several partitions appear once each; a new member resumes after the
    inputs the transaction acked."""
    bus = connect()
    out = _declare(bus, topic, partitions=2, out_partitions=3)
    bus.publish_many(topic, [Message(i, key=f"k{i}") for i in range(10)])
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 6, ack=False)
        assert len(first) == 6
        with bus.transaction(sub) as tx:
            for d in first:
                tx.publish(out, {"in": d.message.value}, key=d.message.key, headers={"n": "1"})
                tx.publish(out, {"in": d.message.value, "copy": 2}, key=f"copy-{d.message.value}")
                tx.ack(d)
        done = {d.message.value for d in first}
    with connect().subscribe(topic, "g") as again:
        rest = drain(again, 4)
        assert again.fetch(10, timeout=QUIET) == []
    assert sorted(d.message.value for d in rest) == sorted(set(range(10)) - done)
    outputs = _outputs(connect, out, 12)
    assert Counter(d.message.value["in"] for d in outputs) == dict.fromkeys(done, 2)
    for d in outputs:
        if "copy" not in d.message.value:
            assert d.message.key == f"k{d.message.value['in']}"
            assert d.message.headers == {"n": "1"}


def test_abort_drops_outputs_and_redelivers_inputs(connect: Connect, topic: str) -> None:
    bus = connect()
    out = _declare(bus, topic, partitions=1, out_partitions=1)
    bus.publish_many(topic, ["a", "b", "c"])
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 3, ack=False)
        tx = bus.transaction(sub)
        for d in first:
            tx.publish(out, f"aborted {d.message.value}")
            tx.ack(d)
        tx.abort()
        tx.abort()  # idempotent
        with pytest.raises(ClosedError):
            tx.commit()
        again = drain(sub, 3, ack=False)
        assert [(d.message.value, d.attempt) for d in again] == [("a", 2), ("b", 2), ("c", 2)]
        assert [d.message.id for d in again] == [d.message.id for d in first]
        with bus.transaction(sub) as tx:
            for d in again:
                tx.publish(out, d.message.value.upper())
                tx.ack(d)
    assert [d.message.value for d in _outputs(connect, out, 3)] == ["A", "B", "C"]


def _fail_in_transaction(
    bus: polybus.Bus, sub: polybus.Subscriber, out: str, deliveries: list[Delivery]
) -> None:
    with bus.transaction(sub) as tx:
        for d in deliveries:
            tx.publish(out, d.message.value)
            tx.ack(d)
        raise RuntimeError("handler failed")


def test_exception_in_transaction_block_aborts(connect: Connect, topic: str) -> None:
    bus = connect()
    out = _declare(bus, topic, partitions=1, out_partitions=1)
    bus.publish_many(topic, ["x", "y"])
    with bus.subscribe(topic, "g") as sub:
        first = drain(sub, 2, ack=False)
        with pytest.raises(RuntimeError, match="handler failed"):
            _fail_in_transaction(bus, sub, out, first)
        again = drain(sub, 2, ack=False)
        assert [(d.message.value, d.attempt) for d in again] == [("x", 2), ("y", 2)]
        sub.nack(again, requeue=False)
    with connect().subscribe(out, "h") as reader:
        assert reader.fetch(10, timeout=QUIET) == []


def test_fenced_member_commit_raises_and_takes_no_effect(connect: Connect, topic: str) -> None:
    """A member that lost a partition of an acked record while its transaction was
    open: commit raises FencedError and publishes nothing; the records are then
    processed once, by the new owner or (still-owned partitions) by the member."""
    bus = connect()
    out = _declare(bus, topic, partitions=2, out_partitions=1)
    bus.publish_many(topic, [Message(i, key=f"k{i}") for i in range(20)])
    a_bus, b_bus = connect(), connect()
    a = a_bus.subscribe(topic, "g", session_timeout=2.0)
    held = drain(a, 20, ack=False)
    assert len(held) == 20
    assert {d.partition for d in held} == {0, 1}
    tx = a_bus.transaction(a)
    for d in held:
        tx.publish(out, d.message.value)
        tx.ack(d)
    b = b_bus.subscribe(topic, "g", session_timeout=2.0)
    # a second member takes a partition over once the first lets it go or times out
    pending: dict[polybus.Subscriber, list[Delivery]] = {a: [], b: []}
    end = time.monotonic() + DEADLINE
    while not pending[b] and time.monotonic() < end:
        pending[a] += a.fetch(20, timeout=0.0)
        pending[b] += b.fetch(20, timeout=0.2)
    assert pending[b], "the second member never got a partition"
    with pytest.raises(FencedError):
        tx.commit()
    with connect().subscribe(out, "h") as reader:
        assert reader.fetch(10, timeout=QUIET) == [], "a fenced transaction published"
    processed: Counter[int] = Counter()
    end = time.monotonic() + DEADLINE
    while sum(processed.values()) < 20 and time.monotonic() < end:
        for sub, sub_bus in ((a, a_bus), (b, b_bus)):
            batch = pending[sub] + sub.fetch(20, timeout=0.1)
            pending[sub] = []
            if batch:
                with sub_bus.transaction(sub) as again:
                    for d in batch:
                        again.publish(out, d.message.value)
                        again.ack(d)
                processed.update(d.message.value for d in batch)
    assert processed == dict.fromkeys(range(20), 1)
    assert sorted(d.message.value for d in _outputs(connect, out, 20)) == list(range(20))
    a.close()
    b.close()
