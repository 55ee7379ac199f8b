"""The matching engine: one member of the ``matchers`` group, and the zones' shared state.

A matcher consumes the city's events (drivers offering a ride, riders asking for one),
keyed by zone, one at a time, and answers each rider on ``matches``: the nearest free
driver of the zone, or none. The state a decision needs (which drivers are free, and
where) is kept per zone in a SQLite file that every matcher opens, not in the matcher's
memory: when the group grows, a zone moves to another member (native, Kafka) or is
shared by several at once (RabbitMQ, Redis), and its state must go with it.

Each event is applied once: its message id and the decision it led to are written in
the same transaction as the change to the drivers. A copy delivered again (to this
member, or to the zone's next owner after a rebalance) finds its id and gets the stored
decision back, so it is published again unchanged (with the same derived message id)
rather than booking a second driver.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from polybus import Delivery
from polybus.patterns.worker import App, Output, Worker

GROUP = "matchers"
ROUTING_WAIT_S = 0.005  # what a rider's request waits for the routing service (simulated)
BATCH = 10  # deliveries a member takes at a time: a small share, so new members find work

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS drivers (driver TEXT PRIMARY KEY, x REAL NOT NULL,"
    " y REAL NOT NULL, offer INTEGER NOT NULL, free INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS handled (event_id TEXT PRIMARY KEY, result TEXT)",
)


class Driver(NamedTuple):
    driver: str
    x: float
    y: float
    offer: int


def nearest(x: float, y: float, drivers: list[Driver]) -> Driver | None:
    """The driver closest to (x, y), or None when there is none."""
    return min(drivers, key=lambda d: math.dist((x, y), (d.x, d.y)), default=None)


def started_flag(state_dir: Path, name: str) -> Path:
    """The file a matcher creates once it has joined the group (the parent waits for it)."""
    return state_dir / f"{name}.started"


class Zones:
    """The state of every zone, one SQLite file each in ``state_dir``.

    One file per zone: a transaction locks its file, so zones never wait for each
    other; only two members holding one zone at once (RabbitMQ, Redis) take turns.
    Use it from one thread (a matcher's handler runs on one).
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._files: dict[str, sqlite3.Connection] = {}

    @classmethod
    def create(cls, state_dir: Path, zones: list[str]) -> None:
        """Create each zone's file and tables (before any matcher starts)."""
        store = cls(state_dir)
        for zone in zones:
            db = store._db(zone)
            db.execute("PRAGMA journal_mode=WAL")  # kept by the file: readers never wait
            for statement in SCHEMA:
                db.execute(statement)
        store.close()

    def _db(self, zone: str) -> sqlite3.Connection:
        db = self._files.get(zone)
        if db is None:
            # autocommit mode: the transactions below are explicit (BEGIN IMMEDIATE). One
            # thread at a time, but close() runs on another: the main thread.
            path = self.state_dir / f"{zone}.sqlite3"
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA synchronous = NORMAL")  # a commit survives a killed process
            self._files[zone] = db
        return db

    @contextmanager
    def _transaction(self, zone: str) -> Iterator[sqlite3.Connection]:
        db = self._db(zone)
        db.execute("BEGIN IMMEDIATE")  # the zone's write lock now: no upgrade deadlock
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def apply(self, event_id: str, event: dict[str, Any], matcher: str) -> dict[str, Any] | None:
        """Apply one event of the city once; the decision for a rider (None for a driver).

        A driver's offer makes the driver free at its position. A rider's request books
        the nearest free driver, or none. An event already applied changes nothing and
        returns the decision it had.
        """
        with self._transaction(event["zone"]) as db:
            done = db.execute(
                "SELECT result FROM handled WHERE event_id = ?", (event_id,)
            ).fetchone()
            if done is not None:
                return None if done[0] is None else dict(json.loads(done[0]))
            result = None
            if event["kind"] == "driver":
                db.execute(
                    "INSERT INTO drivers VALUES (?, ?, ?, ?, 1) ON CONFLICT (driver) DO UPDATE"
                    " SET x = excluded.x, y = excluded.y, offer = excluded.offer, free = 1",
                    (event["driver"], event["x"], event["y"], event["offer"]),
                )
            else:
                rows = db.execute("SELECT driver, x, y, offer FROM drivers WHERE free")
                chosen = nearest(event["x"], event["y"], [Driver(*r) for r in rows])
                result = {
                    "request": event["request"],
                    "zone": event["zone"],
                    "seq": event["seq"],
                    "driver": None,
                    "offer": None,
                    "km": None,
                    "matcher": matcher,
                }
                if chosen is not None:
                    db.execute("UPDATE drivers SET free = 0 WHERE driver = ?", (chosen.driver,))
                    km = math.dist((event["x"], event["y"]), (chosen.x, chosen.y))
                    result |= {"driver": chosen.driver, "offer": chosen.offer, "km": round(km, 2)}
            db.execute(
                "INSERT INTO handled VALUES (?, ?)",
                (event_id, None if result is None else json.dumps(result)),
            )
            return result

    def close(self) -> None:
        for db in self._files.values():
            db.close()
        self._files.clear()


def serve(name: str, url: str, namespace: str, state_dir: str) -> None:
    """Run matcher ``name`` until SIGTERM: join the group, then match."""
    zones = Zones(Path(state_dir))
    matches = f"{namespace}.matches"
    app = App(url)

    # One delivery at a time (concurrency=1): a member is one unit of parallelism, so with
    # KEY_ORDER the group's is the number of members holding a partition. strict_order: a
    # failed event is retried before the zone's later ones, never after them.
    @app.consumer(f"{namespace}.city", group=GROUP, batch=BATCH, strict_order=True)
    def match(delivery: Delivery) -> Output | None:
        event: dict[str, Any] = delivery.message.value
        if event["kind"] == "request":
            time.sleep(ROUTING_WAIT_S)
        result = zones.apply(delivery.message.id, event, name)
        return None if result is None else Output(matches, result, key=event["zone"])

    worker = Worker(app)
    try:
        worker.start()  # subscribed: a member of the group from here on
        started_flag(Path(state_dir), name).touch()
        worker.run()  # until SIGTERM; then it finishes the event in hand and leaves
    finally:
        worker.stop()
        zones.close()


if __name__ == "__main__":
    serve(*sys.argv[1:5])
