"""The conformance suite of the reliability patterns: the same tests on every backend.

Import these tests into a test module (``from polybus.testing.patterns import *``)
with the fixtures of :mod:`polybus.testing.plugin` registered.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import polybus
from polybus import Delivery, Message, RemoteError, RequestTimeout, aio
from polybus.patterns.dlq import DeadLetters
from polybus.patterns.inbox import MemoryInbox
from polybus.patterns.request_reply import Requester
from polybus.patterns.retry import Retry, RetryPolicy
from polybus.patterns.worker import App, Consumer, Output, Worker
from polybus.sessions import HMACKey, Keyring, Tokens, UserContext

__all__ = [
    "test_a_message_whose_user_context_does_not_verify_is_dead_lettered_at_once",
    "test_async_bus_round_trip_never_blocks_the_loop",
    "test_async_worker_runs_coroutine_handlers_with_retries_and_replies",
    "test_at_most_once_never_retries_or_redelivers",
    "test_dead_letters_carry_provenance",
    "test_dead_letters_redrive_to_their_group_and_purge",
    "test_exactly_once_with_an_inbox_skips_redelivered_copies",
    "test_fanout_retry_reaches_only_its_group",
    "test_graceful_stop_finishes_started_work_and_loses_nothing",
    "test_handler_outputs_are_published_with_derived_ids",
    "test_jobs_published_before_the_workers_group_exists_are_processed",
    "test_request_reply_keeps_many_in_flight",
    "test_request_reply_times_out_and_counts_the_late_reply",
    "test_requests_sent_before_the_responder_starts_are_answered",
    "test_retry_does_not_block_the_messages_behind_it",
    "test_retry_survives_a_restart_during_the_backoff",
    "test_strict_order_holds_back_only_the_failed_key",
    "test_undecodable_payload_goes_to_the_dead_letter_topic",
]

Connect = Callable[..., polybus.Bus]
DEADLINE = 30.0  # seconds any single wait may take before the test fails
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=0.0)


def run_until(
    consumers: list[Consumer], done: Callable[[], bool], deadline: float = DEADLINE
) -> None:
    """Poll ``consumers`` until ``done()`` or fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not done():
        assert time.monotonic() < end, "the condition was not reached in time"
        for c in consumers:
            c.poll(0.05)


def test_retry_does_not_block_the_messages_behind_it(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    handled: list[tuple[str, int, float]] = []

    def handle(d: Delivery) -> None:
        handled.append((d.message.value, d.attempt, time.time()))
        if d.message.value == "flaky" and d.attempt == 1:
            raise Retry(delay=1.0)

    consumer = Consumer(bus, topic, handle, group="g", retry=FAST).start()
    bus.publish_many(topic, ["flaky", "a", "b", "c"])
    run_until([consumer], lambda: ("flaky", 2) in [(v, a) for v, a, _ in handled])
    consumer.stop()
    order = [(v, a) for v, a, _ in handled]
    assert order.index(("c", 1)) < order.index(("flaky", 2)), order
    failed_at = next(t for v, a, t in handled if (v, a) == ("flaky", 1))
    retried_at = next(t for v, a, t in handled if (v, a) == ("flaky", 2))
    assert retried_at - failed_at >= 0.95, "the retry ran before its delay"
    assert consumer.stats.retried == 1
    assert consumer.stats.processed == 4


def test_retry_survives_a_restart_during_the_backoff(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    first: list[float] = []

    def fail(d: Delivery) -> None:
        first.append(time.time())
        raise Retry(delay=2.0)

    consumer = Consumer(bus, topic, fail, group="g", retry=FAST).start()
    bus.publish(topic, "once more")
    run_until([consumer], lambda: bool(first))
    consumer.stop()  # the retry lives in the retry topic, not in this process

    again: list[tuple[int, float]] = []
    restarted = Consumer(
        connect(), topic, lambda d: again.append((d.attempt, time.time())), group="g", retry=FAST
    ).start()
    run_until([restarted], lambda: bool(again))
    restarted.stop()
    # 2: one failure before; RabbitMQ also counts the unprocessed hand-back at stop
    assert again[0][0] >= 2
    assert again[0][1] - first[0] >= 1.95, "the retry ran before it was due"


def test_fanout_retry_reaches_only_its_group(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=2, groups=["payment", "inventory"])
    seen: dict[str, Counter[int]] = {"payment": Counter(), "inventory": Counter()}

    def payment(d: Delivery) -> None:
        seen["payment"][d.message.value] += 1
        if d.attempt == 1 and d.message.value % 2:
            raise RuntimeError("card declined, try again")

    def inventory(d: Delivery) -> None:
        seen["inventory"][d.message.value] += 1

    consumers = [
        Consumer(bus, topic, payment, group="payment", retry=FAST).start(),
        Consumer(connect(), topic, inventory, group="inventory", retry=FAST).start(),
    ]
    bus.publish_many(topic, [Message(i, key=str(i)) for i in range(10)])
    run_until(
        consumers,
        lambda: sum(seen["payment"].values()) == 15 and sum(seen["inventory"].values()) == 10,
    )
    for c in consumers:
        c.poll(0.3)  # a stray retry would arrive here
        c.stop()
    assert seen["inventory"] == Counter(range(10)), "a retry reached another group"
    assert seen["payment"] == Counter({i: 2 if i % 2 else 1 for i in range(10)})


def test_strict_order_holds_back_only_the_failed_key(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    done: list[str] = []

    def handle(d: Delivery) -> None:
        if d.message.value == "a1" and d.attempt == 1:
            raise RuntimeError("not yet")
        done.append(d.message.value)

    policy = RetryPolicy(max_attempts=3, initial_delay=0.5, jitter=0.0)
    consumer = Consumer(bus, topic, handle, group="g", retry=policy, strict_order=True).start()
    bus.publish_many(topic, [Message(v, key=v[0]) for v in ["a1", "b1", "a2", "b2", "a3", "b3"]])
    run_until([consumer], lambda: len(done) == 6)
    consumer.stop()
    assert [v for v in done if v[0] == "a"] == ["a1", "a2", "a3"]
    assert [v for v in done if v[0] == "b"] == ["b1", "b2", "b3"]
    assert done.index("b3") < done.index("a1"), f"key b waited for key a: {done}"


def test_dead_letters_carry_provenance(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=2, groups=["g"])
    originals: dict[str, Delivery] = {}

    class Declined(Exception):
        pass

    def handle(d: Delivery) -> None:
        originals.setdefault(d.message.value, d)
        if d.message.value == "card":
            raise Declined("declined card")
        raise KeyError("no such item")

    policy = RetryPolicy(max_attempts=2, initial_delay=0.1, jitter=0.0, give_up_on=(KeyError,))
    consumer = Consumer(bus, topic, handle, group="g", retry=policy).start()
    sent = [Message("card", key="c", headers={"source": "shop"}), Message("item", key="i")]
    bus.publish_many(topic, sent)
    run_until([consumer], lambda: consumer.stats.dead_lettered == 2)
    consumer.stop()
    with DeadLetters(connect(), topic, "g") as dead:
        letters = {letter.message.value: letter for letter in dead.list()}
    assert set(letters) == {"card", "item"}
    card, item = letters["card"], letters["item"]
    assert (card.id, item.id) == (sent[0].id, sent[1].id)
    assert card.message.headers == {"source": "shop"}
    assert card.message.key == "c"
    assert (card.topic, card.group, card.attempts, card.reason) == (topic, "g", 2, "exhausted")
    assert card.partition == originals["card"].partition
    assert str(card.offset) == str(originals["card"].offset)
    assert card.error_type.endswith("Declined")
    assert card.error == "declined card"
    assert 0 < card.first_failure <= card.last_failure <= time.time()
    assert card.last_failure - card.first_failure >= 0.09  # two failures, a backoff apart
    assert (item.attempts, item.reason, item.error_type) == (1, "not-retryable", "KeyError")


def test_undecodable_payload_goes_to_the_dead_letter_topic(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    calls: list[Any] = []
    consumer = Consumer(bus, topic, lambda d: calls.append(d.message.value), group="g").start()
    bus.publish_many(topic, [Message(b"{not json", content_type="application/json"), "fine"])
    run_until([consumer], lambda: consumer.stats.dead_lettered == 1 and calls == ["fine"])
    consumer.stop()
    with DeadLetters(bus, topic, "g") as dead:
        [letter] = dead.list()
    assert letter.reason == "undecodable"
    assert letter.attempts == 1
    assert letter.message.payload == b"{not json"


def test_a_message_whose_user_context_does_not_verify_is_dead_lettered_at_once(
    connect: Connect, topic: str
) -> None:
    """The gateway pattern: only a context the edge signed for this very message, and
    still valid, gets a handler to act; the others are dead-lettered, never retried."""
    edge_key = HMACKey.generate("edge")
    context = UserContext(Tokens(Keyring(edge_key), issuer="edge", audience="services"))
    forger = UserContext(
        Tokens(Keyring(HMACKey.generate("edge")), issuer="edge", audience="services")
    )
    past = UserContext(
        Tokens(
            Keyring(edge_key), issuer="edge", audience="services", clock=lambda: time.time() - 3600
        )
    )
    good = context.attach(Message("good"), "user-1")
    moved = Message("moved", headers={"user-context": good.headers["user-context"]})
    sent = [
        good,
        forger.attach(Message("forged"), "user-1"),
        past.attach(Message("expired"), "user-1"),
        moved,
        Message("none"),
    ]
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    acted: list[tuple[str, str]] = []

    def handle(d: Delivery) -> None:
        acted.append((d.message.value, context.verify(d)["sub"]))

    consumer = Consumer(bus, topic, handle, group="g", retry=FAST).start()
    bus.publish_many(topic, sent)
    run_until([consumer], lambda: consumer.stats.dead_lettered == 4)
    consumer.stop()
    assert acted == [("good", "user-1")]
    assert consumer.stats.retried == 0
    with DeadLetters(bus, topic, "g") as dead:
        letters = {letter.message.value: letter for letter in dead.list()}
    assert sorted(letters) == ["expired", "forged", "moved", "none"]
    assert {letter.attempts for letter in letters.values()} == {1}
    assert "expired" in letters["expired"].error
    assert "another" in letters["moved"].error


def test_dead_letters_redrive_to_their_group_and_purge(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["billing", "shipping"])
    healthy = threading.Event()
    billed: list[Any] = []

    def bill(d: Delivery) -> None:
        if not healthy.is_set():
            raise RuntimeError("billing is down")
        billed.append(d.message.value)

    shipped: list[Any] = []
    billing = Consumer(bus, topic, bill, group="billing", retry=RetryPolicy(max_attempts=1))
    shipping = Consumer(
        connect(), topic, lambda d: shipped.append(d.message.value), group="shipping"
    )
    consumers = [billing.start(), shipping.start()]
    sent = [Message({"order": n}) for n in range(3)]
    bus.publish_many(topic, sent)
    run_until(consumers, lambda: billing.stats.dead_lettered == 3 and len(shipped) == 3)

    with DeadLetters(connect(), topic, "billing") as dead:
        assert [letter.id for letter in dead.list()] == [m.id for m in sent]
        healthy.set()
        assert dead.redrive([sent[0].id], edit=lambda m: {**m.value, "fixed": True}) == 1
        assert dead.purge([sent[1].id]) == 1
        run_until(consumers, lambda: len(billed) == 1)
        for c in consumers:
            c.poll(0.3)
            c.stop()
        assert billed == [{"order": 0, "fixed": True}]
        assert [letter.id for letter in dead.list()] == [sent[2].id]
        assert len(shipped) == 3, "a re-drive reached another group"
    with DeadLetters(connect(), topic, "billing") as again:  # what is left is durable
        assert [letter.id for letter in again.list()] == [sent[2].id]
        assert again.purge() == 1
        assert again.list() == []


def test_request_reply_keeps_many_in_flight(connect: Connect, topic: str) -> None:
    app = App()

    @app.responder(topic, concurrency=4)
    def square(d: Delivery) -> Any:
        if d.message.value == "boom":
            raise ValueError("cannot square boom")
        return d.message.value**2

    worker = Worker(app, connect()).start()
    try:
        with Requester(connect(), topic, timeout=DEADLINE) as requester:
            futures = {n: requester.submit(n) for n in range(100)}
            assert {n: f.result().value for n, f in futures.items()} == {
                n: n * n for n in range(100)
            }
            with pytest.raises(RemoteError, match="cannot square boom") as err:
                requester.request("boom")
            assert err.value.type == "ValueError"
            assert requester.late_replies == 0
    finally:
        worker.stop()


def test_requests_sent_before_the_responder_starts_are_answered(
    connect: Connect, topic: str
) -> None:
    """The requester declares the responders' group, so its requests wait for them."""
    app = App()

    @app.responder(topic)
    def double(d: Delivery) -> Any:
        return d.message.value * 2

    with Requester(connect(), topic, timeout=DEADLINE) as requester:
        futures = [requester.submit(n) for n in range(10)]
        worker = Worker(app, connect()).start()
        try:
            assert [f.result().value for f in futures] == [n * 2 for n in range(10)]
        finally:
            worker.stop()


def test_jobs_published_before_the_workers_group_exists_are_processed(
    connect: Connect, topic: str
) -> None:
    """A new durable group gets every message the topic keeps, whether a declare or the
    first subscribe makes it: the same on every backend that keeps messages."""
    bus = connect()
    if not bus.capabilities & polybus.Capability.SEEK:  # RabbitMQ without a history stream
        pytest.skip("a backend that keeps no history has nothing to give a new group")
    bus.publish_many(topic, list(range(10)))
    app = App()
    done: list[int] = []

    @app.consumer(topic, group="workers")
    def work(d: Delivery) -> None:
        done.append(d.message.value)

    worker = Worker(app, connect()).start()
    try:
        end = time.monotonic() + DEADLINE
        while len(done) < 10 and time.monotonic() < end:
            time.sleep(0.05)
        assert sorted(done) == list(range(10))
    finally:
        worker.stop()


def test_request_reply_times_out_and_counts_the_late_reply(connect: Connect, topic: str) -> None:
    app = App()
    release = threading.Event()

    @app.responder(topic)
    def slow(d: Delivery) -> Any:
        if d.message.value == "slow":
            release.wait(DEADLINE)
        return d.message.value

    worker = Worker(app, connect()).start()
    try:
        with Requester(connect(), topic, timeout=DEADLINE) as requester:
            assert requester.request("warm up").value == "warm up"
            with pytest.raises(RequestTimeout):
                requester.request("slow", timeout=0.3)
            release.set()
            assert requester.request("next").value == "next"
            end = time.monotonic() + DEADLINE
            while requester.late_replies < 1:
                assert time.monotonic() < end, "the late reply never arrived"
                time.sleep(0.01)
            assert requester.late_replies == 1
    finally:
        worker.stop()


def test_at_most_once_never_retries_or_redelivers(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    calls: Counter[Any] = Counter()

    def handle(d: Delivery) -> None:
        calls[d.message.value] += 1
        raise RuntimeError("fails every time")

    consumer = Consumer(bus, topic, handle, group="g", guarantee="at-most-once").start()
    bus.publish_many(topic, ["x", "y"])
    run_until([consumer], lambda: consumer.stats.dead_lettered == 2)
    consumer.stop()
    again = Consumer(connect(), topic, handle, group="g", guarantee="at-most-once").start()
    for _ in range(5):
        again.poll(0.1)
    again.stop()
    assert calls == Counter({"x": 1, "y": 1})


def test_exactly_once_with_an_inbox_skips_redelivered_copies(connect: Connect, topic: str) -> None:
    bus = connect()
    bus.declare(topic, partitions=1, groups=["g"])
    effects: Counter[str] = Counter()
    inbox = MemoryInbox()
    consumer = Consumer(
        bus,
        topic,
        lambda d: effects.update([d.message.value]),
        group="g",
        guarantee="exactly-once",
        inbox=inbox,
    ).start()
    order = Message("charge-42")
    bus.publish_many(topic, [order, order, Message("charge-43"), order])  # the same id 3 times
    run_until([consumer], lambda: consumer.stats.processed + consumer.stats.duplicates == 4)
    consumer.stop()
    assert effects == Counter({"charge-42": 1, "charge-43": 1})
    assert consumer.stats.duplicates == 2


def test_handler_outputs_are_published_with_derived_ids(connect: Connect, topic: str) -> None:
    bus = connect()
    out_topic = f"{topic}.h.retry"  # a name the test fixtures clean up
    bus.declare(topic, partitions=1, groups=["g"])
    bus.declare(out_topic, groups=["h"])
    consumer = Consumer(
        bus, topic, lambda d: [Output(out_topic, "a"), Output(out_topic, "b")], group="g"
    ).start()
    cause = Message("order", correlation_id="trace-1")
    bus.publish_many(topic, [cause, cause])  # one input delivered twice: handled twice
    run_until([consumer], lambda: consumer.stats.processed == 2)
    consumer.stop()
    with bus.subscribe(out_topic, "h") as sub:
        got: list[Delivery] = []
        end = time.monotonic() + DEADLINE
        while len(got) < 4 and time.monotonic() < end:
            got += sub.fetch(10, timeout=0.2)
        sub.ack(got)
    assert sorted(d.message.value for d in got) == ["a", "a", "b", "b"]
    ids = Counter(d.message.id for d in got)
    assert sorted(ids.values()) == [2, 2], "a second run must publish the same ids"
    assert {d.message.causation_id for d in got} == {cause.id}
    assert {d.message.correlation_id for d in got} == {"trace-1"}


def test_graceful_stop_finishes_started_work_and_loses_nothing(
    connect: Connect, topic: str
) -> None:
    bus = connect()
    group = topic  # Kafka group ids are global: a group of its own, whatever ran before
    bus.declare(topic, partitions=2, groups=[group])
    started: set[int] = set()
    finished: Counter[int] = Counter()
    running = threading.Event()

    def slow(d: Delivery) -> None:
        started.add(d.message.value)
        running.set()
        time.sleep(0.3)
        finished[d.message.value] += 1

    app = App()
    app.consumer(topic, group=group, concurrency=2)(slow)
    worker = Worker(app, connect(), stop_timeout=DEADLINE).start()
    bus.publish_many(topic, [Message(i, key=str(i)) for i in range(20)])
    assert running.wait(DEADLINE)
    assert worker.health()["status"] == "ok"
    assert worker.stop() is True, "a started handler did not finish"
    assert worker.health()["status"] == "stopped"
    assert started == set(finished), "stop() returned before started handlers finished"
    assert len(started) < 20, "stop() did not stop taking work"

    rest = App()
    rest.consumer(topic, group=group)(lambda d: finished.update([d.message.value]))
    second = Worker(rest, connect()).start()
    end = time.monotonic() + DEADLINE
    while set(finished) != set(range(20)) and time.monotonic() < end:
        time.sleep(0.05)
    second.stop()
    assert set(finished) == set(range(20)), f"lost: {set(range(20)) - set(finished)}"


def test_async_bus_round_trip_never_blocks_the_loop(connect: Connect, topic: str) -> None:
    async def main() -> None:
        bus = aio.AsyncBus(connect())
        await bus.declare(topic, partitions=1, groups=["g"])
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        sub = await bus.subscribe(topic, "g")
        started = time.monotonic()
        assert await sub.fetch(10, timeout=1.0) == []  # waits, on a thread
        assert time.monotonic() - started >= 0.9
        assert ticks >= 10, f"the event loop was blocked: {ticks} ticks in a second"
        await bus.publish_many(topic, [Message({"n": n}, key="k") for n in range(5)])
        got: list[Delivery] = []
        async for d in sub:
            got.append(d)
            d.ack()
            if len(got) == 5:
                break
        assert [d.message.value["n"] for d in got] == list(range(5))
        await sub.close()
        ticker.cancel()
        await bus.close()

    asyncio.run(asyncio.wait_for(main(), DEADLINE))


def test_async_worker_runs_coroutine_handlers_with_retries_and_replies(
    connect: Connect, topic: str
) -> None:
    work, rpc = topic, f"{topic}-rpc"
    tries: Counter[int] = Counter()

    async def main() -> None:
        bus = aio.AsyncBus(connect())
        app = App()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        @app.consumer(work, group="g", retry=FAST)
        async def handle(d: Delivery) -> None:
            assert asyncio.get_running_loop() is loop  # runs on the worker's loop
            tries[d.message.value] += 1
            if d.attempt == 1 and d.message.value == 2:
                raise RuntimeError("later")
            if sum(tries.values()) == 4:
                done.set()

        @app.responder(rpc)
        async def double(d: Delivery) -> Any:
            await asyncio.sleep(0.01)
            return d.message.value * 2

        async with aio.AsyncWorker(app, bus):
            await bus.publish_many(work, [1, 2, 3])
            replies = await asyncio.gather(
                *(bus.request(rpc, n, timeout=DEADLINE) for n in range(20))
            )
            assert [r.value for r in replies] == [n * 2 for n in range(20)]
            await asyncio.wait_for(done.wait(), DEADLINE)
        await bus.close()

    asyncio.run(asyncio.wait_for(main(), 2 * DEADLINE))
    assert tries == Counter({1: 1, 2: 2, 3: 1})
