"""polybus: one interface for messaging over an embedded log, Kafka, RabbitMQ and Redis.

>>> import polybus
>>> with polybus.connect("memory://") as bus:
...     _ = bus.publish("greetings", {"hello": "world"}, key="user-1")
"""

from .adapters.base import Capability, Receipt
from .bus import Bus, Subscriber, connect
from .errors import (
    BackendUnavailable,
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
    RemoteError,
    RequestTimeout,
    TopicNotFound,
)
from .message import Delivery, Message

__all__ = [
    "BackendUnavailable",
    "Bus",
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
    "PolybusError",
    "Receipt",
    "RemoteError",
    "RequestTimeout",
    "Subscriber",
    "TopicNotFound",
    "connect",
]
__version__ = "0.1.0"
