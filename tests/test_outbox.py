"""The transactional outbox on SQLite and PostgreSQL, relayed to the native engine.

The crash test kills a relay process (SIGKILL) after it published a batch and
before it deleted the batch's rows; this file is also that process
(``python test_outbox.py DB DSN TABLE LOG_DIR BATCH``).
"""

from __future__ import annotations

import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import polybus
from engine_workers import wait_until
from polybus.errors import ConfigurationError, EncodeError
from polybus.message import Message
from polybus.patterns.inbox import SqlInbox
from polybus.patterns.outbox import Outbox, OutboxRelay
from polybus.testing import servers
from polybus.testing.plugin import require_server

TOPIC = "orders"
KEYS = ("k0", "k1", "k2", "k3")


def connect_to(db: str, dsn: str) -> Any:
    if db == "sqlite":
        return sqlite3.connect(dsn, timeout=20)
    import psycopg

    return psycopg.connect(dsn)


@dataclass
class Db:
    name: str
    dsn: str
    table: str

    def connect(self) -> Any:
        return connect_to(self.name, self.dsn)

    def outbox(self) -> Outbox:
        return Outbox(self.name, table=self.table)

    def rows(self) -> int:
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(f"SELECT count(*) FROM {self.table}")
            count: int = cur.fetchone()[0]
            return count
        finally:
            conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    table = f"outbox_{uuid.uuid4().hex[:12]}"
    if request.param == "sqlite":
        d = Db("sqlite", str(tmp_path / "app.db"), table)
    else:
        require_server("postgres", servers.postgres_unavailable())
        d = Db("postgresql", servers.postgres_url(), table)
    conn = d.connect()
    d.outbox().create_table(conn)
    conn.commit()
    conn.close()
    yield d
    if d.name == "postgresql":
        conn = d.connect()
        conn.execute(f"DROP TABLE IF EXISTS {table}, inbox_{table}")
        conn.commit()
        conn.close()


def fill(db: Db, count: int, per_transaction: int = 100) -> list[tuple[str, str, int]]:
    """Add ``count`` messages, ``{"n": i}`` with key ``KEYS[i % 4]``; return (id, key, n)."""
    outbox = db.outbox()
    added = []
    conn = db.connect()
    try:
        for start in range(0, count, per_transaction):
            for n in range(start, min(count, start + per_transaction)):
                key = KEYS[n % len(KEYS)]
                added.append((outbox.add(conn, TOPIC, {"n": n}, key=key), key, n))
            conn.commit()
    finally:
        conn.close()
    return added


def drain(bus: polybus.Bus, group: str, count: int) -> list[polybus.Delivery]:
    """Fetch (and ack) until ``count`` deliveries arrived."""
    got: list[polybus.Delivery] = []
    with bus.subscribe(TOPIC, group) as sub:

        def enough() -> bool:
            batch = sub.fetch(1000, 0.2)
            sub.ack(batch)
            got.extend(batch)
            return len(got) >= count

        wait_until(enough, 30, f"{count} deliveries")
        assert sub.fetch(1000, 0.1) == []  # and no more
    return got


def test_add_writes_in_the_callers_transaction(db: Db) -> None:
    outbox = db.outbox()
    conn = db.connect()
    try:
        outbox.add(conn, TOPIC, {"n": 1})
        conn.rollback()
        assert db.rows() == 0
        message_id = outbox.add(conn, TOPIC, {"n": 2})
        assert db.rows() == 0  # not committed by add()
        conn.commit()
        assert db.rows() == 1
        assert (len(message_id), message_id[14]) == (36, "7")  # a UUIDv7
        with pytest.raises(EncodeError):
            outbox.add(conn, TOPIC, object())
        with pytest.raises(ConfigurationError, match="header"):
            outbox.add(conn, TOPIC, "x", headers={"attempt": 3})  # type: ignore[dict-item]
        with pytest.raises(ConfigurationError, match="key"):
            outbox.add(conn, TOPIC, "x", key=3)  # type: ignore[arg-type]
        other = Outbox("sqlite" if db.name != "sqlite" else "postgresql", table=db.table)
        with pytest.raises(ConfigurationError, match="this outbox is for"):
            other.add(conn, TOPIC, "x")
    finally:
        conn.close()


def test_relay_publishes_rows_with_their_stored_envelope(db: Db, tmp_path: Path) -> None:
    outbox = db.outbox()
    conn = db.connect()
    kept = Message({"total": 9.5}, key="customer-1", correlation_id="c-1", timestamp=1700000000.25)
    sent = [
        (outbox.add(conn, TOPIC, {"n": 1}, key="a", headers={"tenant": "t1"}), {"n": 1}),
        (outbox.add(conn, TOPIC, "text", causation_id="cause-1"), "text"),
        (outbox.add(conn, TOPIC, b"\x00raw", key=b"\xffbin"), b"\x00raw"),
        (outbox.add(conn, TOPIC, [1, 2], content_type="application/msgpack"), [1, 2]),
        (outbox.add(conn, TOPIC, kept), {"total": 9.5}),
    ]
    conn.commit()
    conn.close()
    with polybus.connect(f"native://{tmp_path / 'log'}") as bus:
        bus.declare(TOPIC, partitions=1)
        relay = OutboxRelay(bus, db.connect, outbox, batch=2)
        assert [relay.run_once() for _ in range(4)] == [2, 2, 1, 0]
        relay.close()
        assert db.rows() == 0
        got = [d.message for d in drain(bus, "g", len(sent))]
    assert [(m.id, m.value) for m in got] == sent
    assert (got[0].key, got[0].headers) == ("a", {"tenant": "t1"})
    assert (got[1].causation_id, got[1].content_type) == ("cause-1", "text/plain; charset=utf-8")
    assert (got[2].key, got[2].content_type) == (b"\xffbin", None)
    assert got[3].content_type == "application/msgpack"
    assert (got[4].key, got[4].correlation_id, got[4].timestamp) == (
        "customer-1",
        "c-1",
        kept.timestamp,
    )


def relay_until_killed(db: str, dsn: str, table: str, log_dir: str, batch: str) -> None:
    """The child: relay, and after the second batch is published (before its rows are
    deleted) say so and wait to be killed."""
    bus = polybus.connect(f"native://{log_dir}")
    publish_many = bus.publish_many
    calls = 0

    def publish_then_wait(topic: str, messages: Any, **options: Any) -> Any:
        nonlocal calls
        receipts = publish_many(topic, messages, **options)
        calls += 1
        if calls == 2:
            sys.stdout.write("published\n")
            sys.stdout.flush()
            sys.stdin.read()  # the parent kills this process here
        return receipts

    bus.publish_many = publish_then_wait  # type: ignore[method-assign]
    relay = OutboxRelay(bus, lambda: connect_to(db, dsn), Outbox(db, table=table), batch=int(batch))
    while relay.run_once():
        pass
    raise SystemExit("the relay ran out of rows before it was killed")


def test_relay_killed_between_publish_and_delete(db: Db, tmp_path: Path) -> None:
    count, batch = 400, 50
    added = fill(db, count)
    log_dir = tmp_path / "log"
    with polybus.connect(f"native://{log_dir}") as bus:
        bus.declare(TOPIC, groups=["downstream"])
    child = subprocess.Popen(
        [sys.executable, __file__, db.name, db.dsn, db.table, str(log_dir), str(batch)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(child.stdout, selectors.EVENT_READ)
            ready = sel.select(60)
        line = child.stdout.readline() if ready else b""
        assert line == b"published\n", child.stderr.read() if child.stderr else line
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(10)
        for pipe in (child.stdin, child.stdout, child.stderr):
            if pipe:
                pipe.close()
    assert child.returncode == -signal.SIGKILL
    assert db.rows() == count - batch  # the second batch was published, not deleted

    with polybus.connect(f"native://{log_dir}") as bus:
        relay = OutboxRelay(bus, db.connect, db.outbox(), batch=batch)  # the restart
        while relay.run_once():
            pass
        relay.close()
        assert db.rows() == 0
        deliveries = drain(bus, "downstream", count + batch)

    published = Counter(d.message.id for d in deliveries)
    assert set(published) == {message_id for message_id, _, _ in added}
    assert sorted(published.values()) == [1] * (count - batch) + [2] * batch  # at least once

    # Downstream, through an SQL inbox: each message takes effect once, in order per key.
    inbox = SqlInbox(db.connect, table=f"inbox_{db.table}")
    effects: Counter[str] = Counter()
    order: defaultdict[str, list[int]] = defaultdict(list)
    for d in deliveries:
        message = d.message

        def effect(m: Message = message) -> None:
            effects[m.id] += 1
            order[str(m.key)].append(m.value["n"])

        inbox.process("downstream", message.id, effect)
    inbox.close()
    assert effects == Counter({message_id: 1 for message_id, _, _ in added})
    for key in KEYS:
        assert order[key] == [n for _, k, n in added if k == key]


def test_one_relay_publishes_at_a_time(db: Db, tmp_path: Path) -> None:
    count = 1500
    added = fill(db, count, per_transaction=500)
    with polybus.connect(f"native://{tmp_path / 'log'}") as bus:
        bus.declare(TOPIC, partitions=1, groups=["g"])
        stop = threading.Event()
        relays = [OutboxRelay(bus, db.connect, db.outbox(), batch=50, poll_interval=0.01)]
        relays.append(OutboxRelay(bus, db.connect, db.outbox(), batch=50, poll_interval=0.01))
        threads = [threading.Thread(target=r.run, args=(stop,)) for r in relays]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: db.rows() == 0, 60, "the relays to empty the outbox")
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            for r in relays:
                r.close()
        got = [d.message.id for d in drain(bus, "g", count)]
    assert got == [message_id for message_id, _, _ in added]  # each once, in order


if __name__ == "__main__":
    relay_until_killed(*sys.argv[1:])
