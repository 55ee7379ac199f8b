"""A service behind the edge: ships an order only for the user the edge vouched for.

It shares no session store with the edge: who the user is comes with the order,
as a token the edge signed for that message. A forged, expired or moved one
raises ContextRefused, which the worker dead-letters at once.
"""

from __future__ import annotations

import sys

from polybus import Delivery
from polybus.patterns.worker import App, Output, Worker
from polybus.sessions import HMACKey, Keyring, Tokens, UserContext


def main(url: str, namespace: str, secret_hex: str) -> None:
    # HMAC shares the edge's secret; with Ed25519 keys a service would hold the public key only
    keys = Keyring(HMACKey("edge", bytes.fromhex(secret_hex)))
    context = UserContext(Tokens(keys, issuer="edge", audience="services", ttl=60))
    app = App(url)

    @app.consumer(f"{namespace}.orders", group="shipping")
    def ship(d: Delivery) -> Output:
        user = context.verify(d)["sub"]  # before acting
        return Output(f"{namespace}.shipped", {"order": d.message.id, "user": user})

    Worker(app).run()


if __name__ == "__main__":
    main(*sys.argv[1:4])
