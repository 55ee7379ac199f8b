"""Making a ``KafkaBackend``: from a ``kafka://`` URL (its options are described in the
package docstring) or from a confluent-kafka ``Producer`` or config mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from confluent_kafka import KafkaException, Producer

from ...errors import ConfigurationError
from .._support import Options, ensure_reachable
from .backend import KafkaBackend
from .errors import map_error

_OPTIONS = ("connect_timeout", "reconnect_timeout", "replication_factor")
_UNDOTTED = ("acks", "debug", "partitioner", "retries")  #: librdkafka properties without a dot


def from_url(url: str) -> KafkaBackend:
    """A backend for ``kafka://host:port[,host:port][?options]``; see the package docstring."""
    options = Options(
        url,
        ours=_OPTIONS,
        passes=lambda name: "." in name or name in _UNDOTTED,
        passes_hint=f"or a librdkafka property: {', '.join(_UNDOTTED)} or one with a dot "
        "(linger.ms=5)",
        what="Kafka",
    )
    parts = options.parts
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise options.error("names no broker: use kafka://host:9092[,host2:9092]")
    if parts.path not in ("", "/"):
        raise options.error("a Kafka URL has no path; put options after '?'")
    config: dict[str, Any] = {"bootstrap.servers": hosts, **dict(options.passed)}
    if parts.username is not None:
        config["sasl.username"] = unquote(parts.username)
        config["sasl.password"] = unquote(parts.password or "")
        config["security.protocol"] = "SASL_SSL"
        config["sasl.mechanism"] = "PLAIN"
    reconnect_timeout = options.seconds("reconnect_timeout", 30.0)
    replication_factor = options.number("replication_factor", -1)
    ensure_reachable("Kafka broker", options.addresses(9092), options.connect_timeout())
    return KafkaBackend(
        config, reconnect_timeout=reconnect_timeout, replication_factor=replication_factor
    )


def from_client(
    client: object,
    *,
    config: Mapping[str, Any] | None = None,
    reconnect_timeout: float = 30.0,
    replication_factor: int = -1,
) -> KafkaBackend:
    """Wrap an existing ``confluent_kafka.Producer`` or a librdkafka config mapping.

    A Producer is used for every publish (with the durability it was built
    with) and is not closed by the backend. A Producer does not reveal its
    configuration, so consumers and the admin client find the brokers from
    its cluster metadata; pass ``config`` with anything else they need
    (security settings). A mapping is the same as ``KafkaBackend(mapping)``.
    """
    if isinstance(client, Mapping):
        merged = {**client, **(config or {})}
        return KafkaBackend(
            merged, reconnect_timeout=reconnect_timeout, replication_factor=replication_factor
        )
    if not isinstance(client, Producer):
        raise ConfigurationError(
            f"cannot wrap a {type(client).__name__}: pass a confluent_kafka.Producer or a "
            "librdkafka config dict"
        )
    merged = dict(config or {})
    if "bootstrap.servers" not in merged:
        try:
            brokers = client.list_topics(timeout=reconnect_timeout).brokers.values()
        except KafkaException as exc:
            raise map_error(exc) from exc
        merged["bootstrap.servers"] = ",".join(f"{b.host}:{b.port}" for b in brokers)
    return KafkaBackend(
        merged,
        reconnect_timeout=reconnect_timeout,
        replication_factor=replication_factor,
        producer=client,
    )
