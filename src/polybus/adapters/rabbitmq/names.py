"""What polybus calls things on the broker: exchanges, queues, streams and headers.

Names are predictable, so that plain clients and the management UI find everything
(see the package docstring for how topics and groups map onto them); benchmarks, test
helpers and other clients build the same topology from these functions.
"""

from __future__ import annotations

from typing import Any

from ...envelope import RABBITMQ_KEY, RABBITMQ_REPLAY_END
from ...errors import ConfigurationError

KEY_HEADER = RABBITMQ_KEY  #: a binary or long key, base64-encoded (see polybus.envelope)
MARKER_HEADER = RABBITMQ_REPLAY_END  #: the end of a replay (see polybus.envelope)

DEFAULT_HISTORY_AGE_S = 7 * 24 * 3600


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


#: the exchange type of a topic: every queue bound to it (every group) gets every message
EXCHANGE_TYPE = "fanout"
#: the routing key queues are bound with (a fanout exchange routes without it); a
#: message's key travels as its routing key
BINDING_KEY = ""


def queue_name(topic: str, group: str) -> str:
    """The durable queue of ``group`` on ``topic``: ``topic/group`` (``%`` and ``/`` escaped)."""
    return f"{_escape(topic)}/{_escape(group)}"


def queue_arguments(queue_type: str = "quorum") -> dict[str, Any]:
    """The arguments a durable group's queue is declared with (``queue_type=`` option)."""
    return {"x-queue-type": queue_type}


def history_queue_name(topic: str) -> str:
    """The stream queue keeping ``topic``'s history: ``topic.history`` (escaped as above)."""
    return f"{_escape(topic)}.history"


def partitions_exchange_name(topic: str) -> str:
    """The internal exchange whose ``alternate-exchange`` argument records the partition count."""
    return f"polybus.partitions.{topic}"


def filling_flag_name(queue: str) -> str:
    """The exchange that exists while ``queue`` is being filled from its topic's history."""
    return f"polybus.filling.{queue}"


def _history_arguments(retention_ms: int | None, retention_bytes: int | None) -> tuple[Any, ...]:
    age = DEFAULT_HISTORY_AGE_S if retention_ms is None else max(1, -(-retention_ms // 1000))
    args: list[tuple[str, Any]] = [("x-queue-type", "stream"), ("x-max-age", f"{age}s")]
    if retention_bytes is not None:
        args.append(("x-max-length-bytes", retention_bytes))
    return tuple(args)


def _check_name(kind: str, name: str) -> None:
    if not name:
        raise ConfigurationError(f"{kind} name must not be empty")
    if len(name.encode()) > 255:
        raise ConfigurationError(
            f"{kind} name {name[:40]!r}... is too long: RabbitMQ names hold at most 255 bytes"
        )
    if name.startswith("amq."):
        raise ConfigurationError(f"{kind} name {name!r}: names starting with 'amq.' are reserved")
