"""The log: a directory of topics, each a fixed set of partitions."""

from __future__ import annotations

import atexit
import itertools
import json
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import asdict, dataclass

from ..errors import ClosedError, ConfigurationError, TopicNotFound
from ..model import check_name, partition_for_key
from ..types import Start
from .format import Headers
from .group import Consumer
from .groupfile import ensure_group, group_lag
from .partition import FsyncPolicy, Partition, PartitionConfig
from .producer import Producer

_FSYNC = ("always", "interval", "never")


@dataclass(frozen=True)
class TopicConfig:
    partitions: int = 1
    segment_bytes: int = 64 << 20
    retention_ms: int | None = None
    retention_bytes: int | None = None
    compact: bool = False


class Topic:
    """A named set of partitions. A key always maps to the same partition."""

    def __init__(self, name: str, config: TopicConfig, partitions: list[Partition]) -> None:
        self.name = name
        self.config = config
        self.partitions = partitions
        self._round_robin = itertools.count()

    def partition_for(self, key: bytes | None) -> int:
        """The partition for ``key`` (a stable hash), or round-robin without a key."""
        n = len(self.partitions)
        if n == 1:
            return 0
        if key is None:
            return next(self._round_robin) % n
        return partition_for_key(key, n)

    def append(
        self,
        value: bytes | None,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        timestamp_ms: int | None = None,
        not_before_ms: int = 0,
    ) -> tuple[int, int]:
        """Append one record to its key's partition; return ``(partition, offset)``."""
        p = self.partition_for(key)
        offset = self.partitions[p].append(
            value, key=key, headers=headers, timestamp_ms=timestamp_ms, not_before_ms=not_before_ms
        )
        return p, offset

    def producer(self, *, max_batch: int = 1000, linger: float = 0.005) -> Producer:
        """A buffering producer for this topic; see :class:`Producer`."""
        return Producer(self, max_batch=max_batch, linger=linger)


class Log:
    """A native log rooted at a directory; ``Log(None)`` is an in-memory log.

    Several ``Log`` objects, in this or other processes, may open one
    directory at once. ``fsync`` decides when appends reach the disk:
    ``"always"`` before each append returns, ``"interval"`` (default) every
    ``fsync_interval`` seconds from a background thread, ``"never"`` leaves it
    to the OS. Every append is visible to other processes when it returns.
    The in-memory log lives in a private tmpfs directory removed on close.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval: float = 1.0,
        skip_corrupt: bool = False,
    ) -> None:
        if fsync not in _FSYNC:
            raise ConfigurationError(f"fsync must be one of {_FSYNC}, not {fsync!r}")
        if fsync_interval <= 0:
            raise ConfigurationError("fsync_interval must be positive (seconds)")
        self._temporary = path is None
        if path is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            path = tempfile.mkdtemp(prefix="polybus-mem-", dir=shm)
            fsync = "never"
            atexit.register(shutil.rmtree, path, True)
        self.path = os.fspath(path)
        try:
            os.makedirs(os.path.join(self.path, "topics"), exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(f"cannot use {self.path!r} as a log directory: {exc}") from exc
        self.fsync: FsyncPolicy = fsync
        self.skip_corrupt = skip_corrupt
        self._topics: dict[str, Topic] = {}
        # weak: a closed consumer is forgotten; a running one is held by its heartbeat thread
        self._consumers: weakref.WeakSet[Consumer] = weakref.WeakSet()
        self._lock = threading.RLock()
        self._closed = False
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if fsync == "interval":
            self._flusher = threading.Thread(
                target=self._flush_loop, args=(fsync_interval,), name="polybus-fsync", daemon=True
            )
            self._flusher.start()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                parts = [p for t in self._topics.values() for p in t.partitions if p.dirty]
            for p in parts:
                try:
                    p.flush()
                except (OSError, ValueError):  # closed under us; close() flushes anyway
                    pass

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("log is closed; open a new Log")

    def _meta_path(self, name: str) -> str:
        return os.path.join(self.path, "topics", name, "topic.json")

    def create_topic(
        self,
        name: str,
        partitions: int | None = None,
        *,
        default_partitions: int = 1,
        segment_bytes: int = 64 << 20,
        retention_ms: int | None = None,
        retention_bytes: int | None = None,
        compact: bool = False,
    ) -> Topic:
        """Create a topic, or return it if it exists with the same partition count.

        ``partitions=None`` accepts the existing count, or creates the topic
        with ``default_partitions``. Safe against other processes creating it
        at the same time. Raises ConfigurationError if it exists with a
        different partition count.
        """
        self._check_open()
        check_name("topic", name)
        if partitions is None:
            try:
                return self.topic(name)
            except TopicNotFound:
                partitions = default_partitions
        if not isinstance(partitions, int) or not 1 <= partitions <= 4096:
            raise ConfigurationError(
                f"partitions must be an int from 1 to 4096, not {partitions!r}"
            )
        if segment_bytes < 4096:
            raise ConfigurationError("segment_bytes must be at least 4096")
        config = TopicConfig(partitions, segment_bytes, retention_ms, retention_bytes, compact)
        meta = self._meta_path(name)
        os.makedirs(os.path.dirname(meta), exist_ok=True)
        tmp = f"{meta}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(config), f)
        try:
            os.link(tmp, meta)  # atomic create-if-absent, across processes
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        topic = self.topic(name)
        if topic.config.partitions != partitions:
            raise ConfigurationError(
                f"topic {name!r} exists with {topic.config.partitions} partitions, "
                f"not {partitions}; use the existing count or a new topic name"
            )
        return topic

    def topic(self, name: str) -> Topic:
        """Open an existing topic (cached). Raises TopicNotFound."""
        self._check_open()
        with self._lock:
            topic = self._topics.get(name)
            if topic is not None:
                return topic
            check_name("topic", name)
            try:
                with open(self._meta_path(name)) as f:
                    config = TopicConfig(**json.load(f))
            except FileNotFoundError:
                raise TopicNotFound(
                    f"topic {name!r} does not exist in {self.path}; create it first"
                ) from None
            pconf = PartitionConfig(
                segment_bytes=config.segment_bytes,
                retention_ms=config.retention_ms,
                retention_bytes=config.retention_bytes,
                compact=config.compact,
                fsync=self.fsync,
                skip_corrupt=self.skip_corrupt,
            )
            base = os.path.dirname(self._meta_path(name))
            parts = [
                Partition(os.path.join(base, str(i)), i, pconf) for i in range(config.partitions)
            ]
            topic = self._topics[name] = Topic(name, config, parts)
            return topic

    def topics(self) -> list[str]:
        """Names of all topics in this log."""
        root = os.path.join(self.path, "topics")
        return sorted(n for n in os.listdir(root) if os.path.exists(self._meta_path(n)))

    def create_group(self, topic: str, group: str, *, start: Start = "earliest") -> None:
        """Create a durable group positioned at ``start`` if it does not exist; idempotent."""
        check_name("group", group)
        ensure_group(
            self.path, self.topic(topic), group, start, self.topic, fsync=self.fsync == "always"
        )

    def lag(self, topic: str, group: str) -> dict[int, int]:
        """Records not yet committed by durable ``group``, per partition, without joining it."""
        return group_lag(
            self.path,
            self.topic(topic),
            check_name("group", group),
            self.topic,
            fsync=self.fsync == "always",
        )

    def groups(self, topic: str) -> list[str]:
        """Durable groups of ``topic``."""
        d = os.path.join(self.path, "groups", topic)
        if not os.path.isdir(d):
            return []
        return sorted(n[:-5] for n in os.listdir(d) if n.endswith(".json"))

    def consumer(
        self,
        topic: str,
        group: str | None = None,
        *,
        start: Start = "earliest",
        session_timeout: float = 10.0,
    ) -> Consumer:
        """Join durable ``group`` of ``topic``, or read alone with ``group=None``."""
        if group is not None:
            check_name("group", group)
        consumer = Consumer(
            self.path,
            self.topic(topic),
            group,
            start=start,
            session_timeout=session_timeout,
            fsync=self.fsync == "always",
            topics=self.topic,
        )
        with self._lock:
            self._consumers.add(consumer)
        return consumer

    def close(self) -> None:
        """Close consumers and partitions (flushing per the fsync policy); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        for consumer in list(self._consumers):
            consumer.close()
        for topic in self._topics.values():
            for part in topic.partitions:
                part.close()
        if self._temporary:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
