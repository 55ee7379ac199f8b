"""Benchmark of polybus's native log engine against embedded queue libraries.

Everything is measured in one process run, side by side, on the same file
system (a fresh directory per case under ``--dir``, default the system temp
dir), with 100-byte random payloads.

Peers (put+get of N messages: all N put, then all N got, timed together):

* persist-queue ``SQLiteQueue`` (``auto_commit=True``) and ``Queue`` (file
  queue, ``task_done`` after every get), both with their default durability;
* litequeue ``LiteQueue`` (``put``, then ``pop`` + ``done``);
* queuelib ``FifoDiskQueue`` (``push``/``pop``, no fsync, one process).

polybus figures (opening and closing the log are not timed unless stated):

1. ``Partition.append_batch`` of 1000 messages, ``fsync="interval"``.
2. ``Partition.append`` of one message (visible to other processes on return).
3. ``append_batch`` of 100 messages with ``fsync="always"`` (an fsync per batch).
4. Durable group consumer over a pre-filled topic (filled by batch appends in a
   log that is then closed; not timed): ``poll(max_records=5000, timeout=0)``
   and ``ack`` until every record is read, then ``commit``. Records are
   CRC-32C checked by the engine on read.
5. Cross-process end-to-end latency: a producer in a child process (started
   with ``subprocess``; only the log path crosses the process boundary)
   appends records stamped with ``time.perf_counter_ns()`` (CLOCK_MONOTONIC,
   system-wide on Linux) at a paced 1,000 msg/s; the parent reads them with an
   ephemeral consumer (``group=None, start="earliest"``, ``poll(timeout=1.0)``)
   and records receive time minus send time. The first ``WARMUP_RECORDS`` are
   dropped; p50 and p99 are reported.
6. The queuelib workload on polybus: N single-message ``Producer.append``
   calls (buffered like queuelib's writes, written as batches of up to 1000
   that any process can read), ``flush``, then a durable group consumer
   ``poll`` + ``ack`` until all are read, then ``commit``, timed together and
   compared with queuelib's put+get rate. Figure 2 is the unbuffered case.
7. Recovery scan after a crash: a child process writes records with
   ``append_batch`` (batches of 1000) and is killed with SIGKILL without
   closing the log; the parent times opening the log and its topic plus
   ``Partition.recover()``, which forces the full re-scan a reboot would
   trigger (a plain reopen after a kill between appends scans nothing). The
   segment files are still in the page cache, so this is the engine's scan
   cost, not the disk's.

Throughput cases report the best of ``Sizes.repeats`` runs; throughput rows
also show their ratio to every peer's put+get rate. Targets are checked and
shown, but a missed target does not change the exit status (a failed case or
an engine that cannot be imported does).

Run ``python benchmarks/native_engine.py`` (under a minute on two cores) or
add ``--quick`` for a smoke run with smaller N and single runs.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import litequeue
import persistqueue
import queuelib

if TYPE_CHECKING:
    from polybus.log import Consumer, FsyncPolicy, Log

PAYLOAD_BYTES = 100
DISTINCT_PAYLOADS = 1000
LATENCY_RATE = 1000  # messages per second from the latency producer
WARMUP_RECORDS = 100  # latency samples dropped at the start (imports, page faults)
STAMP = struct.Struct("<q")  # perf_counter_ns() at the head of a latency record
STALL_SECONDS = 60.0  # a consumer that reads nothing for this long has failed
CHILD_STARTUP_SECONDS = 30.0

TOPIC = "bench"
GROUP = "bench"
RECOVERY_NOTE = "open + Partition.recover() (forced full scan); segments are in the page cache."


class BenchmarkError(RuntimeError):
    """A case produced wrong results or its child process failed."""


@dataclass(frozen=True)
class Sizes:
    """How many messages each case moves."""

    slow_peer: int
    fast_peer: int
    batch_append: int
    single_append: int
    fsync_append: int
    consume: int
    latency_seconds: float
    recovery: int
    repeats: int  # throughput cases report the best of this many runs


FULL = Sizes(
    slow_peer=5_000,
    fast_peer=200_000,
    batch_append=1_000_000,
    single_append=200_000,
    fsync_append=100_000,
    consume=1_000_000,
    latency_seconds=3.0,
    recovery=2_000_000,
    repeats=3,
)
QUICK = Sizes(
    slow_peer=500,
    fast_peer=20_000,
    batch_append=100_000,
    single_append=20_000,
    fsync_append=5_000,
    consume=100_000,
    latency_seconds=1.0,
    recovery=200_000,
    repeats=1,
)


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    name: str
    value: float
    unit: str
    target: str = ""
    passed: bool | None = None
    compare: bool = False  # show the ratio against each peer's put+get rate
    note: str = ""


# --------------------------------------------------------------------------- helpers


def make_payloads() -> list[bytes]:
    """Distinct random 100-byte payloads, cycled through by every case."""
    return [os.urandom(PAYLOAD_BYTES) for _ in range(DISTINCT_PAYLOADS)]


def messages(payloads: Sequence[bytes], n: int) -> list[bytes]:
    """The first ``n`` payloads of the endless cycle, as a list built before timing."""
    return list(itertools.islice(itertools.cycle(payloads), n))


def batches(payloads: Sequence[bytes], n: int, size: int) -> list[list[bytes]]:
    """``n`` messages cut into lists of ``size`` (``n`` must be a multiple of it)."""
    if n % size:
        raise ValueError(f"{n} messages do not split into batches of {size}")
    flat = messages(payloads, n)
    return [flat[i : i + size] for i in range(0, n, size)]


@contextmanager
def fresh_dir(root: Path, name: str) -> Iterator[Path]:
    """A new empty directory under ``root``, deleted afterwards."""
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_last(expected: bytes, got: object, case: str) -> None:
    if got != expected:
        raise BenchmarkError(f"{case}: last message read back differs from the last one written")


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def best_of(repeats: int, case: Callable[[], float]) -> float:
    """The highest rate of ``repeats`` runs; every run uses its own fresh directory."""
    return max(case() for _ in range(repeats))


# ----------------------------------------------------------------------------- peers


def time_put_get(
    put: Callable[[bytes], object], get: Callable[[], object], values: Sequence[bytes]
) -> tuple[float, object]:
    """Seconds to put every value then get them all back, and the last value got."""
    start = time.perf_counter()
    for value in values:
        put(value)
    last: object = None
    for _ in range(len(values)):
        last = get()
    return time.perf_counter() - start, last


def peer_sqlite_queue(path: Path, values: Sequence[bytes]) -> float:
    queue = persistqueue.SQLiteQueue(str(path), auto_commit=True)
    try:
        elapsed, last = time_put_get(queue.put, lambda: queue.get(block=False), values)
    finally:
        queue.close()
    check_last(values[-1], last, "persist-queue SQLiteQueue")
    return elapsed


def peer_file_queue(path: Path, values: Sequence[bytes]) -> float:
    queue = persistqueue.Queue(str(path))

    def get() -> object:
        item = queue.get(block=False)
        queue.task_done()
        return item

    elapsed, last = time_put_get(queue.put, get, values)
    check_last(values[-1], last, "persist-queue Queue")
    return elapsed


def peer_litequeue(path: Path, values: Sequence[bytes]) -> float:
    queue = litequeue.LiteQueue(str(path / "queue.sqlite3"))

    def get() -> object:
        message = queue.pop()
        queue.done(message.message_id)
        return message.data

    try:
        elapsed, last = time_put_get(queue.put, get, values)
    finally:
        queue.conn.close()
    check_last(values[-1], last, "litequeue")
    return elapsed


def peer_queuelib(path: Path, values: Sequence[bytes]) -> float:
    queue = queuelib.FifoDiskQueue(path / "queue")
    try:
        elapsed, last = time_put_get(queue.push, queue.pop, values)
    finally:
        queue.close()
    check_last(values[-1], last, "queuelib")
    return elapsed


PeerCase = Callable[[Path, Sequence[bytes]], float]


@dataclass(frozen=True)
class Peer:
    label: str  # column heading of the ratio against this peer
    title: str  # row name of its own put+get figure
    case: PeerCase
    slow: bool  # moves ``Sizes.slow_peer`` messages instead of ``Sizes.fast_peer``


PEERS = (
    Peer("sqlite-queue", "persist-queue SQLiteQueue put+get", peer_sqlite_queue, slow=True),
    Peer("file-queue", "persist-queue Queue (file) put+get", peer_file_queue, slow=True),
    Peer("litequeue", "litequeue put+pop+done", peer_litequeue, slow=True),
    Peer("queuelib", "queuelib FifoDiskQueue push+pop", peer_queuelib, slow=False),
)


def peer_rate(root: Path, name: str, case: PeerCase, values: Sequence[bytes]) -> float:
    with fresh_dir(root, name) as path:
        return rate(len(values), case(path, values))


def measure_peers(root: Path, payloads: Sequence[bytes], sizes: Sizes) -> dict[str, float]:
    """put+get messages per second of every peer, by label."""
    rates: dict[str, float] = {}
    for peer in PEERS:
        values = messages(payloads, sizes.slow_peer if peer.slow else sizes.fast_peer)
        run = partial(peer_rate, root, peer.label, peer.case, values)
        rates[peer.label] = best_of(sizes.repeats, run)
    return rates


# ---------------------------------------------------------------------------- engine


def open_log(path: Path, fsync: FsyncPolicy = "interval") -> Log:
    from polybus.log import Log

    return Log(path, fsync=fsync)


def timed_batch_appends(path: Path, groups: Sequence[Sequence[bytes]], fsync: FsyncPolicy) -> float:
    """Seconds to append every batch to one partition of a fresh topic."""
    with open_log(path, fsync) as log:
        append_batch = log.create_topic(TOPIC, partitions=1).partitions[0].append_batch
        start = time.perf_counter()
        for group in groups:
            append_batch(group)
        return time.perf_counter() - start


def engine_batch_append(root: Path, payloads: Sequence[bytes], sizes: Sizes) -> float:
    groups = batches(payloads, sizes.batch_append, 1000)
    with fresh_dir(root, "batch") as path:
        return rate(sizes.batch_append, timed_batch_appends(path, groups, "interval"))


def engine_fsync_batch_append(root: Path, payloads: Sequence[bytes], sizes: Sizes) -> float:
    groups = batches(payloads, sizes.fsync_append, 100)
    with fresh_dir(root, "fsync") as path:
        return rate(sizes.fsync_append, timed_batch_appends(path, groups, "always"))


def engine_single_append(root: Path, payloads: Sequence[bytes], sizes: Sizes) -> float:
    values = messages(payloads, sizes.single_append)
    with fresh_dir(root, "single") as path, open_log(path) as log:
        append = log.create_topic(TOPIC, partitions=1).partitions[0].append
        start = time.perf_counter()
        for value in values:
            append(value)
        return rate(len(values), time.perf_counter() - start)


def drain(consumer: Consumer, n: int, max_records: int, timeout: float) -> bytes | None:
    """poll + ack until ``n`` records were read; returns the last value read."""
    poll, ack = consumer.poll, consumer.ack
    seen, idle_since = 0, time.monotonic()
    last: bytes | None = None
    while seen < n:
        records = poll(max_records=max_records, timeout=timeout)
        if not records:
            if time.monotonic() - idle_since > STALL_SECONDS:
                raise BenchmarkError(f"consumer stalled after {seen} of {n} records")
            continue
        ack(records)
        seen += len(records)
        last = records[-1].payload
        idle_since = time.monotonic()
    if seen != n:
        raise BenchmarkError(f"consumer read {seen} records, expected {n}")
    return last


def engine_consume(root: Path, payloads: Sequence[bytes], sizes: Sizes) -> float:
    groups = batches(payloads, sizes.consume, 1000)
    with fresh_dir(root, "consume") as path:
        timed_batch_appends(path, groups, "interval")  # the fill is not part of the figure
        with open_log(path) as log, log.consumer(TOPIC, group=GROUP) as consumer:
            start = time.perf_counter()
            last = drain(consumer, sizes.consume, max_records=5000, timeout=0)
            consumer.commit()
            elapsed = time.perf_counter() - start
    check_last(groups[-1][-1], last, "polybus consume")
    return rate(sizes.consume, elapsed)


def engine_put_get(root: Path, payloads: Sequence[bytes], sizes: Sizes) -> float:
    values = messages(payloads, sizes.fast_peer)
    with fresh_dir(root, "putget") as path, open_log(path) as log:
        topic = log.create_topic(TOPIC, partitions=1)
        with log.consumer(TOPIC, group=GROUP) as consumer, topic.producer() as producer:
            start = time.perf_counter()
            append = producer.append
            for value in values:
                append(value)
            producer.flush()
            last = drain(consumer, len(values), max_records=1000, timeout=0)
            consumer.commit()
            elapsed = time.perf_counter() - start
    check_last(values[-1], last, "polybus put+get")
    return rate(len(values), elapsed)


def spawn_child(role: str, path: Path, count: int) -> subprocess.Popen[bytes]:
    """Run this file again as a child process; only the log path and a count cross over."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", role]
    command += ["--child-path", str(path), "--child-count", str(count)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def child_failure(child: subprocess.Popen[bytes], role: str) -> BenchmarkError:
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    return BenchmarkError(f"{role} child exited with {child.returncode}:\n{stderr}")


def sent_ns(value: bytes | None) -> int:
    if value is None:
        raise BenchmarkError("a latency record came back without its value")
    return int(STAMP.unpack_from(value)[0])


def collect_latencies(consumer: Consumer, child: subprocess.Popen[bytes], count: int) -> list[int]:
    """Receive time minus send time, in ns, of ``count`` stamped records."""
    latencies: list[int] = []
    deadline = time.monotonic() + CHILD_STARTUP_SECONDS + count / LATENCY_RATE
    while len(latencies) < count:
        records = consumer.poll(max_records=1000, timeout=1.0)
        received = time.perf_counter_ns()
        latencies.extend(received - sent_ns(record.value) for record in records)
        if records:
            continue
        if child.poll() not in (None, 0) or time.monotonic() > deadline:
            raise child_failure(child, "latency producer")
    return latencies


def engine_latency(root: Path, sizes: Sizes) -> tuple[float, float]:
    """p50 and p99 cross-process append-to-poll latency, in microseconds."""
    count = int(sizes.latency_seconds * LATENCY_RATE)
    with fresh_dir(root, "latency") as path, open_log(path) as log:
        log.create_topic(TOPIC, partitions=1)
        with log.consumer(TOPIC, group=None, start="earliest") as consumer:
            child = spawn_child("latency", path, count)
            try:
                latencies = collect_latencies(consumer, child, count)
            finally:
                child.wait()
        if child.returncode != 0:
            raise child_failure(child, "latency producer")
    cuts = statistics.quantiles(latencies[WARMUP_RECORDS:], n=100, method="inclusive")
    return cuts[49] / 1000, cuts[98] / 1000


def timed_recovery(path: Path) -> tuple[int, float]:
    """Open the log and its topic and force a full re-scan: (records kept, seconds).

    Opening alone only re-scans after a reboot or a torn publish (a SIGKILL between
    appends leaves neither), so ``Partition.recover()`` forces the scan a reboot
    would trigger: every batch of every segment framed and CRC-checked, the tail
    index rebuilt. Closing the log is not timed.
    """
    start = time.perf_counter()
    with open_log(path) as log:
        kept = sum(partition.recover() for partition in log.topic(TOPIC).partitions)
        elapsed = time.perf_counter() - start
    return kept, elapsed


def engine_recovery(root: Path, sizes: Sizes) -> float:
    with fresh_dir(root, "recovery") as path:
        child = spawn_child("recovery", path, sizes.recovery)
        child.wait()
        if child.returncode != -signal.SIGKILL:
            raise child_failure(child, "recovery writer")
        kept, elapsed = timed_recovery(path)
    if kept != sizes.recovery:
        raise BenchmarkError(f"recovery kept {kept} records, expected {sizes.recovery}")
    return rate(kept, elapsed)


# ------------------------------------------------------------------ child processes


def child_latency_producer(path: Path, count: int) -> None:
    """Append ``count`` records stamped with perf_counter_ns() at LATENCY_RATE per second."""
    padding = bytes(PAYLOAD_BYTES - STAMP.size)
    interval_ns = 1_000_000_000 // LATENCY_RATE
    with open_log(path) as log:
        append = log.topic(TOPIC).partitions[0].append
        start = time.perf_counter_ns()
        for i in range(count):
            delay = start + i * interval_ns - time.perf_counter_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            append(STAMP.pack(time.perf_counter_ns()) + padding)


def child_crashing_writer(path: Path, count: int) -> None:
    """Write ``count`` records in batches of 1000, then die by SIGKILL without closing."""
    groups = batches(make_payloads(), count, 1000)
    log = open_log(path)
    append_batch = log.create_topic(TOPIC, partitions=1).partitions[0].append_batch
    for group in groups:
        append_batch(group)
    os.kill(os.getpid(), signal.SIGKILL)


CHILDREN: dict[str, Callable[[Path, int], None]] = {
    "latency": child_latency_producer,
    "recovery": child_crashing_writer,
}


# --------------------------------------------------------------------------- report


def throughput_row(name: str, value: float, target: float, unit: str = "msg/s") -> Row:
    return Row(name, value, unit, f">= {target:,.0f}", value >= target, compare=True)


def measure_engine(
    root: Path, payloads: Sequence[bytes], sizes: Sizes, peers: dict[str, float]
) -> list[Row]:
    """Every polybus figure, in the order of the module docstring."""
    rows = [
        throughput_row(
            "1. append_batch(1000), fsync=interval",
            best_of(sizes.repeats, lambda: engine_batch_append(root, payloads, sizes)),
            1_000_000,
        ),
        throughput_row(
            "2. append (1 msg, visible on return)",
            best_of(sizes.repeats, lambda: engine_single_append(root, payloads, sizes)),
            250_000,
        ),
        throughput_row(
            "3. append_batch(100), fsync=always",
            best_of(sizes.repeats, lambda: engine_fsync_batch_append(root, payloads, sizes)),
            250_000,
        ),
        throughput_row(
            "4. consume: poll(5000)+ack+commit",
            best_of(sizes.repeats, lambda: engine_consume(root, payloads, sizes)),
            1_000_000,
        ),
    ]
    p50, p99 = engine_latency(root, sizes)
    rows.append(Row("5. cross-process latency p50", p50, "us", "<= 50", p50 <= 50))
    rows.append(Row("5. cross-process latency p99", p99, "us", "<= 200", p99 <= 200))
    put_get = best_of(sizes.repeats, lambda: engine_put_get(root, payloads, sizes))
    rows.append(
        Row(
            "6. producer.append + poll/ack/commit",
            put_get,
            "msg/s",
            ">= 1.0x queuelib",
            put_get >= peers["queuelib"],
            compare=True,
        )
    )
    recovery = engine_recovery(root, sizes)
    rows.append(
        Row(
            "7. recovery scan after SIGKILL",
            recovery,
            "rec/s",
            ">= 2,000,000",
            recovery >= 2_000_000,
            note=RECOVERY_NOTE,
        )
    )
    return rows


def format_value(row: Row) -> str:
    digits = 1 if row.unit == "us" else 0
    return f"{row.value:,.{digits}f} {row.unit}"


def format_ratios(row: Row, peers: dict[str, float]) -> list[str]:
    if not row.compare:
        return ["-"] * len(peers)
    return [f"{row.value / peer:,.1f}x" for peer in peers.values()]


def print_table(rows: Sequence[Row], peers: dict[str, float]) -> None:
    header = ["figure", "measured", "target", "pass", *(f"x {name}" for name in peers)]
    lines = [header]
    for row in rows:
        verdict = "-" if row.passed is None else ("PASS" if row.passed else "FAIL")
        lines.append(
            [row.name, format_value(row), row.target or "-", verdict, *format_ratios(row, peers)]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    for row in rows:
        if row.note:
            print(f"note: {row.name.split('.')[0]}. {row.note}")


def peer_rows(peers: dict[str, float]) -> list[Row]:
    return [Row(peer.title, peers[peer.label], "msg/s") for peer in PEERS]


def describe(sizes: Sizes, *, quick: bool) -> str:
    return (
        f"polybus native engine vs embedded queues ({'quick' if quick else 'full'} run), "
        f"{PAYLOAD_BYTES}-byte messages; N: slow peers {sizes.slow_peer:,}, "
        f"queuelib and figure 6 {sizes.fast_peer:,}, figures 1-4 {sizes.batch_append:,} / "
        f"{sizes.single_append:,} / {sizes.fsync_append:,} / {sizes.consume:,}, "
        f"latency {sizes.latency_seconds:g} s at {LATENCY_RATE:,}/s, recovery {sizes.recovery:,}"
    )


def engine_import_error() -> str | None:
    try:
        module = importlib.import_module("polybus.log")
    except ImportError as exc:
        return str(exc)
    return None if hasattr(module, "Log") else "polybus.log has no Log yet"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller N, for a smoke run")
    parser.add_argument("--dir", type=Path, help="where to create temp dirs (default: system temp)")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--child-path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-count", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        CHILDREN[args.child](args.child_path, args.child_count)
        return 0
    sizes = QUICK if args.quick else FULL
    payloads = make_payloads()
    with tempfile.TemporaryDirectory(prefix="polybus-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        peers = measure_peers(root, payloads, sizes)
        error = engine_import_error()
        rows = peer_rows(peers)
        if error is None:
            rows += measure_engine(root, payloads, sizes, peers)
    print(describe(sizes, quick=args.quick))
    print_table(rows, peers)
    if error is not None:
        print(f"polybus.log is not importable ({error}); engine figures skipped")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
