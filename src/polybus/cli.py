"""``polybus``: look inside a native log from the shell.

polybus topics native:///var/lib/app/bus
polybus groups native:///var/lib/app/bus orders
polybus tail   native:///var/lib/app/bus orders --partition 0 --offset 0 -n 10
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .adapters.native import NativeBackend
from .errors import PolybusError
from .log import Log
from .registry import open_backend


def _topics(log: Log, args: argparse.Namespace) -> None:
    print(f"{'topic':30} {'partition':>9} {'start':>12} {'end':>12}")
    for name in log.topics():
        for part in log.topic(name).partitions:
            print(f"{name:30} {part.index:>9} {part.start_offset:>12} {part.end_offset:>12}")


def _groups(log: Log, args: argparse.Namespace) -> None:
    print(f"{'group':30} {'partition':>9} {'lag':>12}")
    for group in log.groups(args.topic):
        for p, n in sorted(log.lag(args.topic, group).items()):
            print(f"{group:30} {p:>9} {n:>12}")


def _tail(log: Log, args: argparse.Namespace) -> None:
    part = log.topic(args.topic).partitions[args.partition]
    for rec in part.read(args.offset, args.n):
        value = rec.value if rec.value is None else rec.value[:120]
        print(f"{rec.partition}:{rec.offset} ts={rec.timestamp_ms} key={rec.key!r} {value!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polybus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)
    topics = commands.add_parser("topics", help="topics with their offsets")
    topics.add_argument("url")
    topics.set_defaults(run=_topics)
    groups = commands.add_parser("groups", help="durable groups of a topic with their lag")
    groups.add_argument("url")
    groups.add_argument("topic")
    groups.set_defaults(run=_groups)
    tail = commands.add_parser("tail", help="print records of one partition")
    tail.add_argument("url")
    tail.add_argument("topic")
    tail.add_argument("--partition", type=int, default=0)
    tail.add_argument("--offset", type=int, default=0)
    tail.add_argument("-n", type=int, default=20)
    tail.set_defaults(run=_tail)
    args = parser.parse_args(argv)
    try:
        backend = open_backend(args.url)
        try:
            if not isinstance(backend, NativeBackend):
                raise PolybusError(f"the CLI inspects native:// logs only, not {args.url!r}")
            args.run(backend.log, args)
        finally:
            backend.close()
    except PolybusError as exc:
        print(f"polybus: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
