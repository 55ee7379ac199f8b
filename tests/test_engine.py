"""The native engine's own features, below the Bus: segments, index, retention,
compaction, time lookup, group fencing and cross-process wake-ups."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polybus.errors import ClosedError, FencedError, MessageTooLarge, TopicNotFound
from polybus.log import Log, encode_batch
from polybus.log.format import decode_batch
from polybus.log.notify import Waiter


def values(n: int, start: int = 0) -> list[bytes]:
    return [f"value-{i:06d}".encode() * 8 for i in range(start, start + n)]


def open_files() -> list[str]:
    """What this process's file descriptors point at."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return out


def read_all(log: Log, topic: str, partition: int = 0) -> list[bytes | None]:
    part = log.topic(topic).partitions[partition]
    out = []
    offset = 0
    while batch := part.read(offset, 333):
        out.extend(r.payload for r in batch)
        offset = batch[-1].offset + 1
    return out


def test_segments_roll_and_reads_cross_them(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        part = log.create_topic("t", segment_bytes=8192).partitions[0]
        for i in range(0, 3000, 100):
            assert part.append_batch(values(100, i)) == i
        for v in values(50, 3000):
            part.append(v)
        segments = sorted(p.name for p in (tmp_path / "topics/t/0").glob("*.log"))
        assert len(segments) > 10
        assert read_all(log, "t") == values(3050)
    with Log(tmp_path) as again:
        assert read_all(again, "t") == values(3050)
        assert again.topic("t").partitions[0].end_offset == 3050


def test_sparse_index_finds_any_offset(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        part = log.create_topic("t", segment_bytes=1 << 16).partitions[0]
        for i in range(0, 5000, 7):
            part.append_batch(values(7, i))
        assert (tmp_path / "topics/t/0/00000000000000000000.idx").stat().st_size > 8
        for offset in (0, 1, 6, 7, 1234, 4095, 4999, 5000, 5003):
            got = part.read(offset, 2)
            assert [r.offset for r in got] == [o for o in (offset, offset + 1) if o < 5005]


def test_reads_in_small_chunks_see_every_batch_whole(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        part = log.create_topic("t").partitions[0]
        for i in range(0, 400, 40):
            part.append_batch(values(40, i))
            part.append(values(1, 1000 + i)[0])
        expected = [v for i in range(0, 400, 40) for v in [*values(40, i), values(1, 1000 + i)[0]]]
        for max_bytes in (16, 100, 3000, 1 << 20):
            got: list[bytes | None] = []
            offset = 0
            while batch := part.read(offset, 7, max_bytes=max_bytes):
                got.extend(r.payload for r in batch)
                offset = batch[-1].offset + 1
            assert got == expected, max_bytes


def test_retention_by_size_and_age_deletes_oldest_segments(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        by_size = log.create_topic("size", segment_bytes=8192, retention_bytes=20_000)
        part = by_size.partitions[0]
        for i in range(0, 2000, 50):
            part.append_batch(values(50, i))
        assert part.start_offset > 0
        total = sum(p.stat().st_size for p in (tmp_path / "topics/size/0").glob("*.log"))
        assert total < 20_000 + 2 * 8192
        first = part.read(0, 1)[0]
        assert first.offset == part.start_offset
        assert first.payload == values(1, first.offset)[0]

        by_age = log.create_topic("age", segment_bytes=8192, retention_ms=1)
        part = by_age.partitions[0]
        for i in range(0, 600, 50):
            part.append_batch(values(50, i))
        time.sleep(0.01)
        part.enforce_retention()
        assert part.start_offset == int(sorted((tmp_path / "topics/age/0").glob("*.log"))[0].stem)
        assert part.start_offset > 0
        assert read_all(log, "age") == values(600 - part.start_offset, part.start_offset)


def test_compaction_keeps_the_newest_value_per_key(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        part = log.create_topic("sessions", segment_bytes=4096, compact=True).partitions[0]
        for round_ in range(200):
            for k in range(5):
                part.append(f"{k}:{round_}".encode(), key=f"k{k}".encode())
        part.append(None, key=b"k0")  # tombstone
        part.compact()  # also runs at each roll; this call covers the newest sealed segment
        records = []
        offset = 0
        while batch := part.read(offset):
            records.extend(batch)
            offset = batch[-1].offset + 1
        assert len(records) < 200  # of 1001; the active segment is never compacted
        latest = {r.key: r.payload for r in records}
        assert latest == {
            b"k0": None,
            **{f"k{k}".encode(): f"{k}:199".encode() for k in range(1, 5)},
        }
        offsets = [r.offset for r in records]
        assert offsets == sorted(set(offsets))
        assert part.append(b"after", key=b"k9") == 1001
        # sealed segments left with nothing are deleted, not kept as empty files
        assert len(list((tmp_path / "topics/sessions/0").glob("*.log"))) <= 3


def test_compaction_of_mixed_batches_keeps_keyless_records_headers_and_times(
    tmp_path: Path,
) -> None:
    """Batches whose records are partly superseded are cut, not dropped whole; records
    without a key, headers, timestamps and not-before times survive the rewrite."""
    with Log(tmp_path) as log:
        part = log.create_topic("mixed", segment_bytes=4096, compact=True).partitions[0]
        expected: dict[int, tuple[bytes | None, bytes | None]] = {}
        newest: dict[bytes, int] = {}
        for round_ in range(120):
            keys = [b"a", None, f"r{round_}".encode(), b"b"]
            first = part.append_batch(
                [f"{round_}:{i}".encode() for i in range(4)],
                keys=keys,
                headers=[(("round", str(round_)),), None, None, None],
                timestamp_ms=[1000 + round_, 2000, 3000, 4000 + round_],
                not_before_ms=[0, 0, 5 + round_, 0],
            )
            for i, key in enumerate(keys):
                expected[first + i] = (key, f"{round_}:{i}".encode())
                if key is not None:
                    newest[key] = first + i
        part.flush()  # newer records count once they would survive a reboot
        part.compact()
        records = list(part._scan_from(0))
        sealed_end = int(sorted((tmp_path / "topics/mixed/0").glob("*.log"))[-1].stem)
        for r in records:
            assert expected[r.offset] == (r.key, r.payload)
        kept = {r.offset for r in records}
        for offset, (key, _) in expected.items():
            if key is None or newest[key] == offset or offset >= sealed_end:
                assert offset in kept, f"offset {offset} (key {key!r}) was compacted away"
            else:
                assert offset not in kept, f"superseded offset {offset} survived"
        by_offset = {r.offset: r for r in records}
        last_a = by_offset[newest[b"a"]]
        assert last_a.headers == (("round", "119"),)
        assert last_a.timestamp_ms == 1119
        assert by_offset[newest[b"r7"]].not_before_ms == 12
        assert by_offset[newest[b"b"]].timestamp_ms == 4119
        assert len(records) < 400  # of 480: whole batches and parts of them went
        assert part.append(b"after", key=b"a") == 480


def test_compaction_drops_a_record_only_for_a_newer_one_that_survives_a_reboot(
    tmp_path: Path,
) -> None:
    """A newer record still only in the page cache does not count: a reboot could take it
    away, and the older one with it would leave the key with nothing."""
    with Log(tmp_path, fsync_interval=3600) as log:
        part = log.create_topic("c", segment_bytes=4096, compact=True).partitions[0]
        part.append(b"old", key=b"k")
        while part.end_offset < 2 or len(list((tmp_path / "topics/c/0").glob("*.log"))) < 2:
            part.append(b"x" * 500)  # keyless filler until the segment rolls
        part.append(b"new", key=b"k")
        part.compact()
        assert part.read(0, 1)[0].payload == b"old"  # the roll synced it; "new" is not yet
        part.flush()
        part.compact()
        assert [r.payload for r in part._scan_from(0) if r.key == b"k"] == [b"new"]


def test_compaction_forgets_a_tombstone_once_past_its_retention(tmp_path: Path) -> None:
    """As Kafka's delete.retention.ms: a tombstone that is its key's newest record stays
    for a day, so readers see the deletion, then goes; the key's older records went before."""
    day_ms = 24 * 3600 * 1000
    with Log(tmp_path, fsync="never") as log:
        part = log.create_topic("t", segment_bytes=4096, compact=True).partitions[0]
        long_ago = time.time_ns() // 1_000_000 - 2 * day_ms
        for key in (b"gone", b"recent"):
            part.append(b"value", key=key)
        part.append(None, key=b"gone", timestamp_ms=long_ago)
        part.append_batch([None, b"kept"], keys=[b"recent", b"other"])
        while len(list((tmp_path / "topics/t/0").glob("*.log"))) < 2:
            part.append(b"x" * 500)  # keyless filler until the segment rolls
        part.compact()
        keyed = {r.key: r.payload for r in part._scan_from(0) if r.key is not None}
        assert keyed == {b"recent": None, b"other": b"kept"}


def test_compaction_runs_in_the_background_after_a_roll(tmp_path: Path) -> None:
    """The append that fills a segment returns before compaction; it happens soon after."""
    with Log(tmp_path, fsync="never") as log:
        part = log.create_topic("bg", segment_bytes=4096, compact=True).partitions[0]
        for i in range(400):
            part.append(b"v%d" % i, key=b"k%d" % (i % 3))
        deadline = time.monotonic() + 10
        while len(list(part._scan_from(0))) > 60:
            assert time.monotonic() < deadline, "compaction did not run after the rolls"
            time.sleep(0.01)
        latest = {r.key: r.payload for r in part._scan_from(0)}
        assert latest == {b"k0": b"v399", b"k1": b"v397", b"k2": b"v398"}
        # the reader let go of the files compaction replaced: their space is free
        assert not [
            path
            for path in open_files()
            if path.startswith(str(tmp_path)) and path.endswith("(deleted)")
        ]


def test_offset_for_time_and_too_large_and_unknown_topic(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        part = log.create_topic("t").partitions[0]
        part.append_batch(values(3), timestamp_ms=1000)
        part.append_batch(values(3, 3), timestamp_ms=[2000, 3000, 4000])
        assert part.offset_for_time(0) == 0
        assert part.offset_for_time(2500) == 4
        assert part.offset_for_time(9000) == 6
        with pytest.raises(MessageTooLarge, match="split it"):
            part.append(b"x" * (65 << 20))
        assert part.end_offset == 6
        with pytest.raises(TopicNotFound, match="create it first"):
            log.topic("missing")
    with pytest.raises(ClosedError):
        log.topic("t")


def test_a_member_whose_lease_expired_is_fenced(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        log.create_topic("t", 1).partitions[0].append_batch(values(10))
        stale = log.consumer("t", "g", session_timeout=0.5)
        got = stale.poll(5, timeout=1)
        assert len(got) == 5
        stale._stop.set()  # stop heartbeating, as a paused process would
        stale._thread.join()  # type: ignore[union-attr]
        time.sleep(0.6)  # let the lease lapse: the point of this test
        fresh = log.consumer("t", "g", session_timeout=5)
        assert fresh.assignment == frozenset({0})
        stale.ack(got)
        with pytest.raises(FencedError, match="another member"):
            stale.commit()
        redelivered = fresh.poll(10, timeout=1)
        assert [r.offset for r in redelivered] == list(range(10))
        fresh.close()


def test_waiter_wakes_on_a_write_from_another_process(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        part = log.create_topic("t").partitions[0]
        waiter = Waiter()
        waiter.watch(part.head_path)
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time; from polybus.log import Log; time.sleep(0.3); "
                "Log(sys.argv[1]).topic('t').partitions[0].append(b'wake')",
                str(tmp_path),
            ],
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        started = time.monotonic()
        while not part.read(0) and time.monotonic() - started < 20:
            waiter.wait(20)
        waited = time.monotonic() - started
        child.wait(10)
        waiter.close()
        assert part.read(0)[0].payload == b"wake"
        assert waited < 10  # a missed wake-up would sleep the whole 20 s


def test_a_torn_roll_leftover_never_hides_later_records(tmp_path: Path) -> None:
    """An empty segment file past the active one (a writer killed inside a roll) is
    removed, so records appended into the old segment afterwards stay readable."""
    part_dir = tmp_path / "topics/t/0"
    with Log(tmp_path) as log:
        part = log.create_topic("t", segment_bytes=8192).partitions[0]
        part.append_batch(values(50))
        leftover = part_dir / f"{part.end_offset + 2:020d}.log"
    leftover.touch()
    with Log(tmp_path) as log:
        part = log.topic("t").partitions[0]
        assert not leftover.exists()
        for v in values(250, 50):
            part.append(v)
        assert len(list(part_dir.glob("*.log"))) > 2
        assert read_all(log, "t") == values(300)


def test_producer_batches_keep_key_order_and_linger_makes_them_visible(tmp_path: Path) -> None:
    with Log(tmp_path) as log:
        topic = log.create_topic("t", 3)
        with topic.producer(max_batch=50, linger=0.01) as producer:
            for i in range(400):
                producer.append(b"%d" % i, key=b"k%d" % (i % 7), headers=(("i", str(i)),))
            reader = log.consumer("t", start="earliest")
            got: list[int] = []
            deadline = time.monotonic() + 10
            while len(got) < 400 and time.monotonic() < deadline:
                records = reader.poll(1000, timeout=0.5)  # the tail arrives by linger alone
                got.extend(int(r.payload or b"") for r in records)
                assert all(r.headers == (("i", (r.payload or b"").decode()),) for r in records)
            reader.close()
        assert sorted(got) == list(range(400))
        for k in range(7):
            per_key = [i for i in got if i % 7 == k]
            assert per_key == sorted(per_key)
        with pytest.raises(ClosedError):
            producer.append(b"late")


def test_members_joining_one_by_one_while_work_is_in_flight_end_balanced(tmp_path: Path) -> None:
    """A partition revoked from a busy member and then targeted back to it must be
    read again, not left revoked forever."""
    with Log(tmp_path) as log:
        topic = log.create_topic("t", 6)
        for p in topic.partitions:
            p.append_batch(values(5))
        first = log.consumer("t", "g", session_timeout=2)
        held = first.poll(100, timeout=1)  # in flight: revoked partitions must wait
        assert len(held) == 30
        members = [first, log.consumer("t", "g", session_timeout=2)]
        deadline = time.monotonic() + 10
        while len(first.assignment) == 6 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the first member has seen the rebalance
        assert len(first.assignment) == 3
        members.append(log.consumer("t", "g", session_timeout=2))
        first.ack(held)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            shares = [m.assignment for m in members]
            if sorted(map(len, shares)) == [2, 2, 2]:
                break
            time.sleep(0.05)
        assert sorted(map(len, shares)) == [2, 2, 2], shares
        assert frozenset().union(*shares) == frozenset(range(6))
        for m in members:
            m.close()


_names = st.sampled_from(["content-type", "polybus-id", "polybus-attempt", "x", "ü-name", ""])
_headers = st.lists(st.tuples(_names, st.text(max_size=20) | _names), max_size=6)


@settings(max_examples=200, deadline=None)
@given(headers=_headers, asked=_names)
def test_a_record_decodes_its_headers_only_when_read_and_finds_the_same(
    headers: list[tuple[str, str]], asked: str
) -> None:
    """Records read back answer header lookups as the decoded tuple would, whether the
    name is absent, present, repeated, or only appears inside a value."""
    batch = encode_batch(0, [b"v"], None, [tuple(headers)], 0, None)
    (record,) = decode_batch(batch, 0, 0)
    expected = None
    for name, value in headers:
        if name == asked:
            expected = value
    assert record.header(asked) == expected
    assert record.headers == tuple(headers)
    assert record.header(asked) == expected  # and again once decoded
