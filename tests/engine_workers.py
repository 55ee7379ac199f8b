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

from polybus.log import Log, Record

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
    value = (rec.value or b"").decode()
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


COMMANDS: dict[str, Callable[..., None]] = {
    "writer": writer,
    "producer": producer,
    "consumer": consumer,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
