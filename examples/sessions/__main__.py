"""Sessions across instances: the four ways to keep a session, and the gateway pattern.

Three app instances behind a small sticky router (a consistent-hash ring, as a
load balancer keeps one), run once per strategy:

* **sticky**: each instance keeps its sessions in memory; routing alone brings
  a user back to the instance that has the session;
* **store**: every instance uses one session store on the ``--url`` backend,
  central on Redis and native, replicated into every instance on Kafka and
  RabbitMQ;
* **tokens**: no session is kept; the cookie is a signed token, and "log out
  everywhere" revokes through a topic every instance follows.

For each, users log in, one instance is killed (SIGKILL) mid-session, and the
run shows whether its users stay logged in; then one user logs out everywhere
and the run times how long until every instance refuses the old cookie.

The gateway: every instance is an edge that publishes orders carrying the
user's context, signed for that message (``UserContext``); a shipping service
that shares no session store verifies it before acting. A forged and an
expired context are dead-lettered, never shipped.

    python -m examples.sessions [--url URL] [--users N]
"""

from __future__ import annotations

import argparse
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import polybus
from polybus import Message
from polybus.patterns.dlq import DeadLetters
from polybus.sessions import HMACKey, Keyring, StickyRouter, Tokens, UserContext

from .. import _support

INSTANCES = ("app-1", "app-2", "app-3")
VICTIM = "app-2"
REVOCATION_DEADLINE_S = 10.0


@dataclass
class Outcome:
    strategy: str
    kept: int  # users of the killed instance still logged in after it died
    on_victim: int
    others_kept: bool  # every other user still logged in
    revocation_ms: float | None  # None: some instance still accepted the cookie
    buyers: list[str]  # the users whose orders the edge published (tokens run only)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, method: str, path: str, cookie: str = "") -> tuple[int, str, str]:
    """(status, body, the cookie set, if any) of one request to an instance."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    if cookie:
        request.add_header("Cookie", cookie)
    try:
        with urllib.request.urlopen(
            request, data=b"" if method == "POST" else None, timeout=10
        ) as r:
            set_cookie = r.headers.get("Set-Cookie", "")
            return r.status, r.read().decode(), set_cookie.split(";", 1)[0]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), ""


def run_strategy(args: argparse.Namespace, strategy: str, users: list[str], secret: str) -> Outcome:
    ports = {name: free_port() for name in INSTANCES}
    procs = {
        name: _support.spawn(
            "examples.sessions.instance",
            *("--name", name, "--strategy", strategy, "--url", args.url),
            *("--namespace", f"{args.namespace}.{strategy}", "--secret", secret),
            *("--port", str(ports[name])),
        )
        for name in INSTANCES
    }
    try:
        for name, port in ports.items():
            _support.wait_until(lambda p=port: healthy(p), 30, f"{name} answering")
        router = StickyRouter(INSTANCES)
        cookies = {}
        for user in users:  # a load balancer routes on the cookie; before it, on the user
            status, _, cookies[user] = call(
                ports[router.route(user)], "POST", f"/login?user={user}"
            )
            if status != 200 or not cookies[user]:
                raise RuntimeError(f"{user} could not log in: {status}")
        on_victim = [u for u in users if router.route(u) == VICTIM]
        procs[VICTIM].kill()
        procs[VICTIM].wait()
        router.mark_dead(VICTIM)
        still = {
            u for u in users if call(ports[router.route(u)], "GET", "/me", cookies[u])[0] == 200
        }
        kept = len(still & set(on_victim))
        others_kept = set(users) - set(on_victim) <= still
        # log out everywhere, then ask every live instance until each refuses the cookie
        user = [u for u in users if u not in on_victim][-1]
        live = [ports[n] for n in INSTANCES if n != VICTIM]
        status, _, _ = call(ports[router.route(user)], "POST", "/logout-everywhere", cookies[user])
        if status != 200:
            raise RuntimeError(f"logout everywhere answered {status}")
        start = time.monotonic()
        revocation_ms: float | None = None
        while time.monotonic() - start < REVOCATION_DEADLINE_S:
            if all(call(port, "GET", "/me", cookies[user])[0] == 401 for port in live):
                revocation_ms = (time.monotonic() - start) * 1000
                break
        ordered = buyers(users, on_victim) if strategy == "tokens" else []
        for u in ordered:  # the gateway: an edge publishes orders for its users
            call(ports[router.route(u)], "POST", "/orders", cookies[u])
        return Outcome(strategy, kept, len(on_victim), others_kept, revocation_ms, ordered)
    finally:
        _support.stop(procs.items(), 10)  # a WSGI server ends by SIGTERM: no status to check


def buyers(users: list[str], on_victim: list[str]) -> list[str]:
    """Three users still logged in on the tokens run (not the one who logged out)."""
    revoked = [u for u in users if u not in on_victim][-1]
    return [u for u in users if u != revoked][:3]


def healthy(port: int) -> bool:
    try:
        return call(port, "GET", "/health")[0] == 200
    except OSError:
        return False


def forged_and_expired(bus: polybus.Bus, orders: str, secret: bytes) -> None:
    """What an attacker and a replay would publish: a context signed with another key,
    and one signed an hour ago."""

    def context(key: bytes, clock_offset: float) -> UserContext:
        tokens = Tokens(
            Keyring(HMACKey("edge", key)),
            issuer="edge",
            audience="services",
            ttl=60,
            clock=lambda: time.time() - clock_offset,
        )
        return UserContext(tokens)

    bus.publish(
        orders, context(secrets.token_bytes(32), 0).attach(Message({"sku": "tv"}), "mallory")
    )
    bus.publish(orders, context(secret, 3600).attach(Message({"sku": "tv"}), "user-00"))


def main(argv: list[str] | None = None) -> int:
    args = _support.parse(__doc__, argv, users=(30, 9))
    _support.check_url(args.url)
    secret = secrets.token_bytes(32)
    users = [f"user-{n:02d}" for n in range(args.users)]
    orders, shipped = _support.topic(args, "tokens.orders"), _support.topic(args, "tokens.shipped")
    outcomes: list[Outcome] = []
    with polybus.connect(args.url) as bus:
        bus.declare(orders, groups=["shipping"])
        bus.declare(shipped, groups=["checker"])
        shipping = _support.spawn(
            "examples.sessions.shipping", args.url, f"{args.namespace}.tokens", secret.hex()
        )
        try:
            for strategy in ("sticky", "store", "tokens"):
                print(
                    f"{strategy}: {len(INSTANCES)} instances, {len(users)} users, killing {VICTIM}",
                    flush=True,
                )
                outcomes.append(run_strategy(args, strategy, users, secret.hex()))
            forged_and_expired(bus, orders, secret)
            with bus.subscribe(shipped, "checker") as sub:
                deadline = time.monotonic() + 30
                ships: list[dict[str, str]] = []
                while len(ships) < 3 and time.monotonic() < deadline:
                    for d in sub.fetch(10, timeout=0.2):
                        ships.append(d.message.value)
                        d.ack()
            with DeadLetters(bus, orders, "shipping", wait=0.2) as dead:
                _support.wait_until(lambda: len(dead.list()) >= 2, 30, "two dead letters")
                refused = sorted(letter.error.rpartition("refused: ")[2] for letter in dead.list())
        finally:
            problems = _support.stop([("the shipping service", shipping)])
    return report(outcomes, ships, refused, problems)


def report(
    outcomes: list[Outcome], ships: list[dict[str, str]], refused: list[str], problems: list[str]
) -> int:
    print(
        f"\n{'strategy':<9} {'killed instance: its users still logged in':<44} "
        "revocation reaches every instance"
    )
    for o in outcomes:
        reach = "never (deadline)" if o.revocation_ms is None else f"{o.revocation_ms:.0f} ms"
        print(f"{o.strategy:<9} {o.kept}/{o.on_victim:<42} {reach}")
        expected = 0 if o.strategy == "sticky" else o.on_victim
        if o.kept != expected:
            problems.append(f"{o.strategy}: {o.kept} of {o.on_victim} kept, expected {expected}")
        if not o.others_kept:
            problems.append(f"{o.strategy}: users of live instances were logged out")
        if o.revocation_ms is None:
            problems.append(f"{o.strategy}: an instance still accepted a revoked cookie")
    print(f"gateway: shipped for {sorted(s['user'] for s in ships)}; dead-lettered: {refused}")
    expected = outcomes[-1].buyers
    if sorted(s["user"] for s in ships) != expected:
        problems.append(f"shipped for {ships}, expected one order each for {expected}")
    if len(refused) != 2:
        problems.append(f"{len(refused)} orders dead-lettered, expected the forged and the expired")
    return _support.verdict(
        problems,
        "sticky sessions die with their instance, a shared store and tokens survive it; "
        "revocation reached every instance; only orders the edge signed were shipped",
    )


if __name__ == "__main__":
    sys.exit(main())
