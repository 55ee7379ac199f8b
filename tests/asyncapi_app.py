"""The App tests/test_asyncapi.py documents: a typed consumer (a pydantic model with a
nested model and a discriminated union) with retries and dead letters, an untyped
at-most-once consumer, and a responder."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from polybus.message import Delivery
from polybus.patterns import App, RetryPolicy


class Line(BaseModel):
    sku: str
    quantity: int = Field(ge=1)


class Card(BaseModel):
    kind: Literal["card"] = "card"
    last4: str


class Transfer(BaseModel):
    kind: Literal["transfer"] = "transfer"
    iban: str


class Order(BaseModel):
    id: int
    lines: list[Line]
    payment: Annotated[Card | Transfer, Field(discriminator="kind")]


app = App("native:///var/lib/shop/bus")


@app.consumer("orders", group="billing", model=Order, retry=RetryPolicy(max_attempts=3))
def bill(delivery: Delivery) -> None:
    """Charge the order's payment.

    Declined cards go to the dead letters."""


@app.consumer("orders", group="audit", guarantee="at-most-once")
def audit(delivery: Delivery) -> None:
    """Keep a copy of every order."""


@app.responder("prices")
def price(delivery: Delivery) -> dict[str, int]:
    """The price of a SKU, in cents."""
    return {"cents": 1999}
