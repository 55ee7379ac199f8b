"""Sessions in Redis: one key per session and a sorted-set index per user, on redis-py.

URLs: ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``...?cluster=true``
(Redis Cluster), and ``redis+sentinel://[:pass@]host:port[,host:port]/service[/db]``
(the master a Sentinel set names; failovers are followed). Options: ``codec``,
``prefix`` (default ``polybus:sessions``), and redis-py's own URL options
(``socket_timeout``, ...). :class:`RedisStore` also wraps any existing
``redis.Redis`` (a Sentinel's ``master_for(...)`` too) or ``RedisCluster``.

Keys. A user's session id starts with the user's tag (:func:`~polybus.sessions.base.user_tag`,
keyed with a secret kept in Redis under ``<prefix>:tag-secret``), which is the Cluster
hash tag of both the session and its user's index, so one Lua script updates them
atomically on one node:

- ``<prefix>:{<tag>}:s:<id>``: the session, ``<version>:<record>``, expiring (PXAT) at the
  record's ``expires_at``: Redis itself forgets an expired session;
- ``<prefix>:{<tag>}:u:<user_id>``: sorted set of the user's session ids, each scored at or
  past its session's expiry (ms); expired members are dropped when the user's next session
  is created, deleted ones by the next listing;
- ``<prefix>:s:{<id>}``: an anonymous session (it has no index).

A save is one ``EVALSHA`` that compares the stored version and writes the
session and, when due, the index entry; a load is one ``GET``, which decodes
only the session's data when the fields stored before it are byte for byte
the ones this store last saved or read (it keeps them decoded, for the last
4096 sessions). Every redis-py error is raised as :class:`SessionStoreUnavailable`.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, ClassVar, TypeVar, cast

import redis
import redis.cluster
import redis.connection
import redis.sentinel
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ...adapters._support.redis import client_options, open_client
from ...errors import ConnectionLost, DecodeError
from ..base import (
    CODECS,
    Head,
    RecordCodec,
    SessionConflict,
    SessionRecord,
    SessionStoreUnavailable,
    user_tag,
    with_data,
)
from . import check_codec

__all__ = ["RedisStore", "from_url"]

# KEYS: session [, index]; ARGV: value ("<version>:<record>"), expire-at ms [, index-until ms]
# Returns the version found when it is not the one the value follows; else -1, or with an
# index the negated score of the session's entry there. The session's id, the index member,
# ends the session's key. An entry's score (and the index's own expiry) is kept at or past
# its session's expiry, moved ahead by a whole idle window at a time, so most saves only
# read it (and a store that has seen the score sends no index at all until it is due).
# TIME is the server's (scripts replicate their effects, so it may come before a write).
_SAVE = """
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then v = tonumber(string.match(cur, '^(%d+):')) end
if v ~= tonumber(string.match(ARGV[1], '^(%d+):')) - 1 then return v end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
if not KEYS[2] then return -1 end
local id = string.match(KEYS[1], ':s:([^:]*)$')
local score = tonumber(redis.call('ZSCORE', KEYS[2], id))
if not score or score < tonumber(ARGV[2]) then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if v == 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
  score = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[2], score, id)
  if redis.call('PTTL', KEYS[2]) < score - now then
    redis.call('PEXPIREAT', KEYS[2], score)
  end
end
return -score
"""

# KEYS: index; ARGV: session key prefix of this tag, id to keep ('' for none)
_DELETE_USER = """
local n = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id ~= ARGV[2] then
    n = n + redis.call('DEL', ARGV[1] .. id)
    redis.call('ZREM', KEYS[1], id)
  end
end
return n
"""

_OPTIONS = {"codec", "prefix"}
_MEMO = 4096  # sessions a store's memos keep (then they start over)
_T = TypeVar("_T")


def _remember(memo: dict[str, _T], session_id: str, value: _T) -> None:
    """Note what a store saw of a session, in a memo of at most _MEMO sessions."""
    if len(memo) >= _MEMO:
        memo.clear()  # start over: what is forgotten costs a decode or an index update
    memo[session_id] = value


def _unavailable(exc: Exception) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(f"Redis session store unavailable: {type(exc).__name__}: {exc}")


class RedisStore:
    """A :class:`~polybus.sessions.base.SessionStore` in Redis; see the module docstring."""

    linearizable: ClassVar[bool] = True

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        *,
        codec: str = "json",
        prefix: str = "polybus:sessions",
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.codec: RecordCodec = CODECS[check_codec(codec)]
        self.prefix = prefix
        self._owns_client = owns_client
        self._save = client.register_script(_SAVE)
        # session id -> (its stored value's bytes before the data, those fields decoded):
        # a load of a version this instance saved or loaded before decodes only the data
        self._heads: dict[str, tuple[bytes, Head]] = {}
        self._indexed: dict[str, int] = {}  # session id -> its index entry's score seen
        self._delete_user = client.register_script(_DELETE_USER)
        self._tag_secret: bytes | None = None

    def _run(self, script: Script, keys: list[str], args: list[bytes | int | str]) -> Any:
        """EVALSHA, loading the script first if the server lost it (a restart, a failover).

        Called directly rather than through ``Script.__call__``: a save makes this call."""
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return script(keys=keys, args=args)

    def _key(self, session_id: str) -> str:
        tag, dot, _ = session_id.partition(".")
        if dot:
            return f"{self.prefix}:{{{tag}}}:s:{session_id}"
        return f"{self.prefix}:s:{{{session_id}}}"

    def _index(self, session_id: str, user_id: str) -> str:
        return f"{self.prefix}:{{{session_id.partition('.')[0]}}}:u:{user_id}"

    def load(self, session_id: str) -> SessionRecord | None:
        try:
            value = self.client.get(self._key(session_id))
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc
        if value is None:
            return None
        value = cast(bytes, value)
        known = self._heads.get(session_id)
        if known is not None and value.startswith(known[0]):
            record = with_data(known[1], self.codec.decode_data(value, len(known[0])))
        else:
            body = value.partition(b":")[2]
            record = self.codec.decode(body)
            start = self.codec.data_start(body, record)
            if start >= 0:
                before_data = value[: len(value) - len(body) + start]
                _remember(self._heads, session_id, (before_data, record[:8]))
        if record.expires_at <= time.time() or record.id != session_id:
            return None
        return record

    def save(self, record: SessionRecord) -> None:
        payload, start = self.codec.encode_split(record)
        value = b"%d:%s" % (record.version, payload)
        expire_ms = int(record.expires_at * 1000)
        sid = record.id
        keys = [self._key(sid)]
        args: list[bytes | int | str] = [value, expire_ms]
        # The index is sent unless this store saw its entry scored past this expiry: an
        # entry's score only grows, and it is removed only with its session or once past
        # (when the session, which expires no later, is gone too). A lost write (a
        # failover) shows as a conflict, which forgets what was seen.
        if record.user_id is not None and "." in sid and self._indexed.get(sid, 0) < expire_ms:
            keys.append(self._index(sid, record.user_id))
            # the entry is good for one more idle window past this expiry
            args.append(expire_ms + max(0, int((record.expires_at - record.last_seen) * 1000)))
        try:
            found = int(self._run(self._save, keys, args))
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc
        if found >= 0:
            self._heads.pop(sid, None)
            self._indexed.pop(sid, None)
            raise SessionConflict.stale(sid, expected=record.version - 1, current=found)
        if found < -1:
            _remember(self._indexed, sid, -found)
        _remember(self._heads, sid, (value[: len(value) - len(payload) + start], record[:8]))

    def delete(self, session_id: str) -> bool:
        self._heads.pop(session_id, None)
        self._indexed.pop(session_id, None)
        try:
            return bool(self.client.delete(self._key(session_id)))
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc

    def user_tag(self, user_id: str) -> str:
        """The user's tag, keyed with a secret this Redis keeps (``<prefix>:tag-secret``,
        made once by whichever instance needs it first), so every instance agrees."""
        if self._tag_secret is None:
            key = f"{self.prefix}:tag-secret"
            try:
                self.client.set(key, secrets.token_bytes(32), nx=True)
                self._tag_secret = cast(bytes, self.client.get(key))
            except redis.RedisError as exc:
                raise _unavailable(exc) from exc
        return user_tag(user_id, self._tag_secret)

    def _user_index(self, user_id: str) -> tuple[str, str]:
        """The user's index key and the key prefix of the user's sessions."""
        tag = self.user_tag(user_id)
        return f"{self.prefix}:{{{tag}}}:u:{user_id}", f"{self.prefix}:{{{tag}}}:s:"

    def user_sessions(self, user_id: str) -> list[SessionRecord]:
        index, prefix = self._user_index(user_id)
        try:
            ids = [i.decode() for i in cast(list[bytes], self.client.zrange(index, 0, -1))]
            if not ids:
                return []
            values = cast(list[bytes | None], self.client.mget([prefix + i for i in ids]))
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc
        out: list[SessionRecord] = []
        gone = []
        now = time.time()
        for sid, value in zip(ids, values, strict=True):
            if value is None:
                gone.append(sid)
                continue
            try:
                record = self.codec.decode(value.partition(b":")[2])
            except DecodeError:  # not listed; it expires by itself
                continue
            if record.user_id == user_id and record.expires_at > now:
                out.append(record)
        if gone:
            try:
                self.client.zrem(index, *gone)
            except redis.RedisError as exc:
                raise _unavailable(exc) from exc
        out.sort(key=lambda r: r.created_at)
        return out

    def delete_user(self, user_id: str, *, keep: str | None = None) -> int:
        index, prefix = self._user_index(user_id)
        try:
            return int(self._run(self._delete_user, [index], [prefix, keep or ""]))
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def from_url(url: str, **options: Any) -> RedisStore:
    """Connect lazily (no I/O here) to the Redis, Cluster or Sentinel master the URL names."""
    parsed = client_options(url, _OPTIONS)
    # Fail fast when Redis is down (one retry: a pooled connection may be stale).
    settings: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 1),
        "socket_connect_timeout": 2.0,
        "socket_timeout": 2.0,
    }
    try:
        client = open_client(parsed, check=False, **settings)
    except ConnectionLost as exc:  # a Cluster client asks for the slots at once
        raise SessionStoreUnavailable(f"Redis session store unavailable: {exc}") from exc
    given = {name: parsed.text(name, "") for name in _OPTIONS if parsed.given(name)}
    return RedisStore(client, owns_client=True, **{**given, **options})
