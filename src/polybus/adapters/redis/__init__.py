"""Redis Streams as a backend: ``redis://[user:pass@]host:port/db`` and ``rediss://`` (TLS).

URL options: ``prefix=<name>`` (key prefix, default ``polybus``), ``reconnect_timeout=<s>``
(default 30), ``connect_timeout=<s>`` (default 2: how long opening a bus waits for Redis to
accept a connection before raising BrokerUnreachable), ``maxlen=<n>`` (cap each partition
stream of the topics this bus declares at about n entries), ``cluster=true`` (connect
with :class:`redis.cluster.RedisCluster`), and redis-py's own URL options
(``socket_timeout``, ``ssl_cert_reqs``, ``client_name``, ...).
:func:`from_client` wraps an existing ``redis.Redis`` or ``redis.cluster.RedisCluster``.

Keys. Every key of a topic carries the hash tag ``{<topic>}``, so a topic lives in one
Cluster slot and one Lua script may touch all of its keys:

- ``<prefix>:{<topic>}:meta``: hash of ``partitions``, ``retention_ms``, ``maxlen``;
- ``<prefix>:{<topic>}:p<n>``: one stream per partition; a key's hash picks the partition
  (the native engine's partitioner, so a key lands on the same partition number);
- ``<prefix>:{<topic>}:delayed``: sorted set of records not yet due, scored by not-before ms.

Entries. Fields: ``value`` (the payload), ``key`` (only when the record has one) and one field
``h:<name>`` per header, e.g. ``h:content-type``, ``h:polybus-id``. No reserved field starts
with ``h:``, so no header name can collide with them. An entry written by a plain client
without a ``value`` field (``XADD s * order 1``) arrives with its fields as a JSON object and
content type application/json; other fields beside ``value`` arrive as headers by their name.
Offsets are stream ids (``"1700000000000-0"``); an entry's timestamp is its id's milliseconds.

Groups. A durable group is a stream consumer group on every partition stream, created at
declare (``TopicSpec.groups``: from id 0, so it gets everything the streams keep, as a new
group does on native and Kafka) or at first subscribe (``earliest``: id 0, ``latest``: ``$``).
Each subscription is one consumer with a unique name. A fetch reads the first partition that
has new records, starting one partition further each time, so members fetching in turn spread
over the partitions; only when none has any does it block (XREADGROUP BLOCK) on all of them.
After a full batch it asks for the next batch at once (prefetch), so Redis works while the
application handles this one. An ephemeral subscriber is a consumer group of its own named
``~ephemeral:<reap-after-ms>:<id>`` (a name no user group can have), destroyed on close; groups
of crashed processes are reaped when a later ephemeral subscriber or a declare finds all their
consumers idle longer than ``reap-after`` (60 session timeouts, at least 10 minutes). A group
that vanished (key deleted, server restarted empty) is recreated by the next fetch: durable
ones from id 0 (nothing lost, perhaps duplicates), ephemeral ones from ``$``.

Redelivery. ``session_timeout`` is a visibility timeout: a record neither acked nor nacked
within it of its delivery may be claimed (XAUTOCLAIM) by any member of the group, the idle
holder included, with ``attempt`` = the entry's delivery count. A member sweeps for such records
on its first fetch and every quarter of its session timeout. ``close()`` hands the member's
unacked records back at once (they become claimable by the next sweep) and deletes the
consumer. ``nack(requeue=True)`` does the same for those records (this member's next fetch takes
them back); ``nack(requeue=False)`` acks them (dropped for this group).

Order. One member sees each partition in order (redeliveries aside). Members of one group
share every partition, so a key's order holds for one member only: no KEY_ORDER.

Acks are sent with the next fetch, at close, or once 1000 are waiting, in the same round trip
as other work; an ack not yet sent when the process dies means a redelivery (at-least-once).

Seek moves the whole group's position in one partition (XGROUP SETID), not only this member's;
settle what you hold of that partition first (an ack of an old delivery also acks its replay).

Delay. A record with a future not-before time waits in the topic's sorted set; every fetch runs
an atomic Lua mover that appends the due ones to their partition stream. Its receipt offset is
``"delayed@<not-before-ms>"``: it has no stream id until it is due.

Retention. ``retention_ms`` trims by MINID and ``maxlen`` by MAXLEN, both approximate (``~``,
Redis drops whole radix-tree nodes, so a few older entries may outlive the limit), after each
published batch, whether or not every group has read them (as in Kafka). ``retention_bytes``
and ``compact`` raise CapabilityError: Redis cannot.

Connection loss. Operations retry with backoff until ``reconnect_timeout``; then ``publish``
raises ConnectionLost (a publish that raised, or was retried, may have been stored: at-least-once)
and ``fetch`` raises ConnectionLost (a later fetch retries). Group state lives in Redis, so a
subscription resumes; records whose delivery was lost in transit come back after the visibility
timeout.

The package's modules: :mod:`.connect` (URL and client), :mod:`.backend` (RedisBackend),
:mod:`.subscription` (RedisSubscription), :mod:`.stats` (offsets and lag for
``RedisBackend.stats``), :mod:`.entries` (the entry layout), :mod:`.resp`
(RESP packing and replies), :mod:`.scripts` (the ``.lua`` files); the client and
``map_error`` come from the toolkit, :mod:`polybus.adapters._support.redis`.
"""

from __future__ import annotations

from .._support.redis import map_error

# also reachable here, as callers build records and specs: adapter.OutRecord(...)
from ..base import OutRecord as OutRecord
from ..base import TopicSpec as TopicSpec
from .backend import RedisBackend, stream_key
from .connect import from_client, from_url
from .subscription import RedisSubscription

__all__ = [
    "RedisBackend",
    "RedisSubscription",
    "from_client",
    "from_url",
    "map_error",
    "stream_key",
]
