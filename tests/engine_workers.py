"""Child-process entry points for the engine reliability tests, and the helpers they share.

Run as ``python engine_workers.py COMMAND ARG...`` (see :data:`COMMANDS`); every
argument is a plain string or number. Children report through files, one line
per event, written with a single ``write`` on an ``O_APPEND`` descriptor: a
SIGKILL cannot undo a ``write`` that returned (the page cache survives the
process), so no fsync is needed for the parent, on the same host, to see it.
A line without its newline was cut off by the kill and is ignored.

Every child gives up after :data:`CHILD_LIFETIME` seconds, so a crashed test
leaves nothing running for long; :class:`Children` also kills its own at exit.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import cast

from polybus.errors import FencedError
from polybus.log import Log, Record, Transaction
from polybus.log import group as group_module
from polybus.log import transaction as transaction_module
from polybus.log.partition import FsyncPolicy, Partition

TOPIC = "t"
GROUP = "g"
#: keys a producer cycles through: record i has key ``k{i % KEYS}`` and sequence ``i // KEYS``
KEYS = 20
CHILD_LIFETIME = 120.0


# -- helpers for the test modules -----------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def complete_lines(path: Path) -> list[str]:
    """The newline-terminated lines of a file another process may be appending to."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


class Children:
    """Spawns worker processes (stderr kept in files) and kills any left at exit."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._procs: dict[subprocess.Popen[bytes], tuple[str, Path]] = {}

    def spawn(self, command: str, *args: str | float | Path) -> subprocess.Popen[bytes]:
        """Start ``engine_workers.py command args...``."""
        argv = [command, *map(str, args)]
        err = self.scratch / f"{command}-{len(self._procs)}.stderr"
        with open(err, "wb") as f:
            proc = subprocess.Popen(
                [sys.executable, __file__, *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
            )
        self._procs[proc] = (" ".join(argv), err)
        return proc

    def describe(self, proc: subprocess.Popen[bytes]) -> str:
        """The worker's command line and what it wrote to stderr."""
        argv, err = self._procs[proc]
        return f"worker `{argv}`, stderr:\n{err.read_text()}"

    def expect_exit(self, proc: subprocess.Popen[bytes], returncode: int, timeout: float) -> None:
        """Wait for ``proc`` to exit and check its exit status (negative: killed by signal)."""
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"still running after {timeout:.0f} s: {self.describe(proc)}"
            ) from None
        assert proc.returncode == returncode, (
            f"exit status {proc.returncode}, expected {returncode}: {self.describe(proc)}"
        )

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc`` and check that it was still running until then."""
        proc.send_signal(signal.SIGKILL)
        self.expect_exit(proc, -signal.SIGKILL, timeout=10)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def crash_value(offset: int, run: int, pad: bytes) -> bytes:
    """A record value that names its own offset and writer run, with a CRC-32 of both."""
    body = b"%d:%d:%s" % (offset, run, pad)
    return b"%s:%08x" % (body, zlib.crc32(body))


def parse_crash_value(value: bytes | None) -> tuple[int, int] | None:
    """``(offset, run)`` of a :func:`crash_value`, or None if the value is damaged."""
    if value is None:
        return None
    body, _, crc = value.rpartition(b":")
    if crc != b"%08x" % zlib.crc32(body):
        return None
    offset, run, _pad = body.split(b":", 2)
    return int(offset), int(run)


def group_value(producer: int, key: str, seq: int) -> str:
    return f"{producer}:{key}:{seq}"


# -- child entry points ---------------------------------------------------------------


def _appender(path: str) -> Callable[[str], int]:
    """A function appending text to ``path`` with one ``write`` per call."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return lambda text: os.write(fd, text.encode())


def writer(directory: str, segment_bytes: str, run: str, acks: str, seed: str) -> None:
    """Append random single records and batches with ``fsync="always"`` until killed.

    After each append returns, writes ``first count`` to ``acks``. Every value
    is a :func:`crash_value` of its offset, predicted from ``end_offset``
    (this is the only writer) and checked against what ``append`` returns.
    """
    rng = random.Random(int(seed))
    log = Log(directory, fsync="always")
    part = log.create_topic(TOPIC, 1, segment_bytes=int(segment_bytes)).partitions[0]
    ack = _appender(acks)
    give_up = time.monotonic() + CHILD_LIFETIME
    while time.monotonic() < give_up:
        first = part.end_offset
        single = rng.random() < 0.5
        count = 1 if single else rng.randint(1, 20)
        values = [
            crash_value(first + i, int(run), rng.randbytes(rng.randint(0, 60)).hex().encode())
            for i in range(count)
        ]
        got = part.append(values[0]) if single else part.append_batch(values)
        if got != first:
            sys.exit(f"append returned offset {got}, but end_offset was {first}")
        ack(f"{first} {count}\n")
    sys.exit("writer was never killed")


def compact_writer(directory: str, run: str, acks: str, seed: str) -> None:
    """Append keyed records to a compact topic of 8 KiB segments until killed, so that
    compactions run all along; after each append returns, writes ``offset key`` to
    ``acks``. Values are :func:`crash_value` s; keys are ``k0`` to ``k{KEYS - 1}``."""
    rng = random.Random(int(seed))
    log = Log(directory, fsync="always")
    part = log.create_topic(TOPIC, 1, segment_bytes=8192, compact=True).partitions[0]
    ack = _appender(acks)
    give_up = time.monotonic() + CHILD_LIFETIME
    while time.monotonic() < give_up:
        first = part.end_offset
        key = f"k{rng.randrange(KEYS)}"
        pad = rng.randbytes(rng.randint(0, 60)).hex().encode()
        got = part.append(crash_value(first, int(run), pad), key=key.encode())
        if got != first:
            sys.exit(f"append returned offset {got}, but end_offset was {first}")
        ack(f"{first} {key}\n")
    sys.exit("writer was never killed")


def producer(directory: str, producer_id: str, count: str, gate: str) -> None:
    """Append ``count`` keyed records: value ``producer:key:seq``, key ``k{i % KEYS}``.

    The second half waits until the file ``gate`` exists.
    """
    with Log(directory) as log:
        topic = log.topic(TOPIC)
        for i in range(int(count)):
            if i == int(count) // 2:
                wait_until(lambda: os.path.exists(gate), CHILD_LIFETIME, "the gate file")
            key = f"k{i % KEYS}"
            topic.append(group_value(int(producer_id), key, i // KEYS).encode(), key=key.encode())


def _consumed_line(tag: str, time_ns: int, rec: Record) -> str:
    value = (rec.payload or b"").decode()
    return f"{tag} {time_ns} {rec.partition} {rec.offset} {value}\n"


def consumer(
    directory: str, out: str, stop: str, session_timeout: str, work_ms: str, hold_after: str
) -> None:
    """Consume in group :data:`GROUP`, 20 records a poll, until ``stop`` exists; then close.

    Writes to ``out``: ``S p,p`` when the assignment changes, and for each
    polled batch one ``A time_ns partition offset value`` line per record,
    then "processes" the batch for ``work_ms`` and acks it. With
    ``hold_after`` ≥ 0, the first batch polled once that many records were
    acked is written with tag ``U`` and never acked; the member commits,
    writes ``H`` and waits to be killed.
    """
    hold = int(hold_after)
    work = int(work_ms) / 1000
    emit = _appender(out)
    give_up = time.monotonic() + CHILD_LIFETIME
    with Log(directory) as log:
        member = log.consumer(TOPIC, group=GROUP, session_timeout=float(session_timeout))
        reported: list[int] | None = None
        acked = 0
        while not os.path.exists(stop):
            if time.monotonic() > give_up:
                sys.exit("consumer was never stopped")
            assignment = sorted(member.assignment)
            if assignment != reported:
                emit(f"S {','.join(map(str, assignment))}\n")
                reported = assignment
            records = member.poll(20, timeout=0.05)
            if not records:
                continue
            now = time.monotonic_ns()
            tag = "U" if 0 <= hold <= acked else "A"
            emit("".join(_consumed_line(tag, now, r) for r in records))
            if tag == "U":
                member.commit()  # must not commit the held records
                emit("H\n")
                time.sleep(max(0.0, give_up - time.monotonic()))
                sys.exit("holding consumer was never killed")
            time.sleep(work)  # records stay in flight meanwhile: rebalances must wait
            member.ack(records)
            acked += len(records)
        member.close()


# -- transactions -----------------------------------------------------------------------

TX_INPUT = "in"
#: each input gets two outputs in OUT (keys ``{i}a``, ``{i}b``) and one in OUT2
TX_OUT, TX_OUT2 = "out", "out2"
TX_GROUP = "tx"
#: where a transaction's commit() may be killed, in the order commit() reaches them
KILL_POINTS = (
    "before-intent",  # nothing written yet
    "torn-intent",  # half the intent written
    "after-intent",  # intent whole, no output appended
    "torn-output",  # half of the first output batch written, not published
    "after-first-output",  # one output batch visible, others not
    "after-all-outputs",  # every output visible, commit() not returned
    "after-commit",  # commit() returned
)
#: kill points at which the transaction is already bound to take effect
ROLLS_FORWARD = frozenset(KILL_POINTS[KILL_POINTS.index("after-intent") :])
#: where the process completing a dead writer's transaction may be killed (from its start)
RECOVERY_KILL_POINTS = (
    "mid-recovery",  # one missing batch appended
    "before-state-write",  # all appended and the commit applied, the state file not written
)


def tx_outputs(value: str) -> list[tuple[str, str, str]]:
    """(topic, key, value) of the outputs of input ``value``."""
    return [
        (TX_OUT, f"{value}a", f"{value}:a"),
        (TX_OUT, f"{value}b", f"{value}:b"),
        (TX_OUT2, value, f"{value}:c"),
    ]


def _die(report: Callable[[str], int], line: str) -> None:
    report(line)
    os.kill(os.getpid(), signal.SIGKILL)


class _KillPoint:
    """Patches the engine so that this process SIGKILLs itself at ``point``: in the
    commit after :meth:`arm`, or for a recovery point in the first recovery."""

    def __init__(self, point: str, report: Callable[[str], int]) -> None:
        self.point = point
        self.report = report
        self.line = f"K {point}\n" if point in RECOVERY_KILL_POINTS else ""
        self.batches = 0  # output batches of the armed commit
        self.appended = 0
        self.recovering = self.applied = self.tearing = False
        real_write_intent = transaction_module.write_intent
        real_append = Partition.append_encoded
        real_append_missing = transaction_module._append_missing
        real_apply = transaction_module.apply_commit
        real_pwrite, real_replace = os.pwrite, os.replace

        def pwrite(fd: int, data: bytes, offset: int) -> int:
            if self.tearing:
                real_pwrite(fd, data[: len(data) // 2], offset)
                self.die()
            return real_pwrite(fd, data, offset)

        def write_intent(
            gf: group_module.GroupFile, intent: transaction_module.Intent
        ) -> transaction_module.Recorded:
            self.hit("before-intent")
            self.tearing = self.at("torn-intent")
            written = real_write_intent(gf, intent)
            self.hit("after-intent")
            return written

        def append_encoded(part: Partition, batch: bytes) -> None:
            self.tearing = self.at("torn-output")
            real_append(part, batch)
            self.appended += 1
            if self.recovering:
                self.hit("mid-recovery")
            elif self.appended == 1:
                self.hit("after-first-output")
            if not self.recovering and self.appended == self.batches:
                self.hit("after-all-outputs")

        def append_missing(gf: group_module.GroupFile, intent: transaction_module.Intent) -> None:
            self.recovering = True
            real_append_missing(gf, intent)
            self.recovering = False

        def apply_commit(state: dict[str, object], intent: transaction_module.Intent) -> None:
            real_apply(state, intent)
            self.applied = True

        def replace(src: str, dst: str) -> None:
            if self.applied and dst.endswith(f"{TX_GROUP}.json"):
                self.hit("before-state-write")
            real_replace(src, dst)

        transaction_module.write_intent = write_intent  # type: ignore[assignment]
        transaction_module._append_missing = append_missing  # type: ignore[assignment]
        transaction_module.apply_commit = apply_commit  # type: ignore[assignment]
        Partition.append_encoded = append_encoded  # type: ignore[method-assign]
        os.pwrite = pwrite  # type: ignore[assignment]
        os.replace = replace  # type: ignore[assignment]

    def arm(self, line: str, batches: int) -> None:
        """Kill in the next commit, which appends ``batches`` output batches."""
        self.line, self.batches, self.appended = line, batches, 0

    def at(self, where: str) -> bool:
        return bool(self.line) and where == self.point

    def hit(self, where: str) -> None:
        if self.at(where):
            self.die()

    def die(self) -> None:
        _die(self.report, self.line)


def tx_worker(
    directory: str, fsync: str, point: str, seed: str, report: str, stop: str, work_ms: str
) -> None:
    """Consume TX_INPUT in group TX_GROUP, each batch in one transaction with its
    :func:`tx_outputs`, "processing" each batch for ``work_ms``; some transactions
    abort. Exits when the group has no lag (and the file ``stop``, unless "-", exists).

    With ``point`` one of :data:`KILL_POINTS`, the third commit SIGKILLs this
    process there, after writing ``K point value...`` (its inputs) to ``report``;
    with one of :data:`RECOVERY_KILL_POINTS`, completing a dead writer's
    transaction does (``K point``); otherwise the parent may kill it. Writes
    ``C n`` after each commit, ``F`` after each FencedError.
    """
    rng = random.Random(int(seed))
    emit = _appender(report)
    kill = _KillPoint(point, emit) if point in (*KILL_POINTS, *RECOVERY_KILL_POINTS) else None
    give_up = time.monotonic() + CHILD_LIFETIME
    with Log(directory, fsync=cast(FsyncPolicy, fsync)) as log:
        member = log.consumer(TX_INPUT, group=TX_GROUP, session_timeout=0.5)
        commits = 0
        while time.monotonic() < give_up:
            records = member.poll(rng.randint(1, 12), timeout=0.05)
            if not records:
                if (stop == "-" or os.path.exists(stop)) and not any(
                    log.lag(TX_INPUT, TX_GROUP).values()
                ):
                    break
                continue
            time.sleep(int(work_ms) / 1000)
            tx: Transaction = member.transaction()
            for rec in records:
                for topic, key, value in tx_outputs((rec.payload or b"").decode()):
                    tx.append(topic, value.encode(), key=key.encode())
            tx.ack(records)
            if rng.random() < 0.15:
                tx.abort()
                continue
            values = " ".join((r.payload or b"").decode() for r in records)
            if kill is not None and point in KILL_POINTS and commits == 2:
                kill.arm(f"K {point} {values}\n", len(tx._outputs))
            try:
                tx.commit()
            except FencedError:
                emit("F\n")
                continue
            commits += 1
            if point == "after-commit" and commits == 3:
                _die(emit, f"K {point} {values}\n")
            emit(f"C {commits}\n")
        else:
            sys.exit("transaction worker never finished")
        member.close()


def tx_noise(directory: str, stop: str) -> None:
    """Append ``noise:n`` records to the output topics until the file ``stop`` exists:
    another producer of the partitions transactions write to."""
    with Log(directory) as log:
        topics = [log.topic(TX_OUT), log.topic(TX_OUT2)]
        n = 0
        while not os.path.exists(stop):
            topics[n % 2].append(b"noise:%d" % n, key=b"%d" % n)
            n += 1
            time.sleep(0.001)


COMMANDS: dict[str, Callable[..., None]] = {
    "writer": writer,
    "compact_writer": compact_writer,
    "producer": producer,
    "consumer": consumer,
    "tx_worker": tx_worker,
    "tx_noise": tx_noise,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
