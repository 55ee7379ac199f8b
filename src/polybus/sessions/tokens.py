# Over 800 lines on purpose: what verify refuses, the keys it trusts and the revocation lists
# it consults form one security boundary, reviewed as one piece. The revocation stores
# (SharedRevocations, the nonce stores) are what moves to a module of their own if it grows.
"""Stateless signed tokens: JWS compact serialization (RFC 7515) carrying JWT claims (RFC 7519).

>>> keys = Keyring(HMACKey.generate("2025-01"))
>>> tokens = Tokens(keys, issuer="https://auth.example", audience="api")
>>> token = tokens.issue("user-42", {"role": "admin"})
>>> tokens.verify(token)["sub"]
'user-42'

What :meth:`Tokens.verify` refuses (each a subclass of :class:`InvalidToken`):

- anything but three base64url parts of at most :data:`MAX_TOKEN_LENGTH` characters;
- an ``alg`` outside the allowlist (``HS256``, ``EdDSA``; never ``none``), a ``kid``
  this service does not hold, or an ``alg`` other than the one bound to that key
  (algorithm confusion: an HMAC "signed" with an Ed25519 public key is refused);
  ``jku``/``jwk``/``x5u``/``x5c`` and any ``crit`` header are refused, keys come
  only from the :class:`Keyring`;
- a bad signature or MAC, checked before any claim is read;
- a ``typ`` other than the expected one, so a one-time token is not an access
  token and the other way round;
- a missing or wrong ``iss``, ``aud``, ``sub``, ``jti``, ``iat`` or ``exp``; an
  ``exp`` in the past (:class:`TokenExpired`), an ``nbf`` in the future
  (:class:`TokenNotYetValid`), a lifetime longer than ``max_ttl``;
- a revoked token id or a token issued at or before its subject's not-before
  time (:class:`TokenRevoked`), when a :class:`Revocations` is attached.

A :class:`SharedRevocations` shares revocations between instances over a
polybus topic, on any backend.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..errors import (
    ClosedError,
    ConfigurationError,
    ConnectionLost,
    DecodeError,
    InvalidToken,
    RevocationUnavailable,
    TokenError,
    TokenExpired,
    TokenNotYetValid,
    TokenReplayed,
    TokenRevoked,
)
from .base import ClientInfo, SessionConflict, SessionRecord, SessionStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from ..bus import Bus, Subscriber

__all__ = [
    "ALGORITHMS",
    "MAX_TOKEN_LENGTH",
    "Ed25519Key",
    "HMACKey",
    "InvalidToken",
    "Key",
    "Keyring",
    "MemoryNonces",
    "NonceStore",
    "RevocationUnavailable",
    "Revocations",
    "SharedRevocations",
    "StoreNonces",
    "TokenError",
    "TokenExpired",
    "TokenNotYetValid",
    "TokenReplayed",
    "TokenRevoked",
    "Tokens",
]

log = logging.getLogger(__name__)
_monotonic = time.monotonic

#: the algorithms polybus signs and verifies with; ``none`` is never among them
ALGORITHMS: Final = ("HS256", "EdDSA")
#: longer tokens are refused before any work is done on them
MAX_TOKEN_LENGTH: Final = 8192
ACCESS_TYPE: Final = "at+jwt"  # RFC 9068's media type for access tokens
ONE_TIME_TYPE: Final = "once+jwt"


# -- base64url without padding (RFC 7515 §2) --------------------------------------

_TO_STD = bytes.maketrans(b"-_", b"+/")
_PADDING = (b"", b"", b"==", b"=")


def b64encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict base64url without padding: any other character raises InvalidToken."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError as exc:
        raise InvalidToken("token is not ASCII") from exc
    if b"=" in raw or b"+" in raw or b"/" in raw or len(raw) % 4 == 1:
        raise InvalidToken("token part is not unpadded base64url")
    try:
        return binascii.a2b_base64(
            raw.translate(_TO_STD) + _PADDING[len(raw) % 4], strict_mode=True
        )
    except binascii.Error as exc:
        raise InvalidToken("token part is not base64url") from exc


def _canonical(part: str, data: bytes) -> None:
    # Unused low bits in the last character would let one signature have several spellings.
    if b64encode(data) != part:
        raise InvalidToken("token signature is not canonical base64url")


# -- keys ---------------------------------------------------------------------------


class Key(Protocol):
    """A key bound to one algorithm and one key id (``kid``)."""

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> str: ...

    @property
    def can_sign(self) -> bool: ...

    def sign(self, data: bytes) -> str:
        """The base64url signature of ``data``. ConfigurationError for a verify-only key."""
        ...

    def verify(self, data: bytes, signature: str) -> bool:
        """Whether ``signature`` (base64url, as in the token) signs ``data``."""
        ...


def _check_kid(kid: str) -> None:
    if not isinstance(kid, str) or not kid or len(kid) > 128:
        raise ConfigurationError("a key id (kid) must be a non-empty string of at most 128 chars")


class HMACKey:
    """An HS256 (HMAC-SHA-256) key of at least 32 random bytes (RFC 7518 §3.2)."""

    __slots__ = ("_inner", "_outer", "kid", "secret")
    alg: Final = "HS256"
    can_sign: Final = True

    def __init__(self, kid: str, secret: bytes) -> None:
        _check_kid(kid)
        if not isinstance(secret, bytes) or len(secret) < 32:
            raise ConfigurationError(
                "an HS256 secret must be at least 32 bytes; make one with HMACKey.generate()"
            )
        self.kid = kid
        self.secret = secret
        # RFC 2104 with the padded key's two hash states computed once: verify then costs
        # two state copies instead of a full HMAC set-up (about half the time).
        block = (hashlib.sha256(secret).digest() if len(secret) > 64 else secret).ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    @classmethod
    def generate(cls, kid: str) -> HMACKey:
        """A new key of 32 bytes from :mod:`secrets`."""
        return cls(kid, secrets.token_bytes(32))

    def _mac(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def sign(self, data: bytes) -> str:
        return b64encode(self._mac(data))

    def verify(self, data: bytes, signature: str) -> bool:
        # Comparing the encoded form also refuses non-canonical spellings of the MAC.
        return hmac.compare_digest(b64encode(self._mac(data)), signature)

    def __repr__(self) -> str:
        return f"HMACKey(kid={self.kid!r}, secret=<hidden>)"


def _ed25519() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise ConfigurationError(
            "Ed25519 keys need the cryptography package: pip install 'polybus[ed25519]'"
        ) from exc
    return ed25519


@dataclass(frozen=True, slots=True, repr=False)
class Ed25519Key:
    """An EdDSA (Ed25519, RFC 8037) key; without ``private`` it only verifies.

    Needs the ``cryptography`` package (``pip install 'polybus[ed25519]'``).
    """

    kid: str
    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None = None
    alg: str = field(default="EdDSA", init=False)

    def __post_init__(self) -> None:
        _check_kid(self.kid)

    @classmethod
    def generate(cls, kid: str) -> Ed25519Key:
        private = _ed25519().Ed25519PrivateKey.generate()
        return cls(kid, private.public_key(), private)

    @classmethod
    def from_private_bytes(cls, kid: str, raw: bytes) -> Ed25519Key:
        """From the 32-byte raw private key."""
        try:
            private = _ed25519().Ed25519PrivateKey.from_private_bytes(raw)
        except ValueError as exc:
            raise ConfigurationError(f"not a raw 32-byte Ed25519 private key: {exc}") from exc
        return cls(kid, private.public_key(), private)

    @classmethod
    def from_public_bytes(cls, kid: str, raw: bytes) -> Ed25519Key:
        """A verify-only key from the 32-byte raw public key."""
        try:
            return cls(kid, _ed25519().Ed25519PublicKey.from_public_bytes(raw))
        except ValueError as exc:
            raise ConfigurationError(f"not a raw 32-byte Ed25519 public key: {exc}") from exc

    def public_only(self) -> Ed25519Key:
        """The verify-only half, for services that must not issue tokens."""
        return Ed25519Key(self.kid, self.public)

    @property
    def can_sign(self) -> bool:
        return self.private is not None

    def sign(self, data: bytes) -> str:
        if self.private is None:
            raise ConfigurationError(f"Ed25519 key {self.kid!r} is verify-only")
        return b64encode(self.private.sign(data))

    def verify(self, data: bytes, signature: str) -> bool:
        from cryptography.exceptions import InvalidSignature

        raw = b64decode(signature)
        _canonical(signature, raw)
        try:
            self.public.verify(raw, data)
        except InvalidSignature:
            return False
        return True

    def __repr__(self) -> str:
        return f"Ed25519Key(kid={self.kid!r}, signs={self.can_sign})"


class Keyring:
    """The keys a service trusts, by ``kid``; one of them signs new tokens.

    Rotation: :meth:`rotate` makes a new key the signer while the old ones keep
    verifying the tokens they signed; :meth:`retire` drops a key once its tokens
    have expired. Both are thread-safe and take effect for the next verify.
    """

    def __init__(self, signing: Key, *verifying: Key) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, Key] = {}
        for key in (signing, *verifying):
            self._add(self._keys, key)
        self._signing = signing
        self.version = 0  #: bumped on every change, so caches built on keys can be dropped

    @staticmethod
    def _add(keys: dict[str, Key], key: Key) -> None:
        if key.alg not in ALGORITHMS:
            raise ConfigurationError(f"algorithm {key.alg!r} is not one of {ALGORITHMS}")
        if key.kid in keys and keys[key.kid] is not key:
            raise ConfigurationError(f"two keys share the key id {key.kid!r}")
        keys[key.kid] = key

    @property
    def signing(self) -> Key:
        return self._signing

    def get(self, kid: str) -> Key | None:
        return self._keys.get(kid)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._keys.values()))

    def rotate(self, new: Key) -> None:
        """Sign with ``new`` from now on; every key held so far still verifies."""
        if not new.can_sign:
            raise ConfigurationError(f"key {new.kid!r} cannot sign")
        with self._lock:
            keys = dict(self._keys)  # copy on write: verifiers read without the lock
            self._add(keys, new)
            self._keys, self._signing = keys, new
            self.version += 1

    def add(self, key: Key) -> None:
        """Trust ``key`` for verifying (e.g. another issuer's next key, published early)."""
        with self._lock:
            keys = dict(self._keys)
            self._add(keys, key)
            self._keys = keys
            self.version += 1

    def retire(self, kid: str) -> None:
        """Stop trusting ``kid``: tokens it signed are refused from now on.

        Raises ConfigurationError for the signing key (rotate first) and for a
        kid this keyring does not hold.
        """
        with self._lock:
            if kid == self._signing.kid:
                raise ConfigurationError(f"key {kid!r} signs new tokens; rotate before retiring")
            if kid not in self._keys:
                raise ConfigurationError(f"no key {kid!r} to retire")
            keys = dict(self._keys)
            del keys[kid]
            self._keys = keys
            self.version += 1


# -- revocation -------------------------------------------------------------------


class Revocations:
    """Revoked token ids (each kept until its token expires) and per-subject
    not-before times ("log out everywhere"), in this process. Thread-safe.

    ``retention`` is how long a subject's not-before time is kept: it must be at
    least the longest token lifetime (:class:`Tokens` checks this).
    """

    def __init__(self, *, retention: float = 3600.0, clock: Callable[[], float] = time.time):
        if retention <= 0:
            raise ConfigurationError("retention must be positive")
        self.retention = retention
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}  # jti -> exp
        self._subjects: dict[str, float] = {}  # sub -> tokens issued at or before are refused
        self._next_purge = 0.0

    def revoke_token(self, jti: str, expires_at: float) -> None:
        """Refuse the token ``jti`` from now on (until ``expires_at``, when it expires
        anyway); idempotent."""
        self._apply_token(jti, expires_at)

    def revoke_subject(self, subject: str, before: float | None = None) -> None:
        """Refuse every token of ``subject`` issued at or before ``before`` (default:
        now). Tokens issued later are accepted; idempotent."""
        self._apply_subject(subject, self._clock() if before is None else before)

    def _apply_token(self, jti: str, expires_at: float) -> None:
        with self._lock:
            if expires_at > self._tokens.get(jti, 0.0):
                self._tokens[jti] = expires_at
        self._purge()

    def _apply_subject(self, subject: str, before: float) -> None:
        with self._lock:
            if before > self._subjects.get(subject, float("-inf")):
                self._subjects[subject] = before
        self._purge()

    def check(self, jti: str, subject: str, issued_at: float) -> None:
        """Raise TokenRevoked if the token was revoked; otherwise return (O(1), no lock)."""
        if jti in self._tokens:
            raise TokenRevoked("token was revoked")
        cutoff = self._subjects.get(subject)
        if cutoff is not None and issued_at <= cutoff:
            raise TokenRevoked("every token of this subject issued before a logout was revoked")

    def _purge(self) -> None:
        now = self._clock()
        if now < self._next_purge:
            return
        with self._lock:
            self._next_purge = now + 1.0
            self._tokens = {j: exp for j, exp in self._tokens.items() if exp > now}
            horizon = now - self.retention
            self._subjects = {s: t for s, t in self._subjects.items() if t > horizon}

    def __len__(self) -> int:
        return len(self._tokens) + len(self._subjects)


class SharedRevocations(Revocations):
    """Revocations shared by every instance that opens one on the same bus and topic.

    Each revocation is applied here at once and published to ``topic``; every
    instance reads the topic (from its start, so one started later learns what
    was revoked before it started) and applies it within about ``poll`` plus
    the backend's delivery delay: a few milliseconds on memory, native, Redis
    and RabbitMQ; 10-15 ms on Apache Kafka, most of it the producer's
    ``linger.ms`` (``kafka://...?linger.ms=0&fetch.wait.max.ms=10`` on the bus's
    URL brings it to about 3 ms). A Kafka-protocol broker that answers a fetch
    only at its ``fetch.wait.max.ms`` (librdkafka's default is 500 ms) adds up
    to that. The topic has one partition and
    keeps messages for ``retention`` seconds, after which every token they
    concern has expired.

    With ``fail_closed_after`` set, each instance publishes a small heartbeat
    every third of it and :meth:`check` raises RevocationUnavailable when its
    own last heartbeat came back longer than that ago: a partitioned instance
    stops accepting tokens instead of missing revocations. After a failed
    fetch or publish it reads the whole topic again, and trusts tokens again
    once a heartbeat sent after that comes back.

    Call :meth:`start` (blocks until caught up) and :meth:`close`, or use it as
    a context manager. ``revoke_*`` block until the broker has the revocation
    and raise ConnectionLost if it cannot be published (it is in force here
    regardless).
    """

    def __init__(
        self,
        bus: Bus,
        *,
        topic: str = "polybus.revocations",
        retention: float = 3600.0,
        poll: float = 0.1,
        fail_closed_after: float | None = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(retention=retention, clock=clock)
        if fail_closed_after is not None and fail_closed_after <= 3 * poll:
            raise ConfigurationError("fail_closed_after must be well above poll")
        self.bus = bus
        self.topic = topic
        self.poll = poll
        self.fail_closed_after = fail_closed_after
        self.instance = uuid.uuid4().hex
        self._subscriber: Subscriber | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._caught_up = threading.Event()
        self._fresh_until = float("inf") if fail_closed_after is None else 0.0
        self._beat = 0
        self._beat_sent = 0.0

    def start(self, timeout: float = 30.0) -> SharedRevocations:
        """Read the revocations published so far and follow new ones; blocks until
        caught up. Raises ConnectionLost if that takes longer than ``timeout``."""
        from ..types import Capability

        if self._thread is not None:
            return self
        retention = self.retention if Capability.RETENTION in self.bus.capabilities else None
        self.bus.declare(self.topic, partitions=1, retention=retention)
        self._subscriber = self.bus.subscribe(self.topic, start="earliest")
        self._thread = threading.Thread(
            target=self._follow, name="polybus-revocations", daemon=True
        )
        self._thread.start()
        try:
            self._heartbeat()  # reading our own marker back means all before it was read
        except BaseException:
            self.close()
            raise
        if not self._caught_up.wait(timeout):
            self.close()
            raise ConnectionLost(f"revocations on {self.topic!r} not read back within {timeout}s")
        return self

    def revoke_token(self, jti: str, expires_at: float) -> None:
        super().revoke_token(jti, expires_at)
        self.bus.publish(self.topic, {"jti": jti, "exp": expires_at}, key=jti)

    def revoke_subject(self, subject: str, before: float | None = None) -> None:
        before = self._clock() if before is None else before
        super().revoke_subject(subject, before)
        self.bus.publish(self.topic, {"sub": subject, "before": before}, key=subject)

    def check(self, jti: str, subject: str, issued_at: float) -> None:
        if _monotonic() > self._fresh_until:
            raise RevocationUnavailable(
                f"revocations on {self.topic!r} not heard from for over "
                f"{self.fail_closed_after}s; refusing tokens until the bus answers"
            )
        # Revocations.check inlined: this runs on every verify
        if jti in self._tokens:
            raise TokenRevoked("token was revoked")
        cutoff = self._subjects.get(subject)
        if cutoff is not None and issued_at <= cutoff:
            raise TokenRevoked("every token of this subject issued before a logout was revoked")

    def _heartbeat(self) -> None:
        self._beat += 1
        self._beat_sent = time.monotonic()
        self.bus.publish(self.topic, {"beat": self.instance, "n": self._beat}, key=self.instance)

    def _follow(self) -> None:
        assert self._subscriber is not None
        sub = self._subscriber
        replay = False
        while not self._stop.is_set():
            try:
                if replay:
                    # Events may have been missed while the bus failed (a backend may resume
                    # an ephemeral reader past them): read the whole history again, and trust
                    # the feed only once a heartbeat sent after that comes back.
                    sub.close()
                    sub = self._subscriber = self.bus.subscribe(self.topic, start="earliest")
                    replay = False
                    self._heartbeat()
                deliveries = sub.fetch(1000, timeout=self.poll)
                for d in deliveries:
                    try:
                        event = d.message.value
                    except DecodeError as exc:
                        log.warning("revocations on %r: skipped an event: %s", self.topic, exc)
                        continue
                    self._apply(event)
                sub.ack(deliveries)
                if (
                    self.fail_closed_after is not None
                    and _monotonic() - self._beat_sent > self.fail_closed_after / 3
                ):
                    self._heartbeat()
            except Exception as exc:  # never let the feed die; checks fail closed meanwhile
                if self._stop.is_set():
                    return
                if isinstance(exc, ClosedError) and self.bus.closed:  # for good
                    log.warning("revocations on %r: bus closed; no longer following", self.topic)
                    self._fresh_until = 0.0 if self.fail_closed_after is not None else math.inf
                    return
                log.warning("revocations on %r: %s; reading them all again", self.topic, exc)
                replay = True
                self._stop.wait(self.poll)

    def _apply(self, event: Any) -> None:
        # Anyone who can publish to the topic can revoke (never un-revoke); malformed
        # events are skipped, never fatal.
        try:
            if "jti" in event:
                self._apply_token(str(event["jti"]), float(event["exp"]))
            elif "sub" in event:
                self._apply_subject(str(event["sub"]), float(event["before"]))
            elif event.get("beat") == self.instance and event.get("n") == self._beat:
                if self.fail_closed_after is not None:
                    self._fresh_until = time.monotonic() + self.fail_closed_after
                self._caught_up.set()
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            log.warning("revocations on %r: skipped a malformed event: %s", self.topic, exc)

    def close(self) -> None:
        """Stop following; idempotent. Checks after close fail closed when
        ``fail_closed_after`` is set."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self.poll + 5)
        if self._subscriber is not None:
            self._subscriber.close()
        self._fresh_until = 0.0 if self.fail_closed_after is not None else float("inf")

    def __enter__(self) -> SharedRevocations:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one-time tokens ----------------------------------------------------------------


class NonceStore(Protocol):
    """Remembers one-time token ids until they expire."""

    def claim(self, nonce: str, expires_at: float) -> bool:
        """Mark ``nonce`` used; True the first time, False on every later call.

        Atomic: of concurrent callers exactly one gets True. A store shared by
        every instance (e.g. Redis) makes that hold across instances too.
        """
        ...


class MemoryNonces:
    """A :class:`NonceStore` in this process; expired nonces are forgotten."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}
        self._next_purge = 0.0

    def claim(self, nonce: str, expires_at: float) -> bool:
        now = self._clock()
        with self._lock:
            if now >= self._next_purge:
                self._next_purge = now + 1.0
                self._used = {n: exp for n, exp in self._used.items() if exp > now}
            if nonce in self._used:
                return False
            self._used[nonce] = expires_at
            return True


class StoreNonces:
    """A :class:`NonceStore` kept in a session store, so every instance on the store shares
    it: the claim is the store's compare-and-set of a new record, atomic across instances
    on a linearizable store (memory, Redis), and the record expires with the token.

    ``store`` is a URL for :func:`~polybus.sessions.open_store` or a store. Raises
    SessionStoreUnavailable when the store is down (the token is then not accepted).
    """

    def __init__(self, store: SessionStore | str) -> None:
        from .stores import open_store

        self.store: SessionStore = open_store(store)

    def claim(self, nonce: str, expires_at: float) -> bool:
        now = time.time()
        record = SessionRecord(
            f"once.{nonce}", None, 1, now, now, expires_at, ClientInfo(), None, {}
        )
        try:
            self.store.save(record)
        except SessionConflict:
            return False
        return True


# -- tokens -------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise InvalidToken("token header repeats a parameter")
    return out


_REFUSED_HEADERS = frozenset({"jku", "jwk", "x5u", "x5c", "crit", "b64", "zip", "enc"})


#: what json.loads raises for text that is no JSON, or nested past the recursion limit
_NOT_JSON = (ValueError, UnicodeDecodeError, RecursionError)
#: the latest time a claim may name: the end of year 9999, as seconds since 1970
_LATEST = 253_402_300_799


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _json(text: bytes, **hooks: Any) -> Any:
    """JSON without the NaN and Infinity that Python's parser accepts by default."""
    return json.loads(text, parse_constant=_refuse_constant, **hooks)


def _number(claims: Mapping[str, Any], name: str, *, required: bool) -> float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise InvalidToken(f"token has no {name!r} claim")
        return None
    if type(value) is not int and type(value) is not float:  # bool is no NumericDate
        raise InvalidToken(f"token claim {name!r} is not a number")
    if not 0 <= value <= _LATEST:  # also false for NaN
        raise InvalidToken(f"token claim {name!r} is not a time between 1970 and 9999")
    return float(value)


class Tokens:
    """Issues and verifies signed tokens for one issuer and audience.

    ``ttl`` is the default lifetime in seconds, ``max_ttl`` (default ``ttl``)
    the longest accepted; ``leeway`` tolerates that much clock skew on
    ``exp``/``nbf``/``iat``. ``algorithms`` narrows the allowlist (e.g. only
    ``("EdDSA",)`` for a service that must not trust shared secrets).
    ``revocations`` is consulted on every verify; ``nonces`` remembers
    redeemed one-time tokens (default: this process only).

    Thread-safe. ``verify`` costs a few microseconds with HS256.
    """

    def __init__(
        self,
        keys: Keyring,
        *,
        issuer: str,
        audience: str,
        ttl: float = 900.0,
        max_ttl: float | None = None,
        leeway: float = 0.0,
        algorithms: Iterable[str] = ALGORITHMS,
        revocations: Revocations | None = None,
        nonces: NonceStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.algorithms = frozenset(algorithms)
        if not self.algorithms or not self.algorithms <= set(ALGORITHMS):
            raise ConfigurationError(f"algorithms must be a non-empty subset of {ALGORITHMS}")
        if not issuer or not audience:
            raise ConfigurationError("issuer and audience must be non-empty strings")
        self.max_ttl = ttl if max_ttl is None else max_ttl
        if not 0 < ttl <= self.max_ttl:
            raise ConfigurationError("ttl must be positive and at most max_ttl")
        if revocations is not None and revocations.retention < self.max_ttl + leeway:
            raise ConfigurationError(
                f"revocations keep a logout for {revocations.retention:g}s, less than the "
                f"longest token lifetime ({self.max_ttl + leeway:g}s): raise their retention"
            )
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.ttl = ttl
        self.leeway = leeway
        self.revocations = revocations
        self.nonces: NonceStore = nonces or MemoryNonces(clock=clock)
        self._clock = clock
        # header part -> (key, typ) for headers of tokens whose signature checked out
        self._headers: dict[str, tuple[Key, str]] = {}
        self._headers_version = keys.version
        for key in keys:
            self._allowed(key)

    def _allowed(self, key: Key) -> Key:
        if key.alg not in self.algorithms:
            raise ConfigurationError(f"key {key.kid!r} uses {key.alg}, not in {self.algorithms}")
        return key

    # issuing

    def issue(
        self,
        subject: str,
        claims: Mapping[str, Any] | None = None,
        *,
        ttl: float | None = None,
        not_before: float | None = None,
        audience: str | None = None,
    ) -> str:
        """A new access token for ``subject`` with extra ``claims``; see :meth:`verify`.

        Registered claims (``iss``, ``sub``, ``aud``, ``iat``, ``exp``, ``nbf``,
        ``jti``) are set here and cannot be overridden through ``claims``.
        """
        return self._issue(ACCESS_TYPE, subject, claims, ttl, not_before, audience)

    def issue_one_time(
        self,
        subject: str,
        claims: Mapping[str, Any] | None = None,
        *,
        ttl: float | None = None,
        audience: str | None = None,
    ) -> str:
        """A token that :meth:`redeem` accepts once (e.g. a password-reset or e-mail
        confirmation link); :meth:`verify` refuses it."""
        return self._issue(ONE_TIME_TYPE, subject, claims, ttl, None, audience)

    def _issue(
        self,
        typ: str,
        subject: str,
        claims: Mapping[str, Any] | None,
        ttl: float | None,
        not_before: float | None,
        audience: str | None,
    ) -> str:
        if not isinstance(subject, str) or not subject:
            raise ConfigurationError("subject must be a non-empty string")
        ttl = self.ttl if ttl is None else ttl
        if not 0 < ttl <= self.max_ttl:
            raise ConfigurationError(f"ttl must be positive and at most max_ttl ({self.max_ttl})")
        key = self._allowed(self.keys.signing)
        # iat in whole ms, never after now: a login right after a logout-everywhere counts
        now = math.floor(self._clock() * 1000) / 1000
        body: dict[str, Any] = dict(claims or {})
        body.update(
            iss=self.issuer,
            sub=subject,
            aud=audience or self.audience,
            iat=now,
            exp=round(now + ttl, 3),
            jti=secrets.token_urlsafe(16),
        )
        if not_before is not None:
            body["nbf"] = not_before
        else:
            body.pop("nbf", None)
        header = {"alg": key.alg, "kid": key.kid, "typ": typ}
        signing_input = (
            b64encode(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64encode(json.dumps(body, separators=(",", ":")).encode())
        )
        token = signing_input + "." + key.sign(signing_input.encode("ascii"))
        if len(token) > MAX_TOKEN_LENGTH:
            raise ConfigurationError(
                f"token would be {len(token)} characters, over {MAX_TOKEN_LENGTH}: fewer claims"
            )
        return token

    # verifying

    def verify(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """The claims of a valid, unrevoked access token; raises InvalidToken (or
        one of its subclasses) otherwise, and RevocationUnavailable when shared
        revocations fail closed. Never blocks."""
        claims = self._verified(token, ACCESS_TYPE, audience)
        if self.revocations is not None:
            self.revocations.check(claims["jti"], claims["sub"], claims["iat"])
        return claims

    def redeem(self, token: str, *, audience: str | None = None) -> dict[str, Any]:
        """The claims of a valid one-time token, the first time it is presented;
        TokenReplayed after that (and on every instance sharing ``nonces``, or
        ``revocations`` within their delay)."""
        claims = self._verified(token, ONE_TIME_TYPE, audience)
        if not self.nonces.claim(claims["jti"], claims["exp"] + self.leeway):
            raise TokenReplayed("one-time token was already used")
        if self.revocations is not None:
            try:
                self.revocations.check(claims["jti"], claims["sub"], claims["iat"])
            except TokenRevoked as exc:  # redeemed on another instance, or revoked
                raise TokenReplayed(f"one-time token was already used or revoked: {exc}") from exc
        if self.revocations is not None:
            try:
                self.revocations.revoke_token(claims["jti"], claims["exp"] + self.leeway)
            except ConnectionLost as exc:  # claimed here already; others learn it later
                log.warning("one-time token redeemed but its revocation not shared: %s", exc)
        return claims

    def revoke(self, claims: Mapping[str, Any]) -> None:
        """Revoke the token these verified ``claims`` came from (e.g. at logout)."""
        if self.revocations is None:
            raise ConfigurationError("revoking needs Tokens(..., revocations=...)")
        self.revocations.revoke_token(str(claims["jti"]), float(claims["exp"]) + self.leeway)

    def revoke_subject(self, subject: str) -> None:
        """Revoke every token of ``subject`` issued until now ("log out everywhere")."""
        if self.revocations is None:
            raise ConfigurationError("revoking needs Tokens(..., revocations=...)")
        self.revocations.revoke_subject(subject)

    def _key_for(self, header_part: str) -> tuple[Key, str, bool]:
        """The key and typ a header names, and whether that header is known-good."""
        if self._headers_version != self.keys.version:
            self._headers = {}
            self._headers_version = self.keys.version
        known = self._headers.get(header_part)
        if known is not None:
            return known[0], known[1], True
        try:
            header = _json(b64decode(header_part), object_pairs_hook=_no_duplicates)
        except InvalidToken:
            raise
        except _NOT_JSON as exc:
            raise InvalidToken("token header is not JSON") from exc
        if not isinstance(header, dict):
            raise InvalidToken("token header is not a JSON object")
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken(f"token algorithm {alg!r} is not allowed here")
        refused = _REFUSED_HEADERS.intersection(header)
        if refused:
            raise InvalidToken(f"token header parameters {sorted(refused)} are not accepted")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken(f"token key id {kid!r} is unknown (retired, or never issued here)")
        if key.alg != alg:
            raise InvalidToken(f"token says {alg} but key {kid!r} is {key.alg}")
        if not isinstance(typ, str):
            raise InvalidToken("token header has no typ")
        return key, typ, False

    def _verified(self, token: str, typ: str, audience: str | None) -> dict[str, Any]:
        if not isinstance(token, str):
            raise InvalidToken("token must be a string")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken(f"token longer than {MAX_TOKEN_LENGTH} characters")
        parts = token.split(".")
        if len(parts) != 3:
            raise InvalidToken("not a compact JWS: expected three dot-separated parts")
        header_part, payload_part, signature = parts
        key, token_typ, known = self._key_for(header_part)
        try:
            signing_input = token[: len(header_part) + 1 + len(payload_part)].encode("ascii")
        except UnicodeEncodeError as exc:
            raise InvalidToken("token is not ASCII") from exc
        if not key.verify(signing_input, signature):
            raise InvalidToken("token signature does not match (tampered, or another key)")
        if not known and len(self._headers) < 256:
            self._headers[header_part] = (key, token_typ)
        if token_typ != typ:
            raise InvalidToken(f"token type {token_typ!r} where {typ!r} was expected")
        try:
            claims = _json(b64decode(payload_part))
        except _NOT_JSON as exc:
            raise InvalidToken("token claims are not JSON") from exc
        if type(claims) is not dict:
            raise InvalidToken("token claims are not a JSON object")
        self._check_claims(claims, audience or self.audience)
        return claims

    def _check_claims(self, claims: dict[str, Any], audience: str) -> None:
        now = self._clock()
        leeway = self.leeway
        exp = _number(claims, "exp", required=True)
        iat = _number(claims, "iat", required=True)
        assert exp is not None
        assert iat is not None
        if now >= exp + leeway:
            raise TokenExpired("token has expired")
        nbf = _number(claims, "nbf", required=False)
        if nbf is not None and now + leeway < nbf:
            raise TokenNotYetValid("token is not valid yet (nbf)")
        if iat > now + leeway:
            raise InvalidToken("token was issued in the future (iat)")
        if exp - iat > self.max_ttl + 0.001:
            raise InvalidToken("token lifetime is longer than this service accepts")
        if claims.get("iss") != self.issuer:
            raise InvalidToken("token issuer (iss) is not this service's")
        aud = claims.get("aud")
        if aud != audience and not (type(aud) is list and audience in aud):
            raise InvalidToken("token audience (aud) is not this service")
        if type(claims.get("sub")) is not str or type(claims.get("jti")) is not str:
            raise InvalidToken("token has no sub or jti")
