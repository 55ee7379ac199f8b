"""The pipeline's SQL database: its tables, the connections the stages open, the check's queries.

One database holds the cards, the ledger, the balances, and the inbox and outbox
tables of polybus: PostgreSQL (a ``postgresql://`` DSN) or SQLite (a file path).
Every table name starts with the run's namespace, so runs sharing a PostgreSQL
database never meet.

The ledger has no unique key on the payment on purpose: the SQL inbox is what keeps
each payment once, and the check counts the entries, so a double booking shows up as
a count of 2 rather than as an error that would hide it.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterable
from typing import Any

from polybus.patterns.outbox import Outbox

CARD_VALID, CARD_EXPIRED = "valid", "expired"


def is_postgres(target: str) -> bool:
    """Whether ``target`` is a PostgreSQL DSN rather than a SQLite file."""
    return target.startswith(("postgresql://", "postgres://"))


def table_prefix(namespace: str) -> str:
    """An SQL identifier made of ``namespace``, short enough for PostgreSQL's 63 characters
    once polybus adds ``_inbox_expires`` to the inbox table's name for its index."""
    return "t_" + re.sub(r"[^A-Za-z0-9_]", "_", namespace)[:40]


class Database:
    """The pipeline's tables in ``target`` (a PostgreSQL DSN or a SQLite file path)."""

    def __init__(self, target: str, namespace: str) -> None:
        self.target = target
        self.dialect = "postgresql" if is_postgres(target) else "sqlite"
        prefix = table_prefix(namespace)
        self.cards = f"{prefix}_cards"
        self.ledger = f"{prefix}_ledger"
        self.balances = f"{prefix}_balances"
        self.inbox = f"{prefix}_inbox"  #: polybus's SqlInbox table, shared by the stages' groups
        self.outbox = f"{prefix}_outbox"  #: polybus's Outbox table (ledger, without transactions)
        self._local = threading.local()

    def connect(self) -> Any:
        """A new DB-API connection, as SqlInbox, Outbox and OutboxRelay want one."""
        if self.dialect == "postgresql":
            import psycopg

            return psycopg.connect(self.target, connect_timeout=5)
        conn = sqlite3.connect(self.target, timeout=10.0)
        # WAL: readers never wait for the writer; NORMAL: a commit survives a killed
        # process (not a power cut), without an fsync per transaction.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def sql(self, text: str) -> str:
        """``text``, written with ``?`` placeholders, in the driver's own style."""
        return text if self.dialect == "sqlite" else text.replace("?", "%s")

    def _query(self, text: str, params: Iterable[Any] = ()) -> list[Any]:
        """Run one statement in a transaction of its own, on this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(self.sql(text), tuple(params))
            rows = cur.fetchall() if cur.description else []
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        return rows

    def close(self) -> None:
        """Close this thread's connection, if it opened one."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- the run's parent -------------------------------------------------------------

    def create(self, cards: dict[str, str]) -> None:
        """Create the tables, with ``cards`` (account -> status); the inbox makes its own."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(
                f"CREATE TABLE {self.cards} (account TEXT PRIMARY KEY, status TEXT NOT NULL)"
            )
            cur.execute(
                f"CREATE TABLE {self.ledger} (payment TEXT NOT NULL, account TEXT NOT NULL, "
                "cents BIGINT NOT NULL)"
            )
            cur.execute(
                f"CREATE TABLE {self.balances} (account TEXT PRIMARY KEY, cents BIGINT NOT NULL)"
            )
            cur.executemany(
                self.sql(f"INSERT INTO {self.cards} VALUES (?, ?)"), sorted(cards.items())
            )
            Outbox(self.dialect, table=self.outbox).create_table(conn)
            conn.commit()
        finally:
            conn.close()

    def drop(self) -> None:
        """Drop every table of the run (a shared PostgreSQL database keeps no leftovers)."""
        for table in (self.cards, self.ledger, self.balances, self.inbox, self.outbox):
            self._query(f"DROP TABLE IF EXISTS {table}")

    def fix_card(self, account: str) -> None:
        """The customer put a valid card on ``account``."""
        self._query(f"UPDATE {self.cards} SET status = ? WHERE account = ?", (CARD_VALID, account))

    def entry_count(self) -> int:
        return int(self._query(f"SELECT COUNT(*) FROM {self.ledger}")[0][0])

    def entries_per_payment(self) -> dict[str, int]:
        return dict(self._query(f"SELECT payment, COUNT(*) FROM {self.ledger} GROUP BY payment"))

    def ledger_sums(self) -> dict[str, int]:
        return dict(self._query(f"SELECT account, SUM(cents) FROM {self.ledger} GROUP BY account"))

    def balance_of_accounts(self) -> dict[str, int]:
        return dict(self._query(f"SELECT account, cents FROM {self.balances}"))

    # -- the stages -------------------------------------------------------------------

    def card_status(self, account: str) -> str:
        rows = self._query(f"SELECT status FROM {self.cards} WHERE account = ?", (account,))
        return str(rows[0][0]) if rows else CARD_EXPIRED

    def book(self, conn: Any, payment: dict[str, Any]) -> None:
        """Write ``payment``'s ledger entry in ``conn``'s open transaction."""
        conn.cursor().execute(
            self.sql(f"INSERT INTO {self.ledger} VALUES (?, ?, ?)"),
            (payment["id"], payment["account"], payment["cents"]),
        )

    def credit(self, conn: Any, account: str, cents: int) -> int:
        """Add ``cents`` to ``account``'s balance in ``conn``'s open transaction; the new one."""
        cur = conn.cursor()
        cur.execute(
            self.sql(
                f"INSERT INTO {self.balances} AS b VALUES (?, ?) ON CONFLICT (account) "
                "DO UPDATE SET cents = b.cents + excluded.cents RETURNING cents"
            ),
            (account, cents),
        )
        return int(cur.fetchone()[0])
