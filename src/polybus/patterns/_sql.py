"""What the SQL inbox and the outbox share: the dialect of a DB-API connection, its
transactions and its errors. SQLite (the stdlib ``sqlite3``) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigurationError, ConnectionLost, PolybusError

DialectName = Literal["sqlite", "postgresql"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
# SQLite result codes (the low byte of sqlite_errorcode) that pass: retrying may succeed
_SQLITE_TRANSIENT = {5, 6, 10, 14}  # BUSY, LOCKED, IOERR, CANTOPEN


def check_table(name: str) -> str:
    """``name`` if it is a plain SQL identifier; tables are named in SQL text, never quoted."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name):
        raise ConfigurationError(
            f"invalid table name {name!r}: use 1-63 letters, digits or '_', not starting "
            "with a digit (set the schema through the connection, e.g. search_path)"
        )
    return name


@dataclass(frozen=True)
class Dialect:
    """How to speak to one kind of database through DB-API."""

    name: DialectName
    module: Any  #: the DB-API module, for its exception classes

    def sql(self, text: str) -> str:
        """``text`` written with ``?`` placeholders, in this driver's paramstyle."""
        return text if self.name == "sqlite" else text.replace("?", "%s")

    def begin(self, conn: Any) -> None:
        """Open a transaction on ``conn`` (on SQLite, taking the write lock now)."""
        if self.name == "sqlite":
            if conn.in_transaction:  # Python 3.12's autocommit=False keeps one always open
                raise ConfigurationError(
                    "this SQLite connection is already in a transaction: use the default "
                    "sqlite3.connect(path) (or autocommit=True), not autocommit=False"
                )
            conn.execute("BEGIN IMMEDIATE")  # no deadlock upgrading a read lock later
        elif conn.autocommit:
            conn.execute("BEGIN")
        # psycopg without autocommit opens a transaction at the first statement

    def transaction_state(self, conn: Any) -> Literal["idle", "open", "failed"]:
        """Whether ``conn`` is in a transaction, and whether PostgreSQL aborted it (a
        statement in it raised): committing that one would silently roll it back."""
        if self.name == "sqlite":
            return "open" if conn.in_transaction else "idle"
        status = int(conn.info.transaction_status)
        # psycopg.pq.TransactionStatus: IDLE 0, ACTIVE 1, INTRANS 2, INERROR 3, UNKNOWN 4
        return "idle" if status == 0 else "open" if status in (1, 2) else "failed"

    def is_transient(self, exc: BaseException) -> bool:
        """True when ``exc`` is a lost connection or a busy database (the call may be retried)."""
        if self.name == "sqlite":
            code = getattr(exc, "sqlite_errorcode", None)
            if code is not None:
                return code & 0xFF in _SQLITE_TRANSIENT
            return isinstance(exc, self.module.OperationalError)
        return isinstance(exc, self.module.OperationalError | self.module.InterfaceError)

    def map_error(self, exc: BaseException, doing: str) -> PolybusError:
        """The polybus error for a driver exception raised while ``doing`` something."""
        text = f"{doing} failed ({type(exc).__module__}.{type(exc).__name__}): {exc}"
        if self.is_transient(exc):
            return ConnectionLost(f"{text}; the database is unreachable or busy, retry later")
        if isinstance(exc, self.module.ProgrammingError | self.module.OperationalError):
            return ConfigurationError(
                f"{text}; does the table exist with another layout? drop it or pick another "
                "table name"
            )
        return PolybusError(text)


def dialect_of(target: object) -> Dialect:
    """The dialect of a DB-API connection, or of the name ``"sqlite"`` or ``"postgresql"``.

    Raises ConfigurationError for any other database or driver.
    """
    if isinstance(target, str):
        name = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql"}.get(
            target.lower()
        )
        if name is None:
            raise ConfigurationError(
                f"unknown SQL dialect {target!r}: use 'sqlite' or 'postgresql'"
            )
        module_name = "sqlite3" if name == "sqlite" else "psycopg"
        try:
            module = __import__(module_name)
        except ImportError:
            raise ConfigurationError(
                "PostgreSQL needs psycopg 3: pip install 'polybus[postgres]'"
            ) from None
        return Dialect(name, module)  # type: ignore[arg-type]
    root = type(target).__module__.split(".", 1)[0]
    if root == "sqlite3":
        return Dialect("sqlite", sys.modules["sqlite3"])
    if root == "psycopg":
        return Dialect("postgresql", sys.modules["psycopg"])
    raise ConfigurationError(
        f"cannot use a {type(target).__module__}.{type(target).__qualname__}: pass a "
        "sqlite3 connection or a psycopg 3 (PostgreSQL) connection"
    )


def rollback_quietly(conn: Any) -> bool:
    """Roll back ``conn``; False if that failed too (the connection is then useless)."""
    try:
        conn.rollback()
    except Exception:  # any driver error: the connection is broken
        return False
    return True


def close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # sqlite3 refuses to close from another thread; gc closes it then
        pass
