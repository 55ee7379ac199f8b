"""RedisBackend: declaring topics, publishing and subscribing, over the client's connections.

Also here: a topic's keys (:func:`stream_key`), what is read once of a topic (``_Topic``), and
the plumbing its subscriptions send their commands through: round trips on a pooled connection
(``_roundtrip``, ``_read``), the retry loop until ``reconnect_timeout`` (``_retry``,
``_call``) and running the Lua scripts (``_eval``, ``_load_scripts``).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
import redis.cluster
import redis.exceptions as rx
from redis.connection import ConnectionPool

from ...errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
)
from ...model import partition_for_key
from .._support.backoff import Backoff
from .._support.redis import map_error, retryable
from ..base import (
    BusStats,
    Capability,
    OutRecord,
    Receipt,
    Start,
    TopicSpec,
    tombstone_refused,
)
from .entries import _Packer
from .resp import _as_dict, _pack
from .scripts import _DECLARE, _SCRIPTS, _evalsha, _Script
from .stats import read_stats
from .subscription import RedisSubscription

T = TypeVar("T")

_MAX_BULK = 512 << 20  # Redis proto-max-bulk-len default: a larger argument is refused
_CHUNK = 1000  # commands per write: the server works on one chunk while we pack the next
_EPHEMERAL = b"~ephemeral:"


def stream_key(topic: str, partition: int, *, prefix: str = "polybus") -> str:
    """The key of the stream holding ``partition`` of ``topic``, for plain Redis clients."""
    return f"{prefix}:{{{topic}}}:p{partition}"


@dataclass
class _Topic:
    """What a publisher or member needs to know about one topic (read once from its meta)."""

    name: str
    partitions: int
    retention_ms: int | None
    maxlen: int | None
    meta: bytes
    delayed: bytes
    streams: list[bytes]
    index: dict[bytes, int]  #: stream key -> partition
    xadd_heads: list[bytes]  #: packed "<stream> *" per partition, the constant part of XADD
    round_robin: Iterator[int]


class RedisBackend:
    """A :class:`~polybus.adapters.base.Backend` on Redis Streams (see the package docstring).

    Thread-safe: ``declare_topic``, ``publish``, ``subscribe`` and ``close`` may be called from
    any thread; each call borrows a connection from the client's pool for its round trips.
    """

    wire_protocol = "redis"
    capabilities = (
        Capability.DURABLE_GROUPS
        | Capability.EPHEMERAL_GROUPS
        | Capability.SEEK
        | Capability.SEEK_TIME
        | Capability.DELAY
        | Capability.LAG
        | Capability.RETENTION
        | Capability.MULTI_PROCESS
    )

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        *,
        prefix: str = "polybus",
        reconnect_timeout: float = 30.0,
        maxlen: int | None = None,
        owns_client: bool = False,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"prefix must be non-empty without braces, not {prefix!r}")
        if reconnect_timeout < 0:
            raise ConfigurationError("reconnect_timeout must be >= 0 seconds")
        if maxlen is not None and maxlen < 1:
            raise ConfigurationError("maxlen must be at least 1")
        self.client = client
        self.prefix = prefix
        self.reconnect_timeout = reconnect_timeout
        self.maxlen = maxlen
        self._owns_client = owns_client
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._topics: dict[str, _Topic] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._lock = threading.Lock()
        self._closed = False

    # -- plumbing -------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ClosedError("bus is closed; connect again")

    def _pool(self, route: bytes) -> ConnectionPool:
        if self._cluster:
            cluster: Any = self.client  # the key's slot owner: every key of a topic is there
            pool: ConnectionPool = cluster.get_node_from_key(route).redis_connection.connection_pool
            return pool
        assert isinstance(self.client, redis.Redis)
        return self.client.connection_pool

    def _roundtrip(self, route: bytes, commands: Iterable[bytes]) -> list[Any]:
        """Send commands (a chunk is written while the previous one's replies are read) and
        return their replies in order; error replies are returned as exception instances.

        Raises redis-py's connection errors; the connection is then dropped.
        """
        pool = self._pool(route)
        conn: Any = pool.get_connection()
        replies: list[Any] = []
        try:
            pending: list[int] = []
            batch: list[bytes] = []
            for command in commands:
                batch.append(command)
                if len(batch) >= _CHUNK:
                    conn.send_packed_command([b"".join(batch)])
                    pending.append(len(batch))
                    batch = []
                    if len(pending) > 1:
                        self._read(conn, pending.pop(0), replies, None)
            if batch:
                conn.send_packed_command([b"".join(batch)])
                pending.append(len(batch))
            for n in pending:
                self._read(conn, n, replies, None)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        return replies

    @staticmethod
    def _read(conn: Any, n: int, replies: list[Any], last_timeout: float | None) -> None:
        read = conn.read_response
        for i in range(n):
            try:
                if last_timeout is not None and i == n - 1:
                    replies.append(read(disable_decoding=True, timeout=last_timeout))
                else:
                    replies.append(read(disable_decoding=True))
            except rx.ResponseError as exc:  # an error reply: the connection is still in sync
                replies.append(exc)

    def _retry(self, op: Callable[[], T], *, deadline: float | None = None) -> T:
        """Run ``op`` until it succeeds, retrying transient failures with backoff until
        ``deadline`` (default: ``reconnect_timeout`` from now); then raise ConnectionLost."""
        started = time.monotonic()
        limit = "" if deadline is not None else " (reconnect_timeout)"
        if deadline is None:
            deadline = started + self.reconnect_timeout
        backoff = Backoff(first=0.02, cap=1.0)
        while True:
            try:
                return op()
            except PolybusError:
                raise
            except Exception as exc:
                if not retryable(exc):
                    raise map_error(exc) from exc
                now = time.monotonic()
                if now >= deadline:
                    raise ConnectionLost(
                        f"Redis unreachable for {now - started:.1f}s{limit}: {exc}"
                    ) from exc
                self._after_failure(exc)
                backoff.sleep(deadline)

    def _after_failure(self, exc: BaseException) -> None:
        if self._cluster and isinstance(exc, rx.MovedError):
            assert isinstance(self.client, redis.cluster.RedisCluster)
            self.client.nodes_manager.initialize()  # slots moved: learn the new layout

    @staticmethod
    def _checked(replies: list[Any]) -> list[Any]:
        """The replies, or the first error reply raised."""
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies

    def _call(self, route: bytes, commands: list[bytes]) -> list[Any]:
        """Send commands in one round trip, retrying until the reconnect deadline; return
        their replies or raise the first error reply (mapped)."""
        return self._retry(lambda: self._checked(self._roundtrip(route, commands)))

    def _load_scripts(self, route: bytes) -> None:
        self._roundtrip(route, [_pack(b"SCRIPT", b"LOAD", s.source) for s in _SCRIPTS])

    def _eval(
        self, route: bytes, script: _Script, keys: Sequence[bytes], args: Sequence[Any]
    ) -> Any:
        """Run a script once, with retries (NOSCRIPT loads the scripts and retries)."""

        def run() -> Any:
            reply = self._roundtrip(route, [_evalsha(script, keys, args)])[0]
            if isinstance(reply, rx.NoScriptError):
                self._load_scripts(route)
                reply = self._roundtrip(route, [_evalsha(script, keys, args)])[0]
            if isinstance(reply, BaseException):
                raise reply
            return reply

        return self._retry(run)

    def _key(self, topic: str, suffix: str) -> bytes:
        return f"{self.prefix}:{{{topic}}}:{suffix}".encode()

    def _topic_from_meta(self, topic: str, meta: list[Any]) -> _Topic:
        n = int(meta[0])
        streams = [stream_key(topic, p, prefix=self.prefix).encode() for p in range(n)]
        return _Topic(
            name=topic,
            partitions=n,
            retention_ms=int(meta[1]) if meta[1] else None,
            maxlen=int(meta[2]) if meta[2] else None,
            meta=self._key(topic, "meta"),
            delayed=self._key(topic, "delayed"),
            streams=streams,
            index={s: p for p, s in enumerate(streams)},
            xadd_heads=[b"$%d\r\n%s\r\n$1\r\n*\r\n" % (len(s), s) for s in streams],
            round_robin=iter(range(random.randrange(n), 1 << 62)),
        )

    def _topic(self, topic: str) -> _Topic:
        t = self._topics.get(topic)
        if t is not None:
            return t
        meta_key = self._key(topic, "meta")
        [meta] = self._call(
            meta_key, [_pack(b"HMGET", meta_key, b"partitions", b"retention_ms", b"maxlen")]
        )
        if meta[0] is None:
            raise TopicNotFound(f"topic {topic!r} does not exist in Redis; declare it first")
        t = self._topic_from_meta(topic, meta)
        with self._lock:
            return self._topics.setdefault(topic, t)

    def _create_groups(self, t: _Topic, group: bytes, start: bytes) -> None:
        """Create ``group`` on every partition stream (and the streams); existing ones stay."""
        commands = [_pack(b"XGROUP", b"CREATE", s, group, start, b"MKSTREAM") for s in t.streams]

        def run() -> None:
            for reply in self._roundtrip(t.meta, commands):
                if isinstance(reply, BaseException) and not str(reply).startswith("BUSYGROUP"):
                    raise reply

        self._retry(run)

    def _reap_ephemeral(self, t: _Topic) -> None:
        """Destroy ephemeral groups left by crashed processes (all consumers idle too long)."""

        def run() -> None:
            infos = self._roundtrip(t.meta, [_pack(b"XINFO", b"GROUPS", s) for s in t.streams])
            candidates: list[tuple[bytes, bytes, int]] = []
            for stream, info in zip(t.streams, infos, strict=True):
                if isinstance(info, BaseException):
                    continue  # the stream does not exist yet
                for g in info:
                    name = _as_dict(g)[b"name"]
                    if name.startswith(_EPHEMERAL):
                        limit = name[len(_EPHEMERAL) :].partition(b":")[0]
                        candidates.append((stream, name, int(limit) if limit.isdigit() else 0))
            if not candidates:
                return
            consumers = self._roundtrip(
                t.meta, [_pack(b"XINFO", b"CONSUMERS", s, g) for s, g, _ in candidates]
            )
            stale = [
                _pack(b"XGROUP", b"DESTROY", s, g)
                for (s, g, limit), cs in zip(candidates, consumers, strict=True)
                if limit > 0
                and not isinstance(cs, BaseException)
                and cs  # a group without consumers may be a subscriber's that is starting
                and all(int(_as_dict(c)[b"idle"]) > limit for c in cs)
            ]
            if stale:
                self._roundtrip(t.meta, stale)

        self._retry(run)

    # -- Backend --------------------------------------------------------------------------

    def declare_topic(self, topic: str, spec: TopicSpec) -> None:
        """Create the topic and ``spec.groups`` if missing; idempotent.

        Raises ConfigurationError naming what differs from an existing declaration,
        CapabilityError for ``retention_bytes`` or ``compact`` (Redis cannot do them).
        """
        self._check()
        if spec.retention_bytes is not None:
            raise CapabilityError(
                "Redis cannot trim a stream by bytes: use retention (age) or the maxlen URL option"
            )
        if spec.compact:
            raise CapabilityError("Redis streams cannot be compacted by key")
        n = spec.partitions
        if n is not None and (not isinstance(n, int) or not 1 <= n <= 4096):
            raise ConfigurationError(f"partitions must be an int from 1 to 4096, not {n!r}")
        if spec.retention_ms is not None and spec.retention_ms < 1:
            raise ConfigurationError("retention must be positive")
        meta_key = self._key(topic, "meta")
        meta = self._eval(
            meta_key,
            _DECLARE,
            [meta_key],
            [
                "" if n is None else n,
                spec.default_partitions,
                "" if spec.retention_ms is None else spec.retention_ms,
                "" if self.maxlen is None else self.maxlen,
            ],
        )
        t = self._topic_from_meta(topic, meta)
        differs = []
        if n is not None and t.partitions != n:
            differs.append(f"{t.partitions} partitions, not {n}")
        if spec.retention_ms is not None and t.retention_ms != spec.retention_ms:
            differs.append(f"retention_ms {t.retention_ms}, not {spec.retention_ms}")
        if self.maxlen is not None and t.maxlen != self.maxlen:
            differs.append(f"maxlen {t.maxlen}, not {self.maxlen}")
        if differs:
            raise ConfigurationError(f"topic {topic!r} exists with {'; '.join(differs)}")
        with self._lock:
            self._topics[topic] = t
        for g in spec.groups:  # a new group gets what the streams keep, as on every backend
            self._create_groups(t, g.encode(), b"0")
        self._reap_ephemeral(t)

    def publish(self, topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        """Append records, pipelined (1000 commands per write, the next written while Redis
        answers the last); returns their stream ids once Redis has answered every one.

        A retried batch may be stored twice (at-least-once). Raises ConnectionLost past
        ``reconnect_timeout``, MessageTooLarge over Redis's 512 MiB argument limit,
        CapabilityError for a tombstone.
        """
        self._check()
        if not records:
            return []
        t = self._topic(topic)
        now_ms = int(time.time() * 1000)
        commands: list[bytes] = []
        partitions: list[int] = []
        touched: set[int] = set()
        packer = _Packer()
        n = t.partitions
        for r in records:
            try:
                size = len(r.value)  # type: ignore[arg-type]
            except TypeError:  # None: a tombstone
                raise tombstone_refused("Redis") from None
            if size > _MAX_BULK:  # Redis would drop the connection: nothing is sent
                raise MessageTooLarge(
                    f"a {size} byte message exceeds Redis's {_MAX_BULK} byte limit"
                )
            if r.key is not None and n > 1:
                p = partition_for_key(r.key, n)
            else:
                p = next(t.round_robin) % n if n > 1 else 0
            partitions.append(p)
            if r.not_before_ms > now_ms:
                commands.append(packer.delayed(t, p, r))
            else:
                touched.add(p)
                commands.append(packer.xadd(t.xadd_heads[p], r))
        for p in sorted(touched):  # trim once per batch, not per entry
            if t.retention_ms is not None:
                minid = max(0, now_ms - t.retention_ms)
                commands.append(_pack(b"XTRIM", t.streams[p], b"MINID", b"~", minid))
            if t.maxlen is not None:
                commands.append(_pack(b"XTRIM", t.streams[p], b"MAXLEN", b"~", t.maxlen))
        replies = self._call(t.meta, commands)
        out = []
        for r, p, reply in zip(records, partitions, replies, strict=False):
            if isinstance(reply, bytes):
                out.append(Receipt(topic, p, reply.decode()))
            else:
                out.append(Receipt(topic, p, f"delayed@{r.not_before_ms}"))
        return out

    def subscribe(
        self, topic: str, group: str | None, *, start: Start, session_timeout: float
    ) -> RedisSubscription:
        """Join ``group`` (created on first use at ``start``) or read as an ephemeral member."""
        self._check()
        if session_timeout <= 0:
            raise ConfigurationError("session_timeout must be positive")
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', not {start!r}")
        t = self._topic(topic)
        consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}".encode()
        position = b"0" if start == "earliest" else b"$"
        if group is None:
            self._reap_ephemeral(t)
            reap_ms = int(max(600.0, 60 * session_timeout) * 1000)
            name = _EPHEMERAL + b"%d:%s" % (reap_ms, uuid.uuid4().hex.encode())
            self._create_groups(t, name, position)
            # the consumer exists from the start, so the reaper can judge the group by it
            self._call(
                t.meta, [_pack(b"XGROUP", b"CREATECONSUMER", s, name, consumer) for s in t.streams]
            )
        else:
            name = group.encode()
            self._create_groups(t, name, position)
        sub = RedisSubscription(self, t, group, name, consumer, session_timeout)
        with self._lock:
            self._subscriptions.add(sub)
        return sub

    def stats(
        self, topics: Collection[str] | None, groups: Collection[str] | None, *, timeout: float
    ) -> BusStats:
        """The partition streams' XINFO, retried until ``timeout`` (:mod:`.stats`)."""
        self._check()
        return read_stats(self, topics, groups, timeout)

    def _forget(self, sub: RedisSubscription) -> None:
        with self._lock:
            self._subscriptions.discard(sub)

    def close(self) -> None:
        """Close every subscription, then the client if this backend created it; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subs = list(self._subscriptions)
        for sub in subs:
            sub.close()
        if self._owns_client:
            try:
                if self._cluster:  # RedisCluster.close() leaves its nodes' pools connected
                    for node in cast(Any, self.client).get_nodes():
                        if node.redis_connection is not None:
                            node.redis_connection.connection_pool.disconnect()
                self.client.close()
            except Exception:
                pass  # closing sockets that already failed
