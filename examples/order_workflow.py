"""An order workflow on polybus's embedded (native) engine: fan-out to three services.

What it shows:

* ``polybus.connect("native:///<dir>")`` gives a durable, multi-process message log
  with no server to install; everything lives in one directory.
* One topic, ``order_placed``, with 4 partitions. The customer id is the message key,
  so all orders of one customer stay in order on one partition.
* Three durable groups -- payment, inventory, notification -- declared up front, so
  each group gets every order (fan-out) even if its service starts late.
* Each service runs in its own OS process (this same file, started with ``--worker``),
  handles every order, acks it, and writes a small JSON result next to the log.
* The parent checks that every group got every order exactly once and prints a
  summary; the exit code is 0 if so, 1 if not.

Run it with ``make demo`` or ``.venv/bin/python examples/order_workflow.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polybus

TOPIC = "order_placed"
PARTITIONS = 4
SERVICES = ("payment", "inventory", "notification")
WORKER_DEADLINE_S = 20.0  # a worker that has not seen every order by then exits non-zero
PARENT_DEADLINE_S = 30.0  # the parent stops waiting for workers after this
DRAIN_S = 0.5  # after the last expected order, look this long for redelivered duplicates

CATALOG: dict[str, int] = {  # item -> unit price in cents
    "keyboard": 4_900,
    "mouse": 1_999,
    "monitor": 18_900,
    "usb-cable": 799,
    "headset": 5_450,
    "webcam": 3_999,
}


@dataclass
class Result:
    """What one worker reports back to the parent (written as JSON)."""

    service: str
    handled: int = 0
    duplicates: int = 0
    first_order: str | None = None
    last_order: str | None = None
    cents_charged: int = 0
    items_reserved: int = 0
    emails_sent: int = 0
    timed_out: bool = False
    order_ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------
# the orders


def make_orders(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """Build ``count`` reproducible orders from a handful of customers."""
    rng = random.Random(seed)
    customers = [f"cust-{n:02d}" for n in range(1, 9)]
    orders: list[dict[str, Any]] = []
    for n in range(1, count + 1):
        picked = rng.sample(sorted(CATALOG), k=rng.randint(1, 3))
        qty = {sku: rng.randint(1, 3) for sku in picked}
        items = [{"sku": sku, "qty": q} for sku, q in qty.items()]
        cents = sum(CATALOG[sku] * q for sku, q in qty.items())
        orders.append(
            {
                "order_id": f"ord-{n:04d}",
                "customer": rng.choice(customers),
                "items": items,
                "amount": cents / 100,
            }
        )
    return orders


def dollars(cents: int) -> str:
    return f"${cents / 100:,.2f}"


# ---------------------------------------------------------------------------
# the services (each runs in its own process)


def handle(service: str, order: dict[str, Any], result: Result) -> str:
    """Do the service's work for one order; return the line to print."""
    oid, customer = order["order_id"], order["customer"]
    if service == "payment":
        cents = round(order["amount"] * 100)
        result.cents_charged += cents
        return f"charged {dollars(cents):>9} to {customer} for {oid}"
    if service == "inventory":
        items = order["items"]
        result.items_reserved += sum(i["qty"] for i in items)
        listed = ", ".join(f"{i['qty']}x {i['sku']}" for i in items)
        return f"reserved {listed} for {oid}"
    result.emails_sent += 1
    return f"email sent to {customer}@example.com: {oid} confirmed"


def run_worker(service: str, base: Path, expect: int) -> int:
    """Consume ``order_placed`` as group ``service`` until ``expect`` orders were seen."""
    result = Result(service=service)
    seen: set[str] = set()
    deadline = time.monotonic() + WORKER_DEADLINE_S
    with (
        polybus.connect(f"native://{base / 'log'}") as bus,
        bus.subscribe(TOPIC, group=service) as sub,
    ):
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if drain_until is None and len(seen) >= expect:
                drain_until = now + DRAIN_S  # all seen: watch briefly for duplicates
            if drain_until is not None and now >= drain_until:
                break
            if now >= deadline:
                result.timed_out = True
                break
            for delivery in sub.fetch(max_messages=100, timeout=0.2):
                order: dict[str, Any] = delivery.message.value
                oid = order["order_id"]
                tag = f"{service:<12} p{delivery.partition} |"  # which partition it came from
                if oid in seen:
                    result.duplicates += 1
                    print(f"{tag} duplicate {oid} ignored", flush=True)
                else:
                    seen.add(oid)
                    print(f"{tag} {handle(service, order, result)}", flush=True)
                    result.handled += 1
                    result.order_ids.append(oid)
                    result.first_order = result.first_order or oid
                    result.last_order = oid
                delivery.ack()

    # Write then rename, so the parent never reads half a file.
    out = base / "results" / f"{service}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(out)
    if result.timed_out:
        print(
            f"{service:<12} | gave up after {WORKER_DEADLINE_S:.0f} s: "
            f"saw {len(seen)} of {expect} orders",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return 0


# ---------------------------------------------------------------------------
# the parent: set up, publish, start the services, check the outcome


def start_workers(base: Path, expect: int) -> dict[str, subprocess.Popen[bytes]]:
    """Start one process per service running this file in ``--worker`` mode."""
    return {
        service: subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                service,
                "--dir",
                str(base),
                "--expect",
                str(expect),
            ]
        )
        for service in SERVICES
    }


def wait_for(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, int | None]:
    """Wait for every worker until the parent's deadline; kill the ones still running."""
    deadline = time.monotonic() + PARENT_DEADLINE_S
    codes: dict[str, int | None] = {}
    for service, proc in procs.items():
        try:
            codes[service] = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes[service] = None
    return codes


def load_result(base: Path, service: str) -> Result | None:
    path = base / "results" / f"{service}.json"
    if not path.exists():
        return None
    return Result(**json.loads(path.read_text()))


def summarize(orders: list[dict[str, Any]], codes: dict[str, int | None], base: Path) -> bool:
    """Print the summary table; return True if every group got every order exactly once."""
    expected_ids = {o["order_id"] for o in orders}
    expected_cents = sum(round(o["amount"] * 100) for o in orders)
    expected_items = sum(i["qty"] for o in orders for i in o["items"])

    print()
    print(f"{'service':<13}{'handled':>8}{'dups':>6}  {'first':<9} {'last':<9} {'outcome'}")
    print("-" * 78)
    problems: list[str] = []
    for service in SERVICES:
        res = load_result(base, service)
        code = codes.get(service)
        if res is None:
            why = "killed at the deadline" if code is None else f"exited {code}, no result"
            print(f"{service:<13}{'-':>8}{'-':>6}  {'-':<9} {'-':<9} {why}")
            problems.append(f"{service}: {why}")
            continue
        if service == "payment":
            outcome = f"charged {dollars(res.cents_charged)} (expected {dollars(expected_cents)})"
            if res.cents_charged != expected_cents:
                problems.append(f"payment charged {dollars(res.cents_charged)}")
        elif service == "inventory":
            outcome = f"reserved {res.items_reserved} items (expected {expected_items})"
            if res.items_reserved != expected_items:
                problems.append(f"inventory reserved {res.items_reserved} items")
        else:
            outcome = f"{res.emails_sent} emails sent"
        print(
            f"{service:<13}{res.handled:>8}{res.duplicates:>6}  "
            f"{res.first_order or '-':<9} {res.last_order or '-':<9} {outcome}"
        )
        missing = expected_ids - set(res.order_ids)
        if missing:
            problems.append(f"{service}: {len(missing)} orders missing")
        if res.duplicates:
            problems.append(f"{service}: {res.duplicates} duplicates")
        if res.timed_out or code != 0:
            problems.append(f"{service}: worker exited {code}")
    print("-" * 78)

    if problems:
        print(f"FAILED: not every group got every order exactly once ({'; '.join(problems)})")
        return False
    print(f"OK: each of the {len(SERVICES)} groups got all {len(orders)} orders exactly once.")
    return True


def run_parent(count: int, base: Path) -> int:
    orders = make_orders(count)
    url = f"native://{base / 'log'}"
    print(f"polybus order workflow on {url}")

    with polybus.connect(url) as bus:
        # Declaring the groups before publishing makes each one durable from offset 0:
        # a service that starts late (or restarts) still gets every order.
        bus.declare(TOPIC, partitions=PARTITIONS, groups=list(SERVICES))
        print(f"declared topic {TOPIC!r}: {PARTITIONS} partitions, groups {', '.join(SERVICES)}")

        procs = start_workers(base, expect=len(orders))
        try:
            per_partition = [0] * PARTITIONS
            for order in orders:
                receipt = bus.publish(
                    TOPIC, order, key=order["customer"], headers={"source": "shop"}
                )
                per_partition[receipt.partition] += 1
            spread = " ".join(f"p{p}={n}" for p, n in enumerate(per_partition))
            print(f"published {len(orders)} orders, keyed by customer: {spread}", flush=True)
        except BaseException:
            for proc in procs.values():
                proc.kill()
            raise

    codes = wait_for(procs)
    ok = summarize(orders, codes, base)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--worker", choices=SERVICES, help="run as this service (internal)")
    parser.add_argument("--dir", type=Path, help="data directory (default: a fresh temp dir)")
    parser.add_argument("--expect", type=int, default=0, help="orders a worker waits for")
    parser.add_argument("--orders", type=int, default=30, help="how many orders to publish")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir for inspection")
    args = parser.parse_args(argv)

    if args.worker:
        if args.dir is None or args.expect <= 0:
            parser.error("--worker needs --dir and --expect")
        return run_worker(args.worker, args.dir, args.expect)

    if args.dir is not None:  # a named directory is wiped, so every run starts clean
        base: Path = args.dir.resolve()
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
    else:
        base = Path(tempfile.mkdtemp(prefix="polybus-demo-"))
    (base / "results").mkdir()
    try:
        return run_parent(args.orders, base)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"data kept in {base}")


if __name__ == "__main__":
    sys.exit(main())
