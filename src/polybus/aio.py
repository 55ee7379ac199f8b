"""asyncio: the same bus, with the same semantics, that never blocks the event loop.

>>> async def main():
...     async with await polybus.aio.connect("native:///var/lib/app/bus") as bus:
...         await bus.publish("orders", {"id": 1})
...         async with await bus.subscribe("orders", "billing") as sub:
...             async for delivery in sub:
...                 delivery.ack()

The client libraries underneath are synchronous, so every call that may wait
(on the network, a lock or a timeout) runs on a thread of the bus's own pool
and the coroutine awaits it. Settling a delivery (``ack``/``nack``) only
queues the acknowledgement and may be called on the loop. Handlers of an
:class:`AsyncWorker` may be coroutines: they run on the loop that started the
worker, while fetching and settling run on threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from .bus import Bus, Subscriber
from .bus import connect as connect_sync
from .errors import ClosedError
from .message import Delivery, Message
from .patterns.consumer import Handler
from .patterns.request_reply import Requester
from .patterns.worker import App, Worker
from .types import Capability, Receipt

__all__ = ["AsyncBus", "AsyncSubscriber", "AsyncWorker", "connect"]

P = ParamSpec("P")
T = TypeVar("T")


async def connect(url: str | object, *, max_threads: int = 32, **options: Any) -> AsyncBus:
    """Connect as :func:`polybus.connect` does, without blocking the loop."""
    pool = ThreadPoolExecutor(max_threads, thread_name_prefix="polybus-aio")
    try:
        loop = asyncio.get_running_loop()
        bus = await loop.run_in_executor(pool, functools.partial(connect_sync, url, **options))
    except BaseException:
        pool.shutdown(wait=False)
        raise
    return AsyncBus(bus, pool)


class AsyncBus:
    """An asyncio face of :class:`~polybus.Bus`; every method has the Bus's contract."""

    def __init__(self, bus: Bus, pool: ThreadPoolExecutor | None = None) -> None:
        self.bus = bus
        self._pool = pool or ThreadPoolExecutor(32, thread_name_prefix="polybus-aio")
        self._requesters: dict[str, Requester] = {}
        self._requesters_lock = asyncio.Lock()

    @property
    def capabilities(self) -> Capability:
        return self.bus.capabilities

    async def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        # in the caller's context (as asyncio.to_thread), so that middleware sees the
        # coroutine's context variables: its current trace span, for one
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._pool, call)

    async def declare(self, topic: str, **options: Any) -> None:
        await self._run(self.bus.declare, topic, **options)

    async def publish(self, topic: str, value: Any, **options: Any) -> Receipt:
        return await self._run(self.bus.publish, topic, value, **options)

    async def publish_many(
        self, topic: str, messages: Iterable[Message | Any], **options: Any
    ) -> list[Receipt]:
        return await self._run(self.bus.publish_many, topic, list(messages), **options)

    async def tombstone(self, topic: str, key: str | bytes, **options: Any) -> Receipt:
        return await self._run(self.bus.tombstone, topic, key, **options)

    async def subscribe(
        self, topic: str, group: str | None = None, **options: Any
    ) -> AsyncSubscriber:
        sub = await self._run(self.bus.subscribe, topic, group, **options)
        return AsyncSubscriber(self, sub)

    async def request(
        self, topic: str, value: Any, *, timeout: float = 30.0, **options: Any
    ) -> Message:
        """Send a request to ``topic`` and await its reply (see
        :class:`~polybus.patterns.request_reply.Requester`). Raises RequestTimeout,
        RemoteError. One requester per topic is kept and closed with the bus."""
        requester = self._requesters.get(topic)
        if requester is None:
            async with self._requesters_lock:  # one per topic, however many ask at once
                requester = self._requesters.get(topic)
                if requester is None:
                    requester = await self._run(Requester, self.bus, topic, timeout=timeout)
                    self._requesters[topic] = requester
        future = await self._run(requester.submit, value, timeout=timeout, **options)
        return await asyncio.wrap_future(future)

    async def close(self) -> None:
        """Close the requesters, subscribers and the bus; idempotent."""
        requesters, self._requesters = self._requesters, {}
        for requester in requesters.values():
            await self._run(requester.close)
        await self._run(self.bus.close)
        self._pool.shutdown(wait=False)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSubscriber:
    """An asyncio face of :class:`~polybus.Subscriber`; iterate it with ``async for``."""

    def __init__(self, bus: AsyncBus, subscriber: Subscriber) -> None:
        self._bus = bus
        self.subscriber = subscriber

    @property
    def group(self) -> str | None:
        return self.subscriber.group

    async def fetch(self, max_messages: int = 100, timeout: float = 1.0) -> list[Delivery]:
        return await self._bus._run(self.subscriber.fetch, max_messages, timeout)

    async def __aiter__(self) -> AsyncIterator[Delivery]:
        """Yield deliveries until the subscriber is closed."""
        while True:
            try:
                batch = await self.fetch(100, 0.5)
            except ClosedError:
                return
            for d in batch:
                yield d

    def ack(self, deliveries: Iterable[Delivery]) -> None:
        self.subscriber.ack(deliveries)

    def nack(self, deliveries: Iterable[Delivery], *, requeue: bool = True) -> None:
        self.subscriber.nack(deliveries, requeue=requeue)

    async def commit(self) -> None:
        await self._bus._run(self.subscriber.commit)

    async def seek(self, partition: int, **where: Any) -> None:
        await self._bus._run(self.subscriber.seek, partition, **where)

    async def lag(self) -> dict[int, int]:
        return await self._bus._run(self.subscriber.lag)

    async def close(self) -> None:
        await self._bus._run(self.subscriber.close)

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncWorker:
    """Runs an :class:`~polybus.patterns.worker.App` whose handlers may be coroutines.

    A coroutine handler runs on the event loop that called :meth:`start`; a
    plain function runs on the consumer's thread, so neither blocks the loop.
    """

    def __init__(self, app: App, bus: AsyncBus, **options: Any) -> None:
        self._app = app
        self._bus = bus
        self._options = options
        self.worker: Worker | None = None

    async def start(self) -> AsyncWorker:
        loop = asyncio.get_running_loop()

        def invoke(handler: Handler, delivery: Delivery) -> Any:
            if inspect.iscoroutinefunction(handler):
                # the task runs in a copy of this thread's context (call_soon_threadsafe's),
                # so the coroutine sees what the middleware's process hooks set
                return asyncio.run_coroutine_threadsafe(handler(delivery), loop).result()
            return handler(delivery)

        self.worker = Worker(self._app, self._bus.bus, invoke=invoke, **self._options)
        await self._bus._run(self.worker.start)
        return self

    async def stop(self, timeout: float | None = None) -> bool:
        """See :meth:`Worker.stop`; coroutine handlers keep running on the loop meanwhile."""
        if self.worker is None:
            return True
        return await self._bus._run(self.worker.stop, timeout)

    def health(self) -> dict[str, Any]:
        return (
            {"status": "stopped", "consumers": {}} if self.worker is None else self.worker.health()
        )

    async def __aenter__(self) -> AsyncWorker:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
