"""Crash and corruption tests of the native log engine.

A writer SIGKILLed at random moments must lose nothing it acknowledged;
torn tails must be truncated by recovery; damaged bytes anywhere in a
segment or its index must surface as CorruptRecordError (or be skipped with
``skip_corrupt=True``), never as a stray exception, a wrong record or a
silent gap.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_workers import (
    TOPIC,
    Children,
    complete_lines,
    crash_value,
    parse_crash_value,
    wait_until,
)
from polybus.errors import CorruptRecordError, PolybusError
from polybus.log import Log, Partition, Record
from polybus.log.format import Headers, check_batch
from polybus.log.partition import BOOT_ID

KILLS = 20
#: the writer run id the parent's own appends carry
PARENT_RUN = -1
#: byte offset of the boot id in a partition's ``head`` (field 9 of its ``<11Q`` layout)
HEAD_BOOT_AT = 9 * 8
FIRST_SEGMENT = f"{0:020d}.log"
FIRST_INDEX = f"{0:020d}.idx"

#: run, first offset, count of one acknowledged append
Ack = tuple[int, int, int]
#: offset, key, value, headers: what a record must read back as
Stored = tuple[int, bytes | None, bytes | None, Headers]


class Span(NamedTuple):
    """Where one batch sits in a segment file."""

    pos: int
    size: int
    base: int
    n_records: int


def batch_spans(segment: Path) -> list[Span]:
    """The valid batches at the start of a segment file, in order."""
    data = segment.read_bytes()
    spans: list[Span] = []
    pos = 0
    while pos < len(data):
        base, count, size = check_batch(data, pos, len(data))
        spans.append(Span(pos, size, base, count))
        pos += size
    return spans


def iter_records(
    part: Partition, max_records: int = 1000, max_bytes: int = 1 << 20
) -> Iterator[Record]:
    """Every record up to the end offset, read in chunks as a consumer would.

    Fails if a read returns nothing before the end: that would hide records.
    """
    offset = 0
    while offset < part.end_offset:
        chunk = part.read(offset, max_records, max_bytes)
        assert chunk, f"read({offset}) returned nothing, but end_offset is {part.end_offset}"
        yield from chunk
        offset = chunk[-1].offset + 1


def read_all(part: Partition, max_records: int = 1000, max_bytes: int = 1 << 20) -> list[Record]:
    return list(iter_records(part, max_records, max_bytes))


def stored(records: Iterable[Record]) -> list[Stored]:
    return [(r.offset, r.key, r.payload, r.headers) for r in records]


def flip(path: Path, flips: Iterable[tuple[int, int]]) -> None:
    """XOR the byte at each ``(position, mask)``."""
    data = bytearray(path.read_bytes())
    for pos, mask in flips:
        data[pos] ^= mask
    path.write_bytes(bytes(data))


def simulate_reboot(part_dir: Path) -> None:
    """Make ``head`` look written before a reboot, so the next open re-scans the tail."""
    with open(part_dir / "head", "r+b") as f:
        f.seek(HEAD_BOOT_AT)
        f.write(struct.pack("<Q", BOOT_ID ^ 1))


# -- SIGKILLed writer -----------------------------------------------------------------


def kill_writer_at_random(
    kids: Children, log_dir: Path, segment_bytes: int, run: int, rng: random.Random
) -> list[Ack]:
    """Run a writer, SIGKILL it 20-200 ms after its first acknowledged append; its acks."""
    acks = log_dir.parent / f"acks-{run}"
    proc = kids.spawn("writer", log_dir, segment_bytes, run, acks, rng.randrange(1 << 32))
    wait_until(
        lambda: bool(complete_lines(acks)) or proc.poll() is not None,
        30,
        f"writer run {run} to acknowledge its first append",
    )
    time.sleep(rng.uniform(0.02, 0.2))  # the random moment of the kill
    kids.kill(proc)
    acked: list[Ack] = []
    for line in complete_lines(acks):
        first, count = map(int, line.split())
        acked.append((run, first, count))
    return acked


def check_crash_log(part: Partition, acks: Iterable[Ack]) -> None:
    """All records intact and dense from 0, each acked one holding its writer's value.

    Then one more append must land exactly at the end offset.
    """
    records = read_all(part)
    end = part.end_offset
    assert [r.offset for r in records] == list(range(end))
    writer_of: dict[int, int] = {}
    for rec in records:
        decoded = parse_crash_value(rec.payload)
        assert decoded is not None, f"damaged value read back: {rec!r}"
        assert decoded[0] == rec.offset, f"record written for offset {decoded[0]} read at {rec!r}"
        writer_of[rec.offset] = decoded[1]
    lost = [
        (run, offset)
        for run, first, count in acks
        for offset in range(first, first + count)
        if writer_of.get(offset) != run
    ]
    assert not lost, f"{len(lost)} acknowledged records lost or replaced (run, offset): {lost[:5]}"
    assert part.append(crash_value(end, PARENT_RUN, b"")) == end
    back = [parse_crash_value(r.payload) for r in part.read(end)]
    assert back == [(end, PARENT_RUN)], f"the record appended at {end} reads back as {back}"


@pytest.mark.slow
@pytest.mark.parametrize("segment_bytes", [64 << 20, 8192], ids=["one-segment", "8k-segments"])
def test_sigkilled_writer_loses_no_acknowledged_record(tmp_path: Path, segment_bytes: int) -> None:
    """20 SIGKILLs of an fsync="always" writer, each run continuing the same log.

    After every kill a reopened log holds every acknowledged record with its
    exact value, no damaged record, dense offsets, and appends at the end.
    """
    rng = random.Random(segment_bytes)
    log_dir = tmp_path / "log"
    acks: list[Ack] = []
    end = 0
    with Children(tmp_path) as kids:
        for run in range(KILLS):
            run_acks = kill_writer_at_random(kids, log_dir, segment_bytes, run, rng)
            assert run_acks[0][1] == end, "the writer did not continue at the end offset"
            acks += run_acks
            with Log(log_dir) as log:
                part = log.topic(TOPIC).partitions[0]
                check_crash_log(part, acks)
                end = part.end_offset
    segments = list((log_dir / "topics" / TOPIC / "0").glob("*.log"))
    if segment_bytes == 8192:
        assert len(segments) > KILLS, "too few segment rolls to test them"
    else:
        assert len(segments) == 1


def killed_writer_log(tmp_path: Path) -> tuple[Path, Path, list[Ack]]:
    """A one-segment log left by a SIGKILLed writer: log dir, partition dir, acks."""
    log_dir = tmp_path / "log"
    with Children(tmp_path) as kids:
        acks = kill_writer_at_random(kids, log_dir, 64 << 20, 0, random.Random(3))
    return log_dir, log_dir / "topics" / TOPIC / "0", acks


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated-batch"])
def test_recover_truncates_damaged_tail_after_kill(tmp_path: Path, damage: str) -> None:
    """part.recover() after a kill and a damaged tail: the good prefix stays, the rest goes.

    Garbage past the end is cut and nothing is lost; a last batch cut in half
    is dropped whole. Appends continue densely where the good prefix ends.
    """
    log_dir, part_dir, acks = killed_writer_log(tmp_path)
    segment = part_dir / FIRST_SEGMENT
    with Log(log_dir) as log:
        part = log.topic(TOPIC).partitions[0]
        spans = batch_spans(segment)
        assert len(spans) >= 2
        last = spans[-1]
        with open(segment, "r+b") as f:
            if damage == "garbage":
                keep_end, keep_bytes = part.end_offset, last.pos + last.size
                f.seek(0, os.SEEK_END)
                f.write(random.Random(1).randbytes(300))
            else:
                keep_end, keep_bytes = last.base, last.pos
                f.truncate(last.pos + last.size // 2)
        assert part.recover() == keep_end
        assert part.end_offset == keep_end
        assert segment.stat().st_size == keep_bytes
        check_crash_log(part, [a for a in acks if a[1] + a[2] <= keep_end])
    with Log(log_dir) as log:
        part = log.topic(TOPIC).partitions[0]
        assert part.end_offset == keep_end + 1
        check_crash_log(part, [a for a in acks if a[1] + a[2] <= keep_end])


def test_reboot_recovery_cuts_the_tail_a_reboot_tore(tmp_path: Path) -> None:
    """Opening after a (simulated) reboot that tore the unflushed tail re-scans from the
    last flush: whole batches stay, the torn one and all after it go, and appends
    continue at its offset, though the head had published more.
    """
    log_dir = tmp_path / "log"
    segment = log_dir / "topics" / TOPIC / "0" / FIRST_SEGMENT
    with Log(log_dir, fsync="never") as log:
        part = log.create_topic(TOPIC, 1).partitions[0]
        for run in (0, 1):  # 0: flushed, then 1: left in the page cache
            for _ in range(10):
                first = part.end_offset
                part.append_batch([crash_value(first + i, run, b"x") for i in range(3)])
            if run == 0:
                part.flush()
    spans = batch_spans(segment)
    torn = spans[12]  # the reboot kept two unflushed batches whole and half of this one
    with open(segment, "r+b") as f:
        f.truncate(torn.pos + torn.size // 2)
    simulate_reboot(segment.parent)
    with Log(log_dir) as log:
        part = log.topic(TOPIC).partitions[0]
        assert part.end_offset == torn.base
        assert segment.stat().st_size == torn.pos
        check_crash_log(part, [(0, 0, 30), (1, 30, torn.base - 30)])


@pytest.mark.slow
def test_writer_killed_while_compacting_keeps_every_keys_newest_record(tmp_path: Path) -> None:
    """10 SIGKILLs of a writer on a compact topic with 8 KiB segments, so that kills land
    in rolls and in background compactions: after each, every key's newest acknowledged
    record (or a newer one) reads back intact, and appends go on at the end."""
    rng = random.Random(11)
    log_dir = tmp_path / "log"
    newest: dict[bytes, int] = {}  # key -> offset of its last acknowledged record
    with Children(tmp_path) as kids:
        for run in range(10):
            acks = tmp_path / f"acks-{run}"
            proc = kids.spawn("compact_writer", log_dir, run, acks, rng.randrange(1 << 32))
            wait_until(
                lambda: len(complete_lines(acks)) > 200 or proc.poll() is not None,  # noqa: B023
                30,
                f"compacting writer run {run} to acknowledge 200 appends",
            )
            time.sleep(rng.uniform(0.0, 0.2))  # the random moment of the kill
            kids.kill(proc)
            for line in complete_lines(acks):
                offset, key = line.split()
                newest[key.encode()] = int(offset)
            with Log(log_dir) as log:
                part = log.topic(TOPIC).partitions[0]
                records = read_all(part)
                for rec in records:
                    decoded = parse_crash_value(rec.payload)
                    assert decoded is not None, f"damaged value read back: {rec!r}"
                    assert decoded[0] == rec.offset, f"record of {decoded[0]} read at {rec!r}"
                last = {r.key: r.offset for r in records}
                lost = {k: o for k, o in newest.items() if last.get(k, -1) < o}
                assert not lost, f"keys whose newest acknowledged record is gone: {lost}"
                end = part.end_offset
                assert part.append(crash_value(end, 99, b""), key=b"k0") == end
                newest[b"k0"] = end
    segments = list((log_dir / "topics" / TOPIC / "0").glob("*.log"))
    assert len(segments) < 40, "compaction did not keep the segment count down"


def test_writer_killed_mid_roll_leaves_every_record_readable(tmp_path: Path) -> None:
    """A writer killed inside a segment roll, after creating the next segment file and
    before publishing the roll, leaves an empty file named after the end offset (the
    kill tests above hit this). Records appended after that must still read back.
    """
    log_dir = tmp_path / "log"
    part_dir = log_dir / "topics" / TOPIC / "0"
    with Log(log_dir, fsync="always") as log:
        part = log.create_topic(TOPIC, 1, segment_bytes=8192).partitions[0]
        while (part_dir / FIRST_SEGMENT).stat().st_size < 7000:
            part.append(crash_value(part.end_offset, 0, b"x" * 80))
        end = part.end_offset
    (part_dir / f"{end:020d}.log").touch()  # what the SIGKILL leaves behind
    with Log(log_dir) as log:
        check_crash_log(log.topic(TOPIC).partitions[0], [(0, 0, end)])


# -- damaged bytes ----------------------------------------------------------------------


def write_sample_log(log_dir: Path) -> list[Stored]:
    """A one-segment log of single records and batches, some keyed, some with headers.

    Over 4 KiB, so its index has several entries. Returns what each offset holds.
    """
    rng = random.Random(7)
    with Log(log_dir) as log:
        part = log.create_topic(TOPIC, 1).partitions[0]
        for i in range(40):
            n = rng.randint(1, 6)
            values = [rng.randbytes(rng.randint(0, 80)) for _ in range(n)]
            keys = [b"key-%d" % rng.randrange(5) if rng.random() < 0.7 else None for _ in values]
            headers = [(("trace", str(rng.random())), ("n", str(j))) for j in range(n)]
            if n == 1:
                part.append(values[0], key=keys[0], headers=headers[0] if i % 2 else None)
            else:
                part.append_batch(
                    values, keys=keys if i % 3 else None, headers=headers if i % 2 else None
                )
        return stored(read_all(part))


class SampleLog:
    """A pristine sample log (tests copy it, never modify it) and its records."""

    def __init__(self, path: Path, records: list[Stored]) -> None:
        self.path = path
        self.records = records

    def copy(self, to: Path) -> Path:
        """A copy of the log at ``to``; returns its partition directory."""
        shutil.copytree(self.path, to)
        return to / "topics" / TOPIC / "0"

    def __repr__(self) -> str:  # keeps Hypothesis' failure reports short
        return f"SampleLog({self.path})"


@pytest.fixture(scope="module")
def sample_log(tmp_path_factory: pytest.TempPathFactory) -> SampleLog:
    log_dir = tmp_path_factory.mktemp("sample") / "log"
    records = write_sample_log(log_dir)
    assert (log_dir / "topics" / TOPIC / "0" / FIRST_INDEX).stat().st_size >= 16
    return SampleLog(log_dir, records)


def read_damaged(log_dir: Path, max_records: int) -> tuple[list[Record], PolybusError | None]:
    """Open the log and read it all; the records read and the PolybusError that stopped it."""
    records: list[Record] = []
    try:
        with Log(log_dir) as log:
            records.extend(iter_records(log.topic(TOPIC).partitions[0], max_records))
    except PolybusError as exc:
        return records, exc
    return records, None


def flips_in(data: st.DataObject, size: int) -> list[tuple[int, int]]:
    """1-8 distinct positions below ``size``, each with a non-zero XOR mask."""
    positions = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=8, unique=True))
    return [(pos, data.draw(st.integers(1, 255))) for pos in positions]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), max_records=st.sampled_from([1, 7, 1000]))
def test_flipped_segment_bytes_raise_corrupt_record_error(
    sample_log: SampleLog, data: st.DataObject, max_records: int
) -> None:
    """1-8 flipped bytes anywhere in a segment are always detected, as CorruptRecordError.

    Records read before the damage are exactly the ones written; nothing else
    (struct.error, msgpack, UnicodeDecodeError, MemoryError...) escapes.
    """
    with tempfile.TemporaryDirectory() as tmp:
        segment = sample_log.copy(Path(tmp) / "log") / FIRST_SEGMENT
        size = segment.stat().st_size
        flip(segment, flips_in(data, size))
        records, error = read_damaged(Path(tmp) / "log", max_records)
    assert isinstance(error, CorruptRecordError), "damaged segment read back without an error"
    assert error.path == str(segment)
    assert 0 <= error.position < size
    assert stored(records) == sample_log.records[: len(records)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), max_records=st.sampled_from([1, 7, 1000]))
def test_flipped_index_bytes_never_hide_or_invent_records(
    sample_log: SampleLog, data: st.DataObject, max_records: int
) -> None:
    """1-8 flipped bytes in the sparse index (the segment intact): reading from 0
    returns every record, dense and exact, or raises CorruptRecordError; never a
    stray exception, a skipped record or an empty read before the end.
    """
    with tempfile.TemporaryDirectory() as tmp:
        index = sample_log.copy(Path(tmp) / "log") / FIRST_INDEX
        flip(index, flips_in(data, index.stat().st_size))
        records, error = read_damaged(Path(tmp) / "log", max_records)
    if error is None:
        assert stored(records) == sample_log.records
    else:
        assert isinstance(error, CorruptRecordError)
        assert stored(records) == sample_log.records[: len(records)]


def damage_batch(part_dir: Path) -> tuple[Path, Span, Span]:
    """Flip the last byte of a batch in the middle of the log; the segment, that batch, the next."""
    segment = part_dir / FIRST_SEGMENT
    spans = batch_spans(segment)
    k = len(spans) // 2
    flip(segment, [(spans[k].pos + spans[k].size - 1, 0x55)])
    return segment, spans[k], spans[k + 1]


@pytest.mark.parametrize("max_records", [1000, 1], ids=["whole-segment", "record-by-record"])
def test_corrupt_record_error_names_file_and_byte_position(
    sample_log: SampleLog, tmp_path: Path, max_records: int
) -> None:
    """The error names the segment and the damaged batch's byte position in that file,
    in its message and as ``.path``/``.position``, however the reads were chunked.
    """
    segment, bad, _next = damage_batch(sample_log.copy(tmp_path / "log"))
    records, error = read_damaged(tmp_path / "log", max_records)
    assert isinstance(error, CorruptRecordError)
    assert (error.path, error.position) == (str(segment), bad.pos)
    assert str(segment) in str(error)
    assert f"byte {bad.pos}" in str(error)
    assert stored(records) == sample_log.records[: len(records)]


@pytest.mark.parametrize(
    "chunking", ["whole-segment", "record-by-record", "chunk-ends-inside-next-batch"]
)
def test_skip_corrupt_reads_past_a_damaged_batch(
    sample_log: SampleLog, tmp_path: Path, chunking: str
) -> None:
    """With skip_corrupt=True, reading skips exactly the damaged batch's records and
    returns every record after it, however the reads were chunked.
    """
    _segment, bad, after = damage_batch(sample_log.copy(tmp_path / "log"))
    max_records, max_bytes = {
        "whole-segment": (1000, 1 << 20),
        "record-by-record": (1, 1 << 20),
        # the first read's chunk holds the damaged batch whole and all but one byte of the next
        "chunk-ends-inside-next-batch": (1000, after.pos + after.size - 1),
    }[chunking]
    with Log(tmp_path / "log", skip_corrupt=True) as log:
        records = read_all(log.topic(TOPIC).partitions[0], max_records, max_bytes)
    lost = range(bad.base, bad.base + bad.n_records)
    assert stored(records) == [s for s in sample_log.records if s[0] not in lost]


def test_reboot_recovery_reports_rotten_batch_as_corrupt_record_error(
    sample_log: SampleLog, tmp_path: Path
) -> None:
    """A batch rotten on disk before the recovery point, met when opening after a
    reboot, raises CorruptRecordError (or is cut off), never an internal exception.
    """
    part_dir = sample_log.copy(tmp_path / "log")
    damage_batch(part_dir)
    simulate_reboot(part_dir)
    records, error = read_damaged(tmp_path / "log", 1000)
    assert error is None or isinstance(error, CorruptRecordError)
    assert stored(records) == sample_log.records[: len(records)]
