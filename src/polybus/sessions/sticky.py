"""Sticky routing: a consistent-hash ring that maps each session to one instance.

>>> router = StickyRouter(["app-1", "app-2", "app-3"])
>>> node = router.route("session-id-or-cookie-value")
>>> router.mark_dead(node)                  # its sessions go to the next live instance
>>> router.route("session-id-or-cookie-value") != node
True

Each instance owns ``vnodes`` points on a 64-bit ring (BLAKE2b of
``"name#i"``, the same in every process and on every machine); a key belongs
to the first point at or after its own hash. Adding or removing one of N
instances moves only the keys of the points it gains or loses, about 1/N of
them. A dead instance's keys go to the next live instance on the ring and come
back when it is marked alive; keys of live instances never move. Sessions keep
their data across such a move only if the instances share their store
(Redis, or a replicated one): routing decides where a request runs, the store
what it sees.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections.abc import Iterable, Iterator

from ..errors import ConfigurationError, NoLiveInstance

__all__ = ["HashRing", "NoLiveInstance", "StickyRouter", "ring_hash"]


def ring_hash(text: str) -> int:
    """The 64-bit ring position of ``text`` (stable across processes and versions)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring of named nodes with ``vnodes`` points each.

    Thread-safe: changes swap the whole ring, lookups never take a lock.
    """

    def __init__(self, nodes: Iterable[str] = (), *, vnodes: int = 160) -> None:
        if vnodes < 1:
            raise ConfigurationError("vnodes must be at least 1")
        self.vnodes = vnodes
        self._lock = threading.Lock()
        self._nodes: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> frozenset[str]:
        return self._nodes

    def add(self, node: str) -> None:
        """Put ``node`` on the ring; idempotent."""
        if not isinstance(node, str) or not node:
            raise ConfigurationError("a node name must be a non-empty string")
        with self._lock:
            if node not in self._nodes:
                self._rebuild(self._nodes | {node})

    def remove(self, node: str) -> None:
        """Take ``node`` off the ring; idempotent."""
        with self._lock:
            if node in self._nodes:
                self._rebuild(self._nodes - {node})

    def _rebuild(self, nodes: frozenset[str]) -> None:
        # Ties between two nodes' points (2^-64 odds) go to the smaller name, so every
        # process builds the same ring whatever order it learnt the nodes in.
        ring = sorted((ring_hash(f"{n}#{i}"), n) for n in nodes for i in range(self.vnodes))
        self._points, self._owners = [p for p, _ in ring], [n for _, n in ring]
        self._nodes = nodes

    def preference(self, key: str) -> Iterator[str]:
        """Every node once, in ring order from ``key``'s position: the owner first, then
        where its keys go if the owner is down."""
        points, owners = self._points, self._owners  # one consistent snapshot
        if not points:
            return
        start = bisect.bisect_left(points, ring_hash(key))
        seen: set[str] = set()
        total = len(self._nodes)
        for i in range(len(points)):
            node = owners[(start + i) % len(points)]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == total:
                    return

    def node_for(self, key: str) -> str:
        """The node that owns ``key``; NoLiveInstance on an empty ring."""
        points, owners = self._points, self._owners
        if not points:
            raise NoLiveInstance("the ring has no nodes")
        i = bisect.bisect_left(points, ring_hash(key))
        return owners[i if i < len(points) else 0]


class StickyRouter:
    """Routes session keys to live instances of a :class:`HashRing`.

    Mark an instance dead when a health check fails; its sessions go to the
    next live instance on the ring until it is marked alive again. ``route``
    never blocks and is thread-safe.
    """

    def __init__(self, nodes: Iterable[str] | HashRing = (), *, vnodes: int = 160) -> None:
        self.ring = nodes if isinstance(nodes, HashRing) else HashRing(nodes, vnodes=vnodes)
        self._dead: frozenset[str] = frozenset()

    def route(self, key: str) -> str:
        """The live instance for ``key`` (a session id, or the session cookie's value).

        Raises NoLiveInstance when no instance is live.
        """
        dead = self._dead
        if not dead:
            return self.ring.node_for(key)
        for node in self.ring.preference(key):
            if node not in dead:
                return node
        raise NoLiveInstance(f"all {len(self.ring.nodes)} instances are marked dead")

    def mark_dead(self, node: str) -> None:
        """Send ``node``'s sessions elsewhere until :meth:`mark_alive`; idempotent."""
        if node not in self.ring.nodes:
            raise ConfigurationError(f"{node!r} is not on the ring")
        self._dead = self._dead | {node}

    def mark_alive(self, node: str) -> None:
        """Route ``node``'s own sessions to it again; idempotent."""
        self._dead = self._dead - {node}

    @property
    def live(self) -> frozenset[str]:
        return self.ring.nodes - self._dead
