"""What every example shares: its command line, its progress line and its verdict.

Each example runs with ``python -m examples.<name>`` from the checkout and takes:

* ``--url``: the backend (``native://`` in a fresh temporary directory by
  default; ``kafka://``, ``amqp://`` and ``redis://`` URLs work the same);
* ``--namespace``: a prefix for every topic, so runs on a shared broker never
  meet (a fresh one per run by default);
* ``--quick``: the small sizes the test suite runs with.

An example ends with one line starting ``OK:`` (exit status 0) or ``FAILED:``
(exit status 1) saying whether its invariant held.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import polybus
from polybus.errors import redact_url

CHECKOUT = Path(__file__).resolve().parent.parent


def parse(
    doc: str | None, argv: Sequence[str] | None = None, **sizes: tuple[int, int]
) -> argparse.Namespace:
    """The example's arguments: ``--url``, ``--namespace``, ``--quick`` and one
    ``--<size>`` per ``sizes`` entry (``name=(default, quick)``)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--url", help="backend URL (default: native:// in a temporary dir)")
    parser.add_argument(
        "--namespace", help="topic name prefix (default: a fresh one, so each run starts clean)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (as the tests run)")
    for name, (default, quick) in sizes.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            dest=name,
            help=f"(default {default}; {quick} with --quick)",
        )
    args = parser.parse_args(argv)
    for name, (default, quick) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    if args.url is None:
        directory = tempfile.mkdtemp(prefix="polybus-example-")
        atexit.register(shutil.rmtree, directory, True)
        args.url = f"native://{directory}"
    args.namespace = args.namespace or f"ex-{uuid.uuid4().hex[:8]}"
    return args


def check_url(url: str) -> None:
    """Exit with a one-line answer when the backend cannot be reached, not a traceback."""
    try:
        polybus.connect(url).close()
    except polybus.PolybusError as exc:
        sys.exit(f"FAILED: cannot use {redact_url(url)}: {exc}")


def topic(args: argparse.Namespace, name: str) -> str:
    """``name`` in this run's namespace."""
    return f"{args.namespace}.{name}"


def spawn(module: str, *arguments: str) -> subprocess.Popen[bytes]:
    """Start ``python -m <module> <arguments>`` (another service of the example)."""
    return subprocess.Popen([sys.executable, "-m", module, *arguments], cwd=CHECKOUT)


def stop(
    processes: Iterable[tuple[str, subprocess.Popen[bytes]]], timeout: float = 20.0
) -> list[str]:
    """SIGTERM every named process still running, as an orchestrator stops a service, and
    SIGKILL those still there after ``timeout``; the problems: one that ignored SIGTERM or
    exited with a non-zero status."""
    processes = list(processes)
    for _, process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    problems = []
    for name, process in processes:
        try:
            status = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            problems.append(f"{name} ignored SIGTERM for {timeout:g} s")
        else:
            if status:
                problems.append(f"{name} exited with status {status}")
    return problems


@contextmanager
def progress(line: Callable[[], str], every: float = 0.25) -> Iterator[None]:
    """Rewrite one status line from ``line()`` until the block ends, then end it."""
    stop = threading.Event()
    live = sys.stdout.isatty()

    def show() -> None:
        last = 0.0
        while not stop.wait(every):
            if live:
                print(f"\r{line()}\033[K", end="", flush=True)
            elif time.monotonic() - last >= 2.0:  # a log, not a terminal: now and then
                print(line(), flush=True)
                last = time.monotonic()

    thread = threading.Thread(target=show, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        print(f"\r{line()}\033[K" if live else line(), flush=True)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Return once ``condition()`` holds; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.05)


def verdict(problems: Sequence[str], success: str) -> int:
    """Print ``OK: success`` or ``FAILED: problems``; the process's exit status."""
    if problems:
        print(f"FAILED: {'; '.join(problems)}")
        return 1
    print(f"OK: {success}")
    return 0
