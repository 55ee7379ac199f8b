"""The inbox: an idempotent consumer remembers which messages its group processed.

A redelivered message (at-least-once) whose id the inbox knows is skipped and
acknowledged, so its handler takes effect once. An inbox remembers an id for
``ttl`` seconds; make it longer than any redelivery or re-drive can take.

What "once" means depends on where the inbox keeps its ids:

- :class:`MemoryInbox`: in this process, until it exits.
- :class:`NativeInbox`: in a native log directory, shared by the processes of one host.
- :class:`RedisInbox`: in Redis (Cluster too), shared by every host.
- :class:`SqlInbox`: in a SQLite or PostgreSQL table, in the same transaction as the
  handler's own writes through ``inbox.connection``.

A duplicate that arrives while the first copy is being handled waits for it, and
is skipped if that one succeeded or runs if it failed: within one process for
every inbox, across processes only for :class:`SqlInbox` (elsewhere two processes
handling one id at the same moment may both run it). Only :class:`SqlInbox`
commits the handler's effects and the entry together; with any other inbox a
crash after the handler's effects and before the entry is written runs the
handler again on redelivery.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..adapters._support import Options
from ..errors import ClosedError, ConfigurationError, ConnectionLost, PolybusError
from ..registry import opener
from ._sql import Dialect, check_table, close_quietly, dialect_of, rollback_quietly

if TYPE_CHECKING:
    import redis

    from ..log import Log, Partition

__all__ = [
    "DEFAULT_TTL",
    "Inbox",
    "MemoryInbox",
    "NativeInbox",
    "RedisInbox",
    "SqlInbox",
    "open_inbox",
]

T = TypeVar("T")

DEFAULT_TTL = 7 * 24 * 3600.0  #: seconds an id is remembered: Kafka's default retention


class Inbox(Protocol):
    """Remembers the message ids each group has processed."""

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        """Run ``handler`` unless ``group`` already processed ``message_id``.

        Returns ``(True, result)`` when it ran and the id is now remembered,
        ``(False, None)`` for a duplicate. When ``handler`` raises, nothing is
        remembered and the exception propagates. Safe to call from several
        threads at once. Raises ConnectionLost when the inbox's store is
        unreachable: before the handler ran, or after it ran when its id could
        not be remembered (so it runs again on redelivery).
        """
        ...

    def close(self) -> None:
        """Release the inbox's connections; idempotent."""
        ...


def _ttl_ms(ttl: float) -> int:
    if not isinstance(ttl, int | float) or ttl <= 0:
        raise ConfigurationError(f"ttl must be a positive number of seconds, not {ttl!r}")
    return max(1, int(ttl * 1000))


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class _InFlight:
    """The ids this process is handling now. A second copy of one waits for the first to
    finish, so it sees that copy's outcome (as a database's key lock makes it wait)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ids: set[tuple[str, str]] = set()

    def enter(self, entry: tuple[str, str]) -> None:
        with self._cond:
            while entry in self._ids:
                self._cond.wait()
            self._ids.add(entry)

    def leave(self, entry: tuple[str, str]) -> None:
        with self._cond:
            self._ids.discard(entry)
            self._cond.notify_all()


def open_inbox(url: str, **options: Any) -> Inbox:
    """The inbox ``url`` names: ``memory://``, ``native:///path`` (:class:`NativeInbox`),
    ``redis://...`` or ``redis+sentinel://...`` (:class:`RedisInbox`), or a scheme a
    package registered (:mod:`polybus.registry`); ``options`` go to its constructor
    (``ttl=...``). An SQL inbox needs a connection factory: build :class:`SqlInbox`."""
    inbox: Inbox = opener("inbox", url)(url, **options)
    return inbox


class MemoryInbox:
    """An inbox in this process's memory: it dedups redeliveries while the process lives."""

    def __init__(self, *, ttl: float = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self._ttl_ms = _ttl_ms(ttl)
        self._lock = threading.Lock()
        self._finished = threading.Condition(self._lock)
        # Keyed by "group NUL id": a str caches its hash, a tuple would hash on every use.
        self._done: dict[str, int] = {}  #: entry -> forget at (ms)
        self._running: dict[str, object] = {}  #: entry -> the call handling it
        self._waiting = 0  #: calls waiting for a running copy to finish
        self._next_sweep = 0

    @classmethod
    def from_url(cls, url: str, *, ttl: float = DEFAULT_TTL) -> MemoryInbox:
        """A new inbox for ``memory://`` (it takes no options)."""
        Options(url, ours=(), what="memory inbox")
        return cls(ttl=ttl)

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        entry = f"{group}\0{message_id}"
        claim = object()
        running = self._running
        # Every message takes this path, so it takes no lock: setdefault claims the
        # entry atomically, and only a copy that finds it claimed waits (locked).
        while running.setdefault(entry, claim) is not claim:
            with self._lock:
                self._waiting += 1
                if entry in running:
                    self._finished.wait(0.05)  # bounded: the finishing side may miss us
                self._waiting -= 1
        try:
            now = time.time_ns() // 1_000_000
            if now >= self._next_sweep:
                self._sweep(now)
            forget_at = self._done.get(entry)
            if forget_at is not None and forget_at > now:
                return False, None
            result = handler()
            self._done[entry] = now + self._ttl_ms  # before the claim goes: a copy sees it
            return True, result
        finally:
            del running[entry]
            if self._waiting:
                with self._lock:
                    self._finished.notify_all()

    def _sweep(self, now: int) -> None:
        with self._lock:  # one sweeper; finishing calls write unlocked, so work on a copy
            if now < self._next_sweep:
                return
            self._next_sweep = now + min(self._ttl_ms, 60_000)
            done = self._done
            for entry in [k for k, t in list(done.items()) if t <= now]:
                done.pop(entry, None)

    def __len__(self) -> int:
        return len(self._done)

    def close(self) -> None:
        pass


# -- native -------------------------------------------------------------------------------

_PLAIN_GROUP = re.compile(r"^[A-Za-z0-9._-]{1,190}$")


def native_topic(group: str) -> str:
    """The native topic that keeps ``group``'s ids: ``_inbox.<group>``, or a digest of
    the group name when it is not a valid topic name."""
    if _PLAIN_GROUP.match(group):
        return f"_inbox.{group}"
    digest = hashlib.sha256(group.encode(errors="surrogatepass")).hexdigest()
    return f"_inbox-{digest[:40]}"  # '-' where plain names have '.': the two never meet


@dataclass
class _Seen:
    """What this process has read of one group's topic."""

    partition: Partition
    offset: int = 0  #: the next offset to read
    ids: dict[str, int] = field(default_factory=dict)  #: message id -> forget at (ms)


class NativeInbox:
    """An inbox in the native log engine: one single-partition topic per group
    (:func:`native_topic`), one record per processed id (the id is the key), retained
    for ``ttl`` by age.

    ``log`` is a :class:`~polybus.log.Log` (left open by :meth:`close`), a
    ``native:///path`` URL or a directory path. Several processes on one host may
    share the directory: before deciding that an id is new, this inbox reads every
    record any process appended to the group's topic. Two processes handling the
    same id at the same moment may both run it; within this process a concurrent
    duplicate waits for the first copy. An id is as durable as the log's fsync
    policy makes its record. Each process keeps the ids of the last ``ttl`` in memory.
    """

    def __init__(
        self,
        log: Log | str | os.PathLike[str],
        *,
        ttl: float = DEFAULT_TTL,
        segment_bytes: int = 1 << 20,
    ) -> None:
        self.ttl = ttl
        self._ttl_ms = _ttl_ms(ttl)
        self._segment_bytes = segment_bytes
        self._close_log: Callable[[], None] | None = None
        from ..log import Log  # here: importing the patterns does not load the engine

        if isinstance(log, Log):
            self.log = log
        elif isinstance(log, str) and "://" in log:
            from ..adapters._support.native import log_options, open_log

            self.log, self._close_log = open_log(log_options(log))
        else:
            self.log = Log(log)
            self._close_log = self.log.close
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        self._in_flight = _InFlight()
        self._next_sweep = 0
        self._closed = False

    def _catch_up(self, group: str, now: int) -> _Seen:
        """Under the lock: ``group``'s ids, with every record appended so far read."""
        seen = self._seen.get(group)
        if seen is None:
            topic = self.log.create_topic(
                native_topic(group),
                1,
                retention_ms=self._ttl_ms,
                segment_bytes=self._segment_bytes,
            )
            seen = self._seen[group] = _Seen(topic.partitions[0])
        part, ids, ttl = seen.partition, seen.ids, self._ttl_ms
        while seen.offset < part.end_offset:
            records = part.read(seen.offset, 10_000)
            if not records:
                break
            for r in records:
                if r.key is not None:
                    ids[r.key.decode(errors="surrogatepass")] = r.timestamp_ms + ttl
            seen.offset = records[-1].offset + 1
        if now >= self._next_sweep:
            for s in self._seen.values():
                s.ids = {k: t for k, t in s.ids.items() if t > now}
            self._next_sweep = now + min(ttl, 60_000)
        return seen

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        entry = (group, message_id)
        self._in_flight.enter(entry)
        try:
            with self._lock:
                if self._closed:
                    raise ClosedError("inbox is closed; open a new one")
                now = _now_ms()
                seen = self._catch_up(group, now)
                if seen.ids.get(message_id, 0) > now:
                    return False, None
            result = handler()
            done = _now_ms()
            try:
                seen.partition.append(
                    b"", key=message_id.encode(errors="surrogatepass"), timestamp_ms=done
                )
            except (OSError, PolybusError) as exc:
                raise ConnectionLost(
                    f"the handler ran but its message id could not be written to "
                    f"{self.log.path}: {exc}; it will run again on redelivery"
                ) from exc
            with self._lock:
                seen.ids[message_id] = done + self._ttl_ms
            return True, result
        finally:
            self._in_flight.leave(entry)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._close_log is not None:
            self._close_log()


# -- Redis --------------------------------------------------------------------------------


class RedisInbox:
    """An inbox in Redis: one key per processed id, set with an expiry of ``ttl`` once the
    handler returned.

    Keys are ``<prefix>:{<group>}:<message id>``: the hash tag keeps a group's keys in
    one Redis Cluster slot. ``client`` is a ``redis.Redis`` or
    ``redis.cluster.RedisCluster`` (left open by :meth:`close`) or a ``redis://`` URL.
    Every host may share the inbox; within this process a concurrent duplicate waits
    for the first copy, in two processes both copies may run. Every redis-py error
    becomes a polybus error (ConnectionLost for a lost or failing-over server).
    """

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster | str,
        *,
        ttl: float = DEFAULT_TTL,
        prefix: str = "polybus:inbox",
    ) -> None:
        import redis as redis_module

        from ..adapters._support.redis import client_options, map_error, open_client, redis_errors

        self._map_error = map_error
        self._redis_errors = redis_errors
        self._errors = (redis_module.RedisError, OSError)
        if "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"the key prefix {prefix!r} must not contain '{{' or '}}'")
        self.ttl = ttl
        self.prefix = prefix
        self._ttl_ms = _ttl_ms(ttl)
        self._owned = isinstance(client, str)
        if isinstance(client, str):
            client = open_client(client_options(client, ()), check=False)
        elif not isinstance(client, redis_module.Redis | redis_module.cluster.RedisCluster):
            raise ConfigurationError(
                f"cannot use a {type(client).__module__}.{type(client).__qualname__}: pass a "
                "redis.Redis, a redis.cluster.RedisCluster or a redis:// URL"
            )
        self.client = client
        self._in_flight = _InFlight()

    def key(self, group: str, message_id: str) -> str:
        """The Redis key that remembers ``message_id`` for ``group``."""
        if "{" in group or "}" in group:
            raise ConfigurationError(
                f"group {group!r} contains a brace, which would break its keys' hash tag"
            )
        return f"{self.prefix}:{{{group}}}:{message_id}"

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        key = self.key(group, message_id)
        entry = (group, message_id)
        self._in_flight.enter(entry)
        try:
            with self._redis_errors():
                if self.client.exists(key):
                    return False, None
            result = handler()
            try:
                self.client.set(key, b"1", px=self._ttl_ms)
            except self._errors as exc:
                error = self._map_error(exc)
                raise type(error)(
                    f"the handler ran but its message id could not be stored: {error}; "
                    "it will run again on redelivery"
                ) from exc
            return True, result
        finally:
            self._in_flight.leave(entry)

    def close(self) -> None:
        if self._owned:
            self.client.close()


# -- SQL ----------------------------------------------------------------------------------


class SqlInbox:
    """An inbox in a SQL table, written in the same transaction as the handler's own writes.

    ``connect`` returns a new DB-API connection: ``sqlite3.connect(path)`` (the default
    transaction mode, or ``autocommit=True``) or ``psycopg.connect(url)``. The inbox
    opens one connection per thread and creates its table if missing (a primary key of
    group and message id, an expiry time). :meth:`process` begins a transaction,
    inserts the id's row, runs the handler, and commits the row together with whatever
    the handler wrote through :attr:`connection`; if the handler raises, all of it
    rolls back. A copy of the message being handled elsewhere (another thread or
    process) makes the insert wait for that transaction: the copy is skipped if it
    commits and runs if it rolls back. Expired rows are purged about once a minute.

    On SQLite a transaction holds the database's write lock, so handlers on one
    database run one at a time; one that outlasts the connection's busy timeout makes
    the others raise ConnectionLost.
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        ttl: float = DEFAULT_TTL,
        table: str = "polybus_inbox",
    ) -> None:
        self.ttl = ttl
        self.table = check_table(table)
        self._ttl_ms = _ttl_ms(ttl)
        self._connect = connect
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[Any] = []
        self._closed = False
        self._next_purge = 0
        conn = self._open()
        self.dialect: Dialect = dialect_of(conn)
        self._adopt(conn)
        self._insert: str = self.dialect.sql(
            f"INSERT INTO {table} (group_name, message_id, expires_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (group_name, message_id) DO UPDATE SET expires_ms = excluded.expires_ms "
            f"WHERE {table}.expires_ms <= ?"  # an expired row counts as absent
        )
        self._purge: str = self.dialect.sql(f"DELETE FROM {table} WHERE expires_ms <= ?")
        self._create_table(conn)

    @property
    def connection(self) -> Any:
        """The connection of the transaction this thread's handler runs in.

        Write through it (and neither commit nor roll it back) to make the handler's
        writes commit with the inbox entry. Raises ConfigurationError outside a handler.
        """
        conn = getattr(self._local, "current", None)
        if conn is None:
            raise ConfigurationError(
                "inbox.connection exists only while a handler runs inside inbox.process()"
            )
        return conn

    def _open(self) -> Any:
        if self._closed:
            raise ClosedError("inbox is closed; open a new one")
        try:
            return self._connect()
        except Exception as exc:
            if type(exc).__module__.split(".", 1)[0] in ("sqlite3", "psycopg"):
                raise ConnectionLost(f"cannot connect to the inbox's database: {exc}") from exc
            raise

    def _adopt(self, conn: Any) -> None:
        with self._lock:
            self._connections.append(conn)
        self._local.conn = conn

    def _conn(self) -> Any:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._open()
            if dialect_of(conn).name != self.dialect.name:
                close_quietly(conn)
                raise ConfigurationError(
                    f"connect() returned a {dialect_of(conn).name} connection, not "
                    f"{self.dialect.name} as before"
                )
            self._adopt(conn)
        return conn

    def _forget(self, conn: Any) -> None:
        """Drop a connection whose transaction could not even be rolled back."""
        self._local.conn = None
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        close_quietly(conn)

    def _fail(self, conn: Any, exc: BaseException, doing: str) -> PolybusError:
        if not rollback_quietly(conn):
            self._forget(conn)
        error: PolybusError = self.dialect.map_error(exc, doing)
        return error

    def _create_table(self, conn: Any) -> None:
        ddl = (
            f"CREATE TABLE IF NOT EXISTS {self.table} (group_name TEXT NOT NULL, "
            "message_id TEXT NOT NULL, expires_ms BIGINT NOT NULL, "
            "PRIMARY KEY (group_name, message_id))",
            f"CREATE INDEX IF NOT EXISTS {self.table}_expires ON {self.table} (expires_ms)",
        )
        d = self.dialect
        for attempt in (1, 2):
            try:
                d.begin(conn)
                cur = conn.cursor()
                for statement in ddl:
                    cur.execute(statement)
                conn.commit()
                return
            except d.module.IntegrityError:  # PostgreSQL: another process created it meanwhile
                rollback_quietly(conn)
                if attempt == 2:
                    raise
            except d.module.Error as exc:
                raise self._fail(conn, exc, f"creating the inbox table {self.table}") from exc

    def _maybe_purge(self, conn: Any, now: int) -> None:
        with self._lock:
            if now < self._next_purge:
                return
            self._next_purge = now + min(self._ttl_ms, 60_000)
        try:
            self.dialect.begin(conn)
            conn.cursor().execute(self._purge, (now,))
            conn.commit()
        except self.dialect.module.Error as exc:
            raise self._fail(conn, exc, f"purging expired rows of {self.table}") from exc

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        if getattr(self._local, "current", None) is not None:
            raise ConfigurationError("inbox.process() cannot run inside one of its handlers")
        if self._closed:
            raise ClosedError("inbox is closed; open a new one")
        conn = self._conn()
        d = self.dialect
        now = _now_ms()
        self._maybe_purge(conn, now)
        try:
            d.begin(conn)
            cur = conn.cursor()
            cur.execute(self._insert, (group, message_id, now + self._ttl_ms, now))
            fresh = cur.rowcount == 1
            if not fresh:
                conn.rollback()
        except d.module.Error as exc:
            raise self._fail(conn, exc, f"recording message {message_id!r}") from exc
        if not fresh:
            return False, None
        self._local.current = conn
        try:
            result = handler()
        except BaseException:
            if not rollback_quietly(conn):
                self._forget(conn)
            raise
        finally:
            self._local.current = None
        state = d.transaction_state(conn)
        if state != "open":
            if not rollback_quietly(conn):
                self._forget(conn)
            if state == "failed":
                raise PolybusError(
                    "an SQL statement of the handler failed, so PostgreSQL aborted its "
                    "transaction; nothing was committed (let such errors propagate)"
                )
            raise ConfigurationError(
                "the handler committed or rolled back inbox.connection itself; leave that "
                "to process(), which commits the handler's writes with the inbox entry"
            )
        try:
            conn.commit()
        except d.module.Error as exc:
            error = self._fail(conn, exc, "committing the handler's transaction")
            raise type(error)(f"{error}; nothing of it was kept") from exc
        return True, result

    def close(self) -> None:
        """Close every connection the inbox opened (those of other live threads too)."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            close_quietly(conn)
        self._local = threading.local()
