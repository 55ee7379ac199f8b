"""Transactions of the native engine: atomic append + offset commit.

Worker processes (engine_workers.tx_worker) consume inputs and, in one
transaction per batch, append three outputs per input to two topics and ack
the batch. They are SIGKILLed at every step of a commit and at random; after
each kill another process takes the group lock, and then every committed
input has its outputs exactly once and no other input has any.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from engine_workers import (
    KILL_POINTS,
    ROLLS_FORWARD,
    TX_GROUP,
    TX_INPUT,
    TX_OUT,
    TX_OUT2,
    Children,
    complete_lines,
    tx_outputs,
)
from polybus.errors import ClosedError, ConfigurationError, FencedError, MessageTooLarge
from polybus.log import Consumer, Log, Record
from polybus.log.partition import Partition

INPUT_PARTITIONS = 3
#: an output of a transaction: topic, key, value
Output = tuple[str, str, str]


def make_log(log_dir: Path, inputs: int, start: int = 0) -> None:
    with Log(log_dir) as log:
        topic = log.create_topic(TX_INPUT, INPUT_PARTITIONS)
        log.create_topic(TX_OUT, 2)
        log.create_topic(TX_OUT2, 1)
        log.create_group(TX_INPUT, TX_GROUP)
        append_inputs(log, range(start, start + inputs))
        assert sum(p.end_offset for p in topic.partitions) == start + inputs


def append_inputs(log: Log, numbers: range) -> None:
    topic = log.topic(TX_INPUT)
    for i in numbers:
        topic.append(str(i).encode(), key=b"k%d" % i)


def read_topic(log: Log, name: str) -> list[tuple[int, int, bytes | None, bytes | None]]:
    """(partition, offset, key, value) of every record of a topic."""
    out = []
    for part in log.topic(name).partitions:
        offset = part.start_offset
        while recs := part.read(offset):
            out.extend((r.partition, r.offset, r.key, r.payload) for r in recs)
            offset = recs[-1].offset + 1
    return out


def outputs_in_log(log: Log) -> Counter[Output]:
    """Every transaction output stored (the noise producer's records left out)."""
    found: Counter[Output] = Counter()
    for topic in (TX_OUT, TX_OUT2):
        for _p, _o, key, value in read_topic(log, topic):
            if not (value or b"").startswith(b"noise:"):
                found[topic, (key or b"").decode(), (value or b"").decode()] += 1
    return found


def committed_inputs(log_dir: Path, log: Log) -> set[str]:
    """Inputs the group state says are committed (below the offset or in acked ranges)."""
    state = json.loads((log_dir / "groups" / TX_INPUT / f"{TX_GROUP}.json").read_text())
    commits, acked = state["commits"], state.get("acked", {})
    return {
        (value or b"").decode()
        for p, offset, _key, value in read_topic(log, TX_INPUT)
        if offset < commits[str(p)] or any(s <= offset < e for s, e in acked.get(str(p), ()))
    }


def check_exactly_once(log_dir: Path) -> set[str]:
    """Take the group lock (completing what a killed worker left), then check that the
    committed inputs, and only they, have their outputs, each exactly once."""
    with Log(log_dir) as log:
        log.lag(TX_INPUT, TX_GROUP)
        committed = committed_inputs(log_dir, log)
        found = outputs_in_log(log)
    expected = Counter(o for value in committed for o in tx_outputs(value))
    missing, extra = expected - found, found - expected
    assert not missing, f"{len(missing)} outputs of committed inputs missing: {list(missing)[:5]}"
    assert not extra, f"{len(extra)} outputs duplicated or uncommitted: {list(extra)[:5]}"
    return committed


def append_noise(log_dir: Path) -> None:
    """Another producer appends to every output partition, so that a transaction
    completed now lands past where its writer meant to put it."""
    with Log(log_dir) as log:
        for name in (TX_OUT, TX_OUT2):
            for part in log.topic(name).partitions:
                part.append(b"noise:parent")


def run_to_kill(kids: Children, log_dir: Path, fsync: str, point: str, seed: int) -> set[str]:
    """Run a worker until it kills itself at ``point``; the inputs it was committing."""
    report = log_dir.parent / f"report-{point}"
    proc = kids.spawn("tx_worker", log_dir, fsync, point, seed, report, "-", 0)
    kids.expect_exit(proc, -signal.SIGKILL, timeout=60)
    kill_lines = [line for line in complete_lines(report) if line.startswith("K ")]
    assert kill_lines, f"not killed at {point}: {kids.describe(proc)}"
    return set(kill_lines[0].split()[2:])


#: a kill point followed by a kill of the process that completes its transaction
THEN_KILL_RECOVERY = {"after-intent": "mid-recovery", "after-first-output": "before-state-write"}


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["interval", "always"])
def test_sigkill_at_every_step_of_a_commit(tmp_path: Path, fsync: str) -> None:
    """A worker killed at each step of its third commit (and, twice, the next process
    killed while completing that transaction): once another process has taken the
    group lock, that transaction took effect whole if its intent was recorded, else
    not at all; and every committed input has its outputs once."""
    log_dir = tmp_path / "log"
    make_log(log_dir, 300)
    committed: set[str] = set()
    with Children(tmp_path) as kids:
        for n, point in enumerate(KILL_POINTS):
            killed = run_to_kill(kids, log_dir, fsync, point, n)
            n_out = 3 * len(killed)
            expect_visible = {
                "after-first-output": range(1, n_out),
                "after-all-outputs": [n_out],
                "after-commit": [n_out],
            }.get(point, [0])
            recovery = THEN_KILL_RECOVERY.get(point)
            if recovery is not None:
                assert not run_to_kill(kids, log_dir, fsync, recovery, n)
                expect_visible = range(1, n_out) if recovery == "mid-recovery" else [n_out]
            with Log(log_dir) as log:  # before anyone else takes the group lock
                visible = outputs_in_log(log)
                before = committed_inputs(log_dir, log)
            ours = sum(visible[o] for value in killed for o in tx_outputs(value))
            assert ours in expect_visible, f"{ours} outputs of the killed transaction visible"
            if point != "after-commit":  # else the state file may or may not say it yet
                assert not killed & before, "the state file names an unfinished transaction"
            append_noise(log_dir)
            after = check_exactly_once(log_dir)
            if point in ROLLS_FORWARD:
                assert killed <= after, f"killed at {point}: the transaction was not completed"
            else:
                assert not killed & after, f"killed at {point}: the transaction took effect"
            assert after >= committed, "committed inputs were lost"
            committed = after
        last = kids.spawn("tx_worker", log_dir, fsync, "none", 99, tmp_path / "report-last", "-", 0)
        kids.expect_exit(last, 0, timeout=60)
    assert check_exactly_once(log_dir) == {str(i) for i in range(300)}


def commits_in(report: Path) -> int:
    return sum(line.startswith("C ") for line in complete_lines(report))


@pytest.mark.slow
def test_members_killed_at_random_while_others_commit(tmp_path: Path) -> None:
    """Three members in separate processes commit transactions while inputs keep
    arriving and another process appends to the output partitions; members are
    SIGKILLed at random moments and replaced. In the end every input has its
    outputs exactly once and the group has no lag."""
    log_dir = tmp_path / "log"
    stop, noise_stop = tmp_path / "stop", tmp_path / "noise-stop"
    inputs = 100
    make_log(log_dir, inputs)
    rng = random.Random(5)
    live: list[tuple[subprocess.Popen[bytes], Path]] = []
    with Children(tmp_path) as kids, Log(log_dir) as log:
        noise = kids.spawn("tx_noise", log_dir, noise_stop)

        def add_member() -> None:
            report = tmp_path / f"report-{rng.randrange(1 << 30)}"
            seed = rng.randrange(1 << 30)
            proc = kids.spawn("tx_worker", log_dir, "interval", "random", seed, report, stop, 2)
            live.append((proc, report))

        for _ in range(3):
            add_member()
        for _kill in range(6):
            proc, report = live.pop(rng.randrange(len(live)))
            seen = commits_in(report)
            deadline = time.monotonic() + 30
            while commits_in(report) <= seen:  # inputs keep coming until it commits anew
                assert time.monotonic() < deadline, f"no commit: {kids.describe(proc)}"
                append_inputs(log, range(inputs, inputs + 2))
                inputs += 2
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))  # the random moment of the kill
            kids.kill(proc)
            add_member()
        stop.touch()
        for proc, _report in live:
            kids.expect_exit(proc, 0, timeout=60)
        noise_stop.touch()
        kids.expect_exit(noise, 0, timeout=10)
    assert check_exactly_once(log_dir) == {str(i) for i in range(inputs)}


# -- in one process -----------------------------------------------------------------


def open_group(tmp_path: Path, inputs: int) -> Log:
    make_log(tmp_path / "log", inputs)
    return Log(tmp_path / "log")


def process(log: Log, member: Consumer, records: list[Record]) -> None:
    with member.transaction() as tx:
        for rec in records:
            for topic, key, value in tx_outputs((rec.payload or b"").decode()):
                tx.append(topic, value.encode(), key=key.encode())
        tx.ack(records)


def poll_all(member: Consumer, count: int) -> list[Record]:
    got: list[Record] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        got += member.poll(count - len(got), timeout=0.2)
    assert len(got) == count
    return got


def test_acks_above_the_committed_prefix_are_not_processed_again(tmp_path: Path) -> None:
    """Records a transaction acked past an unsettled one are recorded as acked ranges:
    the next member skips them, and a seek replays them."""
    with open_group(tmp_path, 30) as log:
        member = log.consumer(TX_INPUT, TX_GROUP)
        records = poll_all(member, 30)
        odd = [r for r in records if r.offset % 2]
        process(log, member, odd)
        member.close()  # the even ones were never settled
        state = json.loads((tmp_path / "log/groups/in/tx.json").read_text())
        assert state["acked"], "no acked ranges recorded"
        again = log.consumer(TX_INPUT, TX_GROUP)
        rest = poll_all(again, 30 - len(odd))
        assert {(r.partition, r.offset) for r in rest} == {
            (r.partition, r.offset) for r in records if not r.offset % 2
        }
        assert again.poll(10, timeout=0.2) == []
        process(log, again, rest)
        again.commit()
        assert "acked" not in json.loads((tmp_path / "log/groups/in/tx.json").read_text())
        again.seek(0, 0)
        replayed = again.poll(100, timeout=0.5)
        assert [r.offset for r in replayed if r.partition == 0] == list(
            range(log.topic(TX_INPUT).partitions[0].end_offset)
        )
        again.ack(replayed)
        again.close()
    assert check_exactly_once(tmp_path / "log") == {str(i) for i in range(30)}


class Interrupted(BaseException):
    """Stands for a KeyboardInterrupt in the middle of commit()."""


def test_commit_interrupted_after_its_intent_completes_at_the_next_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """commit() interrupted after one output batch: the next lock of the group (here
    the same member's commit) appends the rest past what other producers appended
    meanwhile, commits the inputs, and the member does not commit them backwards."""
    with open_group(tmp_path, 20) as log:
        member = log.consumer(TX_INPUT, TX_GROUP)
        first = poll_all(member, 10)
        real_append = Partition.append_encoded
        calls: list[int] = []

        def append_then_interrupt(self: Partition, batch: bytes) -> None:
            real_append(self, batch)
            calls.append(1)
            raise Interrupted

        monkeypatch.setattr(Partition, "append_encoded", append_then_interrupt)
        with pytest.raises(Interrupted):
            process(log, member, first)
        monkeypatch.setattr(Partition, "append_encoded", real_append)
        assert calls == [1]
        for name in (TX_OUT, TX_OUT2):  # another producer, before anyone locks the group
            for part in log.topic(name).partitions:
                part.append(b"noise:between")
        assert check_exactly_once(tmp_path / "log") == {
            r.payload.decode() for r in first if r.payload
        }
        member.commit()  # must not move the commit back below the completed transaction
        process(log, member, poll_all(member, 10))
        member.close()
    assert check_exactly_once(tmp_path / "log") == {str(i) for i in range(20)}


def test_member_whose_lease_expired_is_fenced_and_nothing_is_published(tmp_path: Path) -> None:
    with open_group(tmp_path, 10) as log:
        stale = log.consumer(TX_INPUT, TX_GROUP, session_timeout=0.5)
        held = poll_all(stale, 10)
        stale._stop.set()  # stop heartbeating, as a paused process would
        stale._thread.join()  # type: ignore[union-attr]
        time.sleep(0.6)  # let the lease lapse: the point of this test
        fresh = log.consumer(TX_INPUT, TX_GROUP, session_timeout=5)
        assert fresh.assignment == frozenset(range(INPUT_PARTITIONS))
        with pytest.raises(FencedError, match="another member"):
            process(log, stale, held)
        assert outputs_in_log(log) == Counter()
        process(log, fresh, poll_all(fresh, 10))
        fresh.close()
    assert check_exactly_once(tmp_path / "log") == {str(i) for i in range(10)}


def test_a_transaction_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with open_group(tmp_path, 5) as log:
        with log.consumer(TX_INPUT) as alone, pytest.raises(ConfigurationError, match="group"):
            alone.transaction()
        member = log.consumer(TX_INPUT, TX_GROUP)
        records = poll_all(member, 5)
        member.ack(records[:1])
        tx = member.transaction()
        with pytest.raises(ConfigurationError, match="not in flight"):
            tx.ack(records[:1])
        tx.append(TX_OUT, b"x" * (65 << 20))
        tx.ack(records[1:])
        with pytest.raises(MessageTooLarge, match="smaller transactions"):
            tx.commit()
        with pytest.raises(ClosedError):
            tx.commit()
        redelivered = poll_all(member, 4)
        assert sorted((r.partition, r.offset, r.delivery_count) for r in redelivered) == sorted(
            (r.partition, r.offset, 2) for r in records[1:]
        )
        assert outputs_in_log(log) == Counter()
        member.close()


def test_an_intent_left_by_an_earlier_group_of_that_name_is_not_applied(tmp_path: Path) -> None:
    with open_group(tmp_path, 6) as log:
        member = log.consumer(TX_INPUT, TX_GROUP)
        process(log, member, poll_all(member, 6))
        member.close()
    group_file = tmp_path / "log/groups/in/tx.json"
    group_file.unlink()  # the documented way to restart a group from its start
    with Log(tmp_path / "log") as log:
        member = log.consumer(TX_INPUT, TX_GROUP)
        again = poll_all(member, 6)  # read from the start: nothing applied from the old intent
        member.transaction().abort()
        member.close()
    assert {(r.payload or b"").decode() for r in again} == {str(i) for i in range(6)}
