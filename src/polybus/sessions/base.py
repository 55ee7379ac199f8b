"""The session store protocol, the records stores keep, and the session errors.

A :class:`SessionStore` keeps :class:`SessionRecord` values by key, with a
per-user index and expiry it enforces itself. The key is :func:`store_key` of
the session id (a SHA-256 digest), never the id itself: what a store holds (a
Redis dump, a Kafka topic, the native log's files) cannot be presented as a
cookie (OWASP ASVS 5.0, 7.2: session tokens are not stored in clear). Every write is a
compare-and-set on the record's version, so two instances never silently
overwrite each other; the :class:`~polybus.sessions.manager.SessionManager`
merges on a conflict. Stores never pickle: records are JSON or msgpack.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, ClassVar, NamedTuple, Protocol

import msgpack
import msgspec

from ..codecs import load_json
from ..errors import (
    DecodeError,
    EncodeError,
    SessionConflict,
    SessionError,
    SessionStoreUnavailable,
)
from ..types import tuple_new

__all__ = [
    "CODECS",
    "ClientInfo",
    "RecordCodec",
    "Session",
    "SessionConflict",
    "SessionError",
    "SessionRecord",
    "SessionStore",
    "SessionStoreUnavailable",
    "new_session_id",
    "store_key",
    "user_tag",
]


class ClientInfo(NamedTuple):
    """What the server saw of the client: shown in session lists, optionally bound."""

    user_agent: str = ""
    ip: str = ""


class SessionRecord(NamedTuple):
    """One session as a store keeps it. Times are epoch seconds.

    ``version`` counts the writes (the first save writes version 1).
    ``expires_at`` is when the store must stop returning it (the earlier of
    the idle and the absolute deadline); the manager computes it.
    """

    id: str  #: the session's :func:`store_key`, never its id
    user_id: str | None
    version: int
    created_at: float
    last_seen: float
    expires_at: float
    client: ClientInfo
    fingerprint: str | None
    data: dict[str, Any]


def _json_encoder() -> Callable[[Any], str]:
    """``JSONEncoder(separators=(",", ":"), allow_nan=False).encode`` (no NaN: no JSON),
    its C encoder made once instead of per call, without the circular-reference check
    (a cycle recurses until RecursionError, which :meth:`RecordCodec.dump` reports).
    Side by side, 7 alternating rounds, CPU per encode of the benchmark's data: 2.79
    (2.75-2.86) -> 1.91 (1.86-1.98) us."""
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
    make: Any = getattr(json.encoder, "c_make_encoder", None)  # _json.make_encoder
    if make is None:  # no C accelerator
        return encoder.encode
    # the arguments JSONEncoder.iterencode passes, without its markers dict
    once = make(None, encoder.default, _json_str, None, ":", ",", False, False, False)
    join = "".join

    def encode(value: Any) -> str:
        return join(once(value, 0))

    return encode


_json_str = json.encoder.encode_basestring_ascii  # what the encoder writes a str with
_json_encode = _json_encoder()
# msgspec writes a record's head, and reads every JSON record (codecs.load_json). Side by
# side, 9 alternating rounds, CPU: the head 2.29 (2.11-2.35) -> 0.62 (0.59-0.67) us, the
# benchmark's data read 1.82 (1.73-2.06) -> 0.59 (0.57-0.64) us (the json module's scanner
# alone: 1.39). Its encoder is not used for the data: it writes NaN as null, and bytes,
# sets, dates, UUIDs and enums as JSON where the json module refuses them, as sessions must.
_fast_encode = msgspec.json.Encoder().encode
_unpackb = msgpack.unpackb


class RecordCodec:
    """Encodes a whole record as one JSON array (msgpack: :data:`CODECS`). Never pickle.

    The record's data is the array's last element, so a store that keeps the
    encoded bytes can keep the decoded fields before it too (the record's
    *head*: :meth:`encode_split`, :meth:`data_start`) and decode only the
    data on a load (:meth:`decode_data`): a load has to hand out a copy of
    the data of its own, and decoding it is the cheapest copy there is.
    """

    name: str = "json"
    _end = b"]"  # what follows the data

    def dump(self, value: Any) -> bytes:
        """Encode plain data; raises EncodeError naming what is not JSON data."""
        try:
            return _json_encode(value).encode()
        except RecursionError as exc:  # a cycle, or deeper than the interpreter goes
            raise EncodeError(f"session data is circular or nested too deep: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise EncodeError(
                f"session data must be JSON data (str, int, float, bool, None, list, dict "
                f"with str keys): {exc}"
            ) from exc

    def load(self, payload: bytes) -> Any:
        """Decode plain data; raises DecodeError."""
        try:
            return load_json(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise DecodeError(f"{len(payload)} bytes are not JSON: {exc}") from exc

    def encode(self, record: SessionRecord) -> bytes:
        """Raises EncodeError naming the value that cannot be encoded."""
        return self.encode_split(record)[0]

    def encode_split(self, record: SessionRecord) -> tuple[bytes, int]:
        """The record encoded, and where its data starts in that (for :meth:`decode_data`).

        Raises EncodeError naming the value that cannot be encoded.
        """
        head = self._head(record)
        return head + self.dump(record.data) + self._end, len(head)

    def _head(self, r: SessionRecord) -> bytes:
        """The array's opening and every field before the data: the values :meth:`dump`
        writes, by msgspec when it can (text beyond printable ASCII as it is, not escaped,
        and a float's exponent without a plus sign or leading zero: the same bytes for
        every record the manager makes of ASCII client strings)."""
        id_, user, version, created, seen, expires, client, fp, _ = r
        if (
            # a finite float, as every time the manager makes: x - x is NaN for inf and NaN
            type(created) is float
            and type(seen) is float
            and type(expires) is float
            and created - created == seen - seen == expires - expires == 0.0
            and type(version) is int
            and type(id_) is str
            and (user is None or type(user) is str)
            and type(client) is ClientInfo
            and type(client[0]) is str
            and type(client[1]) is str
            and (fp is None or type(fp) is str)
        ):
            try:
                head = _fast_encode([1, id_, user, version, created, seen, expires, 0, client, fp])
            except ValueError:  # a lone surrogate: escaped as the json module does
                pass
            else:
                return head[:-1] + b","
        return self.dump(_fields(r)[:10])[:-1] + b","

    def data_start(self, payload: bytes, record: SessionRecord) -> int:
        """Where the data of ``payload`` starts, given that it decodes to ``record``; -1
        when ``payload`` was not written by this codec the way it writes ``record`` now
        (then only :meth:`decode` reads it)."""
        try:
            head = self._head(record)
        except EncodeError:
            return -1
        if payload.startswith(head) and payload.endswith(self._end):
            return len(head)
        return -1

    def decode_data(self, payload: bytes, start: int) -> dict[str, Any]:
        """The data of a record whose data starts at ``start`` (:meth:`encode_split`,
        :meth:`data_start`); raises DecodeError when it is not a dict."""
        if not payload.endswith(self._end):
            raise DecodeError(f"stored session of {len(payload)} bytes is not a JSON array")
        data = self.load(payload[start : len(payload) - len(self._end)])
        if type(data) is not dict:
            raise DecodeError(f"session data is a {type(data).__name__}, not a dict")
        return data

    def decode(self, payload: bytes) -> SessionRecord:
        """Raises DecodeError when ``payload`` is not a record of this codec."""
        f = self.load(payload)
        try:
            if type(f) is not list or len(f) != 11 or f[0] != 1:
                raise ValueError("not a version 1 array of 11 fields")
            client, data, user, fingerprint = f[8], f[10], f[2], f[9]
            if type(data) is not dict:
                raise TypeError(f"session data is a {type(data).__name__}, not a dict")
            if not (
                type(f[1]) is str
                and (user is None or type(user) is str)
                and (fingerprint is None or type(fingerprint) is str)
            ):
                raise TypeError("id, user id or fingerprint is not a str")
            return SessionRecord(
                f[1],
                user,
                int(f[3]),
                float(f[4]),
                float(f[5]),
                float(f[6]),
                ClientInfo(str(client[0]), str(client[1])),
                fingerprint,
                data,
            )
        except (ValueError, TypeError, IndexError, KeyError) as exc:
            raise DecodeError(
                f"stored session of {len(payload)} bytes is not a {self.name} session record: {exc}"
            ) from exc


class _MsgpackCodec(RecordCodec):
    name = "msgpack"
    _end = b""

    def __init__(self) -> None:
        self._local = threading.local()  # a Packer per thread: packb makes one per call

    def dump(self, value: Any) -> bytes:
        try:
            packer = self._local.packer
        except AttributeError:
            packer = self._local.packer = msgpack.Packer()
        try:
            out: bytes = packer.pack(value)
            return out
        except (TypeError, ValueError, OverflowError) as exc:
            packer.reset()  # it may hold a part of the value
            raise EncodeError(f"session data must be msgpack data: {exc}") from exc

    def load(self, payload: bytes) -> Any:
        try:
            # msgpack keeps a map's int keys: let them come back as they were saved
            return msgpack.unpackb(payload, strict_map_key=False)
        except (ValueError, TypeError) as exc:  # msgpack.ExtraData, FormatError, StackError
            raise DecodeError(f"{len(payload)} bytes are not msgpack: {exc}") from exc

    def decode_data(self, payload: bytes, start: int) -> dict[str, Any]:
        try:
            data = _unpackb(payload[start:], strict_map_key=False)
        except (ValueError, TypeError) as exc:
            raise DecodeError(f"session data is not msgpack: {exc}") from exc
        if type(data) is not dict:
            raise DecodeError(f"session data is a {type(data).__name__}, not a dict")
        return data

    def _head(self, r: SessionRecord) -> bytes:
        # the first ten fields as an array of ten (0x9a), relabelled an array of eleven
        id_, user, version, created, seen, expires, client, fp, _ = r
        head = [1, id_, user, version, created, seen, expires, 0, list(client), fp]
        return b"\x9b" + self.dump(head)[1:]


#: a record's fields before its data (``record[:8]``): what a store keeps decoded
Head = tuple[Any, ...]


_new_record = tuple_new(SessionRecord, 9)  # SessionRecord(...) without its Python __new__


def with_data(head: Head, data: dict[str, Any]) -> SessionRecord:
    """The record of ``head`` with ``data``."""
    return _new_record(SessionRecord, (*head, data))


def _fields(r: SessionRecord) -> list[Any]:
    # field 7 is kept free (0) so a later layout can add one without a new array length
    return [
        1,
        r.id,
        r.user_id,
        r.version,
        r.created_at,
        r.last_seen,
        r.expires_at,
        0,
        list(r.client),
        r.fingerprint,
        r.data,
    ]


CODECS: dict[str, RecordCodec] = {"json": RecordCodec(), "msgpack": _MsgpackCodec()}


def user_tag(user_id: str, secret: bytes) -> str:
    """Four hex digits shared by every session id of ``user_id``, keyed with ``secret``.

    Redis hashes a session and its user's index to one Cluster slot by it. Keyed, so
    that nobody without the secret can tell from ids whose they are, or link them.
    """
    return hashlib.blake2b(user_id.encode(), digest_size=2, key=secret).hexdigest()


def new_session_id(tag: str | None = None) -> str:
    """A fresh id: 256 random bits from :mod:`secrets`, after ``tag`` and a dot if given."""
    token = secrets.token_urlsafe(32)
    return token if tag is None else f"{tag}.{token}"


def store_key(session_id: str) -> str:
    """The key a store keeps the session ``session_id`` under: the id's user tag (if any),
    a dot, then the SHA-256 of the id in hex.

    Not a credential: a digest cannot be turned back into the id, and it never
    has an id's shape, so the manager refuses it as a cookie before asking the
    store. The tag stays in front, where the Redis store finds it.
    """
    digest = hashlib.sha256(session_id.encode()).hexdigest()
    tag, dot, _ = session_id.partition(".")
    return f"{tag}.{digest}" if dot else digest


class SessionStore(Protocol):
    """Where sessions live. Methods block; all are thread-safe.

    A store names a session by its :func:`store_key` (``SessionRecord.id``,
    and every ``session_id`` argument): the manager hashes the id the client
    holds, so a store never sees it.

    Every method raises :class:`SessionStoreUnavailable` when the store
    cannot be reached, never a client library's exception.
    """

    #: True when compare-and-set holds across every instance (a real conflict is
    #: detected wherever it happens); False for replicated stores, which detect it
    #: within one instance and resolve it between instances by last writer wins.
    linearizable: ClassVar[bool]

    def load(self, session_id: str) -> SessionRecord | None:
        """The live record, or None when it is missing, deleted or expired.

        Raises DecodeError when the stored bytes are not a record.
        """
        ...

    def save(self, record: SessionRecord) -> None:
        """Store ``record`` if the stored version is ``record.version - 1`` (a missing,
        deleted or expired session counts as 0; the manager never reuses an id).

        Raises SessionConflict (with the version found) otherwise, EncodeError
        when the data cannot be encoded; nothing is written then. After
        SessionStoreUnavailable the write may still have been stored (the
        reply was lost): a later save from the old version then conflicts.
        """
        ...

    def delete(self, session_id: str) -> bool:
        """Remove the session and its index entry; True if it existed. Idempotent."""
        ...

    def user_tag(self, user_id: str) -> str | None:
        """What a new session id of ``user_id`` starts with, or None for nothing: a store
        that keeps a user's sessions together by it (Redis) keys it with a secret it
        keeps, so that an id does not tell whose it is."""
        ...

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        """The live sessions of ``user_id``, oldest first (undecodable ones skipped)."""
        ...

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        """Delete every session of ``user_id`` except ``keep``; return how many."""
        ...

    def close(self) -> None:
        """Release connections and files; idempotent."""
        ...


_MISSING: Any = object()  # a key that was not there
_UNKNOWN: Any = object()  # a key mutated in place: its value before is not known


class Session(MutableMapping[str, Any]):
    """A session as the application uses it: a dict of its data plus its metadata.

    Assigning or deleting a key marks it changed; the manager's save writes
    only when something changed (or the idle deadline needs moving), and on a
    conflict merges by the keys changed. A value mutated in place
    (``session["cart"].append(x)``) is not seen: assign it again, or call
    :meth:`mark_changed`. Not thread-safe: one request uses one Session.
    """

    __slots__ = (
        "_data",
        "_original",
        "client",
        "created_at",
        "ended",
        "expires_at",
        "fingerprint",
        "id",
        "last_seen",
        "store_key",
        "transient",
        "user_id",
        "version",
    )

    def __init__(self, record: SessionRecord, session_id: str, *, transient: bool = False) -> None:
        self.id = session_id  #: the id the client holds: a credential, never logged or stored
        (
            self.store_key,  # :func:`store_key` of the id: what the store holds
            self.user_id,
            self.version,  # 0 until first stored
            self.created_at,
            self.last_seen,
            self.expires_at,
            self.client,
            self.fingerprint,
            self._data,
        ) = record
        self._original: dict[str, Any] = {}  # changed key -> its value before the change
        self.ended = False  #: logged out, rotated away or found gone: never saved again
        self.transient = transient  #: made while the store was down (fail-open): not stored

    @property
    def is_new(self) -> bool:
        """True until the session is first stored."""
        return self.version == 0

    @property
    def modified(self) -> bool:
        return bool(self._original)

    def mark_changed(self, key: str) -> None:
        """Declare that the value of ``key`` was mutated in place.

        Its value before is not known, so on a conflict this request's value of
        ``key`` is written over a change another request made to that same key
        (changes to other keys are merged as usual). Assign the key a new value
        instead to have such a conflict detected.
        """
        self._original.setdefault(key, _UNKNOWN)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._original:
            self._original[key] = self._data.get(key, _MISSING)
        self._data[key] = value

    def __delitem__(self, key: str) -> None:
        value = self._data.pop(key)
        self._original.setdefault(key, value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """A shallow copy of the data."""
        return dict(self._data)

    def __repr__(self) -> str:
        # never show the id: it is a credential
        return (
            f"Session(user_id={self.user_id!r}, version={self.version}, "
            f"keys={sorted(self._data)!r})"
        )

    def record(self, **changes: Any) -> SessionRecord:
        """This session as a store record, with ``changes`` applied."""
        record = SessionRecord(
            self.store_key,
            self.user_id,
            self.version,
            self.created_at,
            self.last_seen,
            self.expires_at,
            self.client,
            self.fingerprint,
            self._data,
        )
        return record._replace(**changes) if changes else record
