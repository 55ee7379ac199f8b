"""Multi-process tests of durable groups on one log directory.

Producers and group members run as separate processes (see engine_workers);
the members write what they consume to files the parent checks against the
log itself.
"""

from __future__ import annotations

import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import pytest

from engine_workers import (
    KEYS,
    TOPIC,
    Children,
    complete_lines,
    group_value,
    wait_until,
)
from polybus.log import Log

PRODUCERS = 4
MEMBERS = 3
PARTITIONS = 6
PER_PRODUCER = 600
SESSION_TIMEOUT = 2.0
#: a member's time per batch: long enough that rebalances meet records in flight
WORK_MS = 20
#: records the member to be killed acks before it holds a batch unacked
HOLD_AFTER = 5


class Consumed(NamedTuple):
    """One record as a member reported it."""

    tag: str  #: "A" acked, "U" held unacked
    time_ns: int  #: CLOCK_MONOTONIC when polled: comparable across processes
    partition: int
    offset: int
    value: str


class MemberOutput(NamedTuple):
    records: list[Consumed]
    assignment: frozenset[int] | None  #: the last one reported
    holding: bool  #: the member wrote its held batch and waits to be killed


def read_output(path: Path) -> MemberOutput:
    records: list[Consumed] = []
    assignment: frozenset[int] | None = None
    holding = False
    for line in complete_lines(path):
        tag, _, rest = line.partition(" ")
        if tag == "S":
            assignment = frozenset(int(p) for p in rest.split(",") if p)
        elif tag == "H":
            holding = True
        else:
            time_ns, partition, offset, value = rest.split(" ", 3)
            records.append(Consumed(tag, int(time_ns), int(partition), int(offset), value))
    return MemberOutput(records, assignment, holding)


def acked(outputs: Iterable[Path]) -> list[Consumed]:
    return [r for path in outputs for r in read_output(path).records if r.tag == "A"]


def produced() -> set[str]:
    """Every value the producers append."""
    return {
        group_value(p, f"k{i % KEYS}", i // KEYS)
        for p in range(PRODUCERS)
        for i in range(PER_PRODUCER)
    }


class Group:
    """A topic in a fresh log directory, and its member and producer processes."""

    def __init__(self, tmp_path: Path, kids: Children) -> None:
        self.kids = kids
        self.log_dir = tmp_path / "log"
        self.stop = tmp_path / "stop"
        self.gate = tmp_path / "gate"
        self.scratch = tmp_path
        self.outputs: list[Path] = []
        with Log(self.log_dir) as log:
            log.create_topic(TOPIC, PARTITIONS)

    def member(
        self, work_ms: int = 0, hold_after: int = -1
    ) -> tuple[subprocess.Popen[bytes], Path]:
        """Start a group member: it takes ``work_ms`` per batch; ``hold_after`` ≥ 0
        makes it hold a batch unacked (see engine_workers.consumer).
        """
        out = self.scratch / f"member-{len(self.outputs)}.out"
        self.outputs.append(out)
        proc = self.kids.spawn(
            "consumer", self.log_dir, out, self.stop, SESSION_TIMEOUT, work_ms, hold_after
        )
        return proc, out

    def producers(self) -> list[subprocess.Popen[bytes]]:
        """Start the producers; they append the second half of their records once gated in."""
        return [
            self.kids.spawn("producer", self.log_dir, i, PER_PRODUCER, self.gate)
            for i in range(PRODUCERS)
        ]

    def wait_balanced(self, outputs: list[Path]) -> None:
        """Wait until each of these members reads its even share of the partitions."""

        def balanced() -> bool:
            shares = [read_output(out).assignment or frozenset() for out in outputs]
            each = PARTITIONS // len(outputs)
            return all(len(s) == each for s in shares) and len(set().union(*shares)) == PARTITIONS

        wait_until(balanced, 30, f"{len(outputs)} members to share the partitions")

    def finish(
        self,
        producers: list[subprocess.Popen[bytes]],
        members: list[subprocess.Popen[bytes]],
        covered: Iterable[Path],
    ) -> None:
        """Wait for the producers, until ``covered`` consumed every record, then stop members."""
        self.gate.touch(exist_ok=True)
        for proc in producers:
            self.kids.expect_exit(proc, 0, timeout=60)
        expected = produced()
        wait_until(
            lambda: {r.value for r in acked(covered)} >= expected,
            30,
            "the group to consume every record",
        )
        self.stop.touch()
        for proc in members:
            self.kids.expect_exit(proc, 0, timeout=30)

    def check_against_log(self, records: Iterable[Consumed]) -> None:
        """The log holds exactly the produced records, each key in one partition, and
        every consumed record is the one stored at its partition and offset.
        """
        stored: dict[tuple[int, int], str] = {}
        with Log(self.log_dir) as log:
            for part in log.topic(TOPIC).partitions:
                offset = 0
                while recs := part.read(offset):
                    for rec in recs:
                        stored[rec.partition, rec.offset] = (rec.payload or b"").decode()
                    offset = recs[-1].offset + 1
        assert sorted(stored.values()) == sorted(produced())
        partitions_of_key: defaultdict[str, set[int]] = defaultdict(set)
        for (partition, _offset), value in stored.items():
            partitions_of_key[value.split(":")[1]].add(partition)
        assert all(len(ps) == 1 for ps in partitions_of_key.values()), partitions_of_key
        wrong = [r for r in records if stored.get((r.partition, r.offset)) != r.value]
        assert not wrong, f"consumed records differ from the log: {wrong[:5]}"


def check_key_order(records: Iterable[Consumed]) -> None:
    """In the order records were polled, each producer's keys go through their
    sequence numbers strictly increasing (no record of a key seen out of order).
    """
    last: dict[tuple[str, str], int] = {}
    for rec in sorted(records, key=lambda r: r.time_ns):  # stable: a batch keeps its order
        producer, key, seq = rec.value.split(":")
        previous = last.get((producer, key), -1)
        assert int(seq) > previous, f"{rec} polled after sequence {previous} of its key"
        last[producer, key] = int(seq)


def duplicates(records: Iterable[Consumed]) -> list[tuple[int, int]]:
    counts = Counter((r.partition, r.offset) for r in records)
    return [where for where, n in counts.items() if n > 1]


@pytest.mark.slow
def test_group_consumes_every_record_exactly_once_in_key_order(tmp_path: Path) -> None:
    """4 producers and 3 members of one group, all processes, members joining
    mid-stream: every record is consumed exactly once, each key in sequence order,
    and every member gets a share.
    """
    with Children(tmp_path) as kids:
        group = Group(tmp_path, kids)
        first, first_out = group.member(WORK_MS)
        group.wait_balanced([first_out])
        producers = group.producers()
        wait_until(lambda: bool(acked([first_out])), 30, "the first member to consume")
        late = [group.member(WORK_MS), group.member(WORK_MS)]
        group.wait_balanced(group.outputs)
        group.finish(producers, [first] + [proc for proc, _out in late], group.outputs)
    outputs = [read_output(out) for out in group.outputs]
    records = [r for out in outputs for r in out.records]
    assert all(r.tag == "A" for r in records)
    dupes = duplicates(records)
    assert not dupes, f"{len(dupes)} records consumed more than once, e.g. {dupes[:5]}"
    assert len(records) == PRODUCERS * PER_PRODUCER
    group.check_against_log(records)
    check_key_order(records)
    assert all(out.records for out in outputs), "a member consumed nothing"


@pytest.mark.slow
def test_killed_members_unacked_records_go_to_survivors(tmp_path: Path) -> None:
    """A member SIGKILLed while holding a polled batch unacked: once its lease ends the
    survivors get its partitions from the last commit, so its held records are
    redelivered to them and no record is lost. Nothing else is delivered twice.
    """
    with Children(tmp_path) as kids:
        group = Group(tmp_path, kids)
        survivors = [group.member(), group.member()]
        holder, holder_out = group.member(hold_after=HOLD_AFTER)
        group.wait_balanced(group.outputs)
        group.gate.touch()
        producers = group.producers()
        wait_until(lambda: read_output(holder_out).holding, 30, "a member to hold a batch")
        kids.kill(holder)
        survivor_outs = [out for _proc, out in survivors]
        group.finish(producers, [proc for proc, _out in survivors], group.outputs)
    dead = read_output(holder_out).records
    held = {(r.partition, r.offset) for r in dead if r.tag == "U"}
    assert held, "the killed member held no records"
    assert len([r for r in dead if r.tag == "A"]) >= HOLD_AFTER
    survived = acked(survivor_outs)
    assert held <= {(r.partition, r.offset) for r in survived}, "held records were not redelivered"
    assert {r.value for r in survived} | {r.value for r in dead if r.tag == "A"} == produced()
    dupes = duplicates(survived)
    assert not dupes, f"survivors consumed records twice, e.g. {dupes[:5]}"
    # it committed what it acked before holding: only the held records come twice
    assert set(duplicates(survived + dead)) == held
    group.check_against_log(survived + dead)
    check_key_order(survived)
