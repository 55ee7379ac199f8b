"""Who the user is, carried with the messages an edge service publishes.

One edge service reads the session cookie; every message it publishes because
of a request carries the user's context as a short-lived signed token in a
header. Each consumer verifies it before acting, so services know who the
user is without sharing a session store, and trust only what the edge signed:

>>> keys = Keyring(HMACKey.generate("edge-2026-01"))
>>> context = UserContext(Tokens(keys, issuer="edge", audience="services", ttl=60))
>>> order = context.attach(Message({"sku": "A1"}), "user-42", {"role": "buyer"})
>>> context.verify(order)["sub"]
'user-42'

The token names the message it was signed for (its id), so it cannot be moved
onto another message. A message without a context, or with a forged, expired,
revoked or moved one, raises :class:`ContextRefused`, a
:class:`~polybus.errors.Rejected` error: a worker dead-letters it at once
instead of retrying. Its ``ttl`` bounds how long a message may wait in a queue
(a retry's back-off included) before its context expires; downstream services
need only the verifying key (an Ed25519 public key, or the shared HMAC secret).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..envelope import USER_CONTEXT
from ..errors import ContextRefused, InvalidToken
from ..message import Delivery, Message
from .tokens import Tokens

__all__ = ["HEADER", "ContextRefused", "UserContext"]

#: the header holding the signed user context
HEADER = USER_CONTEXT
_MESSAGE_CLAIM = "mid"


class UserContext:
    """Signs the user's context into messages (:meth:`attach`) and checks it on receipt
    (:meth:`verify`), with ``tokens``' keys, issuer, audience, lifetime and revocations."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def attach(
        self,
        message: Message,
        subject: str,
        claims: Mapping[str, Any] | None = None,
        *,
        ttl: float | None = None,
    ) -> Message:
        """``message``, its header :data:`HEADER` holding a token for ``subject`` with
        ``claims``, bound to the message's id."""
        token = self.tokens.issue(subject, {**(claims or {}), _MESSAGE_CLAIM: message.id}, ttl=ttl)
        message.headers[HEADER] = token
        return message

    def verify(self, message: Message | Delivery) -> dict[str, Any]:
        """The claims of the context ``message`` carries (``sub`` is the user); raises
        ContextRefused when it has none, or one that does not verify for it."""
        if isinstance(message, Delivery):
            message = message.message
        token = message.headers.get(HEADER)
        if token is None:
            raise ContextRefused(f"message {message.id} carries no user context ({HEADER})")
        try:
            claims = self.tokens.verify(token)
        except InvalidToken as exc:
            raise ContextRefused(f"user context of message {message.id} refused: {exc}") from exc
        if claims.get(_MESSAGE_CLAIM) != message.id:
            raise ContextRefused(f"user context of message {message.id} was signed for another")
        return claims
