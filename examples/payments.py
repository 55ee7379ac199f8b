"""Payments with a flaky gateway: retries, dead letters, request-reply and a re-drive.

What it shows, on the embedded engine (no server to install):

* ``App`` handlers run by a ``Worker``: a payment service charging each order
  through a card gateway that fails now and then, with a ``RetryPolicy``
  (exponential backoff with jitter). A failed charge is retried from the
  group's retry topic, durably, and never holds up the orders behind it.
* A declined card is not worth retrying (``give_up_on``): it goes straight to
  the dead-letter topic with its provenance (topic, partition, offset,
  attempts, error and times).
* A fraud-check service answers requests (``App.responder``); the payment
  handler asks it with a ``Requester``, many requests in flight at once.
* ``DeadLetters`` lists what was given up on; after the "customer fixed the
  card", one is re-driven (edited) and goes through.
* ``polybus dlq list native:///... orders payments`` shows the same from the shell.

The script checks its own outcome and exits 0 only if every order was paid
once or dead-lettered, nothing was lost, and the re-drive went through.

Run it with ``make demo`` or ``.venv/bin/python examples/payments.py``.
"""

from __future__ import annotations

import logging
import random
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import polybus
from polybus import Delivery, Message
from polybus.patterns.dlq import DeadLetters
from polybus.patterns.request_reply import Requester
from polybus.patterns.retry import RetryPolicy
from polybus.patterns.worker import App, Worker

ORDERS = 200
DEADLINE_S = 60.0


class CardDeclined(Exception):
    """The card was refused: retrying will not help."""


class GatewayTimeout(Exception):
    """The gateway did not answer: worth another try."""


def main() -> int:
    logging.basicConfig(format="%(name)s: %(message)s")
    directory = Path(__file__).resolve().parent.parent / "demo-data" / "payments"
    shutil.rmtree(directory, ignore_errors=True)  # each run starts from an empty log
    url = f"native://{directory}"
    rng = random.Random(7)
    flaky = {n for n in range(ORDERS) if rng.random() < 0.2}  # first charge times out
    declined = {n for n in range(ORDERS) if n % 50 == 13}  # these cards are refused
    paid: Counter[int] = Counter()
    lock = threading.Lock()
    fixed_cards: set[int] = set()

    app = App(url)

    @app.responder("fraud-checks", concurrency=4)
    def fraud_check(d: Delivery) -> dict[str, object]:
        order = d.message.value
        return {"order": order["id"], "ok": order["amount"] < 900}

    with polybus.connect(url) as bus:
        bus.declare("orders", partitions=4, groups=["payments"])
        checks = Requester(bus, "fraud-checks", timeout=10)

        @app.consumer(
            "orders",
            group="payments",
            concurrency=4,
            retry=RetryPolicy(
                max_attempts=4, initial_delay=0.2, max_delay=2.0, give_up_on=(CardDeclined,)
            ),
        )
        def charge(d: Delivery) -> None:
            order = d.message.value
            verdict = checks.request(order).value
            if not verdict["ok"]:
                raise CardDeclined(f"order {order['id']}: flagged by the fraud check")
            if order["id"] in declined and order["id"] not in fixed_cards:
                raise CardDeclined(f"order {order['id']}: card declined")
            if order["id"] in flaky and d.attempt == 1:
                raise GatewayTimeout(f"order {order['id']}: gateway timed out")
            with lock:
                paid[order["id"]] += 1

        worker = Worker(app, bus).start()
        started = time.monotonic()
        bus.publish_many(
            "orders",
            [
                Message({"id": n, "amount": rng.randrange(5, 800)}, key=f"customer-{n % 30}")
                for n in range(ORDERS)
            ],
        )
        expected_paid = set(range(ORDERS)) - declined
        with DeadLetters(bus, "orders", "payments", wait=0.2) as dead:
            letters = []
            while set(paid) != expected_paid or len(letters) < len(declined):
                if time.monotonic() - started > DEADLINE_S:
                    print("timed out waiting for the payments", file=sys.stderr)
                    return 1
                time.sleep(0.2)
                letters = dead.list()
            print(f"paid {len(paid)} of {ORDERS} orders in {time.monotonic() - started:.1f} s")
            health = worker.health()["consumers"]["orders:payments"]
            print(
                f"{health['retried']} charges retried after a gateway timeout, "
                f"{len(letters)} cards declined and dead-lettered:"
            )
            for letter in letters:
                print(f"  {letter.id}  attempts={letter.attempts}  {letter.error}")

            # The customer of the first declined order fixed the card: re-drive it, edited.
            first = letters[0]
            fixed_cards.add(first.message.value["id"])
            dead.redrive([first.id], edit=lambda m: {**m.value, "note": "card updated"})
            while first.message.value["id"] not in paid:
                if time.monotonic() - started > DEADLINE_S:
                    print("the re-driven order was never paid", file=sys.stderr)
                    return 1
                time.sleep(0.05)
            print(f"re-drove order {first.message.value['id']}: paid")
            remaining = len(dead.list())
        worker.stop()
        checks.close()

    twice = [n for n, count in paid.items() if count > 1]
    ok = not twice and remaining == len(declined) - 1 and set(paid) >= expected_paid
    print(f"paid twice: {twice or 'none'}; still dead-lettered: {remaining}")
    print(f"look at them: .venv/bin/polybus dlq list {url} orders payments")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
