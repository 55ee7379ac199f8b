"""RabbitMQ as a backend: ``amqp://`` and ``amqps://`` URLs, on pika.

How the topic/group model maps onto RabbitMQ. Names are predictable, so plain
clients and the management UI find everything (``%`` and ``/`` in topic and
group names are percent-escaped in queue names, so no two names collide):

- **topic** ``T``: a durable fanout exchange ``T``. A plain client publishing
  to it reaches every group. Its partition count is metadata only (RabbitMQ
  has no partitions; delivered records say partition 0); it is kept as the
  ``alternate-exchange`` argument of an internal exchange
  ``polybus.partitions.T`` that nothing publishes to, because that is the one
  exchange argument RabbitMQ compares when an exchange is declared again.
- **history** (unless ``history=false``): a stream queue ``T.history`` bound
  to ``T`` keeps every message for replay. Retention maps to its ``x-max-age``
  (default 7 days) and ``x-max-length-bytes``; a group's queue keeps its
  backlog until the group consumes it, as RabbitMQ queues do.
- **durable group** ``G``: a durable queue ``T/G`` bound to ``T``, a quorum
  queue unless ``queue_type=classic``. Created by ``declare(groups=...)`` or a
  first subscribe with ``start="earliest"``, it is first filled with a copy of
  ``T.history`` (about 27 k msg/s here), so it holds what the topic keeps, as
  a new group does on every backend; without a history, or made by a subscribe
  with ``start="latest"``, it gets what is published from then on. While it is
  filled an exclusive queue ``polybus.filling-lock.T/G`` keeps other processes
  waiting, and an exchange ``polybus.filling.T/G`` exists until the copy is
  complete: a copy cut short is done again (at-least-once).
- **ephemeral subscriber**: an exclusive, auto-delete, server-named queue
  bound to ``T``; ``start="earliest"`` first replays the history.
- **order**: members of a group compete for one queue, so there is no per-key
  order (no ``KEY_ORDER``); a group with a single member reads in publish order.
- **ack** is basic.ack (runs of acks coalesced into one ``multiple`` ack),
  **nack(requeue=True)** is basic.nack with requeue, **nack(requeue=False)**
  is basic.reject (dropped); a quorum queue redelivers a requeued message
  after the ones already waiting. A member that closes or loses its channel
  gives its unacked deliveries (prefetched ones too) back to the front of the
  queue. ``attempt`` is quorum's ``x-delivery-count`` + 1 (it counts those
  returns too); on classic queues it is 2 for any redelivery. Dead members are
  found by their connection (heartbeats), so ``session_timeout`` does not apply.
- **seek** replays ``T.history`` from a record's offset (a replayed record's
  offset is its stream offset, a queue-delivered record's offset is its
  message id) or from a time, up to the end of the history as of the seek (a
  marker message the seek appends to the stream, invisible to polybus readers),
  then the member continues with its group's queue. Replayed records are
  settled locally (the group's queue is untouched).
- **lag** is not offered: AMQP 0-9-1 reports a queue's ready messages but not
  the messages other members hold unacknowledged. ``stats()`` reports those ready
  messages per group, by passive declares, for the topics and groups it is told
  or this backend used (AMQP lists neither).
- **delay** and **compaction** are not offered.

Threads: one I/O thread per backend owns its two pika connections (one
publishes and declares, one consumes, so a publisher throttled by a broker
alarm never stalls acks); every public method may be called from any thread
and hands its work to it. Open a backend after ``fork()``, not before.
Connections lost are opened again with backoff, everything this backend
declared is declared again, and consumers consume again; deliveries not
acked by then are redelivered by the broker (their acks are ignored).

Publishing uses publisher confirms with a window of unconfirmed messages
(``confirm_window``), so a batch costs far fewer round trips than messages;
``publish`` returns once every record is confirmed and raises on a nack, on an
unroutable return, or when the connection stays down past
``reconnect_timeout``. Records unconfirmed when a connection drops are
published again after reconnecting (at-least-once).

URL options (besides pika's own: ``heartbeat``, ``socket_timeout``,
``ssl_options``, ...): ``reconnect_timeout=<seconds>`` (30), ``connect_timeout=<seconds>``
(2: how long opening a bus waits for the broker to accept a connection before raising
BrokerUnreachable; then at least 5 s more for it to open the AMQP connection),
``queue_type=quorum|classic``, ``prefetch=<n>`` (basic.qos per subscriber,
1000; lower it for slow handlers, so that the members of a work queue share
the work), ``confirm_window=<n>`` (1000), ``history=true|false`` (true; false
drops the replay stream and with it seek and retention, and saves the broker
writing every message twice).

The modules, each importing only those before it: ``names`` (what things are
called on the broker), ``errors`` (pika's exceptions in the polybus tree), ``wire``
(AMQP frames and content properties by hand), ``pika_hooks`` (every use of pika's
private names, checked at import), ``link`` (the I/O thread and its reconnecting
connections), ``publisher``, ``replay`` (reading a topic's history up to a marker),
``subscription`` and ``backend``.
"""

from __future__ import annotations

from .backend import RabbitMQBackend, from_client, from_url
from .errors import map_error
from .names import (
    BINDING_KEY,
    DEFAULT_HISTORY_AGE_S,
    EXCHANGE_TYPE,
    KEY_HEADER,
    MARKER_HEADER,
    filling_flag_name,
    history_queue_name,
    partitions_exchange_name,
    queue_arguments,
    queue_name,
)
from .publisher import DEFAULT_MAX_MESSAGE
from .subscription import RabbitMQSubscription

__all__ = [
    "BINDING_KEY",
    "DEFAULT_HISTORY_AGE_S",
    "DEFAULT_MAX_MESSAGE",
    "EXCHANGE_TYPE",
    "KEY_HEADER",
    "MARKER_HEADER",
    "RabbitMQBackend",
    "RabbitMQSubscription",
    "filling_flag_name",
    "from_client",
    "from_url",
    "history_queue_name",
    "map_error",
    "partitions_exchange_name",
    "queue_arguments",
    "queue_name",
]
