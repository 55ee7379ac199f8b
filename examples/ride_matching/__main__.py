"""Ride matching: a matcher group grows while it runs; its parallelism stops at the partitions.

* One topic, ``city``, with 4 partitions: drivers offering a ride and riders asking for
  one, keyed by zone (12 zones, 3 on each partition). Every zone always has 6 riders
  waiting (each answer brings the zone's next rider), so the group never runs short.
* One durable group, ``matchers``. Each member is a process (``matcher.py``) running an
  ``App`` whose handler books the nearest free driver of the rider's zone, one event at
  a time, and publishes the answer (a driver, or none) to ``matches``, keyed by zone.
* This process plays the city and reads ``matches``. It grows the group while the city
  runs: 1 member, then 2, 4 and 5, and prints per phase the matches per second, the
  p50 and p99 latency from request to answer, and the matches each member made.
* It checks that every request was answered exactly once (a copy delivered again must
  carry the same decision), that no driver's offer was booked twice, and, where the
  backend has ``KEY_ORDER``, that each zone's answers came in its riders' order. Then it
  stops the matchers with SIGTERM.

    python -m examples.ride_matching [--url URL] [--phase-ms MS]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polybus
from polybus import Capability, Subscriber

from .. import _support
from .city import WAITING, ZONES, City
from .matcher import GROUP, ROUTING_WAIT_S, Zones, started_flag

PARTITIONS = 4
MEMBERS = (1, 2, 4, 5)  # the group's size in each phase; the last one is past the partitions
CITY_GROUP = "city"  # the city's own group on ``matches``
JOIN_S = 30.0  # for a new matcher process to join the group
DRAIN_S = 30.0  # for the riders still waiting at the end to be answered
STOP_S = 15.0  # for a matcher to stop after SIGTERM before it is killed


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@dataclass
class Phase:
    """What the group answered while it had ``members`` members, counted from ``settled``
    (half-way: a member that joins takes a rebalance, and a new process a moment, to get
    going) to ``end``."""

    members: int
    start: float
    settled: float
    end: float = 0.0
    matched: int = 0
    unmatched: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    by_member: Counter[str] = field(default_factory=Counter)

    def add(self, answer: dict[str, Any], now: float, latency_s: float) -> None:
        if now < self.settled or self.end:
            return
        if answer["driver"] is None:
            self.unmatched += 1
        else:
            self.matched += 1
        self.latencies_ms.append(latency_s * 1000)
        self.by_member[answer["matcher"]] += 1

    @property
    def names(self) -> list[str]:
        return [f"m{n}" for n in range(1, self.members + 1)]

    def row(self) -> str:
        seconds = self.end - self.settled
        members = "  ".join(f"{name} {self.by_member[name]}" for name in self.names)
        return (
            f"{self.members:7d} {self.end - self.start:7.1f} {self.matched / seconds:9.0f}"
            f" {self.unmatched / seconds:11.0f} {percentile(self.latencies_ms, 0.5):7.0f}"
            f" {percentile(self.latencies_ms, 0.99):7.0f}   {members}"
        )


class Matchers:
    """The group's member processes: started a few at a time, stopped together."""

    def __init__(self, url: str, namespace: str, state_dir: Path) -> None:
        self._arguments = (url, namespace, str(state_dir))
        self._state_dir = state_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def grow_to(self, size: int) -> None:
        for n in range(len(self.processes) + 1, size + 1):
            name = f"m{n}"
            module = "examples.ride_matching.matcher"
            self.processes[name] = _support.spawn(module, name, *self._arguments)

    def joined(self) -> bool:
        """Whether every process has joined the group; raises if one has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"matcher {name} exited before the end of the run")
        return all(started_flag(self._state_dir, name).exists() for name in self.processes)

    def stop(self) -> list[str]:
        """SIGTERM every process, kill those still running after ``STOP_S``; the problems."""
        return _support.stop(((f"matcher {n}", p) for n, p in self.processes.items()), STOP_S)


class Dispatch:
    """This process's loop: read the answers, check them, publish what they bring."""

    def __init__(
        self, bus: polybus.Bus, topic: str, answers: Subscriber, city: City, phases: list[Phase]
    ) -> None:
        self.bus = bus
        self.topic = topic
        self.answers = answers
        self.city = city
        self.phases = phases

    def step(self) -> None:
        deliveries = self.answers.fetch(200, timeout=0.05)
        now = time.monotonic()
        events = []
        for delivery in deliveries:
            answer: dict[str, Any] = delivery.message.value
            brought = self.city.answered(answer)
            if brought is None:  # a copy, or an answer to nobody
                continue
            events += brought
            if self.phases:
                latency = now - self.city.sent[answer["request"]]
                self.phases[-1].add(answer, now, latency)
        if events:
            self.bus.publish_many(self.topic, events)
        self.answers.ack(deliveries)

    def until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Go on until ``condition()`` holds; TimeoutError naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{what} did not happen within {timeout:g} s")
            self.step()

    def progress(self) -> str:
        phase = self.phases[-1] if self.phases else None
        group = f"{phase.members} member(s)" if phase else "starting"
        city = self.city
        return (
            f"{group}: {city.matched} matched, {len(city.answers) - city.matched} no driver,"
            f" {city.waiting} waiting"
        )


def run_phases(dispatch: Dispatch, matchers: Matchers, phase_s: float) -> None:
    """Grow the group phase by phase, the city running all along; then let it drain."""
    city, phases = dispatch.city, dispatch.phases
    try:
        for size in MEMBERS:
            matchers.grow_to(size)
            dispatch.until(matchers.joined, JOIN_S, f"{size} matcher(s) joining the group")
            now = time.monotonic()
            if phases:
                phases[-1].end = now
            else:  # the first member is in: the riders come
                dispatch.bus.publish_many(dispatch.topic, city.first_riders())
            phases.append(phase := Phase(size, now, settled=now + phase_s / 2))
            dispatch.until(
                lambda: time.monotonic() >= phase.start + phase_s, phase_s + 1, "a phase"
            )
    finally:
        if phases and not phases[-1].end:
            phases[-1].end = time.monotonic()
    city.open = False
    dispatch.until(lambda: city.waiting == 0, DRAIN_S, "an answer for every rider")


def report(phases: list[Phase], key_order: bool, backend: str) -> None:
    phases = [phase for phase in phases if phase.end > phase.settled]  # cut short: nothing
    if not phases:
        return
    print("per phase; rates, latencies and counts over its last half, once the group settled:")
    print("members seconds matches/s no driver/s  p50 ms  p99 ms   matches by member")
    for phase in phases:
        print(phase.row())
    last = phases[-1]
    idle = [name for name in last.names if not last.by_member[name]]
    busy = f"{last.members - len(idle)} of {last.members} members matched"
    if key_order:
        why = f"a partition has one member at a time, so at most {PARTITIONS} can"
    else:
        why = f"{backend} has no KEY_ORDER: members share the partitions, so all can"
    print(f"last phase: {busy} ({', '.join(idle) or 'none'} idle); {why}")


def main(argv: list[str] | None = None) -> int:
    args = _support.parse(__doc__, argv, phase_ms=(5000, 1000))
    _support.check_url(args.url)
    topic, matches = _support.topic(args, "city"), _support.topic(args, "matches")
    backend = args.url.split("://")[0]
    city = City()
    problems: list[str] = []
    phases: list[Phase] = []
    with polybus.connect(args.url) as bus, tempfile.TemporaryDirectory() as state:
        key_order = Capability.KEY_ORDER in bus.capabilities
        Zones.create(Path(state), list(ZONES))
        # both groups declared before the first event: each gets every one
        bus.declare(topic, partitions=PARTITIONS, groups=[GROUP])
        bus.declare(matches, partitions=PARTITIONS, groups=[CITY_GROUP])
        fleet = city.fleet()
        receipts = bus.publish_many(topic, fleet)
        partition_of = {e.value["zone"]: r.partition for e, r in zip(fleet, receipts, strict=True)}
        print(
            f"ride matching on {backend}: {len(ZONES)} zones, {WAITING} riders waiting in each,"
            f" {ROUTING_WAIT_S * 1000:g} ms of routing per ride; zones by partition:",
            dict(sorted(Counter(partition_of.values()).items())),
        )
        matchers = Matchers(args.url, args.namespace, Path(state))
        try:
            with bus.subscribe(matches, CITY_GROUP) as answers:
                dispatch = Dispatch(bus, topic, answers, city, phases)
                with _support.progress(dispatch.progress):
                    try:
                        run_phases(dispatch, matchers, args.phase_ms / 1000)
                    except (TimeoutError, RuntimeError, polybus.PolybusError) as exc:
                        problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            problems += matchers.stop()
    report(phases, key_order, backend)
    problems += city.problems()
    if city.waiting:
        problems.append(f"{city.waiting} of {len(city.sent)} riders never answered")
    disorder = sorted(city.out_of_order)
    order = f"answers out of request order in {len(disorder)} of {len(ZONES)} zones"
    if key_order:
        if disorder:
            problems.append(f"{order} ({', '.join(disorder)})")
        order = "per-zone order held in every zone"
    else:
        order = f"per-zone order not checked on {backend} (no KEY_ORDER): {order}"
    answered = f"{len(city.answers)} riders answered once each"
    counts = f"{city.matched} matched, {len(city.answers) - city.matched} with no driver"
    if city.copies:
        counts += f"; {city.copies} copies delivered again, each the same decision"
    return _support.verdict(problems, f"{answered} ({counts}), no offer booked twice; {order}")


if __name__ == "__main__":
    sys.exit(main())
