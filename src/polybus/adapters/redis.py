# Over 800 lines until the adapter becomes a package: its Lua scripts (inline strings here)
# move to .lua package files and RedisSubscription to a module of its own; they share the
# backend's private client and script registry, which needs an interface first.
"""Redis Streams as a backend: ``redis://[user:pass@]host:port/db`` and ``rediss://`` (TLS).

URL options: ``prefix=<name>`` (key prefix, default ``polybus``), ``reconnect_timeout=<s>``
(default 30), ``connect_timeout=<s>`` (default 2: how long opening a bus waits for Redis to
accept a connection before raising BrokerUnreachable), ``maxlen=<n>`` (cap each partition
stream of the topics this bus declares at about n entries), ``cluster=true`` (connect
with :class:`redis.cluster.RedisCluster`), and redis-py's own URL options
(``socket_timeout``, ``ssl_cert_reqs``, ``client_name``, ...).
:func:`from_client` wraps an existing ``redis.Redis`` or ``redis.cluster.RedisCluster``.

Keys. Every key of a topic carries the hash tag ``{<topic>}``, so a topic lives in one
Cluster slot and one Lua script may touch all of its keys:

- ``<prefix>:{<topic>}:meta``: hash of ``partitions``, ``retention_ms``, ``maxlen``;
- ``<prefix>:{<topic>}:p<n>``: one stream per partition; a key's hash picks the partition
  (the native engine's partitioner, so a key lands on the same partition number);
- ``<prefix>:{<topic>}:delayed``: sorted set of records not yet due, scored by not-before ms.

Entries. Fields: ``value`` (the payload), ``key`` (only when the record has one) and one field
``h:<name>`` per header, e.g. ``h:content-type``, ``h:polybus-id``. No reserved field starts
with ``h:``, so no header name can collide with them. An entry written by a plain client
without a ``value`` field (``XADD s * order 1``) arrives with its fields as a JSON object and
content type application/json; other fields beside ``value`` arrive as headers by their name.
Offsets are stream ids (``"1700000000000-0"``); an entry's timestamp is its id's milliseconds.

Groups. A durable group is a stream consumer group on every partition stream, created at
declare (``TopicSpec.groups``: from id 0, so it gets everything the streams keep, as a new
group does on native and Kafka) or at first subscribe (``earliest``: id 0, ``latest``: ``$``).
Each subscription is one consumer with a unique name. A fetch reads the first partition that
has new records, starting one partition further each time, so members fetching in turn spread
over the partitions; only when none has any does it block (XREADGROUP BLOCK) on all of them.
After a full batch it asks for the next batch at once (prefetch), so Redis works while the
application handles this one. An ephemeral subscriber is a consumer group of its own named
``~ephemeral:<reap-after-ms>:<id>`` (a name no user group can have), destroyed on close; groups
of crashed processes are reaped when a later ephemeral subscriber or a declare finds all their
consumers idle longer than ``reap-after`` (60 session timeouts, at least 10 minutes). A group
that vanished (key deleted, server restarted empty) is recreated by the next fetch: durable
ones from id 0 (nothing lost, perhaps duplicates), ephemeral ones from ``$``.

Redelivery. ``session_timeout`` is a visibility timeout: a record neither acked nor nacked
within it of its delivery may be claimed (XAUTOCLAIM) by any member of the group, the idle
holder included, with ``attempt`` = the entry's delivery count. A member sweeps for such records
on its first fetch and every quarter of its session timeout. ``close()`` hands the member's
unacked records back at once (they become claimable by the next sweep) and deletes the
consumer. ``nack(requeue=True)`` does the same for those records (this member's next fetch takes
them back); ``nack(requeue=False)`` acks them (dropped for this group).

Order. One member sees each partition in order (redeliveries aside). Members of one group
share every partition, so a key's order holds for one member only: no KEY_ORDER.

Acks are sent with the next fetch, at close, or once 1000 are waiting, in the same round trip
as other work; an ack not yet sent when the process dies means a redelivery (at-least-once).

Seek moves the whole group's position in one partition (XGROUP SETID), not only this member's;
settle what you hold of that partition first (an ack of an old delivery also acks its replay).

Delay. A record with a future not-before time waits in the topic's sorted set; every fetch runs
an atomic Lua mover that appends the due ones to their partition stream. Its receipt offset is
``"delayed@<not-before-ms>"``: it has no stream id until it is due.

Retention. ``retention_ms`` trims by MINID and ``maxlen`` by MAXLEN, both approximate (``~``,
Redis drops whole radix-tree nodes, so a few older entries may outlive the limit), after each
published batch, whether or not every group has read them (as in Kafka). ``retention_bytes``
and ``compact`` raise CapabilityError: Redis cannot.

Connection loss. Operations retry with backoff until ``reconnect_timeout``; then ``publish``
raises ConnectionLost (a publish that raised, or was retried, may have been stored: at-least-once)
and ``fetch`` raises ConnectionLost (a later fetch retries). Group state lives in Redis, so a
subscription resumes; records whose delivery was lost in transit come back after the visibility
timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgpack
import redis
import redis.cluster
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, ConnectionPool
from redis.retry import Retry

from ..errors import (
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    MessageTooLarge,
    PolybusError,
    TopicNotFound,
    redact_url,
)
from ..log.engine import partition_for_key
from ._support import connect_timeout, ensure_reachable
from .base import (
    Capability,
    InRecord,
    OutRecord,
    Receipt,
    Start,
    TopicSpec,
    tombstone_refused,
)

__all__ = [
    "RedisBackend",
    "RedisSubscription",
    "from_client",
    "from_url",
    "map_error",
    "stream_key",
]

T = TypeVar("T")

_OPTIONS = {"prefix", "reconnect_timeout", "maxlen", "cluster", "connect_timeout"}
#: redis-py's URL options that it passes through as strings rather than parsing
_CLIENT_STRING_OPTIONS = {
    "client_name",
    "ssl_ca_certs",
    "ssl_ca_path",
    "ssl_cert_reqs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
}
_CLIENT_OPTIONS = set(URL_QUERY_ARGUMENT_PARSERS) | _CLIENT_STRING_OPTIONS
_MAX_BULK = 512 << 20  # Redis proto-max-bulk-len default: a larger argument is refused
_CHUNK = 1000  # commands per write: the server works on one chunk while we pack the next
_ACK_BATCH = 1000  # waiting acks that make ack() send them at once
_EPHEMERAL = b"~ephemeral:"
_RELEASED = b"~released"  # holds records handed back by close/nack until a member claims them


def _flag(name: str, value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name} must be true or false, not {value!r}")


def _number(name: str, value: str, kind: Callable[[str], T]) -> T:
    try:
        return kind(value)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number, not {value!r}") from None


def from_url(url: str) -> RedisBackend:
    """Connect to the Redis a ``redis://`` or ``rediss://`` URL names (lazily: no I/O here)."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in _OPTIONS:
            ours[name] = value
        elif name in _CLIENT_OPTIONS:
            theirs.append((name, value))
        else:
            raise ConfigurationError(
                f"unknown option {name!r} in {redact_url(url)!r}; known: "
                f"{', '.join(sorted(_OPTIONS | _CLIENT_OPTIONS))}"
            )
    client_url = urlunsplit(parts._replace(query=urlencode(theirs)))
    if parts.scheme in ("redis", "rediss"):
        timeout = connect_timeout(ours.get("connect_timeout"))
        ensure_reachable("Redis", [(parts.hostname or "localhost", parts.port or 6379)], timeout)
    # No retries inside redis-py: this adapter retries until its own reconnect deadline.
    kwargs: dict[str, Any] = {"retry": Retry(NoBackoff(), 0)}
    try:
        client: redis.Redis | redis.cluster.RedisCluster
        if _flag("cluster", ours.get("cluster", "false")):
            client = redis.cluster.RedisCluster.from_url(client_url, **kwargs)
        else:
            client = redis.Redis.from_url(client_url, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad Redis URL {redact_url(url)!r}: {exc}") from exc
    except Exception as exc:
        raise map_error(exc) from exc
    maxlen = ours.get("maxlen")
    return RedisBackend(
        client,
        prefix=ours.get("prefix", "polybus"),
        reconnect_timeout=_number("reconnect_timeout", ours.get("reconnect_timeout", "30"), float),
        maxlen=None if maxlen is None else _number("maxlen", maxlen, int),
        owns_client=True,
    )


def stream_key(topic: str, partition: int, *, prefix: str = "polybus") -> str:
    """The key of the stream holding ``partition`` of ``topic``, for plain Redis clients."""
    return f"{prefix}:{{{topic}}}:p{partition}"


def from_client(client: object, **options: Any) -> RedisBackend:
    """Wrap a ``redis.Redis`` or ``redis.cluster.RedisCluster``; closing the bus leaves it open.

    ``options`` are :class:`RedisBackend`'s keyword arguments (``prefix``, ...).
    """
    if not isinstance(client, redis.Redis | redis.cluster.RedisCluster):
        raise ConfigurationError(
            f"cannot use a {type(client).__module__}.{type(client).__qualname__}: pass a "
            "synchronous redis.Redis or redis.cluster.RedisCluster"
        )
    return RedisBackend(client, **options)


# -- errors -------------------------------------------------------------------------------

#: error replies of passing server states that redis-py leaves as plain ResponseError
_TRANSIENT = ("BUSY ", "LOADING ", "READONLY ", "MASTERDOWN ", "CLUSTERDOWN ", "TRYAGAIN ")


def _retryable(exc: BaseException) -> bool:
    """True for a lost connection or a server state that passes (failover, loading, resharding)."""
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError):
        return False
    if isinstance(
        exc,
        rx.ConnectionError  # BusyLoadingError (LOADING) included
        | rx.TimeoutError
        | rx.ClusterError  # CLUSTERDOWN, MASTERDOWN
        | rx.SlotNotCoveredError
        | rx.AskError  # MOVED and ASK: the slot moves to another node
        | rx.TryAgainError
        | rx.ReadOnlyError  # a failover made our node a replica
        | OSError,
    ):
        return True
    return isinstance(exc, rx.ResponseError) and str(exc).startswith(_TRANSIENT)


def map_error(exc: BaseException) -> PolybusError:
    """The polybus error for a redis-py (or socket) exception; total over every class."""
    if isinstance(exc, PolybusError):
        return exc
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, rx.AuthenticationError | rx.AuthorizationError | rx.NoPermissionError):
        return ConfigurationError(f"Redis refused the credentials or an ACL denies it: {text}")
    if isinstance(exc, rx.AuthenticationWrongNumberOfArgsError):
        return ConfigurationError(f"Redis AUTH failed, check username and password: {text}")
    if _retryable(exc) or isinstance(exc, rx.InvalidResponse):
        return ConnectionLost(f"Redis connection failed ({name}): {text}")
    if isinstance(exc, rx.OutOfMemoryError):
        return PolybusError(f"Redis is out of memory (maxmemory): {text}")
    if isinstance(exc, rx.ResponseError):
        if text.startswith("WRONGTYPE"):
            return ConfigurationError(f"a Redis key of this topic holds another type: {text}")
        if text.startswith("NOGROUP"):
            return TopicNotFound(f"the topic's stream or consumer group does not exist: {text}")
        if text.startswith("BUSYGROUP"):
            return ConfigurationError(f"the consumer group exists already: {text}")
        if "max" in text and ("bulk" in text or "size" in text):
            return MessageTooLarge(f"Redis refused a too large argument: {text}")
        if text.startswith(("NOAUTH", "WRONGPASS")):
            return ConfigurationError(f"Redis needs credentials: {text}")
        return PolybusError(f"Redis replied with an error ({name}): {text}")
    if isinstance(exc, rx.DataError):
        return ConfigurationError(f"invalid data for a Redis command: {text}")
    if name in ("InvalidTokenSchemaErr", "IncorrectPolicyType"):
        return ConfigurationError(f"bad Redis client configuration ({name}): {text}")
    if name in (
        "RequestTokenErr",
        "TokenRenewalErr",
        "ExternalAuthProviderError",
        "NoValidDatabaseException",
        "UnhealthyDatabaseException",
        "TemporaryUnavailableException",
        "InitialHealthCheckFailedError",
        "HttpError",
    ):
        return ConnectionLost(f"Redis is unreachable ({name}): {text}")
    return PolybusError(f"Redis client error ({type(exc).__module__}.{name}): {text}")


# -- Lua ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Script:
    source: bytes
    sha: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source).hexdigest().encode())


# KEYS[1] meta; ARGV partitions ('' = as it exists, else the default), default, retention, maxlen
_DECLARE = _Script(b"""
local cur = redis.call('HMGET', KEYS[1], 'partitions', 'retention_ms', 'maxlen')
if cur[1] then return cur end
local n = ARGV[1] ~= '' and ARGV[1] or ARGV[2]
redis.call('HSET', KEYS[1], 'partitions', n, 'retention_ms', ARGV[3], 'maxlen', ARGV[4],
           'version', 1)
return {n, ARGV[3], ARGV[4]}
""")

# Moves due delayed records into their partition streams, then trims those streams.
# KEYS[1] delayed zset, KEYS[2] meta, KEYS[3..] partition streams; ARGV now ms, limit.
# Returns the score of the next record still waiting, or -1.
_MOVE_DUE = _Script(b"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
  local touched = {}
  for _, member in ipairs(due) do
    local rec = cmsgpack.unpack(member)
    local stream = KEYS[3 + rec[2]]
    redis.call('XADD', stream, '*', unpack(rec, 3))
    redis.call('ZREM', KEYS[1], member)
    touched[stream] = true
  end
  local meta = redis.call('HMGET', KEYS[2], 'retention_ms', 'maxlen')
  local now = redis.call('TIME')
  for stream in pairs(touched) do
    if meta[1] and meta[1] ~= '' then
      local minid = now[1] * 1000 + math.floor(now[2] / 1000) - tonumber(meta[1])
      redis.call('XTRIM', stream, 'MINID', '~', math.max(minid, 0))
    end
    if meta[2] and meta[2] ~= '' then redis.call('XTRIM', stream, 'MAXLEN', '~', meta[2]) end
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return -1 end
return nxt[2]
""")

# Claims records idle longer than the visibility timeout, with their delivery counts.
# KEYS partition streams; ARGV group, consumer, min idle ms, count, then one cursor per stream.
# Returns per stream {next cursor, {{id, fields, delivery count}, ...}}.
_CLAIM = _Script(b"""
local out = {}
local budget = tonumber(ARGV[4])
for i, key in ipairs(KEYS) do
  local cursor = ARGV[4 + i]
  local got = {}
  if budget > 0 then
    local r = redis.call('XAUTOCLAIM', key, ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', budget)
    cursor = r[1]
    for _, e in ipairs(r[2]) do
      if e[2] then  -- Redis 6.2 lists deleted entries without fields
        local p = redis.call('XPENDING', key, ARGV[1], e[1], e[1], 1)
        got[#got + 1] = {e[1], e[2], p[1][4]}
      end
    end
    budget = budget - #got
  end
  out[i] = {cursor, got}
end
return out
""")

# Hands a leaving member's unacked records back (idle since the epoch: the next sweep claims
# them, delivery counts unchanged) and deletes the consumer.
# KEYS partition streams; ARGV group, consumer, holder.
_RELEASE = _Script(b"""
for _, key in ipairs(KEYS) do
  while true do
    local pending = redis.pcall('XPENDING', key, ARGV[1], '-', '+', 500, ARGV[2])
    if type(pending) ~= 'table' or pending.err or #pending == 0 then break end
    local args = {'XCLAIM', key, ARGV[1], ARGV[3], 0}
    for _, e in ipairs(pending) do args[#args + 1] = e[1] end
    args[#args + 1] = 'TIME'
    args[#args + 1] = 0
    args[#args + 1] = 'JUSTID'
    redis.call(unpack(args))
  end
  redis.pcall('XGROUP', 'DELCONSUMER', key, ARGV[1], ARGV[2])
end
return 1
""")

# Reads new records of the first partition that has any, trying them from ARGV[4] on.
# KEYS partition streams; ARGV group, consumer, count, first partition (0-based).
# Returns {partition, msgpack of the entries} or nil: one bulk string the client decodes in C,
# where parsing ~10 RESP elements per entry in Python would cost more than the rest of a fetch.
_READ = _Script(b"""
local n = #KEYS
for i = 0, n - 1 do
  local p = (tonumber(ARGV[4]) + i) % n
  local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[p + 1], '>')
  if r then return {p, cmsgpack.pack(r[1][2])} end
end
return false
""")

_SCRIPTS = (_DECLARE, _MOVE_DUE, _CLAIM, _RELEASE, _READ)


# -- wire ---------------------------------------------------------------------------------


def _arg(a: bytes | str | int | float) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    return str(a).encode()


def _pack(*args: bytes | str | int | float) -> bytes:
    """One command in RESP. We pack ourselves: redis-py's per-argument packing costs more per
    message than the whole publish budget, and its reply callbacks reshape what we parse."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _evalsha(script: _Script, keys: Sequence[bytes], args: Iterable[bytes | str | int]) -> bytes:
    return _pack(b"EVALSHA", script.sha, len(keys), *keys, *args)


def _as_dict(reply: Any) -> dict[bytes, Any]:
    """A RESP2 flat ``[name, value, ...]`` list or a RESP3 map, as a dict."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _streams(reply: Any) -> list[tuple[bytes, list[Any]]]:
    """XREADGROUP's reply (RESP2 list of pairs, RESP3 map, or nil) as (stream, entries)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(s[0], s[1]) for s in reply]


def _before(entry_id: bytes) -> bytes:
    """The largest stream id smaller than ``entry_id`` (so that reading resumes at it)."""
    ms, _, seq = entry_id.partition(b"-")
    if int(seq or 0) > 0:
        return b"%d-%d" % (int(ms), int(seq) - 1)
    if int(ms) > 0:
        return b"%d-18446744073709551615" % (int(ms) - 1)
    return b"0-0"


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _handle(record: InRecord) -> tuple[int, bytes]:
    """The (partition, stream id) a record was read from, for XACK and XCLAIM."""
    return cast(tuple[int, bytes], record.handle)


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _plain_value(fields: list[bytes]) -> bytes:
    """The payload of an entry a plain client wrote without our layout: its fields as JSON."""
    it = iter(fields)
    text = "utf-8", "backslashreplace"  # any bytes, readably: JSON needs valid text
    obj = {k.decode(*text): v.decode(*text) for k, v in zip(it, it, strict=True)}
    return json.dumps(obj, ensure_ascii=False).encode()


_header_names: dict[bytes, str] = {}  # field -> header name; few distinct names in practice


def _header_name(f: bytes) -> str:
    name = _header_names.get(f)
    if name is None:
        name = _decode(f[2:])
        if len(_header_names) < 1024:
            _header_names[f] = name
    return name


def _record(
    topic: str, partition: int, entry_id: bytes, fields: list[bytes], attempt: int
) -> InRecord:
    value: bytes | None = None
    key: bytes | None = None
    headers: list[tuple[str, str]] = []
    plain: list[tuple[str, str]] = []
    names = _header_names
    for i in range(0, len(fields) - 1, 2):
        f = fields[i]
        if f == b"value":
            value = fields[i + 1]
        elif f[:2] == b"h:":
            headers.append(
                (names.get(f) or _header_name(f), fields[i + 1].decode("utf-8", "surrogateescape"))
            )
        elif f == b"key":
            key = fields[i + 1]
        else:
            plain.append((_decode(f), _decode(fields[i + 1])))
    if value is None:  # not our layout: hand over every field, as JSON
        value, key = _plain_value(fields), None
        headers = [("content-type", "application/json")]
    elif plain:
        have = {name for name, _ in headers}
        headers.extend(h for h in plain if h[0] not in have)
    offset = entry_id.decode()
    return InRecord(
        topic,
        partition,
        offset,
        value,
        key,
        tuple(headers),
        int(offset.partition("-")[0]),
        attempt,
        (partition, entry_id),
    )


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


# -- backend ------------------------------------------------------------------------------


class RedisBackend:
    """A :class:`~polybus.adapters.base.Backend` on Redis Streams (see the module docstring).

    Thread-safe: ``declare_topic``, ``publish``, ``subscribe`` and ``close`` may be called from
    any thread; each call borrows a connection from the client's pool for its round trips.
    """

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
        if deadline is None:
            deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.02
        while True:
            try:
                return op()
            except PolybusError:
                raise
            except Exception as exc:
                if not _retryable(exc):
                    raise map_error(exc) from exc
                now = time.monotonic()
                if now >= deadline:
                    raise ConnectionLost(
                        f"Redis unreachable for {self.reconnect_timeout:g}s "
                        f"(reconnect_timeout): {exc}"
                    ) from exc
                self._after_failure(exc)
                time.sleep(min(delay * (0.5 + random.random()), max(0.0, deadline - now)))
                delay = min(delay * 2, 1.0)

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


class _Packer:
    """Packs XADD and delayed-record commands, caching the packed header field names."""

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[str, bytes] = {}

    def _field(self, name: str) -> bytes:
        f = self._fields.get(name)
        if f is None:
            b = b"h:" + name.encode("utf-8", "surrogateescape")
            f = self._fields[name] = b"$%d\r\n%s\r\n" % (len(b), b)
        return f

    def xadd(self, head: bytes, r: OutRecord) -> bytes:
        v = cast(bytes, r.value)  # publish refuses tombstones
        k = r.key
        hs = r.headers
        parts = [
            b"*%d\r\n$4\r\nXADD\r\n" % (5 + 2 * len(hs) + (0 if k is None else 2)),
            head,
            b"$5\r\nvalue\r\n$%d\r\n" % len(v),
            v,
            b"\r\n",
        ]
        if k is not None:
            parts += (b"$3\r\nkey\r\n$%d\r\n" % len(k), k, b"\r\n")
        field_for = self._field
        for name, value in hs:
            vb = value.encode("utf-8", "surrogateescape")
            parts += (field_for(name), b"$%d\r\n" % len(vb), vb, b"\r\n")
        return b"".join(parts)

    @staticmethod
    def delayed(t: _Topic, p: int, r: OutRecord) -> bytes:
        # msgpack without the bin type: Redis's Lua cmsgpack reads only the old raw strings
        fields: list[Any] = [os.urandom(8), p, b"value", r.value]  # nonce: members must differ
        if r.key is not None:
            fields += (b"key", r.key)
        for name, value in r.headers:
            fields += (
                b"h:" + name.encode("utf-8", "surrogateescape"),
                value.encode("utf-8", "surrogateescape"),
            )
        member = msgpack.packb(fields, use_bin_type=False)
        return _pack(b"ZADD", t.delayed, r.not_before_ms, member)


# -- subscription -------------------------------------------------------------------------


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
        self._buffer: deque[InRecord] = deque()  # read, not yet handed out (claims + reads)
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

    def ack(self, records: Sequence[InRecord]) -> None:
        """Mark records processed; sent with the next fetch, at close, or once 1000 wait."""
        self._check()
        with self._acks_lock:
            self._acks.extend([r.handle for r in records])  # type: ignore[misc]
            full = len(self._acks) >= _ACK_BATCH
        if full:
            self._flush_acks()

    def nack(self, records: Sequence[InRecord], *, requeue: bool) -> None:
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

    def _take(self, max_records: int) -> list[InRecord]:
        buf = self._buffer
        n = min(max_records, len(buf))
        return [buf.popleft() for _ in range(n)]

    def fetch(self, max_records: int, timeout: float) -> list[InRecord]:
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

    def _fetch_retrying(self, max_records: int, timeout: float) -> list[InRecord]:
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            try:
                records = self._fetch_once(max_records, deadline)
                self._outage_since = None
                return records
            except Exception as exc:
                self._drop_connection()
                if isinstance(exc, PolybusError):
                    raise
                if not _retryable(exc):
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
                time.sleep(min(delay * (0.5 + random.random()), deadline - now))
                delay = min(delay * 2, 1.0)

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

    def _fetch_once(self, max_records: int, deadline: float) -> list[InRecord]:
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

    def _read_one(self, max_records: int) -> list[InRecord]:
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

    def _finish_round(self, sent: _Round) -> list[InRecord]:
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

    def _read_blocking(self, max_records: int, block_ms: int) -> list[InRecord]:
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
        self, records: list[InRecord], problems: list[BaseException], acks: list[tuple[int, bytes]]
    ) -> list[InRecord]:
        """Buffer what was read; raise the first problem (the next fetch hands the records
        out), else hand them out."""
        self._buffer.extend(records)
        if problems:
            self._restore_acks(acks)
            raise problems[0]
        return records

    def _claimed(self, reply: Any, problems: list[BaseException]) -> list[InRecord]:
        if isinstance(reply, BaseException):
            self._sweep_at = 0.0  # try again on the next fetch
            self._recover(reply, problems)
            return []
        self._sweep_at = time.monotonic() + self._sweep_every
        out: list[InRecord] = []
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

    def _read_reply(self, reply: Any, problems: list[BaseException]) -> list[InRecord]:
        if isinstance(reply, BaseException):
            self._recover(reply, problems)
            return []
        out: list[InRecord] = []
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
