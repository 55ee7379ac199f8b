"""The one exception tree. Every error polybus raises is a :class:`PolybusError`.

Adapters catch their client library's exceptions at the boundary and re-raise
one of these with ``raise ... from exc``, so callers never need to import a
broker client to handle failures. Every exception lives here; the modules that
raise them re-export them (``polybus.patterns.DeadLetterNotFound`` is this one)::

    PolybusError
    ├── ConfigurationError (ValueError)    a URL, option or argument is wrong
    │   └── BackendUnavailable             no client library for the URL's scheme
    ├── BrokerUnreachable                  nobody answered at the address
    ├── ConnectionLost                     an open connection failed; may retry
    │   └── SessionStoreUnavailable        (also a SessionError)
    ├── CapabilityError                    the backend cannot do this
    ├── ClosedError                        used after close()
    ├── TopicNotFound (LookupError)
    ├── DeadLetterNotFound (LookupError)
    ├── NoLiveInstance (LookupError)
    ├── MessageTooLarge (ValueError)       nothing was written
    ├── EncodeError (TypeError)            nothing was written
    ├── Rejected                           a message no retry can help: dead-lettered
    │   ├── DecodeError (ValueError)
    │   └── ContextRefused                 (also an InvalidToken)
    ├── FencedError                        the partition moved to another member
    ├── CorruptRecordError                 a damaged batch in a log segment
    ├── RequestTimeout (TimeoutError)
    ├── RemoteError                        the responder's handler raised
    ├── SessionError
    │   ├── SessionStoreUnavailable
    │   └── SessionConflict
    └── TokenError
        ├── InvalidToken (ValueError)
        │   ├── TokenExpired
        │   ├── TokenNotYetValid
        │   ├── ContextRefused
        │   └── TokenRevoked
        │       └── TokenReplayed
        └── RevocationUnavailable

:class:`polybus.patterns.Retry` is not in the tree: a handler raises it to ask
for a later try, so it is a signal, not a failure, and ``except PolybusError``
does not swallow it.
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
    "ContextRefused",
    "CorruptRecordError",
    "DeadLetterNotFound",
    "DecodeError",
    "EncodeError",
    "FencedError",
    "InvalidToken",
    "MessageTooLarge",
    "NoLiveInstance",
    "PolybusError",
    "Rejected",
    "RemoteError",
    "RequestTimeout",
    "RevocationUnavailable",
    "SessionConflict",
    "SessionError",
    "SessionStoreUnavailable",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenRevoked",
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


class DeadLetterNotFound(PolybusError, LookupError):
    """No dead letter has the id asked for."""


class NoLiveInstance(PolybusError, LookupError):
    """The ring is empty, or every instance on it is marked dead."""


# -- sessions and tokens ----------------------------------------------------------


class SessionError(PolybusError):
    """Base class of the session errors."""


class SessionStoreUnavailable(SessionError, ConnectionLost):
    """The session store cannot be reached; the message names the store and the cause.

    Under the manager's default ``on_unavailable="fail_closed"`` policy a
    request then fails with this error instead of running without its session.
    """


class SessionConflict(SessionError):
    """A compare-and-set write found another version than the one it was based on.

    Stores raise it from :meth:`SessionStore.save` (``session_id`` is the
    session's :func:`store_key`, ``current_version`` what they found, 0 when
    the session no longer exists); the manager merges and
    retries, and raises it itself only for a real conflict (one key changed by
    two requests) under ``on_conflict="raise"``.
    """

    def __init__(self, message: str, *, session_id: str, current_version: int) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.current_version = current_version

    @classmethod
    def stale(cls, session_id: str, *, expected: int, current: int) -> SessionConflict:
        """The conflict of a save based on version ``expected`` finding ``current``."""
        return cls(
            f"session is at version {current}, not {expected}",
            session_id=session_id,
            current_version=current,
        )


class TokenError(PolybusError):
    """A token could not be accepted. The message is for logs, not for the client."""


class InvalidToken(TokenError, ValueError):
    """The token is malformed, tampered with, signed with an unknown key or algorithm,
    or its claims do not fit this service (issuer, audience, type, lifetime)."""


class TokenExpired(InvalidToken):
    """The token's ``exp`` has passed; the client must get a new one."""


class TokenNotYetValid(InvalidToken):
    """The token's ``nbf`` is still in the future."""


class TokenRevoked(InvalidToken):
    """The token's id was revoked, or its subject was logged out everywhere after it
    was issued."""


class TokenReplayed(TokenRevoked):
    """A one-time token was presented again after its first use."""


class RevocationUnavailable(TokenError):
    """The shared revocation list has not been heard from recently enough to trust a
    token (it fails closed); retry once the bus is reachable again."""


class ContextRefused(InvalidToken, Rejected):
    """A message's user context is missing, forged, expired, revoked or was signed for
    another message."""


#: query options whose values are secrets (sasl.password, ssl.key.password, token, ...)
_SECRET_OPTION = re.compile(r"pass|secret|token|credential|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` as an error message or a log line may show it: the password, and the
    value of any option named like a secret, replaced by ``***``."""
    if "://" not in url:  # not a URL: hide whatever could be user:password@
        user, at, rest = url.rpartition("@")
        return f"{user.partition(':')[0]}:***@{rest}" if at else url
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
