"""The Inbox protocol, checked on every store: memory, native, Redis, SQLite, PostgreSQL.

Each store fixture yields a factory of inboxes on one shared storage, so two
inboxes from it act as two processes (memory inboxes share nothing).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from engine_workers import wait_until
from polybus.errors import ClosedError, ConfigurationError, ConnectionLost, PolybusError
from polybus.patterns.inbox import Inbox, MemoryInbox, NativeInbox, RedisInbox, SqlInbox
from polybus.testing import servers
from polybus.testing.plugin import require_server


@dataclass
class Store:
    name: str
    _make: Callable[[float], Inbox]
    #: a new connection to the store's database (SQL stores only), for checking what committed
    db: Callable[[], Any] | None = None
    opened: list[Inbox] = field(default_factory=list)

    def make(self, ttl: float = 3600.0) -> Inbox:
        inbox = self._make(ttl)
        self.opened.append(inbox)
        return inbox


def _postgres_connect() -> Any:
    import psycopg

    return psycopg.connect(servers.postgres_url())


@contextmanager
def open_store(name: str, tmp_path: Path) -> Iterator[Store]:
    table = f"inbox_{uuid.uuid4().hex[:12]}"
    store: Store
    if name == "memory":
        store = Store(name, lambda ttl: MemoryInbox(ttl=ttl))
    elif name == "native":
        store = Store(name, lambda ttl: NativeInbox(tmp_path / "log", ttl=ttl))
    elif name == "redis":
        require_server("redis", servers.redis_unavailable())
        prefix = f"polybus-test:{uuid.uuid4().hex[:12]}"
        store = Store(name, lambda ttl: RedisInbox(servers.redis_url(), ttl=ttl, prefix=prefix))
    elif name == "sqlite":
        path = tmp_path / "inbox.db"

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(path, timeout=20)

        store = Store(name, lambda ttl: SqlInbox(connect, ttl=ttl, table=table), connect)
    else:
        require_server("postgres", servers.postgres_unavailable())
        store = Store(
            name, lambda ttl: SqlInbox(_postgres_connect, ttl=ttl, table=table), _postgres_connect
        )
    try:
        yield store
    finally:
        for inbox in store.opened:
            inbox.close()
        if name == "redis":
            import redis

            with redis.Redis.from_url(servers.redis_url()) as client:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                if keys:
                    client.delete(*keys)
        elif name == "postgres":
            with _postgres_connect() as conn:
                conn.execute(f"DROP TABLE IF EXISTS {table}, effects_{table}")


ALL = ["memory", "native", "redis", "sqlite", "postgres"]
SHARED = ALL[1:]  #: stores whose inboxes see each other's ids
SQL = ["sqlite", "postgres"]


@pytest.fixture(params=ALL)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(request.param, tmp_path) as s:
        yield s


@pytest.fixture(params=SHARED)
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(request.param, tmp_path) as s:
        yield s


@pytest.fixture(params=SQL)
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with open_store(request.param, tmp_path) as s:
        yield s


def test_duplicate_is_skipped(store: Store) -> None:
    inbox = store.make()
    calls: list[str] = []

    def handler() -> str:
        calls.append("run")
        return "result"

    assert inbox.process("g", "m1", handler) == (True, "result")
    assert inbox.process("g", "m1", handler) == (False, None)
    assert inbox.process("g", "m2", handler) == (True, "result")
    assert calls == ["run", "run"]


def test_groups_are_independent(store: Store) -> None:
    inbox = store.make()
    ran: list[str] = []
    for group in ("billing", "shipping", "billing", "email", "shipping"):
        inbox.process(group, "m1", lambda g=group: ran.append(g))
    assert ran == ["billing", "shipping", "email"]


def test_failed_handler_remembers_nothing(store: Store) -> None:
    inbox = store.make()

    def fail() -> None:
        raise ValueError("handler failed")

    with pytest.raises(ValueError, match="handler failed"):
        inbox.process("g", "m1", fail)
    assert inbox.process("g", "m1", lambda: 42) == (True, 42)
    assert inbox.process("g", "m1", lambda: 43) == (False, None)


def test_id_is_forgotten_after_ttl(store: Store) -> None:
    ttl = 0.3
    inbox = store.make(ttl=ttl)
    started = time.monotonic()
    assert inbox.process("g", "m1", lambda: 1) == (True, 1)
    assert inbox.process("g", "m1", lambda: 2) == (False, None)
    again: list[tuple[bool, int | None]] = []

    def ran_again() -> bool:
        again.append(inbox.process("g", "m1", lambda: 3))
        return again[-1][0]

    wait_until(ran_again, 10, "the id to be forgotten after its ttl")
    assert time.monotonic() - started >= ttl * 0.9
    assert again[-1] == (True, 3)
    assert inbox.process("g", "m1", lambda: 4) == (False, None)  # remembered anew


def _race(inboxes: list[Inbox], copies: int) -> tuple[int, list[bool]]:
    """``copies`` threads (spread over ``inboxes``) process one id at once; return how
    often the handler ran and what each process() said."""
    barrier = threading.Barrier(copies)
    lock = threading.Lock()
    runs = 0
    outcomes: list[bool] = []
    errors: list[BaseException] = []

    def handler() -> None:
        nonlocal runs
        with lock:
            runs += 1
        time.sleep(0.05)  # widens the window in which a broken store lets a copy through

    def copy(inbox: Inbox) -> None:
        try:
            barrier.wait()
            ran, _ = inbox.process("g", "contended", handler)
            with lock:
                outcomes.append(ran)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=copy, args=(inboxes[i % len(inboxes)],)) for i in range(copies)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return runs, outcomes


def test_concurrent_duplicates_in_one_process_run_once(store: Store) -> None:
    runs, outcomes = _race([store.make()], 8)
    assert runs == 1
    assert sorted(outcomes) == [False] * 7 + [True]


def test_concurrent_duplicates_across_inboxes_run_once(sql_store: Store) -> None:
    """Only an SQL inbox promises this: the primary key makes the other copies wait."""
    runs, outcomes = _race([sql_store.make(), sql_store.make()], 8)
    assert runs == 1
    assert sorted(outcomes) == [False] * 7 + [True]


def test_a_copy_waiting_for_a_failed_one_runs(store: Store) -> None:
    inbox = store.make()
    first_running, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def failing() -> None:
        first_running.set()
        release.wait(10)
        raise RuntimeError("first copy failed")

    def first() -> None:
        with pytest.raises(RuntimeError):
            inbox.process("g", "m", failing)

    t1 = threading.Thread(target=first)
    t1.start()
    assert first_running.wait(10)
    result: list[tuple[bool, Any]] = []
    t2 = threading.Thread(
        target=lambda: result.append(inbox.process("g", "m", lambda: ran.append("second")))
    )
    t2.start()
    t2.join(0.2)
    assert t2.is_alive(), "the second copy must wait for the first one's outcome"
    release.set()
    t1.join(10)
    t2.join(10)
    assert result == [(True, None)]
    assert ran == ["second"]


def test_another_inbox_on_the_store_sees_the_ids(shared_store: Store) -> None:
    a, b = shared_store.make(), shared_store.make()
    assert a.process("g", "m1", lambda: "a") == (True, "a")
    assert b.process("g", "m1", lambda: "b") == (False, None)
    assert b.process("g", "m2", lambda: "b") == (True, "b")
    assert a.process("g", "m2", lambda: "a") == (False, None)


_CHILD = """
import sys
from polybus.patterns.inbox import NativeInbox
inbox = NativeInbox(sys.argv[1])
for i in range(int(sys.argv[2])):
    inbox.process("g", f"m{i}", lambda: None)
inbox.close()
"""


def test_native_inbox_reads_what_other_processes_appended(tmp_path: Path) -> None:
    inbox = NativeInbox(tmp_path / "log")
    try:
        assert inbox.process("g", "m0", lambda: None)[0]  # this process read the topic once
        subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "log"), "200"], check=True)
        ran = [inbox.process("g", f"m{i}", lambda: None)[0] for i in range(201)]
        assert ran == [False] * 200 + [True]
    finally:
        inbox.close()
    reopened = NativeInbox(f"native://{tmp_path / 'log'}")  # as after a restart
    try:
        assert reopened.process("g", "m150", lambda: None) == (False, None)
    finally:
        reopened.close()


# -- SQL: the handler's writes and the inbox entry commit together -------------------------


def _effects(store: Store, table: str) -> list[str]:
    """The effects committed so far, read through a connection of its own."""
    assert store.db is not None
    conn = store.db()
    try:
        cur = conn.cursor()
        cur.execute(f"SELECT id FROM {table} ORDER BY id")
        return [row[0] for row in cur.fetchall()]
    finally:
        conn.close()


def test_handler_writes_commit_or_roll_back_with_the_entry(sql_store: Store) -> None:
    inbox = sql_store.make()
    assert isinstance(inbox, SqlInbox)
    table = f"effects_{inbox.table}"
    setup = sql_store.db() if sql_store.db else None
    assert setup is not None
    setup.cursor().execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY)")
    setup.commit()
    setup.close()
    mark = "?" if sql_store.name == "sqlite" else "%s"

    def effect(message_id: str, fail: bool = False) -> Callable[[], str]:
        def handler() -> str:
            inbox.connection.cursor().execute(f"INSERT INTO {table} VALUES ({mark})", (message_id,))
            if fail:
                raise RuntimeError("after writing")
            return message_id

        return handler

    assert inbox.process("g", "m1", effect("m1")) == (True, "m1")
    assert _effects(sql_store, table) == ["m1"]
    with pytest.raises(RuntimeError):
        inbox.process("g", "m2", effect("m2", fail=True))
    assert _effects(sql_store, table) == ["m1"]  # the effect rolled back ...
    assert inbox.process("g", "m2", effect("m2")) == (True, "m2")  # ... and the entry with it
    assert inbox.process("g", "m1", effect("m1")) == (False, None)
    assert _effects(sql_store, table) == ["m1", "m2"]


def test_sql_inbox_refuses_misuse(sql_store: Store) -> None:
    inbox = sql_store.make()
    assert isinstance(inbox, SqlInbox)
    with pytest.raises(ConfigurationError, match="only while a handler runs"):
        _ = inbox.connection
    with pytest.raises(ConfigurationError, match="committed or rolled back"):
        inbox.process("g", "m1", lambda: inbox.connection.commit())
    # the handler's own commit kept the entry (with whatever it wrote before): a duplicate
    assert inbox.process("g", "m1", lambda: None) == (False, None)
    with pytest.raises(ConfigurationError, match="inside one of its handlers"):
        inbox.process("g", "m2", lambda: inbox.process("g", "m3", lambda: None))
    if sql_store.name == "postgres":

        def swallow_sql_error() -> None:
            try:
                inbox.connection.execute("SELECT 1/0")
            except Exception:
                pass

        with pytest.raises(PolybusError, match="aborted its transaction"):
            inbox.process("g", "m4", swallow_sql_error)
        assert inbox.process("g", "m4", lambda: None)[0]
    inbox.close()
    with pytest.raises(ClosedError):
        inbox.process("g", "m5", lambda: None)


# -- errors ---------------------------------------------------------------------------------


def test_unreachable_stores_raise_connection_lost() -> None:
    port = servers.free_port()  # nothing listens there
    ran: list[int] = []
    inbox = RedisInbox(f"redis://127.0.0.1:{port}/0")
    with pytest.raises(ConnectionLost):
        inbox.process("g", "m1", lambda: ran.append(1))
    inbox.close()
    assert not ran
    pytest.importorskip("psycopg")
    import psycopg

    with pytest.raises(ConnectionLost, match="cannot connect"):
        SqlInbox(lambda: psycopg.connect(f"postgresql://127.0.0.1:{port}/x", connect_timeout=2))


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        MemoryInbox(ttl=0)
    with pytest.raises(ConfigurationError, match="table name"):
        SqlInbox(lambda: sqlite3.connect(tmp_path / "x.db"), table="bad; DROP TABLE x")
    with pytest.raises(ConfigurationError, match="prefix"):
        RedisInbox("redis://127.0.0.1:6379/0", prefix="a{b}")
    with pytest.raises(ConfigurationError, match="brace"):
        RedisInbox("redis://127.0.0.1:6379/0").key("{g}", "m")
    with pytest.raises(ConfigurationError, match="psycopg 3"):
        SqlInbox(lambda: object())
    with pytest.raises(ConfigurationError, match="native"):
        NativeInbox("redis://127.0.0.1:6379/0")
