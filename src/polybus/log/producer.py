"""A buffering producer: many small appends become few large batches."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ..errors import ClosedError, ConfigurationError
from .format import Headers

if TYPE_CHECKING:
    from .engine import Topic


class _Buffer:
    __slots__ = ("headers", "keys", "not_before", "values")

    def __init__(self) -> None:
        self.values: list[bytes | None] = []
        self.keys: list[bytes | None] = []
        self.headers: list[Headers | None] = []
        self.not_before: list[int] = []


class Producer:
    """Buffers records per partition and appends each buffer as one batch.

    Like a Kafka producer's ``linger.ms``/``batch.size``: :meth:`append`
    returns at once, and the records are written (and visible to every
    process) when a partition's buffer holds ``max_batch`` records, when
    ``linger`` seconds have passed, on :meth:`flush` and on :meth:`close`.
    Records of one key keep their order. Thread-safe.
    """

    def __init__(self, topic: Topic, *, max_batch: int = 1000, linger: float = 0.005) -> None:
        if max_batch < 1 or linger <= 0:
            raise ConfigurationError("max_batch must be >= 1 and linger > 0 seconds")
        self.topic = topic
        self.max_batch = max_batch
        self.linger = linger
        self._buffers = [_Buffer() for _ in topic.partitions]
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._linger_loop, name="polybus-linger", daemon=True
        )
        self._thread.start()

    def append(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        not_before_ms: int = 0,
    ) -> None:
        """Buffer one record for its key's partition. Raises ClosedError after close()."""
        p = self.topic.partition_for(key)
        with self._lock:
            if self._closed:
                raise ClosedError("producer is closed")
            buf = self._buffers[p]
            buf.values.append(value)
            buf.keys.append(key)
            buf.headers.append(headers)
            buf.not_before.append(not_before_ms)
            if len(buf.values) >= self.max_batch:
                self._write(p)

    def _write(self, p: int) -> None:
        """Under self._lock: append partition ``p``'s buffer as one batch."""
        buf = self._buffers[p]
        if not buf.values:
            return
        self._buffers[p] = _Buffer()
        self.topic.partitions[p].append_batch(
            buf.values,
            keys=buf.keys if any(k is not None for k in buf.keys) else None,
            headers=buf.headers if any(buf.headers) else None,
            timestamp_ms=time.time_ns() // 1_000_000,
            not_before_ms=buf.not_before if any(buf.not_before) else None,
        )

    def flush(self) -> None:
        """Write every buffered record now; on return they are visible to all processes."""
        with self._lock:
            for p in range(len(self._buffers)):
                self._write(p)

    def _linger_loop(self) -> None:
        while not self._stop.wait(self.linger):
            try:
                self.flush()
            except ClosedError:
                return

    def close(self) -> None:
        """Flush and stop; idempotent."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            if self._closed:
                return
            for p in range(len(self._buffers)):
                self._write(p)
            self._closed = True

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
