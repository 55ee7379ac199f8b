"""Middleware: hooks around what a bus and its workers do, for tracing, metrics and
logs of one's own (``polybus.otel`` is built on them).

>>> class Timing(Middleware):
...     def process(self, delivery, call_next):
...         start = time.perf_counter()
...         try:
...             return call_next(delivery)
...         finally:
...             print(delivery.topic, time.perf_counter() - start)
>>> bus = polybus.connect(url, middleware=[Timing()])

A middleware overrides the hooks it needs; the others cost nothing. The
*wrapping* hooks (:meth:`~Middleware.publish`, :meth:`~Middleware.process`)
get the operation as ``call_next`` and return its result: ``middleware=[a, b]``
runs ``a`` around ``b`` around the operation, so ``a`` sees it first and last.
The *notifications* (:meth:`~Middleware.received`, :meth:`~Middleware.failed`,
:meth:`~Middleware.retrying`, :meth:`~Middleware.dead_lettered`) are called in
list order after the fact. :meth:`~Middleware.attach` tells a middleware which
bus it was added to, for one that depends on the backend (its wire protocol,
its capabilities).

No middleware loses a message:

- a ``publish`` hook that raises fails the publish as the backend would (the
  caller gets the error; if it raised after ``call_next`` the records were
  stored, and a caller that publishes again stores them twice, at-least-once);
- a ``process`` hook that raises is a failure of the handler: the message is
  retried or dead-lettered by the worker's policy (when the handler itself
  fails, the worker routes the message inside the hooks, so ``call_next``
  returns; the hooks learn of it through :meth:`~Middleware.failed`);
- a notification that raises is logged and ignored.

Every publish goes through ``publish``: ``Bus.publish``/``publish_many``, the
records patterns forward (retries, dead letters, replies, a handler's
outputs) and those a transaction stages (``call_next`` then returns no
receipts: they exist only at commit). A request of :mod:`~polybus.patterns.request_reply`
is a publish, its answer a delivery the requester receives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from .message import Delivery
from .types import BusStats, Capability, OutRecord, Receipt

__all__ = [
    "Host",
    "Middleware",
    "ProcessNext",
    "PublishNext",
    "notify",
    "process_chain",
    "publish_chain",
]

log = logging.getLogger("polybus.middleware")

PublishNext = Callable[[str, Sequence[OutRecord]], list[Receipt]]
ProcessNext = Callable[[Delivery], Any]


class Host(Protocol):
    """What a middleware may read of the bus it is added to (a :class:`polybus.Bus`)."""

    @property
    def capabilities(self) -> Capability: ...

    @property
    def wire_protocol(self) -> str: ...

    def stats(
        self,
        topics: Collection[str] | None = None,
        groups: Collection[str] | None = None,
        *,
        timeout: float = 5.0,
    ) -> BusStats: ...


class Middleware:
    """The hooks; each default only calls on. Subclass and override what you need."""

    def attach(self, bus: Host) -> None:
        """Called once per bus this middleware is added to, before any other hook runs
        for that bus. Raise ConfigurationError to refuse a bus (it is then not added)."""

    def publish(
        self, topic: str, records: Sequence[OutRecord], call_next: PublishNext
    ) -> list[Receipt]:
        """Around every publish of ``records`` (envelope in their headers) to ``topic``.
        Call ``call_next(topic, records)`` once, with these records or changed copies
        (``record._replace(headers=...)``), and return what it returns."""
        return call_next(topic, records)

    def received(self, deliveries: list[Delivery]) -> None:
        """After a subscriber fetched ``deliveries`` (never called with none); each
        knows its ``topic``, ``group``, ``partition`` and ``offset``."""

    def process(self, delivery: Delivery, call_next: ProcessNext) -> Any:
        """Around a worker's try at ``delivery``: the handler, the publishing of its
        outputs and the ack, or, when the handler fails, its retry or dead letter
        (``call_next`` returns either way). Return what ``call_next(delivery)``
        returns; an exception raised here is a failure of the handler."""
        return call_next(delivery)

    def failed(self, delivery: Delivery, error: BaseException) -> None:
        """A worker's handler (or a process hook) raised ``error`` for ``delivery``;
        called before the message is retried, dead-lettered or dropped, inside the
        process hooks when the handler raised."""

    def retrying(self, delivery: Delivery, error: BaseException, delay: float) -> None:
        """A worker scheduled ``delivery`` to be tried again in ``delay`` seconds."""

    def dead_lettered(self, delivery: Delivery, error: BaseException, reason: str) -> None:
        """A worker gave up on ``delivery`` (``reason``: exhausted, not-retryable,
        undecodable) and published it to the dead-letter topic."""


def _overrides(middleware: Middleware, hook: str) -> bool:
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)


def publish_chain(middleware: Sequence[Middleware], publish: PublishNext) -> PublishNext:
    """``publish`` wrapped by every middleware's ``publish`` hook, the first outermost;
    ``publish`` itself when none overrides it (no cost on the hot path)."""
    chain = publish
    for m in reversed([m for m in middleware if _overrides(m, "publish")]):
        chain = _wrap_publish(m, chain)
    return chain


def _wrap_publish(middleware: Middleware, call_next: PublishNext) -> PublishNext:
    def publish(topic: str, records: Sequence[OutRecord]) -> list[Receipt]:
        return middleware.publish(topic, records, call_next)

    return publish


def process_chain(middleware: Sequence[Middleware], process: ProcessNext) -> ProcessNext:
    """``process`` wrapped by every middleware's ``process`` hook, the first outermost."""
    chain = process
    for m in reversed([m for m in middleware if _overrides(m, "process")]):
        chain = _wrap_process(m, chain)
    return chain


def _wrap_process(middleware: Middleware, call_next: ProcessNext) -> ProcessNext:
    def process(delivery: Delivery) -> Any:
        return middleware.process(delivery, call_next)

    return process


def notify(middleware: Sequence[Middleware], hook: str, *args: Any) -> None:
    """Call notification ``hook`` of every middleware that has it, in order; one that
    raises is logged and the rest still run (a notification never fails the work)."""
    for m in middleware:
        if _overrides(m, hook):
            try:
                getattr(m, hook)(*args)
            except Exception:
                log.exception("middleware %s failed in %s", type(m).__name__, hook)
