"""Submission evaluation queue: an HTTP endpoint enqueues, competing judges run programs.

* The endpoint, a process with a standard-library HTTP server, takes
  ``POST /submissions`` and answers 202 with the submission's id at once: it
  publishes the submission to ``submissions`` and never waits for a judge.
* Judges, N processes in one durable group (``judges``), compete for submissions.
  Each runs one program at a time in a child Python process, with the problem's
  input and a 1 s CPU time limit, and publishes its verdict (accepted, wrong answer,
  time limit exceeded, runtime error) to ``verdicts``.
* The endpoint reads ``verdicts`` in a durable group of its own and serves them:
  ``GET /submissions/<id>``.
* This process is the load. A load generator thread posts a burst over HTTP as fast
  as the endpoint answers; once the queue has drained, a trickle (idle). It prints
  the queue depth (published minus judged) over time, and the POST latency in both
  phases. It reads ``verdicts`` in a group of its own (``audit``) and checks that
  every submission got exactly one verdict, the right one, and that the endpoint
  serves it (exit status 0); then it stops the services with SIGTERM.

    python -m examples.judge_queue [--url URL] [--burst N] [--idle N] [--judges N]
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import polybus

from .. import _support
from . import endpoint, judge
from .client import Client, LoadGenerator, Posted, percentile
from .problems import Verdict, workload

MODULE = "examples.judge_queue"
PARTITIONS = 6  # more than judges, so every judge gets some on partitioned backends
IDLE_INTERVAL_S = 0.05  # between the POSTs of the idle phase: judges keep up with it
SAMPLE_EVERY_S = 0.1  # between readings of the queue depth
DEADLINE_S = 60.0  # for the whole run; a stuck run ends FAILED by then
START_S = 30.0  # for the endpoint to listen
STOP_S = 15.0  # for the services to stop after SIGTERM, before they are killed
DRAIN_S = 0.5  # after the last verdict, watch this long for a second one
TIMELINE_ROWS = 16


class Depth:
    """Reads the endpoint's counters; the queue depth is published minus judged."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.phase = "starting"
        self.load: LoadGenerator | None = None
        self.started = time.monotonic()
        self.samples: list[tuple[float, int, int]] = []  #: (seconds, published, judged)
        self.published = self.judged = 0

    def follow(self, phase: str, load: LoadGenerator) -> None:
        self.phase, self.load = phase, load
        self.started, self.samples = time.monotonic(), []

    def sample(self) -> None:
        stats = self._client.get("/stats")
        self.published, self.judged = stats["published"], stats["judged"]
        self.samples.append((time.monotonic() - self.started, self.published, self.judged))

    def line(self) -> str:
        posted = "" if self.load is None else f"posted {len(self.load.posted)}  "
        return (
            f"{self.phase}: {posted}published {self.published}  judged {self.judged}  "
            f"depth {self.published - self.judged}"
        )


def drive(depth: Depth, load: LoadGenerator, deadline: float) -> float:
    """Run ``load`` and follow the depth until all of it is posted and judged; return
    how long that took."""
    depth.sample()
    load.start()
    while not (load.finished and depth.judged >= depth.published):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the queue did not drain in time ({depth.line()})")
        time.sleep(SAMPLE_EVERY_S)
        depth.sample()
    load.join(max(0.0, deadline - time.monotonic()))
    return time.monotonic() - depth.started


def print_timeline(samples: list[tuple[float, int, int]]) -> None:
    """The depth at evenly spaced moments, as a bar chart."""
    step = max(SAMPLE_EVERY_S, samples[-1][0] / (TIMELINE_ROWS - 1))
    peak = max(1, max(published - judged for _, published, judged in samples))
    print("      s  published  judged  depth")
    moment, shown = 0.0, []
    for sample in samples:
        if sample[0] >= moment:
            shown.append(sample)
            moment = sample[0] + step
    if shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    for seconds, published, judged in shown:
        bar = "#" * round(40 * (published - judged) / peak)
        print(f"  {seconds:5.1f}  {published:9}  {judged:6}  {published - judged:5}  {bar}")


def latency_row(name: str, posted: list[Posted]) -> str:
    ms = [p.seconds * 1000 for p in posted]
    return (
        f"  {name:5}  p50 {percentile(ms, 50):6.2f} ms  p99 {percentile(ms, 99):6.2f} ms"
        f"  max {max(ms):6.2f} ms  ({len(ms)} POSTs)"
    )


def audit(
    bus: polybus.Bus, topic: str, ids: set[str], deadline: float
) -> dict[str, dict[str, dict[str, Any]]]:
    """Every verdict on ``topic``, per submission id and per message id (a redelivered
    copy of one verdict has its id), read in the group ``audit``."""
    verdicts: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    with bus.subscribe(topic, "audit") as sub:
        quiet_until = None
        while quiet_until is None or time.monotonic() < quiet_until:
            if time.monotonic() > deadline:
                break
            for d in sub.fetch(500, timeout=0.1):
                verdicts[d.value["id"]][d.message.id] = d.value
                d.ack()
            if quiet_until is None and ids <= verdicts.keys():
                quiet_until = time.monotonic() + DRAIN_S
    return verdicts


def check(
    posted: list[Posted], verdicts: dict[str, dict[str, dict[str, Any]]], client: Client
) -> list[str]:
    """What breaks the invariant: a submission with no verdict or more than one, a
    wrong verdict, a verdict the endpoint does not serve, a verdict of nothing posted."""
    problems = []
    ids = {p.id for p in posted}
    never = [p.id for p in posted if not verdicts.get(p.id)]
    if never:
        problems.append(f"{len(never)} submissions never judged, e.g. {never[0]}")
    twice = [i for i in ids if len(verdicts.get(i, ())) > 1]
    if twice:
        several = sorted(v["verdict"] for v in verdicts[twice[0]].values())
        problems.append(f"{len(twice)} judged more than once, e.g. {twice[0]}: {several}")
    strangers = verdicts.keys() - ids
    if strangers:
        problems.append(f"{len(strangers)} verdicts of submissions never posted")
    wrong, unserved = [], []
    for p in posted:
        if len(verdicts.get(p.id, ())) != 1:
            continue
        (verdict,) = verdicts[p.id].values()
        if verdict["verdict"] != p.sample.expected:
            got, want = verdict["verdict"], p.sample.expected
            wrong.append(f"{p.id} ({p.sample.problem}): {got}, not {want}")
        served = client.get(f"/submissions/{p.id}")
        if served["status"] != "judged" or served["verdict"] != verdict["verdict"]:
            unserved.append(f"{p.id} served as {served}")
    if wrong:
        problems.append(f"{len(wrong)} wrong verdicts, e.g. {wrong[0]}")
    if unserved:
        problems.append(f"{len(unserved)} verdicts not served, e.g. {unserved[0]}")
    return problems


def stop(services: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM every service, kill those still running after ``STOP_S``; exit statuses."""
    for service in services:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_S
    codes = []
    for service in services:
        try:
            codes.append(service.wait(max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            service.kill()
            codes.append(service.wait())
    return codes


def wait_for_port(port_file: Path, endpoint: subprocess.Popen[bytes]) -> int:
    _support.wait_until(
        lambda: port_file.exists() or endpoint.poll() is not None, START_S, "the endpoint's start"
    )
    if not port_file.exists():
        raise OSError(f"the endpoint exited with status {endpoint.returncode}")
    return int(port_file.read_text())


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--endpoint":
        endpoint.serve(*sys.argv[2:5])
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--judge":
        judge.serve(*sys.argv[2:5])
        return 0
    args = _support.parse(__doc__, argv, burst=(200, 40), idle=(20, 10), judges=(3, 3))
    _support.check_url(args.url)
    submissions, verdicts = _support.topic(args, "submissions"), _support.topic(args, "verdicts")
    deadline = time.monotonic() + DEADLINE_S
    problems: list[str] = []
    posted: list[Posted] = []
    with polybus.connect(args.url) as bus, tempfile.TemporaryDirectory() as scratch:
        # the groups exist before the first submission: none is lost while a service starts
        bus.declare(submissions, partitions=PARTITIONS, groups=["judges"])
        bus.declare(verdicts, groups=["endpoint", "audit"])
        port_file = Path(scratch, "port")
        services = [
            _support.spawn(MODULE, "--endpoint", args.url, args.namespace, str(port_file)),
            *(
                _support.spawn(MODULE, "--judge", f"judge-{n}", args.url, args.namespace)
                for n in range(1, args.judges + 1)
            ),
        ]
        client = None
        try:
            port = wait_for_port(port_file, services[0])
            client = Client(port)
            depth = Depth(client)
            print(
                f"endpoint on http://127.0.0.1:{port}, {args.url.split('://')[0]}; "
                f"{args.judges} judges in the durable group 'judges'"
            )
            burst = LoadGenerator(port, workload(args.burst, seed=1))
            idle = LoadGenerator(port, workload(args.idle, seed=2), IDLE_INTERVAL_S)
            with _support.progress(depth.line):
                depth.follow("burst", burst)
                drained = drive(depth, burst, deadline)
            print(f"burst of {args.burst} POSTs from one client, as fast as the endpoint answers;")
            print(f"queue depth (published - judged) until it drained, {drained:.1f} s:")
            print_timeline(depth.samples)
            with _support.progress(depth.line):
                depth.follow("idle", idle)
                drive(depth, idle, deadline)
            print(f"idle: {args.idle} POSTs, one every {IDLE_INTERVAL_S * 1000:.0f} ms")
            print("POST latency (until the 202):")
            print(latency_row("burst", burst.posted))
            print(latency_row("idle", idle.posted))
            posted = burst.posted + idle.posted
            seen = audit(bus, verdicts, {p.id for p in posted}, deadline)
            tally = Counter(v["verdict"] for copies in seen.values() for v in copies.values())
            judges = Counter(v["judge"] for copies in seen.values() for v in copies.values())
            print("verdicts:", ", ".join(f"{tally[v]} {v}" for v in Verdict))
            print("judged by:", ", ".join(f"{j} {n}" for j, n in sorted(judges.items())))
            problems += check(posted, seen, client)
        except (OSError, http.client.HTTPException, polybus.PolybusError) as exc:
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                client.close()
            codes = stop(services)
    if any(codes):
        problems.append(f"service exit statuses {codes}")
    return _support.verdict(
        problems,
        f"all {len(posted)} submissions got exactly one verdict, the right one, "
        "served by GET /submissions/<id>",
    )


if __name__ == "__main__":
    sys.exit(main())
