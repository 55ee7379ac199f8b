"""How long a new bus waits for its broker, and the check that one answers at all."""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from ...errors import BrokerUnreachable

__all__ = ["CONNECT_TIMEOUT", "ensure_reachable"]

CONNECT_TIMEOUT = 2.0  #: seconds a new bus waits for its broker to answer at all


def ensure_reachable(server: str, addresses: Sequence[tuple[str, int]], timeout: float) -> None:
    """Return once one of ``addresses`` accepts a TCP connection, trying again until
    ``timeout`` seconds have passed (a broker may be starting); then raise
    BrokerUnreachable naming every address and why it failed, so that a wrong address
    or a stopped broker is said at once rather than after a reconnect timeout."""
    deadline = time.monotonic() + timeout
    why: dict[tuple[str, int], str] = {}
    while True:
        for host, port in addresses:
            left = deadline - time.monotonic()
            try:
                with socket.create_connection((host, port), timeout=max(0.05, left)):
                    return
            except OSError as exc:
                why[(host, port)] = exc.strerror or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    failures = "; ".join(f"{host}:{port}: {reason}" for (host, port), reason in why.items())
    raise BrokerUnreachable(
        f"no {server} answers at {failures} (tried for {timeout:g} s): is it running, "
        "and is that its address? (URL option connect_timeout=<seconds> waits longer)"
    )
