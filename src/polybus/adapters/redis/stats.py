"""Topic offsets and group lag from the streams' own accounts (``RedisBackend.stats``).

Topics are found by their meta keys (SCAN ``<prefix>:{*}:meta``, on every primary of a
Cluster) unless named; then one round trip per topic asks XINFO STREAM and XINFO GROUPS
of each partition stream. Offsets count entries, as Redis 7 does (``entries-added``),
since stream ids are not offsets; an older Redis keeps no such count (None).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from ..base import BusStats, GroupStats, PartitionStats, TopicStats
from .resp import _as_dict, _pack

if TYPE_CHECKING:
    from .backend import RedisBackend, _Topic

_EPHEMERAL = b"~"  # no user group starts so (model.check_name): ephemeral subscribers' groups


def read_stats(
    b: RedisBackend, topics: Collection[str] | None, groups: Collection[str] | None, timeout: float
) -> BusStats:
    """See :meth:`~polybus.adapters.base.StatsBackend.stats`; a group's lag is its
    entries not yet delivered plus those delivered and not yet acked (as
    ``RedisSubscription.lag`` counts it), None where Redis cannot count them (after
    a seek into the middle of a stream)."""
    deadline = time.monotonic() + timeout
    names = _topic_names(b, deadline) if topics is None else topics
    found = {}
    for name in names:
        t = _existing(b, name, deadline)
        if t is not None:
            found[name] = b._retry(functools.partial(_topic_stats, b, t, groups), deadline=deadline)
    return BusStats(found)


def _topic_names(b: RedisBackend, deadline: float) -> list[str]:
    prefix = re.sub(r"([*?\[\]\\])", r"\\\1", b.prefix)  # glob characters match themselves
    head, tail = len(b.prefix) + 2, len("}:meta")

    def scan() -> list[str]:
        keys = b.client.scan_iter(match=f"{prefix}:{{*}}:meta", count=1000, _type="HASH")
        return [key[head:-tail].decode() for key in keys]

    return sorted(set(b._retry(scan, deadline=deadline)))


def _existing(b: RedisBackend, name: str, deadline: float) -> _Topic | None:
    """``name``'s topic as its meta key describes it, or None if it has none."""
    known = b._topics.get(name)
    if known is not None:
        return known
    meta_key = b._key(name, "meta")
    ask = [_pack(b"HMGET", meta_key, b"partitions", b"retention_ms", b"maxlen")]
    [meta] = b._retry(lambda: b._checked(b._roundtrip(meta_key, ask)), deadline=deadline)
    return None if meta[0] is None else b._topic_from_meta(name, meta)


def _topic_stats(b: RedisBackend, t: _Topic, groups: Collection[str] | None) -> TopicStats:
    commands = [_pack(b"XINFO", b"STREAM", s) for s in t.streams]
    commands += [_pack(b"XINFO", b"GROUPS", s) for s in t.streams]
    replies = b._roundtrip(t.meta, commands)
    streams, group_lists = replies[: t.partitions], replies[t.partitions :]
    partitions = []
    lags: dict[str, list[int | None]] = {}
    for p, (stream, listed) in enumerate(zip(streams, group_lists, strict=True)):
        if isinstance(stream, BaseException):
            if "no such key" not in str(stream):
                raise stream
            partitions.append(PartitionStats(0, 0))  # never written to, nor grouped
            continue
        info = _as_dict(stream)
        added = info.get(b"entries-added")
        end = None if added is None else int(added)
        partitions.append(PartitionStats(None if end is None else end - int(info[b"length"]), end))
        for group in map(_as_dict, listed):
            name = group[b"name"]
            if name.startswith(_EPHEMERAL) or (groups is not None and name.decode() not in groups):
                continue
            undelivered = group.get(b"lag")
            lag = None if undelivered is None else int(undelivered) + int(group[b"pending"])
            lags.setdefault(name.decode(), [None] * t.partitions)[p] = lag
    return TopicStats(tuple(partitions), {g: GroupStats(tuple(lag)) for g, lag in lags.items()})
