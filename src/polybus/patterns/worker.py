"""Handlers and the workers that run them: retries, dead letters, guarantees, graceful stop.

>>> app = App()
>>> @app.consumer("orders", group="billing", retry=RetryPolicy(max_attempts=3))
... def bill(delivery):
...     charge(delivery.message.value)

``Worker(app, "native:///var/lib/app/bus").run()`` (or ``polybus worker
module:app``) runs every handler until SIGTERM or SIGINT, then stops
gracefully: it takes no new messages, lets the handlers finish what they
started (up to ``stop_timeout``), commits and leaves the groups.

A handler takes a :class:`~polybus.Delivery`; settling it is the worker's job.
It may return an :class:`Output` (or a list of them) to publish as a
consequence of the message; any other return value is ignored. Each output's
id is derived from the input's id and position, so a handler run twice for
one input publishes the same ids twice, which an inbox downstream drops.

Delivery guarantees, per consumer:

- ``at-least-once`` (default): the message is acked after the handler and its
  outputs succeeded; a crash before that delivers it again.
- ``at-most-once``: the batch is acked and committed before the handlers run;
  a failure goes to the dead-letter topic (if enabled), never to a retry.
- ``exactly-once``: at-least-once delivery, with either an ``inbox`` (the
  handler's effects happen once where the inbox's entry and the effects commit
  together: an SQL inbox; otherwise once per successful run) or
  ``transactional=True`` on a backend with transactions, where outputs,
  retries and the input's ack commit atomically.
"""

from __future__ import annotations

import http.server
import inspect
import itertools
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..bus import Bus, connect
from ..errors import (
    BrokerUnreachable,
    ConfigurationError,
)
from ..middleware import Middleware
from .consumer import (
    Consumer,
    Guarantee,
    Handler,
    Invoke,
    Output,
    _check_settings,
    call_handler,
)
from .request_reply import reply_topic, responder
from .retry import NO_RETRY

__all__ = ["App", "Consumer", "Guarantee", "Output", "Worker"]

log = logging.getLogger("polybus.worker")
_RECONNECT_PAUSE = 3.0  # seconds between a worker's tries to reach a broker that did not answer

# -- apps and workers ---------------------------------------------------------------


@dataclass
class _Registration:
    topic: str
    handler: Handler
    options: dict[str, Any]
    reply_topic: str | None = None  #: where a responder's replies go; None for a consumer


_CONSUMER = inspect.signature(Consumer)


def _check_options(options: dict[str, Any]) -> None:
    """``options`` of a registration, checked when it is made rather than when a worker
    starts: unknown names and settings that cannot work raise ConfigurationError."""
    try:
        bound = _CONSUMER.bind_partial(None, "", None, **options)  # bus, topic, handler
    except TypeError as exc:
        known = sorted(set(_CONSUMER.parameters) - {"bus", "topic", "handler"})
        raise ConfigurationError(f"{exc}; the options are {', '.join(known)}") from None
    settings = {n: p.default for n, p in _CONSUMER.parameters.items()} | bound.arguments
    _check_settings(
        settings["guarantee"],
        settings["inbox"],
        settings["transactional"],
        settings["concurrency"],
        settings["strict_order"],
        settings["batch"],
        settings["max_held"],
    )


class App:
    """A set of handlers, registered with :meth:`consumer`; run by a :class:`Worker`.

    ``url`` is the bus a worker connects to when it is given none; ``middleware``
    (:mod:`polybus.middleware`) is added to the bus a worker runs the app on.
    """

    def __init__(self, url: str | None = None, *, middleware: Sequence[Middleware] = ()) -> None:
        self.url = url
        self.middleware = tuple(middleware)
        self.registrations: list[_Registration] = []

    def consumer(
        self, topic: str, *, group: str | None = None, **options: Any
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function as the handler of ``topic`` for ``group``
        (default: the function's name). ``options`` are :class:`Consumer`'s."""

        _check_options(options)

        def register(handler: Handler) -> Handler:
            self.registrations.append(
                _Registration(topic, handler, {"group": group or handler.__name__, **options})
            )
            return handler

        return register

    def responder(
        self, topic: str, *, group: str = "responders", **options: Any
    ) -> Callable[[Handler], Handler]:
        """Register the decorated function (sync or async) as the responder of requests
        on ``topic``: its return value, or the exception it raises, is the reply.
        ``options`` are :class:`Consumer`'s (no retries: a failure is the reply)."""
        _check_options(options)

        def register(handler: Handler) -> Handler:
            self.registrations.append(
                _Registration(
                    topic,
                    responder(handler),
                    {"group": group, "retry": NO_RETRY, "dead_letters": False, **options},
                    reply_topic(topic),
                )
            )
            return handler

        return register

    def run(self, url: str | None = None, **options: Any) -> None:
        """Run every handler in this process until SIGTERM or SIGINT (see :class:`Worker`)."""
        Worker(self, url, **options).run()


class Worker:
    """Runs an :class:`App`'s consumers, one polling thread each, until stopped.

    ``bus`` is a :class:`Bus`, a URL, or None for the app's URL. ``stop_timeout``
    bounds how long :meth:`stop` waits for running handlers.
    """

    def __init__(
        self,
        app: App,
        bus: Bus | str | None = None,
        *,
        stop_timeout: float = 30.0,
        invoke: Invoke = call_handler,
    ) -> None:
        target = bus if bus is not None else app.url
        if target is None:
            raise ConfigurationError("no bus to run on: pass a Bus or URL, or App(url=...)")
        self._own_bus = not isinstance(target, Bus)
        self._target = target
        self._registrations = app.registrations
        self._middleware = app.middleware
        self._invoke = invoke
        self.stop_timeout = stop_timeout
        self.bus: Bus | None = None
        self.consumers: list[Consumer] = []
        self.unreachable: str | None = None  #: why the broker did not answer yet, if it did not
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._health: http.server.ThreadingHTTPServer | None = None
        self.stopped = threading.Event()
        try:
            self._connect()
        except BrokerUnreachable as exc:  # start() raises it again; run() waits for the broker
            self.unreachable = str(exc)

    def _connect(self) -> None:
        bus = connect(self._target) if isinstance(self._target, str) else self._target
        bus.use(*(m for m in self._middleware if m not in bus.middleware))
        self.consumers = [
            Consumer(bus, r.topic, r.handler, invoke=self._invoke, **r.options)
            for r in self._registrations
        ]
        self.bus, self.unreachable = bus, None

    def start(self) -> Worker:
        """Subscribe every consumer and start polling; returns at once. Idempotent.

        Raises BrokerUnreachable when the broker still does not answer."""
        if self.bus is None:
            self._connect()
        if self._threads:
            return self
        for consumer in self.consumers:
            consumer.start()
            thread = threading.Thread(
                target=self._poll, args=(consumer,), name=f"polybus-{consumer.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def _poll(self, consumer: Consumer) -> None:
        try:
            consumer.run(self._stop)
        except Exception:
            log.exception("consumer %s stopped", consumer.name)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop polling, let running handlers finish, commit, leave the groups, close.

        Returns False if some handler was still running at the deadline. Idempotent.
        """
        timeout = self.stop_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._stop.set()
        for consumer in self.consumers:
            consumer._stopping = True  # start no more handlers
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        clean = all(c.stop(max(0.0, deadline - time.monotonic())) for c in self.consumers)
        if self._health is not None:
            self._health.shutdown()
            self._health.server_close()
            self._health = None
        if self._own_bus and self.bus is not None:
            self.bus.close()
        self.stopped.set()
        return clean

    def run(self, *, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Start, block until one of ``signals`` arrives (or :meth:`stop`), then stop.
        A broker that does not answer yet is tried again until it does.

        Call it from the main thread, the only one Python lets handle signals; from any
        other, use :meth:`start` and :meth:`stop`."""
        if threading.current_thread() is not threading.main_thread():
            raise ConfigurationError(
                "Worker.run() handles SIGTERM and SIGINT, which only the main thread can: "
                "call it there, or use worker.start() and worker.stop() from this thread"
            )
        previous = {s: signal.signal(s, lambda *_: self._stop.set()) for s in signals}
        try:
            while not self._stop.is_set():
                try:
                    self.start()
                    break
                except BrokerUnreachable as exc:  # health answers 503 meanwhile
                    self.unreachable = str(exc)
                    log.warning("%s; trying again", exc)
                    self._stop.wait(_RECONNECT_PAUSE)
            while not self._stop.wait(0.5):
                pass
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.stop()

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "failing" | "unreachable" | "stopped", "consumers": {name:
        stats}}``, with the ``reason`` when the broker has not answered yet.

        A consumer fails its check when its polling thread died or has not
        polled for ``2 * session_timeout`` seconds (a handler stuck that long).
        """
        if self.bus is None:
            status = "stopped" if self._stop.is_set() else "unreachable"
            return {"status": status, "reason": self.unreachable, "consumers": {}}
        now = time.monotonic()
        consumers = {}
        healthy = True
        for consumer, thread in itertools.zip_longest(self.consumers, self._threads):
            s = consumer.stats
            alive = thread is not None and thread.is_alive()
            fresh = now - s.last_poll < 2 * consumer.session_timeout
            healthy = healthy and alive and fresh
            consumers[consumer.name] = {
                "alive": alive,
                "seconds_since_poll": round(now - s.last_poll, 3),
                "processed": s.processed,
                "failed": s.failed,
                "retried": s.retried,
                "dead_lettered": s.dead_lettered,
                "duplicates": s.duplicates,
                "last_error": s.last_error,
            }
        status = "stopped" if self._stop.is_set() else "ok" if healthy else "failing"
        return {"status": status, "consumers": consumers}

    def serve_health(self, port: int, host: str = "127.0.0.1") -> int:
        """Answer ``GET /health`` on ``host:port`` (200 when ok, else 503) from a thread;
        returns the port (useful with ``port=0``). Stopped by :meth:`stop`.

        ``GET /metrics`` answers with what ``prometheus_client`` holds, in Prometheus's
        text format: the metrics of an OpenTelemetry SDK given a ``PrometheusMetricReader``
        (``pip install polybus[prometheus]``; see :mod:`polybus.otel.metrics`); 404,
        saying so, without that package."""
        worker = self

        class HealthHandler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the http.server API
                path = self.path.rstrip("/")
                if path == "/metrics":
                    self._reply(*_prometheus_text())
                elif path in ("/health", "/healthz"):
                    report = worker.health()
                    status = 200 if report["status"] == "ok" else 503
                    self._reply(status, "application/json", json.dumps(report).encode())
                else:
                    self.send_error(404)

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health: " + format, *args)

        self._health = http.server.ThreadingHTTPServer((host, port), HealthHandler)
        threading.Thread(target=self._health.serve_forever, daemon=True).start()
        return int(self._health.server_address[1])


def _prometheus_text() -> tuple[int, str, bytes]:
    """(status, content type, body) of ``GET /metrics``."""
    try:
        import prometheus_client
    except ImportError:
        return (
            404,
            "text/plain; charset=utf-8",
            b"no metrics here: pip install polybus[prometheus], then give the OpenTelemetry "
            b"SDK's MeterProvider a PrometheusMetricReader()\n",
        )
    # generate_latest() writes the classic text format, version 0.0.4, whatever the version
    # of prometheus_client (whose CONTENT_TYPE_LATEST has moved on to 1.0.0)
    return 200, "text/plain; version=0.0.4; charset=utf-8", prometheus_client.generate_latest()
