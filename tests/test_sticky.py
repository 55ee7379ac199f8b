"""Sticky routing: consistent hashing moves about 1/N of sessions, dead instances fail over."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from polybus.errors import ConfigurationError
from polybus.sessions import SessionManager
from polybus.sessions.sticky import HashRing, NoLiveInstance, StickyRouter, ring_hash
from polybus.testing import servers
from polybus.testing.plugin import require_server

KEYS = [f"session-{i}" for i in range(20_000)]


def owners(ring: HashRing) -> dict[str, str]:
    return {key: ring.node_for(key) for key in KEYS}


@pytest.mark.parametrize("n", [3, 10])
def test_adding_one_of_n_instances_moves_about_one_nth_and_only_to_it(n: int) -> None:
    ring = HashRing(f"app-{i}" for i in range(n))
    before = owners(ring)
    ring.add("app-new")
    after = owners(ring)
    moved = [k for k in KEYS if before[k] != after[k]]
    fraction = len(moved) / len(KEYS)
    print(f"add 1 to {n}: {fraction:.3f} of sessions moved (ideal {1 / (n + 1):.3f})")
    assert 0.6 / (n + 1) < fraction < 1.4 / (n + 1)
    assert {after[k] for k in moved} == {"app-new"}  # nothing moves between old instances


@pytest.mark.parametrize("n", [3, 10])
def test_removing_one_of_n_instances_moves_exactly_its_sessions(n: int) -> None:
    ring = HashRing(f"app-{i}" for i in range(n))
    before = owners(ring)
    ring.remove("app-1")
    after = owners(ring)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "app-1"}
    fraction = len(moved) / len(KEYS)
    print(f"remove 1 of {n}: {fraction:.3f} of sessions moved (ideal {1 / n:.3f})")
    assert 0.6 / n < fraction < 1.4 / n


def test_load_is_balanced_by_virtual_nodes() -> None:
    counts = Counter(owners(HashRing(f"app-{i}" for i in range(10))).values())
    assert len(counts) == 10
    mean = len(KEYS) / 10
    assert max(counts.values()) < 1.35 * mean
    assert min(counts.values()) > 0.65 * mean


def test_the_ring_is_the_same_in_every_process_whatever_the_order() -> None:
    a = HashRing(["x", "y", "z"])
    b = HashRing(["z", "x"])
    b.add("y")
    assert owners(a) == owners(b)
    # a fixed value: BLAKE2b, not Python's per-process salted hash()
    assert ring_hash("session-1") == int.from_bytes(
        hashlib.blake2b(b"session-1", digest_size=8).digest(), "big"
    )


def test_a_dead_instance_sessions_go_to_the_next_live_one_and_come_back() -> None:
    router = StickyRouter([f"app-{i}" for i in range(5)])
    before = {k: router.route(k) for k in KEYS[:5000]}
    router.mark_dead("app-2")
    during = {k: router.route(k) for k in KEYS[:5000]}
    for key, node in before.items():
        if node == "app-2":
            preference = list(router.ring.preference(key))
            assert during[key] == preference[1]  # the next instance on the ring
        else:
            assert during[key] == node  # sessions of live instances never move
    assert "app-2" not in during.values()
    router.mark_alive("app-2")
    assert {k: router.route(k) for k in KEYS[:5000]} == before


def test_no_live_instance_is_a_clear_error() -> None:
    with pytest.raises(NoLiveInstance):
        StickyRouter().route("s")
    router = StickyRouter(["a", "b"])
    router.mark_dead("a")
    router.mark_dead("b")
    with pytest.raises(NoLiveInstance, match="all 2 instances"):
        router.route("s")
    with pytest.raises(ConfigurationError, match="not on the ring"):
        router.mark_dead("c")
    with pytest.raises(ConfigurationError):
        HashRing(vnodes=0)


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A session store that every instance shares."""
    name = f"sticky-{uuid.uuid4().hex[:8]}"
    if request.param == "memory":
        yield f"memory://{name}"
        return
    require_server("redis", servers.redis_unavailable())
    yield f"{servers.redis_url()}?prefix=polybus-test:{name}"


def test_v7_sessions_of_a_dead_instance_keep_their_data_on_the_next_one(store_url: str) -> None:
    """Failover with a shared store: the session continues elsewhere with its data, and
    its id is still the only credential (nothing is re-issued, nothing adopted)."""
    names = ["app-0", "app-1", "app-2"]
    instances = {name: SessionManager(store_url) for name in names}
    router = StickyRouter(names)
    try:
        ids = []
        for i in range(60):
            manager = instances[router.route(f"new-{i}")]
            session = manager.login(manager.load(None), f"user-{i}")
            session["cart"] = [i]
            assert manager.save(session)
            ids.append(session.id)
        victim = router.route(ids[0])
        instances.pop(victim).close()  # the instance dies
        router.mark_dead(victim)
        assert router.ring.node_for(ids[0]) == victim  # at least one session has to move
        for i, sid in enumerate(ids):
            node = router.route(sid)
            assert node != victim
            session = instances[node].load(sid)
            assert not session.is_new
            assert (session.user_id, session["cart"]) == (f"user-{i}", [i])
    finally:
        for i in range(60):
            next(iter(instances.values())).logout_everywhere(f"user-{i}")
        for manager in instances.values():
            manager.close()
