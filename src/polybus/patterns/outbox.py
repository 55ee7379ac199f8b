"""The transactional outbox: messages written in the application's own database
transaction, published afterwards by a relay, in order, at least once.

An update and the message announcing it commit together or not at all, so no
message is lost when the broker is down and none is sent for a rolled-back change:

>>> outbox = Outbox("sqlite")                       # doctest: +SKIP
>>> with conn:                                      # the application's transaction
...     conn.execute("UPDATE orders SET state = 'paid' WHERE id = ?", (order_id,))
...     outbox.add(conn, "orders", {"id": order_id, "state": "paid"}, key=str(order_id))
>>> relay = OutboxRelay(bus, lambda: sqlite3.connect(path), outbox)
>>> relay.run(stop)                                 # in a thread or a process of its own

A row keeps the encoded value and the whole envelope (message id, timestamp,
correlation and causation ids, content type, headers), so a message published
again after a relay crash carries the same id: consumers dedup it with an inbox
(:mod:`polybus.patterns.inbox`).

SQLite (stdlib ``sqlite3``) and PostgreSQL (psycopg 3) are supported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..bus import Bus
from ..codecs import encode
from ..envelope import CONTENT_TYPE
from ..errors import ConfigurationError, ConnectionLost, PolybusError
from ..message import Message
from ._sql import Dialect, check_table, close_quietly, dialect_of, rollback_quietly

__all__ = ["Outbox", "OutboxRelay"]

log = logging.getLogger("polybus.outbox")

_COLUMNS = (
    "message_id, topic, msg_key, key_binary, payload, content_type, headers, "
    "correlation_id, causation_id, created_at"
)


class Outbox:
    """Writes messages to the outbox table ``table`` through the application's connection.

    ``dialect`` is ``"sqlite"``, ``"postgresql"`` or a connection of either kind.
    """

    def __init__(self, dialect: str | object, *, table: str = "polybus_outbox") -> None:
        self.dialect: Dialect = dialect_of(dialect)
        self.table = check_table(table)
        self._insert = self.dialect.sql(
            f"INSERT INTO {table} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )

    def create_table(self, conn: Any) -> None:
        """Create the outbox table if it does not exist, in ``conn``'s current transaction
        (commit it); idempotent."""
        self._check(conn)
        if self.dialect.name == "sqlite":
            seq, blob, flag = "seq INTEGER PRIMARY KEY AUTOINCREMENT", "BLOB", "INTEGER"
        else:
            seq, blob, flag = (
                "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                "BYTEA",
                "BOOLEAN",
            )
        try:
            conn.cursor().execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ({seq}, message_id TEXT NOT NULL, "
                f"topic TEXT NOT NULL, msg_key {blob}, key_binary {flag} NOT NULL, "
                f"payload {blob} NOT NULL, content_type TEXT, headers TEXT, "
                "correlation_id TEXT, causation_id TEXT, created_at DOUBLE PRECISION NOT NULL)"
            )
        except self.dialect.module.Error as exc:
            raise self.dialect.map_error(exc, f"creating the outbox table {self.table}") from exc

    def _check(self, conn: Any) -> None:
        if dialect_of(conn).name != self.dialect.name:
            raise ConfigurationError(
                f"this outbox is for {self.dialect.name}, not a {dialect_of(conn).name} connection"
            )

    def add(
        self,
        conn: Any,
        topic: str,
        value: Any,
        *,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> str:
        """Write a message for ``topic`` in ``conn``'s current transaction; return its id.

        Does not commit: the message is published once the application commits, and
        never if it rolls back. ``value`` may be a :class:`~polybus.Message` (its id
        and envelope are kept; the keyword arguments are then ignored). Raises
        EncodeError for a value no codec takes, ConfigurationError for a bad key,
        header or topic, and ConnectionLost when the database fails.
        """
        value = Message.of(
            value,
            key=key,
            headers=headers,
            content_type=content_type,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
        if not isinstance(topic, str) or not topic:
            raise ConfigurationError(f"topic must be a non-empty str, not {topic!r}")
        self._check(conn)
        row = _row(value, topic)
        try:
            conn.cursor().execute(self._insert, row)
        except self.dialect.module.Error as exc:
            raise self.dialect.map_error(exc, f"adding a message to {self.table}") from exc
        message_id: str = value.id
        return message_id


def _row(message: Message, topic: str) -> tuple[Any, ...]:
    value, content_type = message.value, message.content_type
    if content_type is None and type(value) is bytes:
        payload = value  # as the bus does: plain bytes travel without a content type
    else:
        payload, content_type = encode(value, content_type)
    key = message.key
    if key is None or isinstance(key, bytes):
        raw_key, binary = key, key is not None
    elif isinstance(key, str):
        raw_key, binary = key.encode(), False
    else:
        raise ConfigurationError(
            f"message key must be str, bytes or None, not {type(key).__name__}"
        )
    for name, text in message.headers.items():
        if type(name) is not str or type(text) is not str:
            raise ConfigurationError(
                f"header {name!r} must map str to str (got {type(text).__name__}); "
                "encode other values yourself, e.g. with str() or json.dumps()"
            )
    return (
        message.id,
        topic,
        raw_key,
        binary,
        payload,
        content_type,
        json.dumps(message.headers) if message.headers else None,
        message.correlation_id,
        message.causation_id,
        message.timestamp,
    )


def _message(row: Sequence[Any]) -> Message:
    """The message a row keeps, with its stored id and envelope."""
    _, message_id, _, raw_key, binary, payload, content_type, headers, corr, cause, ts = row
    fields: dict[str, str] = json.loads(headers) if headers else {}
    if content_type is not None:
        # The payload is encoded already: hand it over as bytes, with the content-type
        # header the bus would have written for the value.
        fields[CONTENT_TYPE] = content_type
    key: str | bytes | None = None
    if raw_key is not None:
        key = bytes(raw_key) if binary else bytes(raw_key).decode()
    return Message(
        bytes(payload),
        key=key,
        headers=fields,
        id=message_id,
        timestamp=ts,
        correlation_id=corr,
        causation_id=cause,
    )


class OutboxRelay:
    """Publishes the outbox's rows through ``bus`` in insertion order, then deletes them.

    ``connect`` returns a new DB-API connection to the outbox's database (the relay
    keeps one, and opens a new one after a failure). Only one relay publishes at a
    time, whatever the number of relay processes: on PostgreSQL a batch runs under a
    transaction-level advisory lock (the others skip their turn), on SQLite under the
    database's write lock (the others wait). So messages go out in the order of their
    rows, and per key in the order the application wrote them. Delivery is
    at-least-once: a relay that dies after publishing a batch and before deleting it
    leaves the batch to be published again, with the same message ids. Use one relay
    object from one thread.
    """

    def __init__(
        self,
        bus: Bus,
        connect: Callable[[], Any],
        outbox: Outbox,
        *,
        batch: int = 500,
        poll_interval: float = 0.5,
    ) -> None:
        if not isinstance(batch, int) or batch < 1:
            raise ConfigurationError(f"batch must be a positive int, not {batch!r}")
        if poll_interval <= 0:
            raise ConfigurationError("poll_interval must be positive (seconds)")
        self.bus = bus
        self.outbox = outbox
        self.batch = batch
        self.poll_interval = poll_interval
        self._connect = connect
        self._conn: Any = None
        d, table = outbox.dialect, outbox.table
        self._select = d.sql(f"SELECT seq, {_COLUMNS} FROM {table} ORDER BY seq LIMIT ?")
        if d.name == "sqlite":  # the write lock is held from select to delete: no row slips in
            self._delete = f"DELETE FROM {table} WHERE seq <= ?"
        else:  # a row of a transaction that commits meanwhile may have a lower seq: name them
            self._delete = f"DELETE FROM {table} WHERE seq = ANY(%s)"
        digest = hashlib.blake2b(f"polybus-outbox:{table}".encode(), digest_size=8).digest()
        self._lock_key = int.from_bytes(digest, "big", signed=True)

    def _connection(self) -> Any:
        if self._conn is None:
            try:
                conn = self._connect()
            except Exception as exc:
                if type(exc).__module__.split(".", 1)[0] in ("sqlite3", "psycopg"):
                    raise ConnectionLost(f"cannot connect to the outbox's database: {exc}") from exc
                raise
            self.outbox._check(conn)
            self._conn = conn
        return self._conn

    def _fail(self, exc: BaseException, doing: str) -> PolybusError:
        if not rollback_quietly(self._conn):
            close_quietly(self._conn)
            self._conn = None
        error: PolybusError = self.outbox.dialect.map_error(exc, doing)
        return error

    def _take(self) -> list[Any]:
        """Begin a transaction and read the next batch, if this relay may publish now."""
        conn, d = self._connection(), self.outbox.dialect
        try:
            d.begin(conn)
            cur = conn.cursor()
            if d.name == "postgresql":
                cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (self._lock_key,))
                if not cur.fetchone()[0]:
                    conn.rollback()
                    return []  # another relay is publishing
            cur.execute(self._select, (self.batch,))
            rows: list[Any] = cur.fetchall()
        except d.module.Error as exc:
            if d.name == "sqlite" and d.is_transient(exc) and rollback_quietly(conn):
                return []  # the write lock stayed busy for the connection's whole timeout
            raise self._fail(exc, f"reading {self.outbox.table}") from exc
        if not rows:
            conn.rollback()
        return rows

    def run_once(self) -> int:
        """Publish the next batch of at most ``batch`` rows and delete them; return how many.

        Returns 0 when the outbox is empty or another relay holds the lock. Blocks
        while the bus publishes. Raises ConnectionLost when the database or the
        broker fails (the batch stays, to be published again), and what
        ``Bus.publish_many`` raises for a row the broker refuses (MessageTooLarge, ...).
        """
        rows = self._take()
        if not rows:
            return 0
        conn = self._conn
        try:
            start = 0
            for end in range(1, len(rows) + 1):  # consecutive rows of one topic: one call
                if end == len(rows) or rows[end][2] != rows[start][2]:
                    self.bus.publish_many(rows[start][2], [_message(r) for r in rows[start:end]])
                    start = end
        except BaseException:
            if not rollback_quietly(conn):
                close_quietly(conn)
                self._conn = None
            raise
        d = self.outbox.dialect
        try:
            marker = rows[-1][0] if d.name == "sqlite" else [r[0] for r in rows]
            conn.cursor().execute(self._delete, (marker,))
            conn.commit()
        except d.module.Error as exc:
            error = self._fail(exc, f"deleting published rows of {self.outbox.table}")
            raise type(error)(
                f"{error}; those {len(rows)} messages will be published again"
            ) from exc
        return len(rows)

    def run(self, stop: threading.Event) -> None:
        """Relay until ``stop`` is set, checking for new rows every ``poll_interval``.

        Database and broker outages (ConnectionLost) are logged and retried; any
        other error (a message the broker refuses) propagates and stops the relay.
        """
        while not stop.is_set():
            try:
                published = self.run_once()
            except ConnectionLost as exc:
                log.warning("outbox relay: %s; retrying in %.1f s", exc, self.poll_interval)
                published = 0
            if published < self.batch:
                stop.wait(self.poll_interval)

    def close(self) -> None:
        """Close the relay's database connection; idempotent."""
        if self._conn is not None:
            close_quietly(self._conn)
            self._conn = None
