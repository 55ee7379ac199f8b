"""``polybus``: inspect a bus, manage dead letters, run and document workers.

polybus stats  URL [--topic T ...] [--group G ...]
polybus top    URL [--topic T ...] [--group G ...] [--interval 1] [--iterations N | --once]
polybus topics native:///var/lib/app/bus
polybus groups native:///var/lib/app/bus orders
polybus tail   native:///var/lib/app/bus orders [--partition 0] [--offset 0] [-n 10]
polybus dlq list    URL orders billing
polybus dlq show    URL orders billing MESSAGE_ID
polybus dlq redrive URL orders billing (MESSAGE_ID ... | --all)
polybus dlq purge   URL orders billing (MESSAGE_ID ... | --all)
polybus worker module:app [--url URL] [--health-port PORT]
polybus docs   module:app [--url URL] [--output FILE]

The stats, top, dead-letter and worker commands take any bus URL; ``topics``,
``groups`` and ``tail`` read native logs. ``docs`` writes an App's AsyncAPI 3.0
document (see :mod:`polybus.asyncapi`) and connects to nothing.
"""

from __future__ import annotations

import argparse
import heapq
import importlib
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from .adapters.native import NativeBackend
from .bus import connect
from .errors import BrokerUnreachable, ConfigurationError, ConnectionLost, PolybusError, redact_url
from .log import Log
from .registry import open_backend
from .types import BusStats

if TYPE_CHECKING:
    from .patterns.worker import App


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
    partitions = log.topic(args.topic).partitions
    if args.partition is not None:
        partitions = [partitions[args.partition]]
    # every partition's first n from the offset, merged by time: the first n of them all
    records = heapq.merge(
        *(part.read(args.offset, args.n) for part in partitions),
        key=lambda rec: rec.timestamp_ms,
    )
    for rec in itertools.islice(records, args.n):
        value = rec.payload if rec.payload is None else rec.payload[:120]
        print(f"{rec.partition}:{rec.offset} ts={rec.timestamp_ms} key={rec.key!r} {value!r}")


#: how to start a broker on one machine, for the message about one nobody answers at
_HOW_TO_START = {
    "kafka": "docker run -d -p 9092:9092 apache/kafka",
    "amqp": "rabbitmq-server -detached, or docker run -d -p 5672:5672 rabbitmq:3",
    "redis": "redis-server --daemonize yes, or docker run -d -p 6379:6379 redis:7",
}


def _check_inspectable(url: str) -> None:
    """Refuse a URL an inspecting command would see nothing at, or would create a log at."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        raise ConfigurationError(
            "a memory:// bus lives inside the process that opened it, and this command runs "
            "in a process of its own, so it would see nothing: inspect a native:/// directory"
        )
    if parts.scheme == "native" and not os.path.isdir(unquote(parts.path)):
        raise ConfigurationError(
            f"{unquote(parts.path)!r} does not exist: there is no native log there to inspect"
        )


def _native(args: argparse.Namespace) -> None:
    _check_inspectable(args.url)
    backend = open_backend(args.url)
    try:
        if not isinstance(backend, NativeBackend):
            raise PolybusError(f"this command reads native:// logs only, not {args.url!r}")
        args.inspect(backend.log, args)
    finally:
        backend.close()


def _stats_json(stats: BusStats) -> dict[str, Any]:
    topics = {}
    for name, topic in sorted(stats.topics.items()):
        topics[name] = {
            "end_offset": topic.end_offset,
            "partitions": [
                {"partition": p, "start_offset": part.start_offset, "end_offset": part.end_offset}
                for p, part in enumerate(topic.partitions)
            ],
            "groups": {
                group: {"lag": lag.total_lag, "partitions": list(lag.lag)}
                for group, lag in sorted(topic.groups.items())
            },
        }
    return {"complete": stats.complete, "topics": topics}


def _unlisted(stats: BusStats, args: argparse.Namespace) -> str | None:
    """What to say when the backend could not list what was not named."""
    if stats.complete or (args.topic and args.group):
        return None
    return "this backend cannot list its topics and groups: name them with --topic and --group"


def _stats(args: argparse.Namespace) -> None:
    _check_inspectable(args.url)
    with connect(args.url) as bus:
        stats = bus.stats(args.topic, args.group)
    if note := _unlisted(stats, args):
        print(f"polybus: {note}", file=sys.stderr)
    print(json.dumps(_stats_json(stats), indent=2))


def _row(
    width: int, name: str, partitions: str = "", end: str = "", rate: str = "", lag: str = ""
) -> str:
    return f"{name:{width}} {partitions:>10} {end:>12} {rate:>10} {lag:>12}".rstrip()


def _number(value: float | None, decimals: int = 0) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _table(stats: BusStats, rates: dict[str, float | None]) -> list[str]:
    """Topics with their partition count, end offset and rate, each followed by its groups'
    lag; "-" for what the backend cannot say."""
    names = [*stats.topics, *(g for t in stats.topics.values() for g in t.groups)]
    width = max([len("topic / group"), *(len(n) + 2 for n in names)])
    lines = [_row(width, "topic / group", "partitions", "end", "msg/s", "lag")]
    for name, topic in sorted(stats.topics.items()):
        end, rate = _number(topic.end_offset), _number(rates.get(name), 1)
        lines.append(_row(width, name, str(len(topic.partitions)), end, rate))
        for group, lag in sorted(topic.groups.items()):
            lines.append(_row(width, f"  {group}", lag=_number(lag.total_lag)))
    return lines


def _rates(before: BusStats, after: BusStats, seconds: float) -> dict[str, float | None]:
    """Messages a second per topic, from the change of its end offset; None where an end
    offset is unknown or went back (the topic was made again)."""
    rates: dict[str, float | None] = {}
    for name, topic in after.topics.items():
        old = before.topics.get(name)
        start, end = None if old is None else old.end_offset, topic.end_offset
        if start is None or end is None or end < start:
            rates[name] = None
        else:
            rates[name] = (end - start) / seconds
    return rates


def _top(args: argparse.Namespace) -> None:
    _check_inspectable(args.url)
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""  # a pipe or a file gets plain frames
    try:
        with connect(args.url) as bus:
            last: tuple[float, BusStats] | None = None
            for frame in itertools.count(1):
                started = time.monotonic()
                try:
                    stats = bus.stats(args.topic, args.group)
                except ConnectionLost as exc:  # the broker may come back: keep watching
                    lines = [f"polybus: {exc}; trying again"]
                else:
                    rates = {} if last is None else _rates(last[1], stats, started - last[0])
                    lines = _table(stats, rates)
                    if note := _unlisted(stats, args):
                        lines += ["", note]
                    last = (started, stats)
                when = time.strftime("%H:%M:%S")
                head = f"polybus top {redact_url(args.url)} - every {args.interval:g} s - {when}"
                print(clear + "\n".join([head, "", *lines, ""]), flush=True)
                if frame == args.iterations:
                    return
                time.sleep(max(0.0, started + args.interval - time.monotonic()))
    except KeyboardInterrupt:  # ^C is how top is left
        return


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else "-"


def _letter(letter: Any) -> dict[str, Any]:
    payload = letter.message.payload or b""
    key = letter.message.key
    try:
        value: Any = letter.message.value
        json.dumps(value)
    except (PolybusError, TypeError, ValueError):
        value = payload[:200].decode("utf-8", "replace")
    return {
        "id": letter.id,
        "reason": letter.reason,
        "attempts": letter.attempts,
        "error_type": letter.error_type,
        "error": letter.error,
        "topic": letter.topic,
        "partition": letter.partition,
        "offset": letter.offset,
        "group": letter.group,
        "first_failure": _when(letter.first_failure),
        "last_failure": _when(letter.last_failure),
        "key": key.hex() if isinstance(key, bytes) else key,
        "headers": letter.message.headers,
        "value": value,
    }


def _dlq(args: argparse.Namespace) -> None:
    from .patterns.dlq import DeadLetters

    if args.action in ("redrive", "purge") and bool(args.ids) == args.all:
        raise ConfigurationError(f"dlq {args.action}: name message ids, or pass --all (not both)")
    with connect(args.url) as bus, DeadLetters(bus, args.topic, args.group) as dead:
        if args.action == "list":
            letters = dead.list(args.limit)
            if args.json:
                print(json.dumps([_letter(letter) for letter in letters], indent=2))
                return
            print(f"{'id':38} {'reason':14} {'tries':>5} {'last failure':20} error")
            for letter in letters:
                error = f"{letter.error_type}: {letter.error}"[:60]
                print(
                    f"{letter.id:38} {letter.reason:14} {letter.attempts:>5} "
                    f"{_when(letter.last_failure):20} {error}"
                )
        elif args.action == "show":
            print(json.dumps(_letter(dead.get(args.ids[0])), indent=2))
        elif args.action == "redrive":
            print(f"re-drove {dead.redrive(args.ids or None)} message(s) to {args.group!r}")
        else:
            print(f"purged {dead.purge(args.ids or None)} message(s)")


def _load_app(spec: str) -> App:
    """The App that ``spec`` (``module:attribute``, the attribute ``app`` by default) names."""
    from .patterns.worker import App

    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # like other app runners: find modules where it runs
    try:
        app = getattr(importlib.import_module(module_name), attr or "app")
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"cannot load {spec!r}: {exc}; name an App as module:attribute, with the module "
            "importable from this directory or PYTHONPATH"
        ) from exc
    if not isinstance(app, App):
        raise ConfigurationError(f"{spec!r} is a {type(app).__name__}, not a polybus App")
    return app


def _worker(args: argparse.Namespace) -> None:
    from .patterns.worker import Worker

    app = _load_app(args.app)
    worker = Worker(app, args.url, stop_timeout=args.stop_timeout)
    if args.health_port is not None:
        try:
            port = worker.serve_health(args.health_port, args.health_host)
        except OSError as exc:
            worker.stop()
            raise ConfigurationError(
                f"cannot serve health on {args.health_host}:{args.health_port}: "
                f"{exc.strerror or exc}; choose another --health-port"
            ) from None
        print(f"polybus: health on http://{args.health_host}:{port}/health", flush=True)
    if worker.unreachable:  # run() waits for it, and health answers 503 meanwhile
        print(f"polybus: {worker.unreachable}; waiting for it", file=sys.stderr, flush=True)
    print(
        f"polybus: running {len(app.registrations)} consumer(s); stop with SIGTERM or ^C",
        flush=True,
    )
    worker.run()


def _docs(args: argparse.Namespace) -> None:
    from .asyncapi import asyncapi_document

    document = asyncapi_document(_load_app(args.app), args.url, title=args.app)
    text = json.dumps(document, indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {args.output!r}: {exc.strerror or exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polybus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True)

    stats = commands.add_parser("stats", help="offsets and group lag of any bus, as JSON")
    top = commands.add_parser("top", help="per-topic rate and per-group lag, refreshed")
    for command in (stats, top):
        command.add_argument("url")
        command.add_argument("--topic", action="append", help="only this topic (repeatable)")
        command.add_argument("--group", action="append", help="only this group (repeatable)")
    stats.set_defaults(run=_stats)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between frames")
    top.add_argument("--iterations", type=int, default=None, help="stop after N frames")
    top.add_argument("--once", action="store_const", const=1, dest="iterations")
    top.set_defaults(run=_top)

    topics = commands.add_parser("topics", help="topics of a native log with their offsets")
    topics.add_argument("url")
    topics.set_defaults(run=_native, inspect=_topics)
    groups = commands.add_parser("groups", help="durable groups of a topic with their lag")
    groups.add_argument("url")
    groups.add_argument("topic")
    groups.set_defaults(run=_native, inspect=_groups)
    tail = commands.add_parser("tail", help="print records of a topic, by time")
    tail.add_argument("url")
    tail.add_argument("topic")
    tail.add_argument("--partition", type=int, default=None, help="only this one")
    tail.add_argument("--offset", type=int, default=0)
    tail.add_argument("-n", type=int, default=20)
    tail.set_defaults(run=_native, inspect=_tail)

    dlq = commands.add_parser("dlq", help="list, show, re-drive or purge a group's dead letters")
    dlq.add_argument("action", choices=["list", "show", "redrive", "purge"])
    dlq.add_argument("url")
    dlq.add_argument("topic")
    dlq.add_argument("group")
    dlq.add_argument("ids", nargs="*", metavar="MESSAGE_ID")
    dlq.add_argument("--all", action="store_true", help="redrive or purge every dead letter")
    dlq.add_argument("--limit", type=int, default=None, help="list at most this many")
    dlq.add_argument("--json", action="store_true", help="list as JSON")
    dlq.set_defaults(run=_dlq)

    worker = commands.add_parser("worker", help="run an App's handlers until SIGTERM or ^C")
    worker.add_argument("app", help="module:attribute of a polybus.patterns.worker.App")
    worker.add_argument("--url", default=None, help="the bus URL (default: the App's)")
    worker.add_argument("--stop-timeout", type=float, default=30.0)
    worker.add_argument("--health-port", type=int, default=None)
    worker.add_argument("--health-host", default="127.0.0.1")
    worker.set_defaults(run=_worker)

    docs = commands.add_parser("docs", help="print an App's AsyncAPI 3.0 document (JSON)")
    docs.add_argument("app", help="module:attribute of a polybus.patterns.worker.App")
    docs.add_argument("--url", default=None, help="the bus it runs on (default: the App's)")
    docs.add_argument("--output", "-o", default=None, help="write it to this file")
    docs.set_defaults(run=_docs)

    args = parser.parse_args(argv)
    if args.run is _dlq and args.action == "show" and len(args.ids) != 1:
        parser.error("dlq show takes exactly one MESSAGE_ID")
    too_few = args.run is _top and args.iterations is not None and args.iterations < 1
    if args.run is _top and (args.interval <= 0 or too_few):
        parser.error("top takes an --interval above 0 and --iterations of 1 or more")
    try:
        args.run(args)
    except PolybusError as exc:
        print(f"polybus: {exc}", file=sys.stderr)
        scheme = urlsplit(getattr(args, "url", None) or "").scheme
        start = _HOW_TO_START.get({"amqps": "amqp", "rediss": "redis"}.get(scheme, scheme))
        if isinstance(exc, BrokerUnreachable) and start:
            print(f"polybus: to run one here: {start}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
