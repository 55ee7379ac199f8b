"""Payment pipeline: four stage processes, a flaky gateway, dead letters, a stage killed mid-stream.

* Four stages, each a process running an ``App`` (see ``stages.py``), each reading the
  topic the one before writes: ``payments`` -> fraud -> ``authorized`` -> ledger ->
  ``booked`` -> balance -> ``settled`` -> notify -> ``notified``. The account is the key.
* The card gateway times out now and then: the payment is tried again from the fraud
  group's retry topic with exponential back-off (``RetryPolicy``), and the payments
  behind it go on. An expired card is declined, and a payment over the fraud limit
  refused: both go to the dead-letter topic at once.
* The ledger books each payment exactly once in SQL: ``SqlInbox`` commits the entry
  with the inbox row. It forwards the payment in a bus transaction where the backend
  has them (native, Kafka), else through an SQL outbox written in that same commit.
  The balance and notification stages are exactly-once through the same inbox table.
  The database is PostgreSQL (``--postgres DSN``, or the tests' server if it answers),
  else SQLite in a temporary file.
* While payments flow, this process SIGKILLs the balance stage, then the ledger, and
  starts each again (``--kill``). Then "the customers fix their cards", and it
  re-drives the declined payments with the real ``polybus dlq`` command and follows
  them through, printing a live progress line of every stage all along.

The invariant, checked in SQL once the stages stopped: every account's balance equals
the sum of its ledger entries; every payment is in the ledger exactly once, except
those the fraud check refused, which are still dead letters (the declined ones were
dead-lettered, then re-driven); and each booked payment was notified once.

    python -m examples.payment_pipeline [--url URL] [--postgres DSN] [--kill STAGES]
                                        [--payments N] [--rate N] [--quick]
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polybus
from polybus import Bus, Capability, Delivery, Message
from polybus.errors import redact_url
from polybus.testing.servers import postgres_url

from .. import _support
from . import stages
from .database import CARD_EXPIRED, CARD_VALID, Database, is_postgres
from .stages import FRAUD_LIMIT_CENTS, Topics

PARTITIONS = 4
WATCH = "watch"  #: this process's group on every stage's output
#: SIGKILL the first stage once it has put out this share of the payments, each next
#: one once it has put out that much more
FIRST_KILL, NEXT_KILL = 0.25, 0.1
DEADLINE_S = 60.0
DRAIN_S = 0.5  # after the last notification, watch this long for copies
BURST = 8  #: payments published at once before a kill, at least
#: kill the ledger once it booked this many payments not forwarded yet, the balance once
#: it put out this many of a burst
BUSY = {"ledger": 2, "balance": 3}
BUSY_WAIT_S = 2.0  #: kill a stage that is not busy after this long all the same
CLI_TIMEOUT_S = 30.0
CLOSE_S = 5.0


@dataclass(frozen=True)
class Plan:
    """The payments of a run, and what should become of them."""

    payments: list[dict[str, Any]]
    cards: dict[str, str]  #: account -> card status at the start
    refused: set[str]  #: payment ids over the fraud limit: dead letters for good
    declined: set[str]  #: payment ids of expired cards: dead letters until re-driven

    @classmethod
    def make(cls, count: int) -> Plan:
        rng = random.Random(7)
        accounts = [f"acct-{n:02d}" for n in range(max(4, count // 10))]
        expired = set(accounts[3::8])

        def cents(n: int) -> int:  # one payment in 37 is over the fraud limit
            return rng.randrange(150_000, 400_000) if n % 37 == 20 else rng.randrange(500, 50_000)

        payments: list[dict[str, Any]] = [
            {"id": f"pay-{n:04d}", "account": rng.choice(accounts), "cents": cents(n)}
            for n in range(count)
        ]
        refused = {p["id"] for p in payments if p["cents"] > FRAUD_LIMIT_CENTS}
        declined = {p["id"] for p in payments if p["account"] in expired} - refused
        cards = {a: CARD_EXPIRED if a in expired else CARD_VALID for a in accounts}
        return cls(payments, cards, refused, declined)

    @property
    def ids(self) -> set[str]:
        return {p["id"] for p in self.payments}

    @property
    def expired(self) -> list[str]:
        return sorted(a for a, status in self.cards.items() if status == CARD_EXPIRED)


class Watch:
    """What each stage has put out, read through this process's own durable group: one
    thread per stage's output topic, so a change is seen within milliseconds."""

    def __init__(self, bus: Bus, topics: Topics) -> None:
        outputs = {
            "fraud": topics.authorized,
            "ledger": topics.booked,
            "balance": topics.settled,
            "notify": topics.notified,
        }
        #: stage -> payment id -> ids of the messages it put out for it
        self.out: dict[str, defaultdict[str, set[str]]] = {s: defaultdict(set) for s in outputs}
        self.copies: Counter[str] = Counter()  #: stage -> messages seen again (same id)
        self.retried: set[str] = set()  #: payments authorized after a gateway timeout
        self.changed = threading.Condition()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(bus, stage, topic), daemon=True)
            for stage, topic in outputs.items()
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, bus: Bus, stage: str, topic: str) -> None:
        try:
            with bus.subscribe(topic, WATCH) as sub:
                while not self._stop.is_set():
                    batch = sub.fetch(1000, timeout=0.1)
                    with self.changed:
                        for d in batch:
                            self._count(stage, d)
                        self.changed.notify_all()
                    sub.ack(batch)
        except BaseException as exc:
            with self.changed:
                self.error = exc
                self.changed.notify_all()

    def _count(self, stage: str, d: Delivery) -> None:
        value = d.message.value
        payment = value["payment"] if stage == "notify" else value["id"]
        ids = self.out[stage][payment]
        if d.message.id in ids:
            self.copies[stage] += 1
        ids.add(d.message.id)
        if stage == "fraud" and value["tries"] > 1:
            self.retried.add(payment)

    def count(self, stage: str) -> int:
        return len(self.out[stage])

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Whether ``condition()`` held within ``timeout`` s; raises what a reader raised."""
        with self.changed:
            held = self.changed.wait_for(lambda: condition() or self.error is not None, timeout)
        self.check()
        return held

    def check(self) -> None:
        """Raise RuntimeError if a reader failed."""
        if self.error is not None:
            raise RuntimeError(f"reading the stages' output failed: {self.error!r}")

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(CLOSE_S)


class Stages:
    """The stage processes: started, SIGKILLed and started again, stopped with SIGTERM."""

    def __init__(self, url: str, namespace: str, database: str) -> None:
        self.arguments = (url, namespace, database)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> int:
        proc = _support.spawn("examples.payment_pipeline", "--stage", name, *self.arguments)
        self.procs[name] = proc
        return proc.pid

    def kill(self, name: str) -> int:
        proc = self.procs[name]
        proc.kill()
        proc.wait()
        return proc.pid

    def check(self) -> None:
        """Raise RuntimeError if a stage exited by itself (it failed to start, say)."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} stage exited with status {proc.returncode}")

    def stop(self) -> list[str]:
        """SIGTERM every stage, SIGKILL those still running after 20 s; what went wrong."""
        return _support.stop((f"the {name} stage", p) for name, p in self.procs.items())


class Run:
    """This process's part: publish, kill and restart stages, re-drive, follow the flow."""

    def __init__(
        self,
        args: argparse.Namespace,
        bus: Bus,
        db: Database,
        plan: Plan,
        watch: Watch,
        procs: Stages,
        kills: list[str],
    ) -> None:
        self.args, self.bus, self.db, self.plan = args, bus, db, plan
        self.watch, self.procs, self.kills = watch, procs, kills
        self.topics = Topics.of(args.namespace)
        self.published = 0
        self.deadline = time.monotonic() + DEADLINE_S
        self.commands = ThreadPoolExecutor(1)

    def line(self) -> str:
        def stage(name: str) -> str:
            copies = self.watch.copies[name]
            return f"{name} {self.watch.count(name)}" + (f" (+{copies} copies)" if copies else "")

        return (
            f"published {self.published}/{len(self.plan.payments)} | {stage('fraud')} "
            f"({len(self.watch.retried)} retried) | {stage('ledger')} | {stage('balance')} | "
            f"{stage('notify')}"
        )

    def drive(self) -> set[str]:
        """The whole run; returns the ids of the payments still dead letters at the end."""
        plan = self.plan
        self.publish_and_kill()
        self.follow("fraud", plan.ids - plan.refused - plan.declined)
        letters: list[dict[str, Any]] = []
        while len(letters) < len(plan.refused) + len(plan.declined):
            self.check_deadline(f"{len(plan.refused) + len(plan.declined)} dead letters")
            letters = json.loads(self.command("list", "--json"))
        for kind, n in Counter(letter["error_type"] for letter in letters).items():
            example = next(letter for letter in letters if letter["error_type"] == kind)
            say(f"  {n} x {kind.rsplit('.', 1)[-1]}, e.g. {example['error']}")
        for account in plan.expired:
            self.db.fix_card(account)
        say(f"the customers of {', '.join(plan.expired)} put a valid card on their accounts")
        declined = [d["id"] for d in letters if d["error_type"].endswith(".CardDeclined")]
        say(self.command("redrive", *declined).strip())
        remaining = self.commands.submit(dlq, "list", self.args.url, self.topics.payments, "--json")
        self.follow("notify", plan.ids - plan.refused)
        say(f"the {len(declined)} re-driven payments went through: booked, settled, notified")
        time.sleep(DRAIN_S)  # the watch goes on a little longer, for copies
        left = {letter["value"]["id"] for letter in json.loads(self.finish(remaining))}
        say(f"  still dead letters: {', '.join(sorted(left))}")
        return left

    def publish_and_kill(self) -> None:
        """Publish the payments at ``--rate`` a second; meanwhile SIGKILL each stage of
        ``kills`` once it has put out its share of them, and start it again. A burst of
        payments is held back for each kill (see :meth:`kill_busy`)."""
        payments = self.plan.payments
        burst = max(BURST, len(payments) // 10)
        started = time.monotonic()
        kills = list(self.kills)
        while self.published < len(payments) or kills:
            paced = int((time.monotonic() - started) * self.args.rate) + 1
            self.publish(min(paced, len(payments) - burst * len(kills)))
            share = FIRST_KILL + NEXT_KILL * (len(self.kills) - len(kills))
            if kills and self.watch.count(kills[0]) >= share * len(payments):
                self.kill_busy(kills.pop(0), burst)
            self.check_deadline("the payments to be published")
            time.sleep(1 / self.args.rate)

    def publish(self, upto: int) -> None:
        """Publish the payments up to number ``upto``."""
        upto = min(upto, len(self.plan.payments))
        if upto > self.published:
            batch = self.plan.payments[self.published : upto]
            self.bus.publish_many(
                self.topics.payments, [Message(p, key=p["account"]) for p in batch]
            )
            self.published = upto

    def kill_busy(self, name: str, burst: int) -> None:
        """Publish ``burst`` payments at once, SIGKILL stage ``name`` in the middle of
        them, and start it again.

        Between two paced payments a stage is idle nearly all the time; in a burst a kill
        finds work half done. The ledger is killed once it has booked entries in SQL that
        it has not forwarded yet: the moment its transaction or outbox is there for. The
        balance is killed once it has put out a few payments of the burst: those it
        handled since its group last committed its offsets are delivered again.
        """
        watch = self.watch
        before = watch.count(name)

        def progress() -> int:
            if name == "ledger":  # booked in SQL, not yet seen on its output topic
                return self.db.entry_count() - watch.count(name)
            return watch.count(name) - before

        self.publish(self.published + burst)
        give_up = time.monotonic() + BUSY_WAIT_S
        while (seen := progress()) < BUSY[name] and time.monotonic() < give_up:
            self.check_deadline(f"the {name} stage to be busy")
            time.sleep(0.001)
        pid = self.procs.kill(name)
        state = (
            f"{seen} payments booked in SQL and not forwarded yet"
            if name == "ledger"
            else f"{seen} payments of a burst put out"
        )
        say(
            f"SIGKILL {name} (pid {pid}) with {state}, {self.published} published; "
            f"started it again (pid {self.procs.start(name)})"
        )

    def follow(self, stage: str, want: set[str]) -> None:
        """Wait until ``stage`` has put out every payment of ``want``."""
        done = self.watch.out[stage]
        while not self.watch.wait(lambda: want <= done.keys(), 0.5):
            self.check_deadline(f"{len(want - done.keys())} payments through the {stage} stage")

    def command(self, action: str, *arguments: str) -> str:
        """``polybus dlq <action> ...``'s output; the progress goes on meanwhile."""
        url, topic = self.args.url, self.topics.payments
        return self.finish(self.commands.submit(dlq, action, url, topic, *arguments))

    def finish(self, command: Future[str]) -> str:
        return command.result(timeout=CLI_TIMEOUT_S + 5)

    def check_deadline(self, waiting_for: str) -> None:
        self.procs.check()
        self.watch.check()
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"still waiting for {waiting_for} after {DEADLINE_S:g} s")


def dlq(action: str, url: str, topic: str, *arguments: str) -> str:
    """Run ``polybus dlq <action> URL TOPIC fraud ...``; show it and return its output."""
    shown = " ".join(["polybus", "dlq", action, redact_url(url), topic, "fraud", *arguments])
    say(f"$ {shown if len(shown) < 120 else shown[:116] + ' ...'}")
    script = Path(sys.executable).with_name("polybus")  # the one installed with this Python
    command = [str(script)] if script.exists() else [sys.executable, "-m", "polybus.cli"]
    done = subprocess.run(
        [*command, "dlq", action, url, topic, "fraud", *arguments],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"polybus dlq {action} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def say(text: str) -> None:
    """Print a line of its own above the progress line (in one write: the progress
    line's thread writes too)."""
    sys.stdout.write(f"\r{text}\033[K\n" if sys.stdout.isatty() else f"{text}\n")
    sys.stdout.flush()


def choose_database(dsn: str | None) -> str:
    """``--postgres DSN``; else the tests' PostgreSQL if it answers; else a SQLite file."""
    if dsn is not None:
        refused = postgres_refuses(dsn)
        if refused is not None:
            sys.exit(f"FAILED: cannot use PostgreSQL at {redact_url(dsn)}: {refused}")
        return dsn
    if postgres_refuses(postgres_url()) is None:
        return postgres_url()
    directory = tempfile.mkdtemp(prefix="polybus-example-")
    atexit.register(shutil.rmtree, directory, True)
    return str(Path(directory) / "payments.db")


def postgres_refuses(dsn: str) -> str | None:
    """None if PostgreSQL at ``dsn`` lets us in, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed: pip install 'polybus[postgres]'"
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
    except psycopg.Error as exc:
        return str(exc).strip() or type(exc).__name__
    return None


def check(db: Database, plan: Plan, watch: Watch, dead_letters: set[str]) -> list[str]:
    """The invariant, in SQL, on the notified topic and in the dead letters: what breaks it.
    Prints what it counted."""
    problems = []
    bookable = plan.ids - plan.refused
    entries = db.entries_per_payment()
    if missing := bookable - entries.keys():
        problems.append(f"{len(missing)} payments not in the ledger, e.g. {min(missing)}")
    if twice := sorted(p for p, n in entries.items() if n > 1):
        problems.append(f"{len(twice)} payments booked more than once, e.g. {twice[0]}")
    if stray := entries.keys() - bookable:
        problems.append(f"{len(stray)} refused payments booked, e.g. {min(stray)}")
    sums, balances = db.ledger_sums(), db.balance_of_accounts()
    if off := sorted(a for a in sums.keys() | balances.keys() if sums.get(a) != balances.get(a)):
        problems.append(
            f"the balance of {len(off)} of {len(sums.keys() | balances.keys())} accounts "
            f"differs from the sum of its ledger entries, e.g. {off[0]}: "
            f"balance {balances.get(off[0])}, entries {sums.get(off[0])}"
        )
    notified = watch.out["notify"]
    if missing := bookable - notified.keys():
        problems.append(f"{len(missing)} payments never notified, e.g. {min(missing)}")
    if twice := sorted(p for p, ids in notified.items() if len(ids) > 1):
        problems.append(f"{len(twice)} payments notified more than once, e.g. {twice[0]}")
    if dead_letters != plan.refused:
        problems.append(
            f"the dead letters left are {sorted(dead_letters)}, not the refused payments "
            f"{sorted(plan.refused)}"
        )
    say(
        f"ledger: {sum(entries.values())} entries for {len(entries)} payments, "
        f"{len(balances)} account balances checked against them; {len(watch.retried)} "
        f"payments went through after gateway timeouts; messages seen twice (same id, "
        f"dropped by the next stage's inbox): {dict(watch.copies) or 'none'}"
    )
    return problems


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--stage":
        stages.run(*sys.argv[2:6])
        return 0
    # SIGTERM (a test's timeout, say) stops the stages too, as the finally blocks do
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # _support.parse takes sizes only: the options of this example are read first.
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--postgres", metavar="DSN")
    own.add_argument("--kill", metavar="STAGES")
    options, rest = own.parse_known_args(argv)
    summary = (__doc__ or "").split("\n\n")[0]
    args = _support.parse(
        f"{summary} Also --postgres DSN: the database (default: the tests' PostgreSQL if it "
        "answers, else SQLite in a temporary file); --kill STAGES: the stages to SIGKILL "
        "mid-stream, comma-separated, or none (default balance,ledger; balance on Kafka).",
        rest,
        payments=(400, 80),
        rate=(60, 30),
    )
    if args.url.startswith("memory:"):
        sys.exit("FAILED: a memory:// bus lives in one process, and the stages are processes")
    _support.check_url(args.url)
    kafka = args.url.startswith("kafka://")
    kill = options.kill or ("balance" if kafka else "balance,ledger")
    kills = [] if kill == "none" else kill.split(",")
    if unknown := set(kills) - {"ledger", "balance"}:
        sys.exit(f"FAILED: --kill takes ledger, balance or none, not {', '.join(sorted(unknown))}")
    if kafka and options.kill is None:
        print(
            "not killing the ledger on Kafka: a member killed inside a transaction leaves it "
            "open, and the balance stage's read_committed reads wait until the broker aborts "
            "it (transaction.timeout.ms: the reconnect timeout + 5 s, 35 s by default); "
            "--kill balance,ledger to see it"
        )
    database = choose_database(options.postgres)
    db = Database(database, args.namespace)
    plan = Plan.make(args.payments)
    topics = Topics.of(args.namespace)
    db.create(plan.cards)
    problems: list[str] = []
    try:
        with polybus.connect(args.url) as bus:
            forward = "bus transaction" if Capability.TRANSACTIONS in bus.capabilities else "outbox"
            print(
                f"{len(plan.payments)} payments on {args.url.split('://')[0]}; database "
                f"{'PostgreSQL' if is_postgres(database) else 'SQLite'}; the ledger forwards "
                f"through the {forward}"
            )
            bus.declare(topics.payments, partitions=PARTITIONS, groups=["fraud"])
            bus.declare(topics.authorized, partitions=PARTITIONS, groups=["ledger", WATCH])
            bus.declare(topics.booked, partitions=PARTITIONS, groups=["balance", WATCH])
            bus.declare(topics.settled, partitions=PARTITIONS, groups=["notify", WATCH])
            bus.declare(topics.notified, partitions=PARTITIONS, groups=[WATCH])
            watch = Watch(bus, topics)
            procs = Stages(args.url, args.namespace, database)
            run = Run(args, bus, db, plan, watch, procs, kills)
            dead_letters: set[str] = set()
            try:
                for name in stages.STAGES:
                    procs.start(name)
                with _support.progress(run.line):
                    dead_letters = run.drive()
            except (TimeoutError, RuntimeError) as exc:
                problems.append(str(exc))
            finally:
                problems += procs.stop()
                run.commands.shutdown(cancel_futures=True)
                watch.close()
            problems += check(db, plan, watch, dead_letters)
    finally:
        if is_postgres(database):
            db.drop()
        db.close()
    return _support.verdict(
        problems,
        f"{len(plan.ids - plan.refused)} payments booked once each ({len(plan.declined)} of "
        f"them after a re-drive), every balance equals its ledger entries, the "
        f"{len(plan.refused)} refused payments are still dead letters",
    )


if __name__ == "__main__":
    sys.exit(main())
