"""RedisSubscription: one member of a consumer group, its fetch rounds, acks, seek and lag.

A fetch is one round trip on the member's own connection: waiting acks, a claim sweep when
due, the delayed-record mover and a read (the scripts of :mod:`.scripts`), with the next
round sent ahead after a full batch. Other commands go through its backend's plumbing
(:class:`~.backend.RedisBackend`'s ``_call``, ``_retry``, ``_roundtrip``, ``_read``).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import redis.exceptions as rx
from redis.connection import ConnectionPool

from ...errors import ClosedError, ConfigurationError, ConnectionLost, PolybusError, TopicNotFound
from .._support.backoff import Backoff
from .._support.redis import map_error, retryable
from ..base import Delivery
from .entries import _handle, _record
from .resp import _as_dict, _before, _id_key, _pack, _streams
from .scripts import _CLAIM, _MOVE_DUE, _READ, _RELEASE, _evalsha

if TYPE_CHECKING:
    from .backend import RedisBackend, _Topic

_ACK_BATCH = 1000  # waiting acks that make ack() send them at once
_RELEASED = b"~released"  # holds records handed back by close/nack until a member claims them


@dataclass
class _Round:
    """A fetch round sent on a member's connection whose replies are still to be read."""

    acks: list[tuple[int, bytes]]  #: acks it carries (restored if it fails)
    n_acks: int  #: XACK commands first in it
    sweep: bool  #: whether it carries a claim sweep
    commands: int


class RedisSubscription:
    """One consumer of a stream consumer group on every partition of one topic.

    It keeps one connection of the client's pool for its reads (a prefetch may be waiting on
    it); acks and other calls borrow pooled ones. Records prefetched or handed out count
    against the visibility timeout from the moment Redis delivered them, so a member that
    needs longer than ``session_timeout`` for a batch should get a longer one.

    One thread fetches (and seeks, reads lag); ``ack``/``nack`` and ``close`` may come from
    any thread (``close`` waits for a fetch in progress).
    """

    def __init__(
        self,
        backend: RedisBackend,
        topic: _Topic,
        group: str | None,
        name: bytes,
        consumer: bytes,
        session_timeout: float,
    ) -> None:
        self._backend = backend
        self._t = topic
        self._group = group
        self._name = name
        self._consumer = consumer
        self._visibility_ms = max(1, int(session_timeout * 1000))
        self._sweep_every = max(0.05, session_timeout / 4)
        self._sweep_at = 0.0  # monotonic time of the next claim sweep; 0: on the next fetch
        self._cursors = [b"0-0"] * topic.partitions
        self._next_due = -1  # epoch ms of the next delayed record, -1: none known
        self._rotation = random.randrange(topic.partitions)
        self._buffer: deque[Delivery] = deque()  # read, not yet handed out (claims + reads)
        self._acks: list[tuple[int, bytes]] = []
        self._acks_lock = threading.Lock()
        self._outage_since: float | None = None
        self._conn: Any = None
        self._pool: ConnectionPool | None = None
        self._prefetched: _Round | None = None
        self._conn_lock = threading.Lock()  # fetch and close: the connection has one user
        self._closed = False

    @property
    def group(self) -> str | None:
        return self._group

    def _check(self) -> None:
        if self._closed or self._backend._closed:
            raise ClosedError("subscription is closed; subscribe again")

    # -- acks -----------------------------------------------------------------------------

    def _take_acks(self) -> list[tuple[int, bytes]]:
        with self._acks_lock:
            acks, self._acks = self._acks, []
        return acks

    def _restore_acks(self, acks: list[tuple[int, bytes]]) -> None:
        if acks:
            with self._acks_lock:
                self._acks[:0] = acks

    def _ack_commands(self, acks: list[tuple[int, bytes]]) -> list[bytes]:
        by_partition: dict[int, list[bytes]] = {}
        for p, entry_id in acks:
            by_partition.setdefault(p, []).append(entry_id)
        return [
            _pack(b"XACK", self._t.streams[p], self._name, *ids) for p, ids in by_partition.items()
        ]

    def _flush_acks(self) -> None:
        acks = self._take_acks()
        if not acks:
            return
        try:
            self._backend._call(self._t.meta, self._ack_commands(acks))
        except ConnectionLost:
            self._restore_acks(acks)
            raise

    def commit(self) -> None:
        self._check()
        self._flush_acks()

    def ack(self, records: Sequence[Delivery]) -> None:
        """Mark records processed; sent with the next fetch, at close, or once 1000 wait."""
        self._check()
        with self._acks_lock:
            self._acks.extend([r.handle for r in records])  # type: ignore[misc]
            full = len(self._acks) >= _ACK_BATCH
        if full:
            self._flush_acks()

    def nack(self, records: Sequence[Delivery], *, requeue: bool) -> None:
        """``requeue``: hand records back now (this member's next fetch takes them again,
        ``attempt`` + 1); else drop them for this group (acked)."""
        if not requeue:
            self.ack(records)
            return
        self._check()
        by_partition: dict[int, list[bytes]] = {}
        for r in records:
            p, entry_id = _handle(r)
            by_partition.setdefault(p, []).append(entry_id)
        b, t = self._backend, self._t
        commands = [
            _pack(
                b"XCLAIM", t.streams[p], self._name, self._consumer, 0, *ids, b"TIME", 0, b"JUSTID"
            )
            for p, ids in by_partition.items()
        ]
        b._call(t.meta, commands)
        self._sweep_at = 0.0

    # -- fetch ----------------------------------------------------------------------------

    def _take(self, max_records: int) -> list[Delivery]:
        buf = self._buffer
        n = min(max_records, len(buf))
        return [buf.popleft() for _ in range(n)]

    def fetch(self, max_records: int, timeout: float) -> list[Delivery]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds ([] on timeout).

        While Redis is unreachable it retries within ``timeout``; once the outage has lasted
        ``reconnect_timeout`` it raises ConnectionLost (a later fetch tries again).
        """
        with self._conn_lock:
            self._check()
            if self._buffer:
                return self._take(max_records)
            records = self._fetch_retrying(max_records, timeout)
            if len(records) == max_records and not self._buffer:
                # A full batch: more are likely waiting. Ask for them now, so that Redis works
                # while the application handles this batch; the next fetch reads the reply.
                try:
                    self._prefetched = self._send_round(max_records)
                except Exception:
                    self._drop_connection()
            return records

    def _fetch_retrying(self, max_records: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        backoff = Backoff(first=0.02, cap=1.0)
        while True:
            try:
                records = self._fetch_once(max_records, deadline)
                self._outage_since = None
                return records
            except Exception as exc:
                self._drop_connection()
                if isinstance(exc, PolybusError):
                    raise
                if not retryable(exc):
                    raise map_error(exc) from exc
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                if now - self._outage_since >= self._backend.reconnect_timeout:
                    raise ConnectionLost(
                        f"Redis unreachable for {now - self._outage_since:.1f}s: {exc}"
                    ) from exc
                if now >= deadline:
                    return []
                self._backend._after_failure(exc)
                backoff.sleep(deadline)

    def _connection(self) -> Any:
        """This member's own connection: it may hold a prefetch, so it is not shared."""
        if self._conn is None:
            self._pool = self._backend._pool(self._t.meta)
            self._conn = self._pool.get_connection()
        return self._conn

    def _drop_connection(self) -> None:
        """Forget a connection whose state is unknown (an error mid-exchange)."""
        conn, self._conn, self._prefetched = self._conn, None, None
        if conn is not None:
            assert self._pool is not None
            conn.disconnect()
            self._pool.release(conn)

    def _fetch_once(self, max_records: int, deadline: float) -> list[Delivery]:
        while True:
            if self._buffer or self._read_one(max_records):
                return self._take(max_records)
            now = time.monotonic()
            if now >= deadline:
                return []
            if self._sweep_at == 0.0:
                continue  # records were handed back (nack) meanwhile: claim them first
            # Nothing anywhere: block on every partition, until due delayed records at most.
            block_ms = int((deadline - now) * 1000)
            if self._next_due >= 0:
                block_ms = min(block_ms, max(0, self._next_due - int(time.time() * 1000) + 1))
            if block_ms > 0 and self._read_blocking(max_records, block_ms):
                return self._take(max_records)
            if time.monotonic() >= deadline:
                return []

    def _read_one(self, max_records: int) -> list[Delivery]:
        """One round trip: send waiting acks, sweep for records to claim (when due), move due
        delayed records, and read new records of the first partition that has some."""
        sent, self._prefetched = self._prefetched, None
        return self._finish_round(sent or self._send_round(max_records))

    def _send_round(self, max_records: int) -> _Round:
        t = self._t
        sweep = time.monotonic() >= self._sweep_at
        acks = self._take_acks()
        commands = self._ack_commands(acks)
        n_acks = len(commands)
        if sweep:
            commands.append(
                _evalsha(
                    _CLAIM,
                    t.streams,
                    [self._name, self._consumer, self._visibility_ms, max_records, *self._cursors],
                )
            )
        now_ms = int(time.time() * 1000)
        commands.append(_evalsha(_MOVE_DUE, [t.delayed, t.meta, *t.streams], [now_ms, 1000]))
        # One partition per read, starting at the next one each time: members that fetch in
        # turn spread over the partitions instead of the first draining all of them.
        self._rotation = (self._rotation + 1) % t.partitions
        commands.append(
            _evalsha(_READ, t.streams, [self._name, self._consumer, max_records, self._rotation])
        )
        try:
            self._connection().send_packed_command([b"".join(commands)])
        except BaseException:
            self._restore_acks(acks)
            raise
        return _Round(acks, n_acks, sweep, len(commands))

    def _finish_round(self, sent: _Round) -> list[Delivery]:
        replies: list[Any] = []
        try:
            self._backend._read(self._connection(), sent.commands, replies, None)
        except BaseException:
            self._restore_acks(sent.acks)
            raise
        problems: list[BaseException] = []
        records = self._claimed(replies[-3], problems) if sent.sweep else []
        self._moved(replies[-2], problems)
        reply = replies[-1]
        if isinstance(reply, BaseException):
            self._recover(reply, problems)
        elif reply:
            p, entries = int(reply[0]), msgpack.unpackb(reply[1], raw=True)
            topic = self._t.name
            records += [_record(topic, p, e[0], e[1] or [], 1) for e in entries]
        problems += (
            r
            for r in replies[: sent.n_acks]
            if isinstance(r, BaseException) and not str(r).startswith("NOGROUP")
        )
        return self._deliver(records, problems, sent.acks)

    def _read_blocking(self, max_records: int, block_ms: int) -> list[Delivery]:
        t = self._t
        command = _pack(
            b"XREADGROUP",
            b"GROUP",
            self._name,
            self._consumer,
            b"COUNT",
            max_records,
            b"BLOCK",
            block_ms,
            b"STREAMS",
            *t.streams,
            *([b">"] * t.partitions),
        )
        conn = self._connection()
        conn.send_packed_command([command])
        replies: list[Any] = []
        # the socket must outwait the server's BLOCK
        self._backend._read(conn, 1, replies, block_ms / 1000 + 5)
        problems: list[BaseException] = []
        records = self._read_reply(replies[0], problems)
        return self._deliver(records, problems, [])

    def _deliver(
        self, records: list[Delivery], problems: list[BaseException], acks: list[tuple[int, bytes]]
    ) -> list[Delivery]:
        """Buffer what was read; raise the first problem (the next fetch hands the records
        out), else hand them out."""
        self._buffer.extend(records)
        if problems:
            self._restore_acks(acks)
            raise problems[0]
        return records

    def _claimed(self, reply: Any, problems: list[BaseException]) -> list[Delivery]:
        if isinstance(reply, BaseException):
            self._sweep_at = 0.0  # try again on the next fetch
            self._recover(reply, problems)
            return []
        self._sweep_at = time.monotonic() + self._sweep_every
        out: list[Delivery] = []
        topic = self._t.name
        for p, (cursor, entries) in enumerate(reply):
            self._cursors[p] = cursor
            for entry_id, fields, count in entries:
                out.append(_record(topic, p, entry_id, fields, int(count)))
        return out

    def _moved(self, reply: Any, problems: list[BaseException]) -> None:
        if isinstance(reply, BaseException):
            self._recover(reply, problems)
        else:
            self._next_due = int(float(reply))

    def _read_reply(self, reply: Any, problems: list[BaseException]) -> list[Delivery]:
        if isinstance(reply, BaseException):
            self._recover(reply, problems)
            return []
        out: list[Delivery] = []
        topic, index = self._t.name, self._t.index
        for stream, entries in _streams(reply):
            p = index[stream]
            for entry_id, fields in entries:
                out.append(_record(topic, p, entry_id, fields or [], 1))
        return out

    def _recover(self, exc: BaseException, problems: list[BaseException]) -> None:
        """Fix what a failed command in a fetch needs: scripts the server forgot, a group
        that vanished (key deleted, server restarted empty, group reaped); else report it."""
        if isinstance(exc, rx.NoScriptError):
            self._backend._load_scripts(self._t.meta)
        elif str(exc).startswith("NOGROUP"):
            # durable: from the start, so nothing is lost (at-least-once); ephemeral: from now
            start = b"$" if self._group is None else b"0"
            self._backend._create_groups(self._t, self._name, start)
        else:
            problems.append(exc)

    # -- position -------------------------------------------------------------------------

    def seek(
        self, partition: int, *, offset: int | str | None = None, timestamp_ms: int | None = None
    ) -> None:
        """Move the group's position in ``partition`` to a stream id (inclusive) or to the
        first entry at or after ``timestamp_ms``. It moves the whole group in that partition
        (XGROUP SETID), not only this member."""
        self._check()
        if (offset is None) == (timestamp_ms is None):
            raise ConfigurationError("seek needs exactly one of offset= or timestamp_ms=")
        if not 0 <= partition < self._t.partitions:
            raise ConfigurationError(
                f"partition {partition} out of range: topic {self._t.name!r} has "
                f"{self._t.partitions}"
            )
        if offset is not None:
            ms, dash, seq = str(offset).partition("-")
            if not (isinstance(offset, str) and ms.isdigit() and dash and seq.isdigit()):
                raise ConfigurationError(
                    f"Redis offsets are stream ids like '1700000000000-0', not {offset!r}"
                )
            target = offset.encode()
        else:
            assert timestamp_ms is not None
            target = b"%d-0" % max(0, timestamp_ms)
        with self._conn_lock:
            self._seek(partition, target)

    def _seek(self, partition: int, target: bytes) -> None:
        if self._prefetched is not None:  # read ahead of the old position: drop it below
            try:
                self._read_one(1)
            except PolybusError:
                raise
            except Exception as exc:
                self._drop_connection()
                raise map_error(exc) from exc
        self._flush_acks()  # before the position moves, so no ack lands on a redelivery
        stream = self._t.streams[partition]
        skipped = [
            _handle(r)
            for r in self._buffer
            if r.partition == partition and _id_key(_handle(r)[1]) < _id_key(target)
        ]
        self._buffer = deque(r for r in self._buffer if r.partition != partition)
        b = self._backend
        commands = [_pack(b"XGROUP", b"SETID", stream, self._name, _before(target))]
        if skipped:
            commands += self._ack_commands(skipped)
        b._call(self._t.meta, commands)

    def lag(self) -> dict[int, int]:
        """Entries this group has not acked, per partition: not yet delivered + pending."""
        self._check()
        self._flush_acks()
        b, t = self._backend, self._t

        def run() -> dict[int, int]:
            infos = b._checked(
                b._roundtrip(t.meta, [_pack(b"XINFO", b"GROUPS", s) for s in t.streams])
            )
            out = {}
            for p, groups in enumerate(infos):
                info = next((g for g in map(_as_dict, groups) if g[b"name"] == self._name), None)
                if info is None:
                    raise TopicNotFound(f"group {self._name!r} vanished from {t.streams[p]!r}")
                lag = info.get(b"lag")
                if lag is None:  # unknown after a seek into the middle: count what is left
                    lag = self._count_after(t.streams[p], info[b"last-delivered-id"])
                out[p] = int(lag) + int(info[b"pending"])
            return out

        return b._retry(run)

    def _count_after(self, stream: bytes, last: bytes) -> int:
        count, start = 0, b"(" + last
        while True:
            [reply] = self._backend._checked(
                self._backend._roundtrip(
                    self._t.meta, [_pack(b"XRANGE", stream, start, b"+", b"COUNT", 10000)]
                )
            )
            count += len(reply)
            if len(reply) < 10000:
                return count
            start = b"(" + reply[-1][0]

    # -- close ----------------------------------------------------------------------------

    def close(self) -> None:
        """Send waiting acks, hand unacked records back to the group and leave it (an
        ephemeral group is destroyed); idempotent. Waits for a fetch in progress. Best
        effort while Redis is unreachable: the visibility timeout then hands the records on."""
        if self._closed:
            return
        self._closed = True
        b, t = self._backend, self._t
        with self._conn_lock:
            try:
                if self._prefetched is not None:  # its records are pending: released below
                    self._read_one(1)
            except Exception:
                self._drop_connection()
            if self._conn is not None:
                assert self._pool is not None
                self._pool.release(self._conn)
                self._conn = None
            self._buffer.clear()
        try:
            self._flush_acks()
            if self._group is None:
                commands = [_pack(b"XGROUP", b"DESTROY", s, self._name) for s in t.streams]
                b._retry(lambda: b._roundtrip(t.meta, commands))
            else:
                b._eval(t.meta, _RELEASE, t.streams, [self._name, self._consumer, _RELEASED])
        except PolybusError:
            pass
        finally:
            b._forget(self)
