"""The one exception tree. Every error polybus raises is a :class:`PolybusError`.

Adapters catch their client library's exceptions at the boundary and re-raise
one of these with ``raise ... from exc``, so callers never need to import a
broker client to handle failures.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = [
    "BackendUnavailable",
    "BrokerUnreachable",
    "CapabilityError",
    "ClosedError",
    "ConfigurationError",
    "ConnectionLost",
    "CorruptRecordError",
    "DecodeError",
    "EncodeError",
    "FencedError",
    "MessageTooLarge",
    "PolybusError",
    "Rejected",
    "RemoteError",
    "RequestTimeout",
    "TopicNotFound",
    "redact_url",
]


class PolybusError(Exception):
    """Base class of every error raised by polybus."""


class ConfigurationError(PolybusError, ValueError):
    """A URL, option or argument is invalid; the message says which and how to fix it."""


class BackendUnavailable(ConfigurationError):
    """The URL names a backend whose client library is not installed, or no backend at all."""


class BrokerUnreachable(PolybusError):
    """No broker answered at the address a bus was opened with (refused, unknown host,
    or silent) within ``connect_timeout``: wrong address, or the broker is not running.
    Unlike :class:`ConnectionLost`, there never was a connection to lose."""


class CapabilityError(PolybusError):
    """The backend cannot do what was asked (e.g. seek on a broker without replay)."""


class ClosedError(PolybusError):
    """The bus, subscription or log was used after ``close()``."""


class ConnectionLost(PolybusError):
    """The connection to the broker failed or dropped; the operation may be retried."""


class TopicNotFound(PolybusError, LookupError):
    """The topic does not exist and the call does not create topics."""


class MessageTooLarge(PolybusError, ValueError):
    """A message exceeds the backend's size limit; nothing was written."""


class EncodeError(PolybusError, TypeError):
    """A value could not be encoded by the chosen codec; nothing was written."""


class Rejected(PolybusError):
    """A message that cannot be processed as it is: trying it again cannot help, so a
    worker sends it to the dead-letter topic at once, whatever its retry policy."""


class DecodeError(Rejected, ValueError):
    """A payload could not be decoded with the codec its content type names."""


class FencedError(PolybusError):
    """This consumer no longer owns the partition (it was reassigned); its commit was refused.

    The uncommitted messages will be delivered to the new owner (at-least-once).
    """


class CorruptRecordError(PolybusError):
    """A record batch in a log segment failed its checksum or framing check.

    ``path`` and ``position`` name the damaged bytes. Open the log with
    ``skip_corrupt=True`` to skip past damaged batches instead.
    """

    def __init__(self, message: str, *, path: str, position: int) -> None:
        super().__init__(message)
        self.path = path
        self.position = position


class RequestTimeout(PolybusError, TimeoutError):
    """No reply to a request arrived within its timeout; a later reply is dropped."""


class RemoteError(PolybusError):
    """The responder's handler raised; ``type`` and ``message`` are what it raised."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message


#: query options whose values are secrets (sasl.password, ssl.key.password, token, ...)
_SECRET_OPTION = re.compile(r"pass|secret|token|credential|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` as an error message or a log line may show it: the password, and the
    value of any option named like a secret, replaced by ``***``."""
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None
    except ValueError:
        return "<a URL that cannot be parsed>"
    shown = url
    if has_password:
        userinfo, _, hosts = parts.netloc.rpartition("@")
        shown = shown.replace(f"//{parts.netloc}", f"//{userinfo.split(':', 1)[0]}:***@{hosts}", 1)
    if parts.query:
        query = "&".join(
            f"{name}=***" if _SECRET_OPTION.search(name) else f"{name}{eq}{value}"
            for name, eq, value in (pair.partition("=") for pair in parts.query.split("&"))
        )
        fragment = f"#{parts.fragment}" if parts.fragment else ""
        shown = f"{shown.partition('?')[0]}?{query}{fragment}"
    return shown
