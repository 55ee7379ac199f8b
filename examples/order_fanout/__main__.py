"""Order placed, fan-out: three services, each a durable group, each gets every order.

* One topic, ``orders``, with 4 partitions. The customer id is the key, so one
  customer's orders stay in order on one partition.
* Three durable groups (payment, inventory, notification), declared before the
  first order, so each gets every order even when its service starts late.
* Each service is a process running an ``App`` with one ``@app.consumer``; its
  handler does the work and returns an ``Output``, a record of what it did,
  published to ``audit``.
* This process publishes the orders, follows ``audit`` and checks that every
  service handled every order exactly once (exit status 0), then stops the
  services with SIGTERM, as an orchestrator would.

    python -m examples.order_fanout [--url URL] [--orders N]
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from typing import Any

import polybus
from polybus import Delivery, Message
from polybus.patterns.worker import App, Output, Worker

from .. import _support

SERVICES = ("payment", "inventory", "notification")
PARTITIONS = 4
DEADLINE_S = 60.0
DRAIN_S = 0.5  # after the last record, watch this long for duplicates


def service(name: str, url: str, namespace: str) -> None:
    """Run one service until SIGTERM."""
    app = App(url)
    audit = f"{namespace}.audit"

    @app.consumer(f"{namespace}.orders", group=name, concurrency=4)
    def handle(d: Delivery) -> Output:
        order: dict[str, Any] = d.message.value
        if name == "payment":
            done = f"charged ${order['cents'] / 100:,.2f} to {order['customer']}"
        elif name == "inventory":
            done = f"reserved {order['items']} items"
        else:
            done = f"emailed {order['customer']}@example.com"
        record = {"service": name, "order": order["id"], "partition": d.partition, "done": done}
        return Output(audit, record, key=name)

    Worker(app).run()


def orders(count: int) -> list[Message]:
    rng = random.Random(7)
    return [
        Message(
            {
                "id": f"ord-{n:04d}",
                "customer": (customer := f"cust-{rng.randrange(12):02d}"),
                "items": rng.randint(1, 5),
                "cents": rng.randrange(500, 50_000),
            },
            key=customer,
        )
        for n in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--service":
        service(*sys.argv[2:5])
        return 0
    args = _support.parse(__doc__, argv, orders=(300, 40))
    _support.check_url(args.url)
    topic, audit = _support.topic(args, "orders"), _support.topic(args, "audit")
    handled: Counter[tuple[str, str]] = Counter()
    with polybus.connect(args.url) as bus:
        # groups declared before the first order: each service gets them all
        bus.declare(topic, partitions=PARTITIONS, groups=list(SERVICES))
        bus.declare(audit, groups=["checker"])
        procs = [
            _support.spawn("examples.order_fanout", "--service", name, args.url, args.namespace)
            for name in SERVICES
        ]
        try:
            placed = orders(args.orders)
            receipts = bus.publish_many(topic, placed)
            spread = Counter(r.partition for r in receipts)
            print(
                f"placed {len(placed)} orders on {args.url.split('://')[0]}, by partition:",
                dict(sorted(spread.items())),
            )

            def line() -> str:
                per = Counter(s for s, _ in handled)
                return "  ".join(f"{s} {per[s]}/{len(placed)}" for s in SERVICES)

            want = {(s, m.value["id"]) for s in SERVICES for m in placed}
            deadline = time.monotonic() + DEADLINE_S
            with _support.progress(line), bus.subscribe(audit, "checker") as sub:
                quiet_until = None
                while quiet_until is None or time.monotonic() < quiet_until:
                    if time.monotonic() > deadline:
                        break
                    for d in sub.fetch(500, timeout=0.1):
                        handled[d.message.value["service"], d.message.value["order"]] += 1
                        d.ack()
                    if quiet_until is None and want <= handled.keys():
                        quiet_until = time.monotonic() + DRAIN_S
        finally:
            problems = _support.stop(zip(SERVICES, procs, strict=True))
    missing = want - handled.keys()
    if missing:
        problems.append(f"{len(missing)} (service, order) pairs never handled")
    twice = [pair for pair, n in handled.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} handled twice, e.g. {twice[0]}")
    return _support.verdict(
        problems, f"each of {len(SERVICES)} services handled all {len(placed)} orders once"
    )


if __name__ == "__main__":
    sys.exit(main())
