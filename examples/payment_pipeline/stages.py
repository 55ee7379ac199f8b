"""The four stages of the payment pipeline; each runs in a process of its own.

=========  ===================  ==========================================================
stage      topic -> topic       what it does
=========  ===================  ==========================================================
fraud      payments ->          refuses amounts over the fraud limit, then authorizes the
           authorized           card at a gateway that times out now and then (retried
                                with back-off) and declines expired cards (dead letter)
ledger     authorized ->        books the payment in SQL exactly once (SQL inbox); forwards
           booked               it in a bus transaction where the backend has them, else
                                through an SQL outbox written in the booking's transaction
balance    booked -> settled    adds it to the account's balance, exactly once (SQL inbox)
notify     settled -> notified  tells the customer, once (SQL inbox)
=========  ===================  ==========================================================

A stage is an ``App`` run by a ``Worker`` until SIGTERM. Every message is keyed by
account, so one account's payments stay in order through every stage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import polybus
from polybus import Bus, Capability, Delivery
from polybus.patterns import App, Output, RetryPolicy, Worker
from polybus.patterns.inbox import SqlInbox
from polybus.patterns.outbox import Outbox, OutboxRelay

from .. import _support
from .database import CARD_VALID, Database

T = TypeVar("T")

FRAUD_LIMIT_CENTS = 100_000  #: a payment above $1,000.00 is refused by the fraud check
SESSION_S = 1.0  #: a killed member's work goes to the next one after this long
RELAY_STOP_S = 10.0  #: how long a stopping ledger waits for its relay's last batch


class FraudSuspected(Exception):
    """The fraud check refused the payment: it waits in the dead letters for an analyst."""


class CardDeclined(Exception):
    """The gateway declined the card: retrying cannot help until the customer fixes it."""


class GatewayTimeout(Exception):
    """The gateway did not answer in time: worth another try."""


#: back-off 0.1 s, 0.2 s, 0.4 s (less up to a fifth, the jitter); refusals are not retried
GATEWAY_RETRY = RetryPolicy(
    max_attempts=4, initial_delay=0.1, max_delay=1.0, give_up_on=(FraudSuspected, CardDeclined)
)


@dataclass(frozen=True)
class Topics:
    """The pipeline's topic names in one run's namespace."""

    payments: str
    authorized: str
    booked: str
    settled: str
    notified: str

    @classmethod
    def of(cls, namespace: str) -> Topics:
        args = argparse.Namespace(namespace=namespace)
        return cls(*(_support.topic(args, field.name) for field in fields(cls)))


def gateway_timeouts(payment_id: str) -> int:
    """How many tries of ``payment_id`` the gateway lets time out before it answers:
    0 for most, 1 or 2 for three payments in ten (as a hash of the id decides)."""
    return (0, 0, 0, 0, 0, 0, 0, 1, 1, 2)[zlib.crc32(payment_id.encode()) % 10]


class CountingInbox(SqlInbox):
    """The SQL inbox, counting the copies it skipped: the stage reports them as it stops."""

    def __init__(self, db: Database) -> None:
        super().__init__(db.connect, table=db.inbox)
        self.skipped = 0
        self._skipped_lock = threading.Lock()

    def process(
        self, group: str, message_id: str, handler: Callable[[], T]
    ) -> tuple[bool, T | None]:
        ran, result = super().process(group, message_id, handler)
        if not ran:
            with self._skipped_lock:
                self.skipped += 1
        return ran, result


@dataclass
class Parts:
    """What a stage made besides its handlers: its inbox, and the outbox's relay."""

    inbox: CountingInbox | None = None
    relay: OutboxRelay | None = None


def fraud(app: App, bus: Bus, topics: Topics, db: Database) -> Parts:
    @app.consumer(topics.payments, group="fraud", concurrency=4, retry=GATEWAY_RETRY)
    def authorize(d: Delivery) -> Output:
        payment: dict[str, Any] = d.message.value
        if payment["cents"] > FRAUD_LIMIT_CENTS:
            raise FraudSuspected(
                f"{payment['id']}: ${payment['cents'] / 100:,.2f} is over the limit"
            )
        if db.card_status(payment["account"]) != CARD_VALID:
            raise CardDeclined(f"{payment['id']}: the card of {payment['account']} has expired")
        if d.attempt <= gateway_timeouts(payment["id"]):
            raise GatewayTimeout(f"{payment['id']}: no answer from the gateway (try {d.attempt})")
        return Output(topics.authorized, {**payment, "tries": d.attempt}, key=payment["account"])

    return Parts()


def ledger(app: App, bus: Bus, topics: Topics, db: Database) -> Parts:
    inbox = CountingInbox(db)

    def entry(payment: dict[str, Any]) -> dict[str, Any]:
        return {key: payment[key] for key in ("id", "account", "cents")}

    if Capability.TRANSACTIONS in bus.capabilities:
        # The entry and the inbox row commit in SQL first; the forward and the input's ack
        # then commit together in a bus transaction. A crash between the two delivers the
        # input again: the inbox skips the booking, the forward goes out again with the
        # same derived id, and the balance's inbox drops it if the first one got through.
        @app.consumer(
            topics.authorized,
            group="ledger",
            guarantee="exactly-once",
            transactional=True,
            session_timeout=SESSION_S,
        )
        def book(d: Delivery) -> Output:
            payment: dict[str, Any] = d.message.value
            inbox.process("ledger", d.message.id, lambda: db.book(inbox.connection, payment))
            return Output(topics.booked, entry(payment), key=payment["account"])

        return Parts(inbox)

    # No transactions: the forward is a row of the outbox, written in the transaction of
    # the entry and the inbox row. The relay publishes it afterwards, at least once, with
    # the id the row keeps, so a copy a killed relay publishes again is dropped downstream.
    outbox = Outbox(db.dialect, table=db.outbox)

    @app.consumer(
        topics.authorized,
        group="ledger",
        guarantee="exactly-once",
        inbox=inbox,
        concurrency=2,
        session_timeout=SESSION_S,
    )
    def book_with_outbox(d: Delivery) -> None:
        payment: dict[str, Any] = d.message.value
        db.book(inbox.connection, payment)
        outbox.add(inbox.connection, topics.booked, entry(payment), key=payment["account"])

    return Parts(inbox, OutboxRelay(bus, db.connect, outbox, poll_interval=0.05))


def balance(app: App, bus: Bus, topics: Topics, db: Database) -> Parts:
    inbox = CountingInbox(db)

    @app.consumer(
        topics.booked,
        group="balance",
        guarantee="exactly-once",
        inbox=inbox,
        concurrency=2,
        session_timeout=SESSION_S,
    )
    def credit(d: Delivery) -> Output:
        booked: dict[str, Any] = d.message.value
        new = db.credit(inbox.connection, booked["account"], booked["cents"])
        return Output(topics.settled, {**booked, "balance": new}, key=booked["account"])

    return Parts(inbox)


def notify(app: App, bus: Bus, topics: Topics, db: Database) -> Parts:
    inbox = CountingInbox(db)

    @app.consumer(topics.settled, group="notify", guarantee="exactly-once", inbox=inbox)
    def tell(d: Delivery) -> Output:
        settled: dict[str, Any] = d.message.value
        text = (
            f"{settled['account']}: charged ${settled['cents'] / 100:,.2f}, "
            f"balance ${settled['balance'] / 100:,.2f}"
        )
        return Output(
            topics.notified, {"payment": settled["id"], "text": text}, key=settled["account"]
        )

    return Parts(inbox)


STAGES: dict[str, Callable[[App, Bus, Topics, Database], Parts]] = {
    "fraud": fraud,
    "ledger": ledger,
    "balance": balance,
    "notify": notify,
}


class _DeadLettersAreExpected(logging.Filter):
    """Giving up on a payment is how the fraud stage refuses it, not trouble worth a
    warning: the run lists the dead letters with ``polybus dlq list``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gave up on" not in record.getMessage()


def run(stage: str, url: str, namespace: str, database: str) -> None:
    """Run ``stage`` until SIGTERM (``python -m examples.payment_pipeline --stage ...``),
    then say what this process did."""
    logging.basicConfig(format=f"{stage}: %(message)s", level=logging.WARNING)
    logging.getLogger("polybus.worker").addFilter(_DeadLettersAreExpected())
    # pika warns of every 404 the RabbitMQ adapter gets when it asks whether a queue exists
    logging.getLogger("pika").setLevel(logging.ERROR)
    db = Database(database, namespace)
    app = App(url)
    with polybus.connect(url) as bus:
        parts = STAGES[stage](app, bus, Topics.of(namespace), db)
        worker = Worker(app, bus)
        stop = threading.Event()
        relay = parts.relay
        relaying = threading.Thread(target=relay.run, args=(stop,), daemon=True) if relay else None
        if relaying is not None:
            relaying.start()
        try:
            worker.run()
        finally:
            stop.set()
            if relay is not None and relaying is not None:
                relaying.join(RELAY_STOP_S)
                relay.close()
            if parts.inbox is not None:
                parts.inbox.close()
    done = Counter[str]()
    for stats in worker.health()["consumers"].values():
        done.update({k: stats[k] for k in ("processed", "retried", "dead_lettered")})
    said = [f"{n} {what.replace('_', '-')}" for what, n in done.items() if n]
    if parts.inbox is not None and parts.inbox.skipped:
        n = parts.inbox.skipped
        said.append(f"{n} {'copy' if n == 1 else 'copies'} skipped by the inbox")
    # one write: the stages stop together, and their lines must not interleave
    sys.stdout.write(
        f"  {stage} (pid {os.getpid()}) stopped: {', '.join(said) or 'nothing to do'}\n"
    )
    sys.stdout.flush()
