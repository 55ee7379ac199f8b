"""The public catalog: where the pipeline's last stage publishes each video, once.

It is an SQLite file, written by the publish stage and read by whoever watches
(the example's parent process reads it for progress and for its check).

Delivery is at-least-once, so the publish stage may be handed the same video
twice (a stage killed after publishing its output and before committing its
input hands that input to the group again, and the copy flows on). The catalog
makes publishing idempotent by video id: ``feed`` has one row per video, kept
unique by the database, and a delivery of a video already there changes
nothing but a row in ``absorbed``, the record of the duplicates it absorbed.
The two writes of one delivery commit together.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS feed (video_id TEXT NOT NULL UNIQUE, title TEXT NOT NULL, "
    "url TEXT NOT NULL, message_id TEXT NOT NULL, published_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS absorbed (video_id TEXT NOT NULL, message_id TEXT NOT NULL, "
    "received_ms INTEGER NOT NULL)",
)


class Duplicate(NamedTuple):
    """A delivery of a video already in the feed."""

    video_id: str
    message_id: str
    received_ms: int  #: epoch ms


class Catalog:
    """One connection to the catalog file at ``path`` (created if missing); usable from
    any thread, one call at a time."""

    def __init__(self, path: Path) -> None:
        # autocommit mode: each call says where its transaction begins and ends
        self._db = sqlite3.connect(
            path, timeout=10.0, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
            for statement in _SCHEMA:
                self._db.execute(statement)

    def publish(self, video_id: str, title: str, url: str, message_id: str) -> bool:
        """Put the video in the feed; False (and a row in ``absorbed``) if it was there."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                added = self._db.execute(
                    "INSERT INTO feed VALUES (?, ?, ?, ?, ?) ON CONFLICT (video_id) DO NOTHING",
                    (video_id, title, url, message_id, now_ms),
                ).rowcount
                if not added:
                    self._db.execute(
                        "INSERT INTO absorbed VALUES (?, ?, ?)", (video_id, message_id, now_ms)
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return bool(added)

    def feed(self) -> Counter[str]:
        """How many feed rows each published video has (one, if publishing is idempotent)."""
        with self._lock:
            rows = self._db.execute("SELECT video_id, count(*) FROM feed GROUP BY video_id")
            return Counter(dict(rows.fetchall()))

    def message_ids(self) -> dict[str, str]:
        """The id of the message each video was published from."""
        with self._lock:
            return dict(self._db.execute("SELECT video_id, message_id FROM feed").fetchall())

    def absorbed(self) -> list[Duplicate]:
        """Every duplicate delivery absorbed, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM absorbed ORDER BY rowid").fetchall()
        return [Duplicate(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
