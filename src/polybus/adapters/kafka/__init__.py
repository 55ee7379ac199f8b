"""Apache Kafka as a backend, on confluent-kafka (librdkafka): ``kafka://host:port[,host:port]``.

URL options: ``connect_timeout=<seconds>`` (default 2: how long opening a bus waits
for any bootstrap broker to accept a connection before raising BrokerUnreachable),
``reconnect_timeout=<seconds>`` (default 30: how long a publish
waits for the broker before raising ConnectionLost, and how long a
subscription tolerates an unreachable cluster before its fetch raises it) and
``replication_factor=<n>`` for topics this adapter creates (default: the
broker's ``default.replication.factor``). librdkafka properties go to every
client unchanged: any option with a dot in its name, plus ``acks``, ``debug``,
``partitioner`` and ``retries``, e.g.
``kafka://b1:9092?security.protocol=SSL&linger.ms=20``. A user and password
in the URL become ``sasl.username``/``sasl.password`` (with SASL_SSL and
PLAIN unless the URL says otherwise).

How the polybus model maps onto Kafka:

- a topic is a Kafka topic. A key picks its partition by the Java client's
  murmur2 hash, so polybus, librdkafka's ``murmur2_random`` and JVM producers
  agree on where a key goes; keyless records go to one partition per run of
  1024, the next run to the next partition (a producer passed to
  :func:`from_client` partitions as it was configured to);
- a durable group is a Kafka consumer group with auto-commit off. Acks are
  tracked per partition and the contiguous settled prefix is committed from
  ``fetch`` (at most every 0.2 s), on revocation and on close — never past an
  unsettled record. A revoked partition's unacked records go to its next
  owner; acks that arrive for them later are ignored. Declaring a group
  commits the start of every partition it has no position on (as the native
  engine does), so it keeps what is published before a member subscribes;
- ``nack(requeue=True)`` hands the record back to the same member on a later
  fetch with ``attempt + 1``; ``nack(requeue=False)`` settles it;
- an ephemeral subscriber joins no group: it reads every partition from the
  end offsets looked up before ``subscribe`` returned, commits nothing and
  leaves no trace. Partitions added to the topic later are not read;
- seek by offset or time moves one partition and forgets its unsettled
  records; lag is the high watermark minus the group's committed offset;
- no per-message delay (no DELAY): a pattern emulates it above this layer;
- subscribers read with ``isolation.level=read_committed``: records of open or
  aborted transactions are not delivered.

Transactions (``Capability.TRANSACTIONS``, consume → produce exactly once)
are Kafka transactions with the consumed offsets in them (EOS v2, KIP-447);
:mod:`polybus.adapters.kafka.transactions` says how.

The modules, each importing only those listed before it:

- ``errors``: how confluent-kafka failures map to polybus errors;
- ``acks``: the acknowledgement tracking of one partition a subscription reads;
- ``producer``: publishing on the backend's own producer (``KafkaBackend.publish``);
- ``transactions``: a subscription's transactional producer, and ``KafkaTransaction``;
- ``subscription``: ``KafkaSubscription``, a group member or group-less reader;
- ``stats``: topic offsets and group lag through the admin client (``KafkaBackend.stats``);
- ``backend``: ``KafkaBackend`` (configuration, topics and groups, subscribing, closing);
- ``construction``: ``from_url`` and ``from_client``.
"""

from .backend import KafkaBackend
from .construction import from_client, from_url
from .errors import map_error
from .subscription import KafkaSubscription
from .transactions import KafkaTransaction as KafkaTransaction

__all__ = ["KafkaBackend", "KafkaSubscription", "from_client", "from_url", "map_error"]
