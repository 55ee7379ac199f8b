"""polybus: one interface for messaging over an embedded log, Kafka, RabbitMQ and Redis.

>>> import polybus
>>> with polybus.connect("memory://") as bus:
...     _ = bus.publish("greetings", {"hello": "world"}, key="user-1")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .bus import Bus, Subscriber, connect
from .errors import (
    BackendUnavailable,
    BrokerUnreachable,
    CapabilityError,
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    CorruptRecordError,
    DecodeError,
    EncodeError,
    FencedError,
    MessageTooLarge,
    PolybusError,
    Rejected,
    RemoteError,
    RequestTimeout,
    TopicNotFound,
)
from .message import Delivery, Message
from .middleware import Middleware
from .types import BusStats, Capability, Receipt

if TYPE_CHECKING:
    from .sessions import SessionManager

__all__ = [
    "BackendUnavailable",
    "BrokerUnreachable",
    "Bus",
    "BusStats",
    "Capability",
    "CapabilityError",
    "ClosedError",
    "ConfigurationError",
    "ConnectionLost",
    "CorruptRecordError",
    "DecodeError",
    "Delivery",
    "EncodeError",
    "FencedError",
    "Message",
    "MessageTooLarge",
    "Middleware",
    "PolybusError",
    "Receipt",
    "Rejected",
    "RemoteError",
    "RequestTimeout",
    "Subscriber",
    "TopicNotFound",
    "connect",
    "open_sessions",
]
__version__ = "0.1.0"


def open_sessions(store: str | object, **options: Any) -> SessionManager:
    """A session manager on the store ``store`` names, e.g. ``redis://...`` or
    ``native:///var/lib/app/sessions`` (see :mod:`polybus.sessions`); ``options``
    are :class:`~polybus.sessions.SessionManager`'s. Imported on first use."""
    from .sessions import SessionManager

    return SessionManager(store, **options)  # type: ignore[arg-type]
