"""A judge: one member of the durable group ``judges`` on the submissions topic.

Each judge takes one submission at a time (``batch=1``, so the members of the group
share a burst instead of one of them fetching it all), runs the program in a child
Python process with the problem's input and a CPU time limit, and returns the
verdict as an ``Output`` to the verdicts topic, keyed by the submission id. The worker
publishes the verdict before it acks the submission, and the verdict's message id is
derived from the submission's, so a submission judged again after a judge died
yields a copy of the same verdict, never a second one.

Judges run untrusted, CPU-hungry programs, so they lower their own CPU priority
(and their children's): the endpoint and the broker on the same host keep answering
while the judges work through a backlog.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

from polybus import Delivery
from polybus.patterns.worker import App, Output, Worker

from .problems import PROBLEMS, Problem, Verdict

#: CPU seconds a program may use (whole seconds: RLIMIT_CPU's unit). CPU time, not wall
#: time, as judges count it: a busy machine slows a program down without using it up.
TIME_LIMIT_S = 1
WALL_LIMIT_S = 10.0  # for a program that waits instead of computing
NICENESS = 10
#: where a real judge would sandbox the program (no network, no files, a memory cap),
#: this only caps its CPU time; the kernel ends a child that passes it (SIGXCPU), even
#: one whose judge was killed
SANDBOX = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    f"resource.setrlimit(resource.RLIMIT_CPU, ({TIME_LIMIT_S}, {TIME_LIMIT_S + 1}))\n"
    "source = sys.argv.pop()\n"
    "exec(compile(source, '<submission>', 'exec'), {'__name__': '__main__'})\n"
)


def judge(problem: Problem, source: str) -> Verdict:
    """Run ``source`` on ``problem``'s input and say what it earned."""
    try:
        run = subprocess.run(
            [sys.executable, "-I", "-S", "-c", SANDBOX, source],
            input=problem.input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=WALL_LIMIT_S,
        )
    except subprocess.TimeoutExpired:  # run() has killed the child
        return Verdict.TIME_LIMIT_EXCEEDED
    if run.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # past the CPU limit
        return Verdict.TIME_LIMIT_EXCEEDED
    if run.returncode != 0:
        return Verdict.RUNTIME_ERROR
    if run.stdout.split() != problem.expected.split():
        return Verdict.WRONG_ANSWER
    return Verdict.ACCEPTED


def judge_url(url: str) -> str:
    """``url`` with RabbitMQ's prefetch lowered to 1: its default (1000) would let the
    first judge to subscribe take a whole burst while the others idle."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps") or "prefetch=" in parts.query:
        return url
    return parts._replace(query="&".join(filter(None, [parts.query, "prefetch=1"]))).geturl()


def serve(name: str, url: str, namespace: str) -> None:
    """Judge submissions as ``name`` until SIGTERM."""
    os.nice(NICENESS)
    app = App(judge_url(url))
    verdicts = f"{namespace}.verdicts"

    @app.consumer(f"{namespace}.submissions", group="judges", batch=1)
    def judge_submission(d: Delivery) -> Output:
        submission = d.value
        started = time.monotonic()
        verdict = judge(PROBLEMS[submission["problem"]], submission["source"])
        record = {
            "id": submission["id"],
            "problem": submission["problem"],
            "verdict": verdict,
            "judge": name,
            "ms": round((time.monotonic() - started) * 1000),
        }
        return Output(verdicts, record, key=submission["id"])

    Worker(app).run()
