"""Sessions in Redis: one key per session and a sorted-set index per user, on redis-py.

URLs: ``redis://[user:pass@]host:port/db``, ``rediss://`` (TLS), ``...?cluster=true``
(Redis Cluster), and ``redis+sentinel://[:pass@]host:port[,host:port]/service[/db]``
(the master a Sentinel set names; failovers are followed). Options: ``codec``,
``prefix`` (default ``polybus:sessions``), and redis-py's own URL options
(``socket_timeout``, ...). :class:`RedisStore` also wraps any existing
``redis.Redis`` (a Sentinel's ``master_for(...)`` too) or ``RedisCluster``.

Keys. A user's session id starts with the user's tag (:func:`~polybus.sessions.base.user_tag`),
which is the Cluster hash tag of both the session and its user's index, so one
Lua script updates them atomically on one node:

- ``<prefix>:{<tag>}:s:<id>``: the session, ``<version>:<record>``, expiring (PXAT) at the
  record's ``expires_at``: Redis itself forgets an expired session;
- ``<prefix>:{<tag>}:u:<user_id>``: sorted set of the user's session ids, each scored at or
  past its session's expiry (ms); expired members are dropped when the user's next session
  is created, deleted ones by the next listing;
- ``<prefix>:s:{<id>}``: an anonymous session (it has no index).

A save is one ``EVALSHA`` that compares the stored version and writes the
session and the index entry; a load is one ``GET``. Every redis-py error is
raised as :class:`SessionStoreUnavailable`.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ...errors import ConfigurationError, DecodeError
from ..base import (
    CODECS,
    RecordCodec,
    SessionConflict,
    SessionRecord,
    SessionStoreUnavailable,
    user_tag,
)
from . import check_codec

__all__ = ["RedisStore", "from_url"]

# KEYS: session [, index]; ARGV: expected version, value, expire-at ms, id, now ms, index-until ms
# An index member's score (and the index's own expiry) is kept at or past its session's
# expiry, moved ahead by a whole idle window at a time, so most saves only read it.
_SAVE = """
local cur = redis.call('GET', KEYS[1])
local v = 0
if cur then v = tonumber(string.match(cur, '^(%d+):')) end
if v ~= tonumber(ARGV[1]) then return v end
redis.call('SET', KEYS[1], ARGV[2], 'PXAT', ARGV[3])
if KEYS[2] then
  local score = redis.call('ZSCORE', KEYS[2], ARGV[4])
  if not score or tonumber(score) < tonumber(ARGV[3]) then
    if v == 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[5]) end
    redis.call('ZADD', KEYS[2], ARGV[6], ARGV[4])
    if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[6]) - tonumber(ARGV[5]) then
      redis.call('PEXPIREAT', KEYS[2], ARGV[6])
    end
  end
end
return -1
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

_OPTIONS = {"codec", "prefix", "cluster"}


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
        self._delete_user = client.register_script(_DELETE_USER)

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
        record = self.codec.decode(cast(bytes, value).partition(b":")[2])
        if record.expires_at <= time.time() or record.id != session_id:
            return None
        return record

    def save(self, record: SessionRecord) -> None:
        value = b"%d:%s" % (record.version, self.codec.encode(record))
        expire_ms = int(record.expires_at * 1000)
        keys = [self._key(record.id)]
        if record.user_id is not None and "." in record.id:
            keys.append(self._index(record.id, record.user_id))
        now_ms = int(time.time() * 1000)
        # the index entry is good for one more idle window past this expiry
        until_ms = expire_ms + max(0, int((record.expires_at - record.last_seen) * 1000))
        args: list[bytes | int | str] = [
            record.version - 1,
            value,
            expire_ms,
            record.id,
            now_ms,
            until_ms,
        ]
        try:
            found = self._run(self._save, keys, args)
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc
        if found != -1:
            raise SessionConflict(
                f"session is at version {found}, not {record.version - 1}",
                session_id=record.id,
                current_version=int(found),
            )

    def delete(self, session_id: str) -> bool:
        try:
            return bool(self.client.delete(self._key(session_id)))
        except redis.RedisError as exc:
            raise _unavailable(exc) from exc

    def _user_index(self, user_id: str) -> tuple[str, str]:
        """The user's index key and the key prefix of the user's sessions."""
        tag = user_tag(user_id)
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


def _sentinel_client(url: str, client_options: dict[str, Any]) -> redis.Redis:
    parts = urlsplit(url)
    hosts = []
    for hostport in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = hostport.rpartition(":")
        if not host:
            host, port = port, "26379"
        try:
            hosts.append((host.strip("[]"), int(port)))
        except ValueError:
            raise ConfigurationError(f"bad Sentinel address {hostport!r} in {url!r}") from None
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ConfigurationError(
            f"{url!r} names no Sentinel service: use redis+sentinel://host:26379/mymaster[/db]"
        )
    db = int(path[1]) if len(path) > 1 else 0
    password = unquote(parts.password) if parts.password else None
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
        hosts, sentinel_kwargs={"socket_timeout": client_options.get("socket_timeout", 2.0)}
    )
    master = sentinel.master_for(  # type: ignore[no-untyped-call]
        path[0], db=db, password=password, **client_options
    )
    return cast(redis.Redis, master)


def from_url(url: str, **options: Any) -> RedisStore:
    """Connect lazily (no I/O here) to the Redis the URL names."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    theirs: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        (ours.__setitem__(name, value) if name in _OPTIONS else theirs.append((name, value)))
    # Fail fast when Redis is down (one retry: a pooled connection may be stale).
    client_options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 1),
        "socket_connect_timeout": 2.0,
        "socket_timeout": 2.0,
    }
    try:
        client: redis.Redis | redis.cluster.RedisCluster
        if parts.scheme == "redis+sentinel":
            client_options.update(dict(theirs))
            client = _sentinel_client(url, client_options)
        elif ours.pop("cluster", "false").lower() in ("1", "true", "yes", "on"):
            client_url = urlunsplit(parts._replace(query=urlencode(theirs)))
            client = redis.cluster.RedisCluster.from_url(client_url, **client_options)
        else:
            client_url = urlunsplit(parts._replace(query=urlencode(theirs)))
            client = redis.Redis.from_url(client_url, **client_options)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from exc
    except redis.RedisError as exc:  # a Cluster client asks for the slots at once
        raise _unavailable(exc) from exc
    ours.pop("cluster", None)
    return RedisStore(client, owns_client=True, **{**ours, **options})
