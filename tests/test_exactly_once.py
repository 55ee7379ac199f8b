"""Exactly once through crashes: a consume → process → produce pipeline killed at every step.

A child process runs a :class:`~polybus.patterns.worker.Consumer` that turns
each input ``n`` of topic ``in`` into the output ``n * 10`` on ``out``, and
SIGKILLs itself at one step of input 7: before its handler, after its handler
(before the output is produced), after the output was produced, after the
input's ack but before the ack was committed, and after the commit. A clean
consumer then finishes the work, and the end state is counted:

- ``transactional`` (native engine, Kafka): outputs and the input's commit are
  one transaction, so ``out`` holds every output exactly once;
- ``inbox`` (native engine, Redis): at-least-once delivery; a re-run publishes the same output ids
  again (they are derived from the input's id), and a downstream consumer with
  an inbox applies each output exactly once.

The crash points are reached by wrapping polybus's own objects in the child
(nothing of the broker is mocked).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import polybus
from polybus import Capability, Delivery
from polybus.patterns.inbox import MemoryInbox
from polybus.patterns.worker import Consumer, Output
from polybus.testing import servers
from polybus.testing.plugin import require_server

INPUTS = 20
VICTIM = 7  #: the input at whose step the child dies
STEPS = ["before_handler", "after_handler", "after_produce", "before_commit", "after_commit"]
DEADLINE = 30.0
LEASE = 1.0  #: session timeout: how soon the dead child's partitions move on


def pipeline(out: str) -> Callable[[Delivery], Output]:
    def handler(d: Delivery) -> Output:
        return Output(out, d.message.value * 10, key=str(d.message.value))

    return handler


def child(url: str, mode: str, step: str, source: str, out: str) -> None:
    """Run the pipeline from ``source`` to ``out`` until SIGKILLed at ``step`` of input VICTIM."""
    handler = pipeline(out)
    from polybus.bus import Bus, BusTransaction

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def is_victim(d: Delivery) -> bool:
        return bool(d.message.value == VICTIM)

    def crashing_handler(d: Delivery) -> Output:
        if step == "before_handler" and is_victim(d):
            die()
        out = handler(d)
        if step == "after_handler" and is_victim(d):
            die()
        return out

    victim_out = str(VICTIM).encode()
    if mode == "transactional":
        real_begin = Bus.transaction

        def begin(self: Bus, sub: polybus.Subscriber) -> BusTransaction:
            tx = real_begin(self, sub)
            inner = tx._tx
            staged: list[bool] = []

            class Crashing:
                def publish(self, topic: str, records: list) -> None:  # type: ignore[type-arg]
                    inner.publish(topic, records)
                    if any(r.key == victim_out for r in records):
                        staged.append(True)
                        if step == "after_produce":
                            die()

                def ack(self, records: list) -> None:  # type: ignore[type-arg]
                    inner.ack(records)

                def commit(self) -> None:
                    if staged and step == "before_commit":
                        die()
                    inner.commit()
                    if staged and step == "after_commit":
                        die()

                def abort(self) -> None:
                    inner.abort()

            tx._tx = Crashing()  # type: ignore[assignment]
            return tx

        Bus.transaction = begin  # type: ignore[method-assign]
    else:
        real_publish = Bus.publish_records
        real_ack = Delivery.ack

        def publish(self: Bus, topic: str, records: list) -> list:  # type: ignore[type-arg]
            receipts = real_publish(self, topic, records)
            if step == "after_produce" and any(r.key == victim_out for r in records):
                die()
            return receipts

        def ack(self: Delivery) -> None:
            real_ack(self)
            if self.topic == source and self.message.value == VICTIM:
                if step == "before_commit":
                    die()  # acked, and the ack not yet committed
                if step == "after_commit":
                    self._owner.commit()
                    die()

        Bus.publish_records = publish  # type: ignore[method-assign]
        Delivery.ack = ack  # type: ignore[method-assign]

    with polybus.connect(url) as bus:
        consumer = Consumer(
            bus,
            source,
            crashing_handler,
            group=f"{source}-g",
            transactional=mode == "transactional",
            batch=5,
            session_timeout=LEASE,
        ).start()
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            consumer.poll(0.1)
    sys.exit("the crash point was never reached")


def _cases() -> list[tuple[str, str]]:
    return [
        ("native", "transactional"),
        ("native", "inbox"),
        ("redis", "inbox"),
        ("kafka", "transactional"),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize(("backend", "mode"), _cases())
def test_each_input_takes_effect_once_whatever_step_the_pipeline_dies_at(
    backend: str, mode: str, step: str, tmp_path: Path
) -> None:
    if backend == "redis":
        require_server("redis", servers.redis_unavailable())
        url = servers.redis_url()
    elif backend == "kafka":
        require_server("kafka", servers.kafka_unavailable())
        # A dead child's open transaction is aborted by the broker after the transaction
        # timeout, reconnect_timeout + 5 s: 10 s here instead of 35.
        url = f"kafka://{servers.kafka_bootstrap()}?reconnect_timeout=5"
    else:
        url = f"native://{tmp_path / 'log'}"
    source, out = f"eo-{uuid.uuid4().hex[:10]}", f"eo-{uuid.uuid4().hex[:10]}"
    try:
        with polybus.connect(url) as bus:
            if mode == "transactional" and Capability.TRANSACTIONS not in bus.capabilities:
                pytest.skip(f"{backend} has no transactions")
            bus.declare(source, partitions=2, groups=[f"{source}-g"])
            bus.declare(out, partitions=2, groups=[f"{out}-h"])
            bus.publish_many(source, [polybus.Message(n, key=str(n)) for n in range(INPUTS)])

        proc = subprocess.run(
            [sys.executable, __file__, url, mode, step, source, out],
            timeout=DEADLINE + 30,
            check=False,
        )
        assert proc.returncode == -signal.SIGKILL, "the child did not die at its crash point"

        with polybus.connect(url) as bus:
            finisher = Consumer(
                bus,
                source,
                pipeline(out),
                group=f"{source}-g",
                transactional=mode == "transactional",
                session_timeout=LEASE,
            ).start()
            effects: Counter[int] = Counter()
            downstream = Consumer(
                bus,
                out,
                lambda d: effects.update([d.message.value]),
                group=f"{out}-h",
                inbox=MemoryInbox(),
                guarantee="exactly-once",
            ).start()
            end = time.monotonic() + DEADLINE
            while len(effects) < INPUTS:
                assert time.monotonic() < end, f"outputs missing: {sorted(effects)}"
                finisher.poll(0.05)
                downstream.poll(0.05)
            for _ in range(5):  # anything still to come (a duplicate) comes now
                finisher.poll(0.1)
                downstream.poll(0.1)
            finisher.stop()
            downstream.stop()
        assert effects == Counter({n * 10: 1 for n in range(INPUTS)}), "an input took effect twice"
        if mode == "transactional":
            assert downstream.stats.duplicates == 0, "a transaction's output was stored twice"
    finally:
        if backend == "redis":
            for topic in (source, out):
                servers.redis_delete_topic(f"{topic}*")


if __name__ == "__main__":
    child(*sys.argv[1:6])
