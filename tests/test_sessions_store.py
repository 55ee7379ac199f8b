"""The session store conformance suite on every store, plus what only one store has:
Redis Cluster and Sentinel, and the native store surviving a crash."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import polybus
from polybus.errors import DecodeError
from polybus.sessions import SessionManager, SessionStoreUnavailable, open_store
from polybus.testing import servers
from polybus.testing.conformance import drain
from polybus.testing.plugin import require_server, with_options
from polybus.testing.sessions import *  # noqa: F403
from polybus.testing.sessions import record, wait_until

REDIS_SERVER = shutil.which("redis-server")
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None and os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="redis-server is not installed (Debian: apt-get install redis-server)",
)


def _redis_server(tmp: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    assert REDIS_SERVER is not None, "redis-server is not installed"
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: servers.reachable("127.0.0.1", port, 0.2), f"redis-server on {port}")
    return proc


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    """A private three-master Redis Cluster; yields a ``redis://...?cluster=true`` URL."""
    ports = [servers.free_port() for _ in range(3)]
    procs = [
        _redis_server(
            tmp_path / str(p),
            p,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{p}.conf",
            "--cluster-port",  # the default, port + 10000, may be past 65535
            str(servers.free_port()),
        )
        for p in ports
    ]
    try:
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )

        def ready() -> bool:
            info = subprocess.run(
                ["redis-cli", "-p", str(ports[0]), "cluster", "info"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout
            return "cluster_state:ok" in info

        wait_until(ready, "the cluster to agree on its slots")
        yield f"redis://127.0.0.1:{ports[0]}/0?cluster=true"
    finally:
        _stop_all(procs)


@needs_redis_server
@pytest.mark.slow
def test_redis_cluster_keeps_a_user_and_their_sessions_in_one_slot(redis_cluster: str) -> None:
    import redis.cluster

    store = open_store(redis_cluster)
    try:
        mine = [record(store, "alice", n=i) for i in range(3)]
        for rec in mine:
            store.save(rec)
        assert [r.id for r in store.user_sessions("alice")] == [r.id for r in mine]
        client = redis.cluster.RedisCluster.from_url(redis_cluster.replace("?cluster=true", ""))
        keys = set(client.scan_iter(match="polybus:sessions:*"))
        assert b"polybus:sessions:tag-secret" in keys  # the tags' secret, in a slot of its own
        slots = {client.keyslot(k) for k in keys - {b"polybus:sessions:tag-secret"}}
        client.close()
        assert len(slots) == 1  # three sessions and the index: one slot, one Lua script
        assert store.delete_user("alice", keep=mine[0].id) == 2
        assert store.load(mine[1].id) is None
        users = [record(store, f"user-{i}") for i in range(20)]  # other users spread over the nodes
        for rec in users:
            store.save(rec)
        assert all(store.load(r.id) == r for r in users)
    finally:
        store.close()


@needs_redis_server
@pytest.mark.slow
def test_redis_sentinel_follows_a_failover(tmp_path: Path) -> None:
    master_port, replica_port, sentinel_port = (servers.free_port() for _ in range(3))
    procs = [_redis_server(tmp_path / "master", master_port)]
    try:
        procs.append(
            _redis_server(
                tmp_path / "replica", replica_port, "--replicaof", "127.0.0.1", str(master_port)
            )
        )
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            textwrap.dedent(f"""\
            port {sentinel_port}
            bind 127.0.0.1
            sentinel monitor main 127.0.0.1 {master_port} 1
            sentinel down-after-milliseconds main 500
            sentinel failover-timeout main 5000
        """)
        )
        procs.append(
            subprocess.Popen(
                [REDIS_SERVER or "", str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_until(lambda: servers.reachable("127.0.0.1", sentinel_port, 0.2), "the sentinel")
        # redis-py's own options in the URL arrive typed (a str timeout would be a TypeError)
        manager = SessionManager(
            f"redis+sentinel://127.0.0.1:{sentinel_port}/main?socket_timeout=2&max_connections=50"
        )
        try:
            # a bus on the same URL reaches the master the Sentinel names
            with polybus.connect(f"redis+sentinel://127.0.0.1:{sentinel_port}/main") as bus:
                bus.publish("sentinel-topic", "through the sentinel")
                with bus.subscribe("sentinel-topic", "g", start="earliest") as sub:
                    assert [d.value for d in drain(sub, 1)] == ["through the sentinel"]
            session = manager.login(manager.load(None), "alice")
            session["step"] = 1
            assert manager.save(session)
            wait_until(
                lambda: (
                    subprocess.run(
                        ["redis-cli", "-p", str(replica_port), "dbsize"],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout.strip()
                    not in ("", "0")
                ),
                "the replica to copy the session",
            )
            procs[0].send_signal(signal.SIGKILL)  # the master dies
            procs[0].wait()

            def saved_after_failover() -> bool:
                try:
                    s = manager.load(session.id)
                    s["step"] = 2
                    return not s.is_new and manager.save(s)
                except SessionStoreUnavailable:
                    return False  # while no master is elected: a clear error, not a crash

            wait_until(saved_after_failover, "a save on the promoted replica", deadline=30)
            assert manager.load(session.id)["step"] == 2
        finally:
            manager.close()
    finally:
        _stop_all(procs)


_WRITER = """
import sys
from polybus.sessions import SessionManager
from polybus.sessions.stores import native
native._SEGMENT_BYTES = int(sys.argv[2])  # small segments: rolls and compactions all along
manager = SessionManager(sys.argv[1])
i = 0
while True:
    s = manager.login(manager.load(None), f"user-{i % 7}")
    s["n"] = i
    manager.save(s)
    print(s.id, i, flush=True)  # printed only once the save returned
    i += 1
"""


@pytest.mark.slow
@pytest.mark.parametrize("segment_bytes", [16 << 20, 8192], ids=["one-segment", "compacting"])
def test_native_sessions_survive_a_crash_mid_write(tmp_path: Path, segment_bytes: int) -> None:
    """Kill -9 a process saving sessions as fast as it can: every session whose save
    returned is there after reopening, with its data and its user index. With small
    segments the kill also falls inside rolls and compactions."""
    url = f"native://{tmp_path / 'log'}"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, url, str(segment_bytes)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while len(lines) < 300 and time.monotonic() < deadline:
        lines.append(proc.stdout.readline().decode())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    saved = [line.split() for line in lines if line.endswith("\n")]
    assert len(saved) >= 300
    with SessionManager(url) as manager:
        for sid, n in saved:
            session = manager.load(sid)
            assert not session.is_new, "a session whose save returned was lost"
            assert session["n"] == int(n)
        listed = sum(len(manager.sessions_of(f"user-{u}")) for u in range(7))
        assert listed >= len(saved)
    if segment_bytes == 8192:
        segments = list((tmp_path / "log" / "topics" / "sessions" / "0").glob("*.log"))
        assert len(segments) > 3, "too few segment rolls to test them"


def test_rabbitmq_without_streams_catches_up_from_a_snapshot() -> None:
    """history=false: no stream to replay, so a new instance asks the running ones."""
    require_server("rabbitmq", servers.rabbitmq_unavailable())
    topic = f"sessions-{uuid.uuid4().hex[:12]}"
    url = with_options(servers.rabbitmq_url(), topic=topic, history="false", snapshot_wait=0.3)
    first = open_store(url)
    try:
        assert not first.linearizable
        recs = [record(first, "alice", n=i) for i in range(3)]
        for rec in recs:
            first.save(rec)
        first.delete(recs[2].id)
        second = open_store(with_options(url, snapshot_wait=5))  # caught up when it returns
        try:
            assert second.load(recs[0].id) == recs[0]
            assert [r.id for r in second.user_sessions("alice")] == [recs[0].id, recs[1].id]
            second.save(recs[1]._replace(version=2, data={"n": 10}))
            wait_until(
                lambda: (r := first.load(recs[1].id)) is not None and r.data == {"n": 10},
                "the second instance's save to reach the first",
            )
        finally:
            second.close()
    finally:
        first.close()
        servers.rabbitmq_delete_topic(topic, ())


def test_rabbitmq_catches_up_from_the_stream_with_no_instance_running() -> None:
    """With streams, a new instance replays the changes from the stream: saves, a
    second version and a delete, written by an instance that is gone by then."""
    require_server("rabbitmq", servers.rabbitmq_unavailable())
    topic = f"sessions-{uuid.uuid4().hex[:12]}"
    url = with_options(servers.rabbitmq_url(), topic=topic)
    try:
        first = open_store(url)
        try:
            recs = [record(first, "alice", n=i) for i in range(3)]
            for rec in recs:
                first.save(rec)
            first.save(recs[1]._replace(version=2, data={"n": 10}))
            first.delete(recs[2].id)
        finally:
            first.close()
        second = open_store(url)  # caught up when it returns
        try:
            assert second.load(recs[0].id) == recs[0]
            assert second.load(recs[1].id) == recs[1]._replace(version=2, data={"n": 10})
            assert second.load(recs[2].id) is None
            assert [r.id for r in second.user_sessions("alice")] == [recs[0].id, recs[1].id]
        finally:
            second.close()
    finally:
        servers.rabbitmq_delete_topic(topic, ())


def test_kafka_store_deletes_what_expired_so_compaction_can_shrink_it() -> None:
    require_server("kafka", servers.kafka_unavailable())
    topic = f"sessions-{uuid.uuid4().hex[:12]}"
    writer = open_store(f"kafka://{servers.kafka_bootstrap()}?topic={topic}", sweep_interval=0.1)
    try:
        rec = record(writer, "alice", ttl=0.3, a=1)
        writer.save(rec)
        with polybus.connect(f"kafka://{servers.kafka_bootstrap()}") as bus:
            reader = bus.subscribe(topic, None, start="earliest")
            values: list[bytes | None] = []

            def deleted() -> bool:
                values.extend(
                    d.message.payload for d in reader.fetch(1, 0.1) if d.message.key == rec.id
                )
                return values[-1:] == [b""]

            wait_until(deleted, "a deletion of the expired session in the topic")
        assert len(values) == 2  # the save, then its deletion
        assert writer.load(rec.id) is None
    finally:
        writer.close()


_INCREMENTER = """
import sys
from polybus.sessions import SessionConflict, SessionManager
manager = SessionManager(sys.argv[1])
for _ in range(int(sys.argv[3])):
    while True:
        s = manager.load(sys.argv[2])
        assert not s.is_new, "the session was lost"
        s["count"] += 1
        try:
            assert manager.save(s)
            break
        except SessionConflict:
            continue  # another process came first: read again and redo
"""


@pytest.mark.slow
def test_native_compare_and_set_holds_between_processes(tmp_path: Path) -> None:
    """Processes incrementing one counter on one log directory lose no increment."""
    url = f"native://{tmp_path / 'log'}"
    with SessionManager(url) as manager:
        session = manager.load(None)
        session["count"] = 0
        assert manager.save(session)
    procs = [
        subprocess.Popen([sys.executable, "-c", _INCREMENTER, url, session.id, "100"])
        for _ in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    with SessionManager(url) as manager:
        assert manager.load(session.id)["count"] == 300


def _redis_store(prefix: str) -> Any:
    require_server("redis", servers.redis_unavailable())
    return open_store(with_options(servers.redis_url(), prefix=prefix))


def test_redis_load_reads_the_stored_bytes_whatever_it_saw_before() -> None:
    """A load decodes only the data when the fields stored before it are byte for byte the
    ones this store saw last; a value written over them by others is read as written."""
    import redis

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store, other = _redis_store(prefix), _redis_store(prefix)
    raw = redis.Redis.from_url(servers.redis_url())
    try:
        rec = record(store, "alice", n=1)
        store.save(rec)
        assert store.load(rec.id) == rec
        other.save(rec._replace(version=2, data={"n": 2}))  # another instance
        assert store.load(rec.id) == rec._replace(version=2, data={"n": 2})
        key = store._key(rec.id)  # type: ignore[attr-defined]
        value = raw.get(key)
        assert value is not None
        assert value.endswith(b'{"n":2}]')
        raw.set(key, value.replace(b'{"n":2}]', b'{"n":3}]'), keepttl=True)  # same fields
        loaded = store.load(rec.id)
        assert loaded is not None
        assert loaded.data == {"n": 3}
        raw.set(key, value.replace(b'{"n":2}]', b"[3]]"), keepttl=True)
        with pytest.raises(DecodeError):
            store.load(rec.id)
    finally:
        store.close()
        other.close()
        _redis_cleanup_prefix(raw, prefix)


def test_redis_index_entry_stays_at_or_past_its_sessions_expiry() -> None:
    """Saves leave the user's index out while its entry is known to reach past the new
    expiry, and the entry is always at or past the session's expiry."""
    import redis

    from polybus.sessions import handle_of

    prefix = f"test-{uuid.uuid4().hex[:12]}"
    store = _redis_store(prefix)
    raw = redis.Redis.from_url(servers.redis_url())
    keys_sent: list[int] = []
    run = store._run

    def counting(script: Any, keys: list[str], args: list[Any]) -> Any:
        keys_sent.append(len(keys))
        return run(script, keys, args)

    store._run = counting
    now = [time.time()]
    manager = SessionManager(store, idle_timeout=600, touch_interval=0, clock=lambda: now[0])
    try:
        session = manager.login(manager.load(None), "alice")
        key = session.store_key
        stored, index = store._key(key), store._index(key, "alice")
        for step in range(30):
            now[0] += 60  # an idle window is ten of these saves
            s = manager.load(session.id)
            s["n"] = step
            assert manager.save(s)
            score = raw.zscore(index, key)
            assert score is not None
            assert score >= raw.pexpiretime(stored)
        assert keys_sent.count(2) <= 5, keys_sent  # the index moved once per idle window
        assert keys_sent.count(1) >= 25, keys_sent
        assert [i.handle for i in manager.sessions_of("alice")] == [handle_of(session.id)]
        assert manager.logout_everywhere("alice") == 1
    finally:
        store.close()
        _redis_cleanup_prefix(raw, prefix)


def _redis_cleanup_prefix(client: Any, prefix: str) -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()
