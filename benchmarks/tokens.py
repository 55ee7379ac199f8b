"""Session tokens: verify and issue speed on one core, the cost of the revocation check,
and how fast a revocation reaches another instance on each backend.

CPU figures run in this process pinned to one core and count calls per second
of the thread's CPU time. Each figure is the best of ``--rounds`` rounds of
``--count`` calls, the variants interleaved round by round; the overheads are
the median of the per-round ratios. The revocation list holds
10,000 revoked token ids and 1,000 logged-out users while it is measured.
PyJWT's ``jwt.decode`` of an equivalent token is shown for comparison when it
is installed.

Propagation: two instances (two buses, two :class:`SharedRevocations`) on one
backend; instance A revokes a token ``--revocations`` times, 20 ms apart, and
B checks it in a loop; the delay is from A's ``revoke`` call to B refusing it.

    python benchmarks/tokens.py [--count 20000] [--rounds 25] [--backends memory,native,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import polybus
from polybus.sessions.tokens import (
    Ed25519Key,
    HMACKey,
    Keyring,
    Revocations,
    SharedRevocations,
    TokenRevoked,
    Tokens,
)
from polybus.testing import servers

ISSUER, AUDIENCE = "https://auth.example", "api"
CLAIMS = {"role": "editor", "tenant": "acme"}

BACKENDS: dict[str, tuple[Callable[[], str], Callable[[], str | None]]] = {
    "memory": (lambda: f"memory://{uuid.uuid4().hex}", lambda: None),
    "native": (lambda: f"native://{tempfile.mkdtemp(prefix='polybus-tokens-')}", lambda: None),
    "kafka": (lambda: f"kafka://{servers.kafka_bootstrap()}", servers.kafka_unavailable),
    "rabbitmq": (servers.rabbitmq_url, servers.rabbitmq_unavailable),
    "redis": (servers.redis_url, servers.redis_unavailable),
}


def rate(fn: Callable[[], object], count: int) -> float:
    """Calls per second of this thread's CPU time: what one core does, whatever else
    the machine runs meanwhile (wall-clock rates on a shared machine swing by 30 %)."""
    started = time.thread_time()
    for _ in range(count):
        fn()
    return count / (time.thread_time() - started)


def filled(revocations: Revocations) -> Revocations:
    exp = time.time() + 600
    for i in range(10_000):
        revocations.revoke_token(f"revoked-{i}", exp)
    for i in range(1_000):
        revocations.revoke_subject(f"gone-{i}")
    return revocations


def cpu(count: int, rounds: int) -> dict[str, float]:
    hs = Keyring(HMACKey.generate("hs-1"))
    ed = Keyring(Ed25519Key.generate("ed-1"))
    plain = Tokens(hs, issuer=ISSUER, audience=AUDIENCE)
    revoking = Tokens(hs, issuer=ISSUER, audience=AUDIENCE, revocations=filled(Revocations()))
    eddsa = Tokens(ed, issuer=ISSUER, audience=AUDIENCE)
    token, ed_token = plain.issue("user-42", CLAIMS), eddsa.issue("user-42", CLAIMS)
    bus = polybus.connect(f"memory://{uuid.uuid4().hex}")
    shared = filled(SharedRevocations(bus, poll=0.1).start())
    shared_tokens = Tokens(hs, issuer=ISSUER, audience=AUDIENCE, revocations=shared)
    cases: dict[str, tuple[Callable[[], object], int]] = {
        "HS256 verify": (lambda: plain.verify(token), count),
        "HS256 verify + revocation check": (lambda: revoking.verify(token), count),
        "HS256 verify + shared revocations": (lambda: shared_tokens.verify(token), count),
        "HS256 issue": (lambda: plain.issue("user-42", CLAIMS), count // 2),
        "EdDSA verify": (lambda: eddsa.verify(ed_token), count // 10),
        "EdDSA issue": (lambda: eddsa.issue("user-42", CLAIMS), count // 10),
    }
    try:
        import jwt  # PyJWT, for comparison only

        secret = hs.signing.secret  # type: ignore[attr-defined]
        now = int(time.time())
        pyjwt_token = jwt.encode(
            {
                **CLAIMS,
                "iss": ISSUER,
                "aud": AUDIENCE,
                "sub": "user-42",
                "iat": now,
                "exp": now + 900,
                "jti": uuid.uuid4().hex,
            },
            secret,
            algorithm="HS256",
            headers={"kid": "hs-1"},
        )
        cases["PyJWT HS256 decode (comparison)"] = (
            lambda: jwt.decode(
                pyjwt_token, secret, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER
            ),
            count // 4,
        )
    except ImportError:
        print("(PyJWT not installed: no comparison row)")
    best: dict[str, float] = dict.fromkeys(cases, 0.0)
    ratios: dict[str, list[float]] = {"local": [], "shared": []}
    for _ in range(rounds):
        round_rates = {name: rate(fn, n) for name, (fn, n) in cases.items()}
        for name, value in round_rates.items():
            best[name] = max(best[name], value)
        base = round_rates["HS256 verify"]
        ratios["local"].append(round_rates["HS256 verify + revocation check"] / base)
        ratios["shared"].append(round_rates["HS256 verify + shared revocations"] / base)
    shared.close()
    bus.close()
    for kind, values in ratios.items():
        best[f"revocation check overhead ({kind}), % median"] = 100 * (
            1 - statistics.median(values)
        )
    return best


def propagation(url: str, revocations: int) -> list[float]:
    topic = f"bench-revocations-{uuid.uuid4().hex[:8]}"
    keys = Keyring(HMACKey.generate("k"))
    with polybus.connect(url) as bus_a, polybus.connect(url) as bus_b:
        a = SharedRevocations(bus_a, topic=topic, poll=0.05).start()
        b = SharedRevocations(bus_b, topic=topic, poll=0.05).start()
        issuer = Tokens(keys, issuer=ISSUER, audience=AUDIENCE, revocations=a)
        delays = []
        try:
            for _ in range(revocations):
                claims = issuer.verify(issuer.issue("user-1"))
                started = time.perf_counter()
                issuer.revoke(claims)
                deadline = started + 30
                while True:
                    try:
                        b.check(claims["jti"], claims["sub"], claims["iat"])
                    except TokenRevoked:
                        break
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"revocation did not reach the other instance on {url}")
                    time.sleep(0.0002)
                delays.append(time.perf_counter() - started)
                time.sleep(0.02)
        finally:
            a.close()
            b.close()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--revocations", type=int, default=50)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[-1]})
    print(f"one core (CPU time), best of {args.rounds} rounds of {args.count:,} calls")
    for name, value in cpu(args.count, args.rounds).items():
        unit = "" if name.startswith("revocation") else "/s"
        print(f"  {name:<50} {value:>12,.1f}{unit}")

    print(f"\nrevocation reaching another instance ({args.revocations} revocations)")
    for name in args.backends.split(","):
        url, unavailable = BACKENDS[name]
        reason = unavailable()
        if reason:
            print(f"  {name:<10} skipped: {reason}")
            continue
        delays = sorted(d * 1000 for d in propagation(url(), args.revocations))
        p99 = delays[min(len(delays) - 1, round(0.99 * (len(delays) - 1)))]
        print(
            f"  {name:<10} p50 {statistics.median(delays):7.1f} ms   p99 {p99:7.1f} ms   "
            f"max {delays[-1]:7.1f} ms"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
