"""Sticky routing: consistent hashing moves about 1/N of sessions, dead instances fail over."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

import pytest

from polybus.errors import ConfigurationError
from polybus.sessions import SessionManager, SessionStore
from polybus.sessions.sticky import HashRing, NoLiveInstance, StickyRouter, ring_hash
from polybus.testing.sessions import open_session_store, store_case, wait_until

__all__ = ["open_session_store", "store_case"]  # fixtures of the session store suite

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


def test_v7_sessions_of_a_dead_instance_keep_their_data_on_the_next_one(
    open_session_store: Callable[..., SessionStore],
) -> None:
    """Failover with a central (memory, native, Redis) or replicated (Kafka, RabbitMQ)
    store: the session continues on the next instance with its user and data, under the
    same id (nothing re-issued, nothing adopted)."""
    names = ["app-0", "app-1", "app-2"]
    instances = {name: SessionManager(open_session_store()) for name in names}
    router = StickyRouter(names)
    ids = []
    for i in range(30):
        manager = instances[router.route(f"new-{i}")]
        session = manager.login(manager.load(None), f"user-{i}")
        session["cart"] = [i]
        assert manager.save(session)
        ids.append(session.id)
    victim = router.route(ids[0])
    del instances[victim]  # the instance dies (its store connection is closed after the test)
    router.mark_dead(victim)
    moved = 0
    for i, sid in enumerate(ids):
        owners = list(router.ring.preference(sid))
        expected = owners[1] if owners[0] == victim else owners[0]
        assert router.route(sid) == expected, "a session went elsewhere than its next instance"
        moved += owners[0] == victim
        manager = instances[router.route(sid)]

        def arrived(manager: SessionManager = manager, sid: str = sid, i: int = i) -> bool:
            session = manager.load(sid)
            return session.get("cart") == [i]  # a replicated store may need a moment

        wait_until(arrived, f"session {i} on the instance it failed over to")
        session = manager.load(sid)
        assert (session.is_new, session.user_id) == (False, f"user-{i}")
    assert moved > 0
