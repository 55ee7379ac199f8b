"""Topic offsets and group lag read through the admin client (``KafkaBackend.stats``).

Four kinds of request, each one for everything asked about: the cluster metadata
(topics and their partition counts), the low and the high watermarks, the consumer
groups, and each group's committed offsets (the admin API takes one group per
request, so they are sent together and awaited together). No consumer is made, so
no group is joined or rebalanced.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from concurrent.futures import Future
from typing import TypeVar

from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public, not in __all__
    AdminClient,
    OffsetSpec,
)

from ..base import BusStats, GroupStats, PartitionStats, TopicStats
from .errors import _while_leaders_move, map_error

__all__ = ["read_stats"]

T = TypeVar("T")


def read_stats(
    admin: AdminClient,
    topics: Collection[str] | None,
    groups: Collection[str] | None,
    timeout: float,
) -> BusStats:
    """See :meth:`~polybus.adapters.base.StatsBackend.stats`. Kafka's internal topics
    (``__consumer_offsets``, ...) are left out; lag is the high watermark minus the
    group's committed offset, or the low watermark where that is higher or the group
    committed none (it would read from there)."""
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(0.1, deadline - time.monotonic())

    def answer(future: Future[T]) -> T:
        try:
            return future.result(timeout=left())
        except Exception as exc:
            raise map_error(exc) from exc

    try:
        metadata = admin.list_topics(timeout=left())
    except Exception as exc:
        raise map_error(exc) from exc
    counts = {
        name: len(found.partitions)
        for name, found in metadata.topics.items()
        if found.error is None and not name.startswith("__") and (topics is None or name in topics)
    }
    tps = [TopicPartition(name, p) for name, n in counts.items() for p in range(n)]
    if not tps:
        return BusStats({})
    low = _watermarks(admin, tps, OffsetSpec.earliest(), left)  # type: ignore[no-untyped-call]
    high = _watermarks(admin, tps, OffsetSpec.latest(), left)  # type: ignore[no-untyped-call]
    if groups is None:
        listed = answer(admin.list_consumer_groups(request_timeout=left()))
        if listed.errors:  # a broker did not answer: the list would be short
            raise map_error(listed.errors[0])
        groups = [g.group_id for g in listed.valid]
    asked = {
        group: admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=left()
        )[group]
        for group in groups
    }
    committed: dict[str, dict[str, dict[int, int]]] = {}  # topic -> group -> partition -> offset
    for group, future in asked.items():
        for tp in answer(future).topic_partitions or ():
            if tp.topic in counts and tp.error is None:
                committed.setdefault(tp.topic, {}).setdefault(group, {})[tp.partition] = tp.offset
    found = {}
    for name, n in counts.items():
        lags = {}
        for group, offsets in committed.get(name, {}).items():
            lags[group] = GroupStats(
                tuple(
                    max(0, high[name, p] - max(offsets.get(p, -1), low[name, p])) for p in range(n)
                )
            )
        partitions = tuple(PartitionStats(low[name, p], high[name, p]) for p in range(n))
        found[name] = TopicStats(partitions, lags)
    return BusStats(found)


def _watermarks(
    admin: AdminClient, tps: list[TopicPartition], spec: OffsetSpec, left: Callable[[], float]
) -> dict[tuple[str, int], int]:
    """One watermark of every partition in ``tps``, by (topic, partition)."""

    def ask() -> dict[tuple[str, int], int]:
        futures = admin.list_offsets(dict.fromkeys(tps, spec), request_timeout=left())
        return {(tp.topic, tp.partition): f.result(left()).offset for tp, f in futures.items()}

    try:
        return _while_leaders_move(ask, left())
    except Exception as exc:
        raise map_error(exc) from exc
