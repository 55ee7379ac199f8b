"""The city: riders and drivers as events keyed by zone, and the ledger of the answers.

The city keeps ``WAITING`` riders waiting in every zone: each answer on ``matches``
brings the next rider of that zone, so every partition always has work and the
group's speed, not the city's, sets the pace. A booked driver offers a ride again
(a new offer, at the drop-off) as soon as the city hears of the booking.

The ledger checks every answer as it arrives:

- each rider's request is decided once: a copy delivered again must carry the same
  decision (same driver, same offer) as the first;
- a driver's offer is booked at most once (no driver is sent to two riders);
- the answers of a zone come in the order its riders asked (``seq``); breaks are
  counted per zone, and it is for the caller to say whether they are allowed.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from polybus import Message

# Three zones on each of the 4 partitions, with the native (and Redis) partitioner and
# with Kafka's: a partition without a zone would leave its member idle whatever happens.
ZONES = (
    "airport",
    "beach",
    "canal",
    "castle",
    "hospital",
    "market",
    "museum",
    "old-town",
    "orchard",
    "south-end",
    "stadium",
    "university",
)
QUIET_ZONES = ("castle", "orchard")  # two drivers for six riders: some get none
DRIVERS_PER_ZONE = 8
WAITING = 6  # riders waiting in each zone at any time
ZONE_KM = 4.0  # a zone is a square of this side


class City:
    """The events the matchers consume, and the ledger of what they answered."""

    def __init__(self, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._seq: Counter[str] = Counter()  #: riders so far, per zone
        self._offers: Counter[str] = Counter()  #: offers so far, per driver
        self.sent: dict[str, float] = {}  #: request id -> time.monotonic() when it was made
        self.answers: dict[str, dict[str, Any]] = {}  #: request id -> its first answer
        self.matched = 0  #: riders given a driver
        self.copies = 0  #: answers delivered again (identical ones)
        self.booked: set[tuple[str, int]] = set()  #: (driver, offer) pairs booked
        self.decided_twice: list[str] = []  #: requests whose copies disagree
        self.booked_twice: list[str] = []  #: offers given to two riders
        self.strangers: list[str] = []  #: answers to requests nobody made
        self.out_of_order: Counter[str] = Counter()  #: per zone
        self._last_seq: Counter[str] = Counter()  #: per zone, the last answered rider
        self.open = True  #: whether an answer brings the zone's next rider

    def _where(self) -> dict[str, float]:
        return {
            "x": round(self._rng.uniform(0, ZONE_KM), 3),
            "y": round(self._rng.uniform(0, ZONE_KM), 3),
        }

    def rider(self, zone: str) -> Message:
        """The next rider of ``zone`` asking for a ride."""
        self._seq[zone] += 1
        seq = self._seq[zone]
        request = f"{zone}/{seq}"
        self.sent[request] = time.monotonic()
        value = {"kind": "request", "request": request, "zone": zone, "seq": seq, **self._where()}
        return Message(value, key=zone)

    def driver(self, driver: str, zone: str) -> Message:
        """``driver`` offering a ride in ``zone`` (free, at a new position)."""
        self._offers[driver] += 1
        value = {"kind": "driver", "driver": driver, "zone": zone, "offer": self._offers[driver]}
        return Message(value | self._where(), key=zone)

    def fleet(self) -> list[Message]:
        """Every zone's drivers, each offering a first ride."""
        return [
            self.driver(f"{zone}-{n}", zone)
            for zone in ZONES
            for n in range(1, 1 + (2 if zone in QUIET_ZONES else DRIVERS_PER_ZONE))
        ]

    def first_riders(self) -> list[Message]:
        """``WAITING`` riders in every zone."""
        return [self.rider(zone) for _ in range(WAITING) for zone in ZONES]

    def answered(self, answer: dict[str, Any]) -> list[Message] | None:
        """Check an answer; the events it brings (the zone's next rider, the driver's next
        offer), or None when it is a copy of an answer already in."""
        request = answer["request"]
        first = self.answers.get(request)
        if first is not None:
            self.copies += 1
            if (first["driver"], first["offer"]) != (answer["driver"], answer["offer"]):
                self.decided_twice.append(
                    f"{request}: {first['driver']} (offer {first['offer']}) by"
                    f" {first['matcher']}, then {answer['driver']} (offer {answer['offer']})"
                    f" by {answer['matcher']}"
                )
            return None
        if request not in self.sent:
            self.strangers.append(request)
            return None
        self.answers[request] = answer
        zone = answer["zone"]
        if answer["seq"] < self._last_seq[zone]:
            self.out_of_order[zone] += 1
        self._last_seq[zone] = max(self._last_seq[zone], answer["seq"])
        events = [self.rider(zone)] if self.open else []
        if answer["driver"] is not None:
            self.matched += 1
            booking = (answer["driver"], answer["offer"])
            if booking in self.booked:
                self.booked_twice.append(f"{answer['driver']} offer {answer['offer']}")
            self.booked.add(booking)
            events.append(self.driver(answer["driver"], zone))
        return events

    def problems(self) -> list[str]:
        """What the ledger found wrong, one line per kind, with the first case."""
        kinds = (
            ("requests decided twice", self.decided_twice),
            ("driver offers booked twice", self.booked_twice),
            ("answers to requests nobody made", self.strangers),
        )
        return [f"{len(cases)} {kind}, e.g. {cases[0]}" for kind, cases in kinds if cases]

    @property
    def waiting(self) -> int:
        """Riders with no answer yet."""
        return len(self.sent) - len(self.answers)
