"""Video pipeline: upload, transcode, compress, store, publish; a stage killed, each video once.

* This process is the uploader: it publishes each video to ``uploads`` (4
  partitions, the video id as key). Four stages follow (:mod:`.stages`), each a
  durable group with worker processes of its own and its own concurrency:
  transcode (1 process, 4 threads), compress (the slow stage: 2 processes of 3
  threads), store (1 process, 2 threads) and publish (1 process, 1 thread).
* Some videos fail their first transcode tries and are retried with back-off
  through the group's retry topic; a few always fail and, after their fourth
  try, go to the dead-letter topic ``uploads.transcode.dlq``.
* Once a third of the videos are compressed, one compress process is killed
  with SIGKILL and a new one started, as a supervisor would. What it had fetched
  and not committed goes to the group again, so the videos it had already passed
  on reach the later stages twice (at-least-once).
* The publish stage puts each video in the catalog (:mod:`.catalog`), which is
  idempotent by video id and counts the duplicate deliveries it absorbed.
* This process follows every stage (a ``progress`` group on each stage's output
  topic and on the dead letters) and checks that every good video was published
  exactly once and every always-failing one dead-lettered: none lost, none both.

    python -m examples.video_pipeline [--url URL] [--videos N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import polybus
from polybus import Message
from polybus.patterns.dlq import DeadLetter, dead_letter_topic

from .. import _support
from .catalog import Catalog, Duplicate
from .stages import OUTPUTS, STAGES, TRANSCODE_RETRY, catalog_path, declare

VICTIM = "compress"  # the stage one of whose processes is killed
READY_S = 20.0  # for every stage process to subscribe
DEADLINE_S = 20.0  # for every video to be published or dead-lettered, plus:
DEADLINE_PER_VIDEO_S = 0.1
DRAIN_S = 0.5  # after the last video, watch this long for late copies
STOP_S = 10.0  # for the stage processes to stop on SIGTERM
SLACK_S = 20.0  # for the rest (connecting, declaring, closing) before the watchdog ends it


def plan(count: int) -> list[dict[str, Any]]:
    """The videos to upload. ``flaky``: how many transcode tries fail before one works;
    ``corrupt``: every try fails. Fixed by a seed, so each run uploads the same."""
    rng = random.Random(2024)
    corrupt = set(rng.sample(range(count), min(count, max(2, count // 12))))
    return [
        {
            "id": f"vid-{n:04d}",
            "title": f"{rng.choice(('Sunset', 'Harbour', 'Keynote', 'Recipe', 'Match'))} #{n}",
            "seconds": rng.randrange(30, 600),
            "corrupt": n in corrupt,
            "flaky": 0 if n in corrupt else rng.choice((0, 0, 0, 0, 1, 2)),
        }
        for n in range(count)
    ]


class Fleet:
    """The stage processes. Whatever happens, :meth:`stop` ends every one started."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self._argv = ("--url", args.url, "--namespace", args.namespace, "--workdir", str(workdir))
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, stage: str) -> subprocess.Popen[bytes]:
        proc = _support.spawn("examples.video_pipeline.stages", stage, *self._argv)
        self.running.append((stage, proc))
        return proc

    def kill(self, stage: str) -> subprocess.Popen[bytes]:
        """SIGKILL the first running process of ``stage``: no stop, no commit, no goodbye."""
        entry = next(e for e in self.running if e[0] == stage)
        entry[1].kill()
        entry[1].wait(STOP_S)
        self.running.remove(entry)
        return entry[1]

    def check(self) -> None:
        """Raise RuntimeError if a process ended by itself (none should)."""
        ended = [(s, p) for s, p in self.running if p.poll() is not None]
        if ended:
            said = "; ".join(f"{s}[{p.pid}] with status {p.returncode}" for s, p in ended)
            raise RuntimeError(f"stage processes ended by themselves: {said}")

    def stop(self) -> list[str]:
        """SIGTERM every process, SIGKILL those still there after STOP_S; the problems.
        Each process is stopped once, whichever thread calls first."""
        running, self.running = self.running, []
        return _support.stop(((f"{stage}[{p.pid}]", p) for stage, p in running), STOP_S)


class Watcher:
    """What this process sees of the pipeline: the videos on each stage's output topic and
    in the dead letters (read by a ``progress`` group of its own), and the catalog."""

    def __init__(self, bus: polybus.Bus, args: argparse.Namespace, catalog: Catalog) -> None:
        self.catalog = catalog
        self.subs = {
            stage: bus.subscribe(_support.topic(args, topic), "progress")
            for stage, topic in OUTPUTS.items()
        }
        self.subs["dead"] = bus.subscribe(dead_letter_topic(uploads(args), "transcode"), "progress")
        self.done: dict[str, set[str]] = {stage: set() for stage in OUTPUTS}  # video ids
        self.tries: dict[str, int] = {}  # video id -> the transcode try that worked
        self.dead: dict[str, DeadLetter] = {}
        self.feed: Counter[str] = Counter()  # video id -> its rows in the catalog's feed
        self.absorbed: list[Duplicate] = []
        self.killed_ms = 0  # when the VICTIM process was killed (epoch ms)

    def poll(self) -> None:
        for stage, sub in self.subs.items():
            for d in sub.fetch(500, timeout=0.02):
                video = d.value
                if stage == "dead":
                    self.dead[video["id"]] = DeadLetter.of(d)
                else:
                    self.done[stage].add(video["id"])
                if stage == "transcode":
                    self.tries.setdefault(video["id"], video["transcode_attempts"])
                d.ack()
        self.feed, self.absorbed = self.catalog.feed(), self.catalog.absorbed()

    def line(self, good: int, corrupt: int) -> str:
        return "  ".join(
            [f"{stage} {len(self.done[stage])}/{good}" for stage in OUTPUTS]
            + [f"publish {len(self.feed)}/{good}", f"dead-lettered {len(self.dead)}/{corrupt}"]
            + [f"duplicates absorbed {len(self.absorbed)}"]
        )

    def after_kill(self) -> int:
        """How many of the duplicates came once the VICTIM process was killed."""
        return sum(d.received_ms >= self.killed_ms > 0 for d in self.absorbed)

    def close(self) -> None:
        for sub in self.subs.values():
            sub.close()


def uploads(args: argparse.Namespace) -> str:
    return _support.topic(args, "uploads")


def say(line: str) -> None:
    """Print a line of its own, over the live progress line if there is one."""
    print(f"\r{line}\033[K" if sys.stdout.isatty() else line, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _support.parse(__doc__, argv, videos=(240, 36))
    # SIGTERM ends this process as ^C does, through the code that stops the stages
    signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(128 + signum))
    _support.check_url(args.url)
    workdir = Path(tempfile.mkdtemp(prefix="polybus-video-"))
    catalog = Catalog(catalog_path(workdir))
    fleet = Fleet(args, workdir)
    limit = READY_S + follow_limit(args.videos) + STOP_S + SLACK_S
    watchdog = threading.Timer(limit, give_up, (fleet, workdir, limit))
    watchdog.daemon = True
    watchdog.start()
    try:
        return run(args, workdir, catalog, fleet)
    finally:
        watchdog.cancel()
        catalog.close()
        shutil.rmtree(workdir, ignore_errors=True)


def give_up(fleet: Fleet, workdir: Path, limit: float) -> None:
    """End a run still going after ``limit`` seconds, its stages first. Each of the
    run's own waits has a deadline; this is for a broker that stops answering, which
    can hold each call for its reconnect timeout (30 s by default), one after another."""
    print(f"FAILED: the run did not end within {limit:g} s", flush=True)
    fleet.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    os._exit(1)


def run(args: argparse.Namespace, workdir: Path, catalog: Catalog, fleet: Fleet) -> int:
    videos = plan(args.videos)
    good = {v["id"] for v in videos if not v["corrupt"]}
    corrupt = {v["id"] for v in videos if v["corrupt"]}
    problems: list[str] = []
    with polybus.connect(args.url) as bus, ExitStack() as stack:
        # Every group exists before the first upload, so each gets every message.
        declare(bus, args)
        for topic in OUTPUTS.values():
            bus.declare(_support.topic(args, topic), groups=["progress"])
        bus.declare(dead_letter_topic(uploads(args), "transcode"), groups=["progress"])
        watcher = Watcher(bus, args, catalog)
        stack.callback(watcher.close)
        stack.callback(lambda: problems.extend(fleet.stop()))
        try:
            for stage in STAGES.values():
                for _ in range(stage.processes):
                    fleet.start(stage.name)

            def ready() -> bool:
                fleet.check()
                watcher.poll()  # meanwhile the progress groups join (a Kafka rebalance)
                return len(list(workdir.glob("ready.*"))) >= len(fleet.running)

            _support.wait_until(ready, READY_S, "every stage process subscribing")
            bus.publish_many(uploads(args), [Message(v, key=v["id"]) for v in videos])
            print(
                f"uploaded {len(videos)} videos on {args.url.split('://')[0]}: "
                f"{sum(v['flaky'] > 0 for v in videos)} will fail 1-2 transcode tries, "
                f"{len(corrupt)} are corrupt and fail every try"
            )
            with _support.progress(lambda: watcher.line(len(good), len(corrupt))):
                follow(watcher, fleet, good, corrupt)
        except (RuntimeError, TimeoutError) as exc:
            problems.append(str(exc))

    report(watcher)
    problems += check(good, corrupt, watcher, catalog.message_ids())
    return _support.verdict(
        problems,
        f"{len(good)} videos published exactly once, {len(corrupt)} dead-lettered, none lost; "
        f"the sink absorbed {len(watcher.absorbed)} duplicate deliveries "
        f"({watcher.after_kill()} after the kill)",
    )


def follow_limit(videos: int) -> float:
    """Seconds the pipeline gets to publish or dead-letter ``videos`` videos."""
    return DEADLINE_S + DEADLINE_PER_VIDEO_S * videos


def follow(watcher: Watcher, fleet: Fleet, good: set[str], corrupt: set[str]) -> None:
    """Follow the pipeline until every video is published or dead-lettered, and DRAIN_S
    more; kill a process of VICTIM once a third of the videos passed it, and start
    another. Raises TimeoutError past the deadline, RuntimeError if a process died."""
    finished_at = None
    timeout = follow_limit(len(good) + len(corrupt))
    deadline = time.monotonic() + timeout
    while finished_at is None or time.monotonic() < finished_at + DRAIN_S:
        watcher.poll()
        if not watcher.killed_ms and len(watcher.done[VICTIM]) >= len(good) // 3:
            victim = fleet.kill(VICTIM)
            watcher.killed_ms = time.time_ns() // 1_000_000
            fresh = fleet.start(VICTIM)
            say(
                f"SIGKILL {VICTIM}[{victim.pid}] at {len(watcher.done[VICTIM])}/{len(good)} "
                f"done; started {VICTIM}[{fresh.pid}] in its place"
            )
        if finished_at is None and good <= watcher.feed.keys() and corrupt <= watcher.dead.keys():
            finished_at = time.monotonic()
        fleet.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pipeline did not finish within {timeout:g} s")


def report(watcher: Watcher) -> None:
    """What the retries, the dead letters and the idempotent sink did."""
    retried = Counter(n for n in watcher.tries.values() if n > 1)
    print(
        "transcoded after failed tries: "
        + (", ".join(f"{n} videos at try {t}" for t, n in sorted(retried.items())) or "none")
    )
    for letter in watcher.dead.values():
        print(
            f"dead letter {letter.message.value['id']}: {letter.reason} after {letter.attempts} "
            f"tries, {letter.error_type.rsplit('.', 1)[-1]}: {letter.error}"
        )
    absorbed = watcher.absorbed
    copies = Counter(d.video_id for d in absorbed)
    print(
        f"publish absorbed {len(absorbed)} duplicate deliveries, {watcher.after_kill()} "
        "of them after the kill"
        + (f": {', '.join(f'{v} x{n}' for v, n in sorted(copies.items()))}" if copies else "")
    )


def check(
    good: set[str], corrupt: set[str], watcher: Watcher, published_from: dict[str, str]
) -> list[str]:
    """What breaks "every good video published exactly once, every corrupt one
    dead-lettered after its last try, none lost"."""
    feed, dead = watcher.feed, watcher.dead
    problems = []

    def some(ids: set[str] | list[str]) -> str:
        return f"{len(ids)} ({', '.join(sorted(ids)[:3])}{', ...' if len(ids) > 3 else ''})"

    if missing := good - feed.keys():
        problems.append(f"good videos never published: {some(missing)}")
    if twice := [v for v, n in feed.items() if n > 1]:
        problems.append(f"videos published more than once: {some(twice)}")
    if wrong := corrupt & feed.keys():
        problems.append(f"corrupt videos published: {some(wrong)}")
    if lost := corrupt - dead.keys():
        problems.append(f"corrupt videos not in the dead letters: {some(lost)}")
    if wrong := good & dead.keys():
        problems.append(f"good videos dead-lettered: {some(wrong)}")
    budget = TRANSCODE_RETRY.max_attempts
    if early := [v for v, d in dead.items() if (d.reason, d.attempts) != ("exhausted", budget)]:
        problems.append(f"dead-lettered before their {budget} tries: {some(early)}")
    # A copy the sink absorbed is a redelivery of the message it published (an output's
    # id derives from its input's), not another message about the same video.
    if strangers := [
        d.video_id for d in watcher.absorbed if published_from.get(d.video_id) != d.message_id
    ]:
        problems.append(f"duplicates with another message id: {some(strangers)}")
    return problems


if __name__ == "__main__":
    sys.exit(main())
